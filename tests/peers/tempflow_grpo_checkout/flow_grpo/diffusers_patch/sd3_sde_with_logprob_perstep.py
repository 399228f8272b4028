# Test copy of TempFlow-GRPO's flow_grpo/diffusers_patch/sd3_sde_with_logprob_perstep.py: the per-step function
# with the same signature, expressions, order of operations and dtypes (no fp32 upcast; the noise is drawn in
# model_output's dtype; 6 branches per call; the 4th output is std_dev_t * sqrt(-dt)). Only the formatting and the
# imports differ.
import math

import torch

try:
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # the same draws (tests/test_compat.py::test_randn_tensor_is_diffusers)
    from tempflow.compat.flow_grpo import randn_tensor


def sde_step_with_logprob(
    self,
    model_output: torch.FloatTensor,
    timestep: float | torch.FloatTensor,
    sample: torch.FloatTensor,
    prev_sample: torch.FloatTensor | None = None,
    generator: torch.Generator | None = None,
    determistic: bool = False,
):
    step_index = [self.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    # flux
    sigma = self.sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = self.sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma

    std_dev_t = (
        torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * 0.7
    )  # In SD3.5-M, 0.7. In FLUX, 0.9

    # our sde
    prev_sample_mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )

    if prev_sample is not None and generator is not None:
        raise ValueError(
            "Cannot pass both generator and prev_sample. Please make sure that either `generator` or"
            " `prev_sample` stays `None`."
        )

    # No noise is added during evaluation
    if determistic:
        prev_sample = sample + dt * model_output
    else:
        num_samples = 6
        batch_size = sample.shape[0]

        prev_sample_mean = prev_sample_mean.repeat_interleave(num_samples, dim=0)

        noise_shape = [batch_size * num_samples] + list(model_output.shape[1:])
        variance_noise = randn_tensor(
            noise_shape,
            generator=generator,
            device=model_output.device,
            dtype=model_output.dtype,
        )
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise

    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    # mean along all but batch dimension
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))

    return prev_sample, log_prob, prev_sample_mean, std_dev_t * torch.sqrt(-1 * dt)
