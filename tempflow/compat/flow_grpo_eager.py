"""Flow-GRPO's ``sde_step_with_logprob`` written the way its authors wrote it: one ``index_for_timestep`` (and so one
``.item()``) per sample, every coefficient recomputed from ``sigmas`` in each call, expressions in their order.

This is the behaviour the drop-in :func:`tempflow.compat.flow_grpo.sde_step_with_logprob` must reproduce, and
the eager baseline the benchmarks time it against. Not meant for use: it is the slow original, kept as a spec."""

import math

import torch

from .flow_grpo import randn_tensor


def eager_sde_step_with_logprob(
    self,
    model_output,
    timestep,
    sample,
    noise_level=0.7,
    prev_sample=None,
    generator=None,
    sde_type="sde",
    return_sqrt_dt=False,
):
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()

    step_index = [self.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = self.sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = self.sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma

    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        if prev_sample is None:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
        log_prob = (
            -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
            - torch.log(std_dev_t * torch.sqrt(-1 * dt))
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )
    elif sde_type == "cps":
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
            sigma_prev**2 - std_dev_t**2
        )
        if prev_sample is None:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample_mean + std_dev_t * variance_noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)

    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if return_sqrt_dt:
        return prev_sample, log_prob, prev_sample_mean, std_dev_t, torch.sqrt(-1 * dt)
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


class EagerScheduler:
    """The two tensors Flow-GRPO's step reads from a diffusers scheduler (``sigmas``, ``timesteps``) and diffusers'
    per-value ``index_for_timestep``, over a :class:`tempflow.sde.TimeGrid`: lets benchmarks run the original
    without a diffusers scheduler object."""

    def __init__(self, grid):
        self.sigmas, self.timesteps = grid.sigmas, grid.timesteps

    def index_for_timestep(self, timestep):
        indices = (self.timesteps == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()
