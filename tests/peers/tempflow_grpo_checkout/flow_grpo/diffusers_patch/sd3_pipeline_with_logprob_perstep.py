# The denoising loop of TempFlow-GRPO's flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_perstep.py, without the
# text encoders and the VAE: at each step i an ODE step (determistic=True) carries the main trajectory, an SDE step
# (determistic=False) draws 6 branches, and each branch is finished with ODE steps (the per-step process reward).
# Calls are made the way the pipeline makes them (velocity and latents upcast, the timestep as a length-1 tensor,
# no generator: the noise comes from torch's global RNG). `transformer(latents, timestep)` stands in for the SD3
# transformer with guidance applied.
import torch

from .sd3_sde_with_logprob_perstep import sde_step_with_logprob


@torch.no_grad()
def pipeline_with_logprob(self, latents, num_inference_steps=10):
    self.scheduler.set_timesteps(num_inference_steps)
    timesteps = self.scheduler.timesteps
    all_latents = [latents]
    all_sde_latents = []
    all_log_probs = []
    all_branch_ends = []
    for i, t in enumerate(timesteps[:-1]):
        noise_pred = self.transformer(latents, t.expand(latents.shape[0]))
        latents_dtype = latents.dtype
        ode_latents, _, _, _ = sde_step_with_logprob(
            self.scheduler, noise_pred.float(), t.unsqueeze(0), latents.float(), determistic=True
        )
        sde_latents, log_prob, prev_latents_mean, std_dev_t = sde_step_with_logprob(
            self.scheduler, noise_pred.float(), t.unsqueeze(0), latents.float(), determistic=False
        )
        latents = ode_latents
        all_latents.append(latents)
        all_sde_latents.append(sde_latents)
        all_log_probs.append(log_prob)
        if latents.dtype != latents_dtype:
            latents = latents.to(latents_dtype)
        inner_latents = sde_latents.clone()
        for inner_t in timesteps[i + 1 :]:
            noise_pred = self.transformer(inner_latents, inner_t.expand(inner_latents.shape[0]))
            inner_latents, _, _, _ = sde_step_with_logprob(
                self.scheduler, noise_pred.float(), inner_t.unsqueeze(0), inner_latents.float(), determistic=True
            )
        all_branch_ends.append(inner_latents)
    return latents, all_latents, all_sde_latents, all_log_probs, all_branch_ends
