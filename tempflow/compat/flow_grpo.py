"""Drop-in replacement for Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py).

Same signature, same return tuple and shapes, same numbers (to fp32 rounding) and, given the same ``generator``, the
same noise bit for bit; ``noise_level=0`` (Flow-GRPO's evaluation) is the deterministic Euler step, as in the
original. What differs is the cost: the step indices come from one vectorised comparison instead of one ``.item()``
per sample, the coefficients from a cached table, and the elementwise work from the fused kernels of
:mod:`tempflow.ops` (one pass for the sample, its log-prob and the mean; two when scoring a given sample).

Use it directly::

    from tempflow.compat.flow_grpo import sde_step_with_logprob

or swap it into an imported Flow-GRPO checkout without editing it::

    import flow_grpo.diffusers_patch.sd3_pipeline_with_logprob
    from tempflow.compat import flow_grpo as tf_compat
    tf_compat.patch()   # every module holding Flow-GRPO's function now holds ours

``patch()`` recognises Flow-GRPO's function by its signature and by its numbers on a tiny input
(:mod:`tempflow.compat._patch`), not by its package: TempFlow-GRPO's functions, in a package also named
``flow_grpo``, are left alone (see :mod:`tempflow.compat.tempflow_grpo`).
"""

from __future__ import annotations

import torch

from . import _core, _patch
from ._core import step_indices
from ._patch import Patch

__all__ = ["sde_step_with_logprob", "step_indices", "randn_tensor", "patch", "Patch"]

_SDE_TYPES = {"sde": "flow-grpo", "cps": "cps"}


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """diffusers' ``randn_tensor``: draws on the generator's device (a CPU generator draws on the CPU, then the
    result moves to ``device``); a list of generators draws one sample each. Same calls, same stream."""
    if isinstance(device, str):
        device = torch.device(device)
    rand_device = device
    batch_size = shape[0]
    layout = layout or torch.strided
    device = device or torch.device("cpu")
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, list) else generator.device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = "cpu"
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        one = (1, *tuple(shape)[1:])
        parts = [torch.randn(one, generator=g, device=rand_device, dtype=dtype, layout=layout) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype, layout=layout).to(device)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """What the kernels read as is (fp32, bf16, fp16: the maths is fp32 either way, as after Flow-GRPO's
    ``.float()``); anything else is upcast first."""
    return t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()


def sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_type: str = "sde",
    return_sqrt_dt: bool = False,
):
    """One SDE step of a flow-matching scheduler and the mean-reduced log-prob of its result, as Flow-GRPO.

    Args:
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps`` (anything with
            ``sigmas`` ``(T+1,)`` and ``timesteps`` ``(T,)`` tensors).
        model_output: velocity ``(B, ...)``, any float dtype (computed in fp32, as after Flow-GRPO's upcast).
        timestep: 1-D tensor of length 1 or B holding scheduler timestep values (``scheduler.timesteps[k]``).
        sample: the state ``x_t`` ``(B, ...)``.
        noise_level: ``a`` of ``sigma_t = a sqrt(t / (1 - t))`` (sde) or of ``sin(a pi / 2)`` (cps); 0 gives the
            deterministic step (Euler for sde) and a non-finite log-prob, as in Flow-GRPO's evaluation.
        prev_sample: score this ``x_next`` instead of drawing one (detached inside the log-prob).
        generator: as for diffusers' ``randn_tensor`` (noise drawn in fp32 with the velocity's shape; drawn also
            at ``noise_level=0``, so the generator advances as the original's does).
        sde_type: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving).
        return_sqrt_dt: also return ``sqrt(-dt)``.

    Returns:
        ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)`` and ``sqrt(-dt)`` when asked, fp32: ``log_prob``
        ``(B,)``; ``std_dev_t`` and ``sqrt(-dt)`` ``(n, 1, ..., 1)`` with ``n`` the timestep's length, as the
        original. For ``sde`` ``std_dev_t`` is ``sigma_t`` without the ``sqrt(-dt)`` factor; for ``cps`` it is
        ``t_next sin(a pi / 2)`` and ``log_prob = -mean (prev_sample - prev_sample_mean)^2``.
    """
    if sde_type not in _SDE_TYPES:
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    _core.check_inputs(model_output, sample)
    v, x = _fp32(model_output), _fp32(sample)
    if prev_sample is not None:
        prev_sample = prev_sample.float()
        if prev_sample.shape != sample.shape:
            raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} does not match {tuple(sample.shape)}")
    table = _core.table_for(scheduler, noise_level, _SDE_TYPES[sde_type], x.device)
    idx, rows = _core.steps(scheduler, timestep, x.shape[0], x.device)

    if prev_sample is None:
        noise = _core.draw_noise(
            model_output.shape, generator, model_output.device, torch.float32, randn_tensor, not _core.grad_needed(x, v)
        )
        prev_sample, log_prob, mean = _core.sample(x, v, noise, rows, table)
    else:
        mean = _core.mean(x, v, rows, table)
        log_prob = _core.score(x, v, prev_sample, rows, table)

    std_dev_t = _core.column(table.sigma, idx, x.dim())  # sigma_t; for cps the table's sigma is its std
    if return_sqrt_dt:
        return prev_sample, log_prob, mean, std_dev_t, torch.sqrt(-_core.column(table.dt, idx, x.dim()))
    return prev_sample, log_prob, mean, std_dev_t


sde_step_with_logprob.__tempflow_compat__ = _patch.FLOW_GRPO


def patch(package: str | None = None, name: str = "sde_step_with_logprob") -> Patch:
    """Put :func:`sde_step_with_logprob` in place of Flow-GRPO's function in every imported module that holds it:
    the defining module, the pipelines that imported it, and training scripts (``__main__``) that did
    ``from ... import``.

    A function is replaced only when it is Flow-GRPO's: its signature (``noise_level``, ``prev_sample``,
    ``generator``, then optionally ``sde_type`` and ``return_sqrt_dt``) and its numbers on a tiny input are
    Flow-GRPO's. Other functions of that name (TempFlow-GRPO's per-step function and scorer, in a package also named
    ``flow_grpo``) are left alone and listed in ``Patch.skipped``; when none is Flow-GRPO's, ``RuntimeError`` says
    what was found. ``package`` optionally keeps only functions defined in that package.

    Import the Flow-GRPO modules first. Returns a :class:`Patch`; ``with patch(): ...`` undoes it on exit.
    """
    return _patch.apply(
        {_patch.FLOW_GRPO: lambda ident: sde_step_with_logprob},
        "tempflow.compat.flow_grpo.patch()",
        name=name,
        package=package,
    )
