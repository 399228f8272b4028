# The denoising loop of Flow-GRPO's flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py, without the text
# encoders and the VAE: it calls the step the way the pipeline does (velocity and latents upcast, the timestep as a
# length-1 tensor, `noise_level` passed through; evaluation calls it with noise_level=0) and collects the latents
# and log-probs. `transformer(latents, timestep)` stands in for the SD3 transformer with guidance applied.
import torch

from .sd3_sde_with_logprob import sde_step_with_logprob


@torch.no_grad()
def pipeline_with_logprob(self, latents, num_inference_steps=10, noise_level=0.7):
    self.scheduler.set_timesteps(num_inference_steps)
    all_latents = [latents]
    all_log_probs = []
    for t in self.scheduler.timesteps:
        noise_pred = self.transformer(latents, t.expand(latents.shape[0]))
        latents_dtype = latents.dtype
        latents, log_prob, prev_latents_mean, std_dev_t = sde_step_with_logprob(
            self.scheduler,
            noise_pred.float(),
            t.unsqueeze(0),
            latents.float(),
            noise_level=noise_level,
        )
        all_latents.append(latents)
        all_log_probs.append(log_prob)
        if latents.dtype != latents_dtype:
            latents = latents.to(latents_dtype)
    return latents, all_latents, all_log_probs
