"""What the drop-ins of :mod:`tempflow.compat` share: the scheduler's coefficient table (cached), the step indices of
the given timestep values, and the fused paths that replace the originals' ~15 elementwise passes.

Fused paths (one kernel pass each, :mod:`tempflow.ops`; the pure-torch reference where no kernel serves the device):

* :func:`affine`: ``cx x + cv v`` rounded as :func:`tempflow.sde.sde_mean` (the mean, or the Euler step ``x + dt v``);
* :func:`score`: the mean-reduced log-prob of a given sample (``ops.branch_logp_kl``; differentiable in the velocity);
* :func:`sample`: K samples from given noise, their log-probs and the mean (``ops.branch_step``).

When autograd needs more than the fused ops give (a gradient through the mean, or through ``sample``), the same
quantities come from the differentiable torch reference (:mod:`tempflow.sde`, :mod:`tempflow.reference`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from .. import ops, reference, sde

_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16
_SCRATCH = threading.local()


def zero_noise_table(grid: sde.TimeGrid, schedule: str) -> sde.SDETable:
    """The coefficient table of ``noise_level = 0``, which :func:`tempflow.sde.sde_table` refuses: std = 0, so the
    step is deterministic (``flow-grpo``: ``coef_x = 1``, ``coef_v = dt``, the Euler step; ``cps``: its mean at
    ``std = 0``). Log-probs under it are not finite (``-0/0 + inf`` for the Gaussian), as in the originals."""
    s = grid.sigmas.double()
    t, t_next = s[:-1], s[1:]
    dt = t_next - t
    zero = torch.zeros_like(t)
    if schedule == "cps":
        root = t_next  # sqrt(t_next^2 - std^2) with std = 0
        coef_x = (1 - t_next) + root
        coef_v = -t * (1 - t_next) + (1 - t) * root
    else:
        coef_x = torch.ones_like(t)  # 1 + 0 / (2 t) * dt
        coef_v = dt  # (1 + 0) * dt

    def f32(x):
        return x.to(torch.float32)

    return sde.SDETable(
        schedule, 0.0, grid, f32(t), f32(t_next), f32(dt), f32(zero), f32(zero), f32(coef_x), f32(coef_v)
    )


def table_for(scheduler, noise_level: float, schedule: str, device: torch.device) -> sde.SDETable:
    """The scheduler's coefficient table for ``noise_level`` (``>= 0``), cached while its ``sigmas`` tensor is
    unchanged (same object, same version counter) and its ``timesteps`` is the same object."""
    a = float(noise_level)
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(
            f"noise_level must be a finite number >= 0 (0 gives the deterministic step), got {noise_level}"
        )
    sigmas = scheduler.sigmas
    key = (id(sigmas), sigmas._version, id(scheduler.timesteps), a, schedule, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0] is sigmas:
        _TABLE_CACHE.move_to_end(key)
        return hit[1]
    grid = sde.grid_from_scheduler(scheduler, device=device)
    table = zero_noise_table(grid, schedule) if a == 0 else sde.sde_table(grid, schedule, a)
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


def check_inputs(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if sample.dim() < 2:
        raise ValueError(f"sample must be (B, ...) with at least one non-batch dimension, got {tuple(sample.shape)}")


def steps(scheduler, timestep, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, rows)``: the step index of each of the ``n`` timestep values ``(n,)`` (what the originals'
    ``sigma`` rows follow), and one per batch row ``(B,)`` (``n`` is 1 or B)."""
    timestep = torch.as_tensor(timestep).reshape(-1)
    n = timestep.numel()
    if n not in (1, batch):
        raise ValueError(f"timestep must hold 1 or B={batch} values, got {n}")
    idx = step_indices(scheduler.timesteps, timestep).to(device)
    return idx, (idx.expand(batch) if n == 1 else idx)


def column(col: torch.Tensor, idx: torch.Tensor, ndim: int) -> torch.Tensor:
    """A table column at the timestep's steps, shaped ``(n, 1, ..., 1)`` like the originals' ``sigma``."""
    return col[idx].reshape(-1, *([1] * (ndim - 1)))


def grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_backend(x: torch.Tensor) -> str | None:
    name = ops.resolve_backend(x.device)
    return None if name == "torch" else name


def affine(x: torch.Tensor, v: torch.Tensor, cx: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
    """``cx[b] x + cv[b] v`` in fp32 with per-row ``(B,)`` coefficients, rounded as :func:`tempflow.sde.sde_mean`
    (two products, one sum, no fused multiply-add).

    One pass of the fused sampler with ``std = 0`` and ``x`` standing in as the noise (``mean + 0 * x``), so
    the result is that kernel's mean bit for bit and reads ``x`` and ``v`` once. A non-finite ``x`` gives NaN
    where the torch expression gives +-inf. Differentiable (torch expression) when autograd needs it."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    backend = _kernel_backend(x)
    if backend is None or grad_needed(x, v, cx, cv):
        return x.float() * cx.reshape(shape) + v.float() * cv.reshape(shape)
    d = x[0].numel()
    x2, v2 = ops._flat(x, b, d), ops._flat(v, b, d)
    cx = cx.to(device=x.device, dtype=torch.float32).expand(b).contiguous()
    cv = cv.to(device=x.device, dtype=torch.float32).expand(b).contiguous()
    zero = torch.zeros(b, device=x.device, dtype=torch.float32)
    out = ops._branch_sample_op(x2, v2, cx, cv, zero, x2.reshape(b, 1, d), None, 1, False, backend)[0]
    return out.reshape(x.shape)


def mean(x: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, table: sde.SDETable) -> torch.Tensor:
    """The SDE step's mean ``coef_x x + coef_v v`` (fp32, ``(B, ...)``)."""
    if grad_needed(x, v):
        return sde.sde_mean(x, v, rows, table)
    return affine(x, v, table.coef_x[rows], table.coef_v[rows])


def euler(x: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, table: sde.SDETable) -> torch.Tensor:
    """The Euler step ``x + dt v`` (fp32), bit for bit the originals' ``sample + dt * model_output``."""
    if grad_needed(x, v):
        return x + sde.at_step(table.dt, rows, x) * v
    return affine(x, v, torch.ones_like(table.dt[rows]), table.dt[rows])


def score(
    x: torch.Tensor, v: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor, table: sde.SDETable
) -> torch.Tensor:
    """Mean-reduced log-prob ``(B,)`` of the given ``prev`` ``(B, ...)`` (detached), in one pass over ``x``, ``v`` and
    ``prev``; differentiable in ``v`` (and through the torch reference in ``x`` when it needs a gradient)."""
    if grad_needed(x):
        m = sde.sde_mean(x, v, rows, table)
        return sde.log_prob(prev, m, sde.at_step(table.std, rows, x), kind=table.logprob_kind)
    logp, _ = ops.branch_logp_kl(v, x, prev.detach().unsqueeze(1), rows, table)
    return logp[:, 0]


def scratch(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer for an intermediate that is never returned (the noise; its fp32 copy), reused from call
    to call on the CPU: a fresh buffer of the size of K = 6 branches (38 MB at B = 24 for SD3.5-M latents) is
    served by ``mmap``, and first touching its pages costs as much as a pass over it. Elsewhere a new tensor (the
    CUDA caching allocator already reuses memory). :func:`release_scratch` frees them."""
    shape = tuple(shape)
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < math.prod(shape):
        buf = bufs[slot] = torch.empty(shape, dtype=dtype)
    return buf.view(-1)[: math.prod(shape)].view(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (:func:`scratch`)."""
    _SCRATCH.bufs = {}


def draw_noise(shape, generator, device, dtype: torch.dtype, randn_tensor, reuse: bool = True) -> torch.Tensor:
    """``randn_tensor(shape, generator=generator, device=device, dtype=dtype)``, drawn into a scratch buffer when
    that gives the same draws: no generator or one CPU generator, CPU tensors (``torch.randn(..., out=)`` runs the
    same ``normal_`` on the same stream). The result is overwritten by the next draw on this thread."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if (
        not reuse
        or device.type != "cpu"
        or isinstance(generator, list)
        or (generator is not None and generator.device.type != "cpu")
    ):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, out=scratch("noise", shape, dtype, device))


def sample(
    x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor, rows: torch.Tensor, table: sde.SDETable, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` samples per row from the given noise ``(B * k, ...)`` (row ``b * k + j`` is branch ``j`` of item ``b``):
    ``(samples (B * k, ...), log_prob (B * k,), mean (B, ...))``, fp32, in one pass (``ops.branch_step``)."""
    b = x.shape[0]
    noise = noise.reshape(b, k, *x.shape[1:])
    backend = _kernel_backend(x)
    if grad_needed(x, v):
        samples, logp, m = reference.branch_sample(x, v, rows, table, k, noise=noise)
    elif backend is None:
        samples, logp, m = ops.branch_step(x, v, rows, table, k, noise=noise, backend="torch", return_mean=True)
    else:
        d = x[0].numel()
        cx, cv, std = (ops._row(col, rows, x) for col in (table.coef_x, table.coef_v, table.std))
        state, vel = x, v
        if noise.dtype not in (torch.float32, x.dtype):
            if noise.dtype == v.dtype:
                # the kernels read noise in fp32 or in the state's dtype: pass the velocity as the "state" (same
                # two products, the sum commuted, so the same bits) rather than convert K copies of the noise
                state, vel, cx, cv = v, x, cv, cx
            else:
                noise = scratch("noise_fp32", noise.shape, torch.float32, noise.device).copy_(noise)
        samples, sums, m = ops._branch_sample_op(
            ops._flat(state, b, d), ops._flat(vel, b, d), cx, cv, std, ops._flat(noise, b, k, d), None, k, True, backend
        )
        logp = ops._logp_from_sums(sums, std, d, table.logprob_kind)
        m = m.reshape(x.shape)
    return samples.reshape(b * k, *x.shape[1:]), logp.reshape(b * k), m
