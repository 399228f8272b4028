"""Fused ops and the one place that picks a backend.

Ops (each with the pure-torch reference of :mod:`tempflow.reference` as its ``torch`` backend):
  :func:`branch_step`       K one-step SDE branches from one velocity: samples, log-probs (and the mean)
  :func:`branch_score`      log-probs of K given samples (no grad)
  :func:`branch_logp_kl`    K log-probs and the exact KL, differentiable in the velocity
  :func:`branch_grpo_loss`  the GRPO loss of K actions per state: one forward and one backward pass over memory
  :func:`philox_normal`     counter-based noise (tempflow.rng's stream)

Backends:
  ``torch``   the pure-torch reference (tempflow.rng, tempflow.sde); always available, any device.
  ``cpu``     C++ with OpenMP (csrc/cpu), CPU tensors; available when the extension was built.
  ``triton``  Triton kernels (kernels/), CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``.
  ``cuda``    hand-written CUDA kernels (csrc/cuda), CUDA tensors; built only against a CUDA build of torch.

The choice is made per call from the tensor's device: ``backend=`` (argument) or ``TEMPFLOW_BACKEND``
(environment) name one explicitly, and a named backend that cannot serve the device raises; ``auto``
(the default) takes the fastest available one and says once, through ``logging``, why it fell back.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from . import _ext, kernels, objective, reference, rng, sde

__all__ = [
    "BACKENDS",
    "backend_status",
    "resolve_backend",
    "BranchSample",
    "branch_step",
    "branch_score",
    "branch_logp_kl",
    "branch_grpo_loss",
    "philox_normal",
]

BACKENDS = ("torch", "cpu", "triton", "cuda")
_log = logging.getLogger("tempflow.ops")
_warned: set[str] = set()
# Looked up once at import, so that resolving a backend inside torch.compile is plain Python.
_CPU_LOADED, _CPU_REASON = _ext.load("_C")
_CUDA_LOADED, _CUDA_REASON = _ext.load("_C_cuda")


def _triton_status(device: torch.device) -> str:
    if not kernels.AVAILABLE:
        return kernels.REASON
    if device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET):
        return ""
    return f"triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"


def backend_status(device: torch.device | str = "cpu") -> dict[str, str]:
    """``{backend: ""}`` when usable for tensors on ``device``, else ``{backend: reason}``."""
    device = torch.device(device)
    if not _CPU_LOADED:
        cpu = _CPU_REASON
    elif device.type != "cpu":
        cpu = f"C++ kernels need CPU tensors, got {device.type}"
    else:
        cpu = ""
    if not _CUDA_LOADED:
        cuda = _CUDA_REASON
    elif device.type != "cuda":
        cuda = f"CUDA kernels need CUDA tensors, got {device.type}"
    else:
        cuda = ""
    return {"torch": "", "cpu": cpu, "triton": _triton_status(device), "cuda": cuda}


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend to use for tensors on ``device``; see the module docstring for the rules."""
    device = torch.device(device)
    requested = (backend or os.environ.get("TEMPFLOW_BACKEND") or "auto").strip().lower()
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown tempflow backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    status = backend_status(device)
    if requested != "auto":
        if status[requested]:
            source = "backend=" if backend else "TEMPFLOW_BACKEND"
            raise RuntimeError(
                f"tempflow backend {requested!r} was requested ({source}) but cannot run on {device}: "
                f"{status[requested]}. Use backend='auto' or one of: "
                + ", ".join(b for b, why in status.items() if not why)
            )
        return requested
    preferred = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in preferred:
        if not status[name]:
            if name == "torch" and device.type not in _warned:
                _warned.add(device.type)
                _log.info("tempflow: using the torch reference on %s (%s)", device.type, status[preferred[0]])
            return name
    return "torch"


def philox_normal(keys: torch.Tensor, n: int, offset: int = 0, *, backend: str | None = None) -> torch.Tensor:
    """Counter-based standard normals: ``(S,)`` int64 stream keys -> ``(S, n)`` fp32.

    Row ``s`` holds elements ``offset .. offset + n - 1`` of stream ``keys[s]``, the same values as
    :func:`tempflow.rng.normal_from_keys` (integers and uniforms bit for bit; the normal to the last bits of
    the backend's ``log``/``cos``). Keys come from :func:`tempflow.rng.stream_keys`.
    """
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64 stream keys from tempflow.rng.stream_keys, got {keys.dtype}")
    keys = keys.reshape(-1)
    name = resolve_backend(keys.device, backend)
    if name == "cpu":
        return torch.ops.tempflow_cpu.philox_normal(keys, n, offset)
    if name == "triton":
        from .kernels.philox import philox_normal as triton_philox_normal

        return triton_philox_normal(keys, n, offset)
    return rng.normal_from_keys(keys, (n,), offset=offset)


# --------------------------------------------------------------------------------------------------------------
# Device-independent custom ops: one schema, a fake for tracing, an implementation per compiled backend.
# The public functions below flatten every latent to (B, D), gather the per-row coefficients and call these.
# --------------------------------------------------------------------------------------------------------------


def _impl(backend: str):
    """The object holding a compiled backend's kernels under the op names (torch.ops namespace or Triton module)."""
    if backend == "cpu":
        return torch.ops.tempflow_cpu
    if backend == "cuda":
        return torch.ops.tempflow_cuda
    from .kernels import branch

    return branch


@torch.library.custom_op("tempflow::branch_sample", mutates_args=())
def _branch_sample_op(
    x: torch.Tensor,
    v: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None,
    keys: torch.Tensor | None,
    K: int,
    return_mean: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).branch_sample(x, v, coef_x, coef_v, std, noise, keys, K, return_mean)


@_branch_sample_op.register_fake
def _(x, v, coef_x, coef_v, std, noise, keys, K, return_mean, backend):
    b, d = x.shape
    mean = x.new_empty((b, d) if return_mean else (0,), dtype=torch.float32)
    return x.new_empty((b, K, d), dtype=torch.float32), x.new_empty((b, K), dtype=torch.float32), mean


@torch.library.custom_op("tempflow::branch_logp", mutates_args=())
def _branch_logp_op(
    v: torch.Tensor,
    x: torch.Tensor,
    actions: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    v_ref: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).branch_logp(v, x, actions, coef_x, coef_v, v_ref)


@_branch_logp_op.register_fake
def _(v, x, actions, coef_x, coef_v, v_ref, backend):
    b, k, _ = actions.shape
    return v.new_empty((b, k), dtype=torch.float32), v.new_empty((b,), dtype=torch.float32)


@torch.library.custom_op("tempflow::branch_logp_backward", mutates_args=())
def _branch_logp_backward_op(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    actions: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    v_ref: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _impl(backend).branch_logp_backward(alpha, beta, v, x, actions, coef_x, coef_v, v_ref)


@_branch_logp_backward_op.register_fake
def _(alpha, beta, v, x, actions, coef_x, coef_v, v_ref, backend):
    return torch.empty_like(v)


def _branch_logp_setup(ctx, inputs, output):
    v, x, actions, coef_x, coef_v, v_ref, backend = inputs
    ctx.save_for_backward(v, x, actions, coef_x, coef_v, v_ref)
    ctx.backend = backend


def _branch_logp_backward(ctx, grad_sums, grad_kl):
    # sums[b, k] = sum_d (a - cx x - cv v)^2 -> d/dv = -2 cv (a - mean)
    # kl_sums[b] = sum_d (v - v_ref)^2      -> d/dv = 2 (v - v_ref)
    v, x, actions, coef_x, coef_v, v_ref = ctx.saved_tensors
    alpha = (-2.0 * coef_v.unsqueeze(1) * grad_sums).float().contiguous()
    beta = (2.0 * grad_kl).float().contiguous() if grad_kl is not None else coef_v.new_zeros(coef_v.shape)
    grad_v = _branch_logp_backward_op(alpha, beta, v, x, actions, coef_x, coef_v, v_ref, ctx.backend)
    return grad_v, None, None, None, None, None, None


_branch_logp_op.register_autograd(_branch_logp_backward, setup_context=_branch_logp_setup)


# --------------------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------------------


class BranchSample(NamedTuple):
    """``samples`` ``(B, K, ...)`` fp32, their mean-reduced ``log_prob`` ``(B, K)``, and the step's ``mean``
    ``(B, ...)`` (None unless asked for)."""

    samples: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor | None


def _row(col: torch.Tensor, step, x: torch.Tensor) -> torch.Tensor:
    """A per-step table column gathered for each of the B rows of ``x``: ``(B,)`` fp32, contiguous, on x's device."""
    return sde.at_step(col, step, x).reshape(-1).to(x.device).expand(x.shape[0]).contiguous()


def _check_state(x: torch.Tensor, v: torch.Tensor, name: str = "velocity") -> None:
    if x.shape != v.shape:
        raise ValueError(f"state and {name} shapes differ: {tuple(x.shape)} vs {tuple(v.shape)}")
    if x.dim() < 2:
        raise ValueError(f"state must be (B, ...) with at least one non-batch dimension, got {tuple(x.shape)}")
    for t, what in ((x, "state"), (v, name)):
        if not t.is_floating_point():
            raise TypeError(f"{what} must be floating point, got {t.dtype}")


def _check_branches(t: torch.Tensor, x: torch.Tensor, what: str) -> int:
    if t.dim() != x.dim() + 1 or t.shape[0] != x.shape[0] or t.shape[2:] != x.shape[1:]:
        raise ValueError(
            f"{what} must be (B, K, ...) = ({x.shape[0]}, K, {', '.join(map(str, x.shape[1:]))}), got {tuple(t.shape)}"
        )
    return t.shape[1]


def _flat(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    """``t`` reshaped for a kernel; float64 (which the kernels do not take) goes down to fp32."""
    if t is None:
        return None
    return (t.float() if t.dtype == torch.float64 else t).reshape(*shape)


def _logp_from_sums(sums: torch.Tensor, std: torch.Tensor, d: int, kind: str) -> torch.Tensor:
    if kind == "squared":
        return -sums / d
    s = std.unsqueeze(1)
    return sums * (-0.5 / (s * s * d)) - torch.log(s) - sde.LOG_SQRT_2PI


def branch_step(
    x: torch.Tensor,
    v: torch.Tensor,
    step,
    table: sde.SDETable,
    K: int = 1,
    *,
    noise: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    return_mean: bool = False,
    backend: str | None = None,
) -> BranchSample:
    """K one-step SDE branches from one state and one velocity, in one pass that reads ``x`` and ``v`` once::

        mean = coef_x[k] x + coef_v[k] v,   samples[:, j] = mean + std[k] eps_j,   log_prob[:, j] = logp(samples[:, j])

    Args:
        x, v: ``(B, ...)`` state and velocity (any float dtypes; fp32 maths).
        step: step number (int) or ``(B,)`` integer tensor.
        table: the schedule's :class:`tempflow.sde.SDETable`.
        K: branches per state (K = 1 is the plain Flow-GRPO step).
        noise: ``(B, K, ...)`` given noise, or
        keys: ``(B, K)`` int64 stream keys (:func:`tempflow.rng.stream_keys`): the noise is generated inside the
            kernel, ``eps[b, j].flatten()[i] = tl.randn(keys[b, j], i)`` (tempflow.rng's stream).
        return_mean: also return the mean ``(B, ...)``.

    Returns:
        :class:`BranchSample` ``(samples (B, K, ...) fp32, log_prob (B, K) fp32, mean or None)``.

    Example::

        >>> keys = rng.stream_keys(seed, torch.tensor([[[p, s, k, j] for j in range(6)] for p, s in items]))
        >>> out = branch_step(x, v, k, table, K=6, keys=keys)
    """
    _check_state(x, v)
    if (noise is None) == (keys is None):
        raise ValueError("branch_step needs exactly one of noise= (B, K, ...) and keys= (B, K) stream keys")
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    b = x.shape[0]
    if noise is not None and _check_branches(noise, x, "noise") != K:
        raise ValueError(f"noise has {noise.shape[1]} branches, K = {K}")
    if keys is not None and (keys.dtype != torch.int64 or tuple(keys.shape) != (b, K)):
        raise ValueError(
            f"keys must be int64 stream keys of shape (B, K) = ({b}, {K}), got {keys.dtype} {tuple(keys.shape)}"
        )
    name = resolve_backend(x.device, backend)
    if name == "torch":
        samples, logp, mean = reference.branch_sample(x, v, step, table, K, noise=noise, keys=keys)
        return BranchSample(samples, logp, mean if return_mean else None)
    d = x[0].numel()
    std = _row(table.std, step, x)
    samples, sums, mean = _branch_sample_op(
        _flat(x, b, d),
        _flat(v, b, d),
        _row(table.coef_x, step, x),
        _row(table.coef_v, step, x),
        std,
        _flat(noise, b, K, d),
        keys,
        K,
        return_mean,
        name,
    )
    logp = _logp_from_sums(sums, std, d, table.logprob_kind)
    return BranchSample(samples.reshape(b, K, *x.shape[1:]), logp, mean.reshape(x.shape) if return_mean else None)


def branch_logp_kl(
    v: torch.Tensor,
    x: torch.Tensor,
    actions: torch.Tensor,
    step,
    table: sde.SDETable,
    v_ref: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(B, K)`` of K given actions ``(B, K, ...)`` from one velocity ``v`` ``(B, ...)``, and the exact KL
    ``(B,)`` of the step to a reference velocity ``v_ref`` (zeros without one). Differentiable in ``v``: the backward
    is one more pass, ``dv = sum_j alpha_j (a_j - mean) + beta (v - v_ref)``, with nothing of size (B, K, ...) kept."""
    _check_state(x, v)
    k = _check_branches(actions, x, "actions")
    if v_ref is not None:
        _check_state(x, v_ref, "reference velocity")
    name = resolve_backend(x.device, backend)
    if name == "torch":
        return reference.branch_logp_kl(v, x, actions, step, table, v_ref)
    b, d = x.shape[0], x[0].numel()
    std, cv = _row(table.std, step, x), _row(table.coef_v, step, x)
    sums, kl_sums = _branch_logp_op(
        _flat(v, b, d),
        _flat(x, b, d),
        _flat(actions, b, k, d),
        _row(table.coef_x, step, x),
        cv,
        None if v_ref is None else _flat(v_ref.detach(), b, d),
        name,
    )
    logp = _logp_from_sums(sums, std, d, table.logprob_kind)
    kl = kl_sums * (cv * cv / (2 * std * std * d)) if v_ref is not None else torch.zeros_like(kl_sums)
    return logp, kl


def branch_score(x, v, step, table: sde.SDETable, samples: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Log-probs ``(B, K)`` of given samples ``(B, K, ...)`` (the "score" mode of :func:`branch_step`)."""
    with torch.no_grad():
        return branch_logp_kl(v, x, samples, step, table, backend=backend)[0]


def branch_grpo_loss(
    v: torch.Tensor,
    x: torch.Tensor,
    actions: torch.Tensor,
    step,
    table: sde.SDETable,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    weight: torch.Tensor | None,
    clip_eps: float,
    beta: float = 0.0,
    v_ref: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The scalar GRPO loss of K actions per state, from one forward of the velocity per state::

        L = mean over (b, j) of [ w_b max(-A r, -A clip(r, 1-eps, 1+eps)) + beta KL_b ],  r = exp(logp - old_logp)

    Args:
        v: ``(B, ...)`` velocity at the states (requires grad); x: ``(B, ...)`` states; actions: ``(B, K, ...)``.
        old_logp, adv: ``(B, K)``; weight: ``(B,)`` noise-aware weights (or None).
        v_ref: reference velocity for the exact KL (needed when ``beta != 0``).

    The gradient equals autograd of the reference with the forward repeated K times (the official way).
    """
    if beta and v_ref is None:
        raise ValueError(f"beta = {beta} needs v_ref, the reference model's velocity at the same states")
    logp, kl = branch_logp_kl(v, x, actions, step, table, v_ref, backend=backend)
    return objective.grpo_objective(logp, old_logp, adv, weight, clip_eps, beta, kl if v_ref is not None else None)
