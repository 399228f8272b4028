"""Drop-in replacement for Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py).

Same signature, same return tuple, same numbers (to fp32 rounding) and, given the same ``generator``, the
same noise bit for bit; but the step indices are found with one vectorised comparison instead of one
``.item()`` per sample, and the per-step coefficients come from cached device tables (:mod:`tempflow.sde`).

Use it directly::

    from tempflow.compat.flow_grpo import sde_step_with_logprob

or swap it into an imported Flow-GRPO checkout without editing it::

    import flow_grpo.diffusers_patch.sd3_pipeline_with_logprob
    from tempflow.compat import flow_grpo as tf_compat
    tf_compat.patch()          # every module holding Flow-GRPO's function now holds ours
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch

from .. import sde

__all__ = ["sde_step_with_logprob", "step_indices", "randn_tensor", "patch", "Patch"]

_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16
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


def _table(scheduler, noise_level: float, schedule: str, device: torch.device) -> sde.SDETable:
    """The scheduler's coefficient table, cached while its ``sigmas`` tensor is unchanged."""
    sigmas = scheduler.sigmas
    key = (id(sigmas), sigmas._version, id(scheduler.timesteps), float(noise_level), schedule, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0] is sigmas:
        _TABLE_CACHE.move_to_end(key)
        return hit[1]
    table = sde.sde_table(sde.grid_from_scheduler(scheduler, device=device), schedule, noise_level)
    _TABLE_CACHE[key] = (sigmas, table)  # holding sigmas keeps its id from being reused while cached
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def step_indices(schedule_timesteps: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Vectorised ``scheduler.index_for_timestep`` for each entry of ``timestep`` (exact match; where a value
    occurs more than once the second occurrence is taken, as diffusers does). One host synchronisation, to
    raise a clear error for a value that is not on the grid."""
    ts = schedule_timesteps.reshape(1, -1)
    tq = timestep.reshape(-1, 1).to(device=ts.device, dtype=ts.dtype)
    match = tq == ts
    count = match.sum(dim=1)
    if not bool((count > 0).all()):
        missing = tq.reshape(-1)[count == 0].tolist()
        raise ValueError(
            f"timestep value(s) {missing} are not on the scheduler's grid {schedule_timesteps.tolist()}; pass "
            "values taken from scheduler.timesteps (after set_timesteps with the same number of steps)"
        )
    want = torch.where(count > 1, 2, 1)  # diffusers: `pos = 1 if len(indices) > 1 else 0`
    return (match & (match.cumsum(dim=1) == want.unsqueeze(1))).to(torch.int8).argmax(dim=1)


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
        model_output: velocity ``(B, ...)``, any float dtype (upcast to fp32).
        timestep: 1-D tensor of length 1 or B holding scheduler timestep values (``scheduler.timesteps[k]``).
        sample: the state ``x_t`` ``(B, ...)``.
        noise_level: ``a`` of ``sigma_t = a sqrt(t / (1 - t))`` (sde) or of ``sin(a pi / 2)`` (cps).
        prev_sample: score this ``x_next`` instead of drawing one (detached inside the log-prob).
        generator: as for diffusers' ``randn_tensor`` (noise drawn in fp32 with the velocity's shape).
        sde_type: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving).
        return_sqrt_dt: also return ``sqrt(-dt)``.

    Returns:
        ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)`` and ``sqrt(-dt)`` when asked: fp32;
        ``log_prob`` ``(B,)``; ``std_dev_t`` and ``sqrt(-dt)`` ``(B, 1, ..., 1)``. For ``sde`` ``std_dev_t`` is
        ``sigma_t`` without the ``sqrt(-dt)`` factor; for ``cps`` it is ``t_next sin(a pi / 2)`` and
        ``log_prob = -mean (prev_sample - prev_sample_mean)^2``.
    """
    if sde_type not in _SDE_TYPES:
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    model_output = model_output.float()
    sample = sample.float()
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if prev_sample is not None:
        prev_sample = prev_sample.float()
        if prev_sample.shape != sample.shape:
            raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} does not match {tuple(sample.shape)}")
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep).reshape(-1)
    if timestep.numel() not in (1, batch):
        raise ValueError(f"timestep must hold 1 or B={batch} values, got {timestep.numel()}")

    table = _table(scheduler, noise_level, _SDE_TYPES[sde_type], sample.device)
    step = step_indices(scheduler.timesteps, timestep).to(sample.device).expand(batch)
    mean = sde.sde_mean(sample, model_output, step, table)
    std = sde.at_step(table.std, step, sample)
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    log_prob = sde.log_prob(prev_sample, mean, std, kind=table.logprob_kind)

    std_dev_t = sde.at_step(table.sigma, step, sample)  # sigma_t; for cps the table's sigma is its std
    if return_sqrt_dt:
        sqrt_dt = torch.sqrt(-sde.at_step(table.dt, step, sample))
        return prev_sample, log_prob, mean, std_dev_t, sqrt_dt
    return prev_sample, log_prob, mean, std_dev_t


class Patch:
    """Record of a :func:`patch`: ``undo()`` (or leaving the ``with`` block) restores the originals."""

    def __init__(self, replaced: list[tuple[object, str, object]]):
        self.replaced = replaced

    @property
    def modules(self) -> list[str]:
        return [getattr(m, "__name__", repr(m)) for m, _, _ in self.replaced]

    def undo(self) -> None:
        for module, name, original in reversed(self.replaced):
            setattr(module, name, original)
        self.replaced = []

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch(package: str = "flow_grpo", name: str = "sde_step_with_logprob") -> Patch:
    """Swap tempflow's step into every imported module that holds ``package``'s function ``name``: the defining
    module, the pipelines that imported it, and training scripts (``__main__``) that did ``from ... import``.

    Import the Flow-GRPO modules first. Returns a :class:`Patch`; ``with patch(): ...`` undoes it on exit.
    """
    replaced = []
    for module in list(sys.modules.values()):
        fn = getattr(module, name, None) if module is not None else None
        if fn is None or fn is sde_step_with_logprob:
            continue
        origin = getattr(fn, "__module__", "") or ""
        if origin == package or origin.startswith(package + "."):
            replaced.append((module, name, fn))
            setattr(module, name, sde_step_with_logprob)
    if not replaced:
        raise RuntimeError(
            f"no imported module holds {package}'s {name}: import the {package} modules (e.g. "
            f"{package}.diffusers_patch.sd3_sde_with_logprob) before calling tempflow.compat.flow_grpo.patch()"
        )
    return Patch(replaced)
