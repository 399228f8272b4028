"""The flow SDE of Flow-GRPO and TempFlow-GRPO: pure-torch fp32 reference (docs/ALGORITHM.md, section 1).

Conventions
-----------
* Rectified flow ``x_t = (1 - t) x_0 + t x_1`` with ``x_1 ~ N(0, I)``; time runs from 1 (noise) to 0 (data).
  The model predicts the velocity ``v``; the ODE step is ``x_next = x + dt v`` with ``dt = t_next - t < 0``.
* A :class:`TimeGrid` holds ``t_0 = 1 > ... > t_{T-1} > t_T = 0`` exactly as diffusers'
  ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes them (its ``sigmas``).
* An :class:`SDETable` holds every per-step coefficient as a ``(T,)`` fp32 tensor on the device. Every step
  is linear in ``x`` and ``v``::

      mean = coef_x[k] * x + coef_v[k] * v          x_next = mean + std[k] * eps

  For the ``flow-grpo`` schedule (``sigma_t = a sqrt(t / (1 - t))``, with ``1 - t_grid[1]`` at ``t = 1``)
  and ``dance`` (``sigma_t = a``)::

      coef_x = 1 + sigma^2 / (2 t) * dt,   coef_v = (1 + sigma^2 (1 - t) / (2 t)) * dt,   std = sigma sqrt(-dt)

  For ``cps`` (coefficients-preserving, ``std = t_next sin(a pi / 2)``)::

      mean = (x - t v)(1 - t_next) + (x + (1 - t) v) sqrt(t_next^2 - std^2)

* Steps are addressed by **step number** ``k`` (a Python int, or a ``(B,)`` integer tensor for items that sit at
  different steps), never by timestep value: a step gathers its coefficients from the tables on the device and
  needs no host synchronisation (pass ``check_finite=False`` to skip the one NaN check).
* Everything is shape-agnostic: the first ``batch_dims`` dimensions are batch dimensions (1 by default; 2 for
  ``(B, K, ...)`` branches), the rest are reduced by the log-prob's **mean** (SD3 latents ``(B, C, H, W)``,
  packed FLUX tokens ``(B, L, D)``, video ``(B, C, F, H, W)``). Inputs of any float dtype are upcast to fp32.

Example::

    >>> grid = time_grid(10, shift=3.0)                       # SD3 / SD3.5
    >>> table = sde_table(grid, "flow-grpo", noise_level=0.7)
    >>> out = sde_step(x, v, 0, table, noise=eps)              # out.sample, out.mean, out.std, out.log_prob
    >>> x1 = ode_step(x, v, 0, grid)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SCHEDULES",
    "heun_step",
    "dpm2m_step",
    "data_prediction",
    "TimeGrid",
    "wan_time_grid",
    "SDETable",
    "SDEStep",
    "time_grid",
    "flux_mu",
    "flux_time_grid",
    "QWENIMAGE_SHIFT",
    "qwenimage_time_grid",
    "grid_from_scheduler",
    "sde_table",
    "at_step",
    "coefficients",
    "sde_mean",
    "sde_step",
    "ode_step",
    "log_prob",
    "log_prob_grad_v",
    "kl",
    "kl_from_velocity",
    "noise_aware_weights",
]

SCHEDULES = ("flow-grpo", "cps", "dance")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeGrid:
    """A sampling grid: ``sigmas`` ``(T+1,)`` fp32 from ``t_0`` down to ``t_T = 0``, and diffusers' timestep values
    ``timesteps = 1000 * t`` ``(T,)``. Build it with :func:`time_grid`, :func:`flux_time_grid` or
    :func:`grid_from_scheduler`."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self):
        s, ts = self.sigmas, self.timesteps
        if s.dim() != 1 or s.numel() < 2:
            raise ValueError(
                f"a time grid needs at least 2 points (T >= 1 steps), got sigmas of shape {tuple(s.shape)}"
            )
        if ts.dim() != 1 or ts.numel() != s.numel() - 1:
            raise ValueError(f"timesteps must have T = {s.numel() - 1} entries, got shape {tuple(ts.shape)}")
        if not s.is_floating_point() or s.dtype != torch.float32:
            raise TypeError(f"sigmas must be float32, got {s.dtype}")
        if s.device.type != "meta":
            host = s.detach().cpu().double()
            if not torch.isfinite(host).all() or host.min() < 0 or host.max() > 1:
                raise ValueError(
                    "grid times must lie in [0, 1] (t = 1 is pure noise, t = 0 is data); got "
                    f"{host.tolist()}. Flow-matching schedulers use sigmas, not the 0..1000 timestep values."
                )
            if not (host[1:] < host[:-1]).all():
                raise ValueError(f"grid times must strictly decrease from noise to data; got {host.tolist()}")
            if host[0] <= 0:
                raise ValueError("the first grid time must be > 0")

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.sigmas.device

    def to(self, device) -> TimeGrid:
        return TimeGrid(self.sigmas.to(device), self.timesteps.to(device))


def _diffusers_sigma_bounds(shift: float, num_train_timesteps: int, dynamic: bool) -> tuple[float, float]:
    """``sigma_max, sigma_min`` of a freshly constructed FlowMatchEulerDiscreteScheduler (computed in fp32)."""
    train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    s = train / num_train_timesteps
    if not dynamic:
        s = shift * s / (1 + (shift - 1) * s)
    return s[0].item(), s[-1].item()


def time_grid(
    num_steps: int,
    shift: float = 3.0,
    *,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
    shift_terminal: float | None = None,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> TimeGrid:
    """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``.

    * static shift (SD3/SD3.5, ``shift=3``): ``t = shift s / (1 + (shift - 1) s)``, ``s`` evenly spaced from 1
      down to the scheduler's ``sigma_min`` (the shifted ``1/num_train_timesteps``);
    * dynamic shift (FLUX, ``mu`` given, ``use_dynamic_shifting=True``): ``t = e^mu / (e^mu + (1/s - 1))``;
    * ``sigmas`` given: those ``s`` values are shifted instead (the FLUX pipeline passes
      ``linspace(1, 1/T, T)``);
    * ``shift_terminal`` (the scheduler config's, e.g. Qwen-Image's 0.02): the shifted times are then stretched,
      ``t = 1 - (1 - t) (1 - shift_terminal) / (1 - t_last)``, so that the last one before 0 is ``shift_terminal``
      (the first stays 1); it needs ``num_steps >= 2``.

    The arithmetic follows diffusers step by step (numpy float64 or float32, then fp32), so the result is
    bit-identical to the scheduler's ``sigmas`` and ``timesteps``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    dynamic = mu is not None
    if not dynamic and not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if sigmas is None:
        s_max, s_min = _diffusers_sigma_bounds(shift, num_train_timesteps, dynamic)
        s = np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, num_steps) / num_train_timesteps
    else:
        s = np.array(sigmas).astype(np.float32)
        if s.ndim != 1 or len(s) != num_steps:
            raise ValueError(f"sigmas must hold num_steps = {num_steps} values, got shape {s.shape}")
        if not np.all((s > 0) & (s <= 1)):
            raise ValueError(f"sigmas must lie in (0, 1] before shifting, got {s.tolist()}")
    if dynamic:
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = shift * s / (1 + (shift - 1) * s)
    if shift_terminal:
        if not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
        if num_steps < 2:
            raise ValueError("a grid stretched to shift_terminal needs num_steps >= 2 (one step has no last time to "
                             "stretch: diffusers' scheduler divides by zero there)")  # fmt: skip
        one_minus = 1 - s  # diffusers' FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal, op for op
        s = 1 - (one_minus / (one_minus[-1] / (1 - shift_terminal)))
    t = torch.from_numpy(np.asarray(s)).to(dtype=torch.float32, device=device)
    timesteps = t * num_train_timesteps
    t = torch.cat([t, torch.zeros(1, device=t.device)])
    return TimeGrid(t, timesteps)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift: linear in the image token count (256 -> 0.5, 4096 -> 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_time_grid(num_steps: int, image_seq_len: int, device=None, shift_terminal: float | None = None,
                   **mu_kwargs) -> TimeGrid:  # fmt: skip
    """The FLUX.1 pipeline's grid: ``s = linspace(1, 1/T, T)`` with the dynamic shift of ``image_seq_len`` tokens
    (4096 for 1024 px). ``mu_kwargs`` (:func:`flux_mu`'s) and ``shift_terminal`` (:func:`time_grid`'s) give other
    pipelines' scheduler configs of the same form (:func:`qwenimage_time_grid`)."""
    s = np.linspace(1.0, 1 / num_steps, num_steps)
    return time_grid(num_steps, mu=flux_mu(image_seq_len, **mu_kwargs), sigmas=s, shift_terminal=shift_terminal,
                     device=device)  # fmt: skip


#: Qwen-Image's scheduler config (Qwen/Qwen-Image ``scheduler/scheduler_config.json``: ``base_image_seq_len`` 256,
#: ``max_image_seq_len`` 8192, ``base_shift`` 0.5, ``max_shift`` 0.9, ``shift_terminal`` 0.02, exponential dynamic
#: shift) in the names of :func:`flux_mu` and :func:`time_grid`.
QWENIMAGE_SHIFT = {"base_seq_len": 256, "max_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                   "shift_terminal": 0.02}  # fmt: skip


def qwenimage_time_grid(num_steps: int, image_seq_len: int, device=None, **overrides) -> TimeGrid:
    """The Qwen-Image pipeline's grid: the same formula as FLUX's (``s = linspace(1, 1/T, T)``, the exponential
    shift with ``mu`` linear in the packed image token count, diffusers' ``calculate_shift``) with Qwen-Image's
    constants (:data:`QWENIMAGE_SHIFT`: ``mu`` 0.5 at 256 tokens to 0.9 at 8192; 1024 px is 4096 tokens), then
    stretched to end at ``shift_terminal`` 0.02. ``overrides``: other values of those keys (a scheduler config's)."""
    unknown = set(overrides) - set(QWENIMAGE_SHIFT)
    if unknown:
        raise TypeError(f"unknown qwenimage_time_grid settings {sorted(unknown)}; known: {', '.join(QWENIMAGE_SHIFT)}")
    return flux_time_grid(num_steps, image_seq_len, device=device, **{**QWENIMAGE_SHIFT, **overrides})


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical shift (diffusers' ``compute_empirical_mu``, from black-forest-labs/flux2): linear in the
    image token count and, below 4300 tokens, also in the number of steps (fitted at 10 and 200 steps)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def flux2_time_grid(num_steps: int, image_seq_len: int, device=None, shift_terminal: float | None = None) -> TimeGrid:
    """The FLUX.2 pipeline's grid: ``s = linspace(1, 1/T, T)`` with the exponential dynamic shift of
    :func:`flux2_mu` (``mu`` depends on the token count and on T; 4096 tokens at 1024 px), as ``Flux2Pipeline``
    passes them to its ``FlowMatchEulerDiscreteScheduler``. ``shift_terminal``: a scheduler config's
    (:func:`time_grid`)."""
    s = np.linspace(1.0, 1 / num_steps, num_steps)
    return time_grid(num_steps, mu=flux2_mu(image_seq_len, num_steps), sigmas=s, shift_terminal=shift_terminal,
                     device=device)  # fmt: skip


def wan_time_grid(num_steps: int, flow_shift: float = 5.0, num_train_timesteps: int = 1000, device=None) -> TimeGrid:
    """The grid of Wan's shipped scheduler, ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)`` after
    ``set_timesteps(num_steps)``: ``s`` evenly spaced from 1 to ``1/num_train_timesteps`` over ``num_steps + 1``
    points, the last dropped (not FlowMatchEulerDiscreteScheduler's spacing), shifted by
    ``flow_shift s / (1 + (flow_shift - 1) s)``, the first lowered by 1e-6 (the scheduler avoids t = 1 exactly), then
    0. ``timesteps`` are ``1000 t`` here; the scheduler truncates its own to integers (int64), which this grid does
    not do (the sampling times, ``sigmas``, are the scheduler's bit for bit)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not flow_shift > 0:
        raise ValueError(f"flow_shift must be > 0, got {flow_shift}")
    s = np.linspace(1, 1 / num_train_timesteps, int(num_steps) + 1)[:-1]
    s = flow_shift * s / (1 + (flow_shift - 1) * s)
    if np.fabs(s[0] - 1) < 1e-6:  # diffusers: avoids log(0) in UniPC's first update
        s[0] -= 1e-6
    t = torch.from_numpy(np.concatenate([s, [0]]).astype(np.float32)).to(device)
    return TimeGrid(t, t[:-1] * num_train_timesteps)


def grid_from_scheduler(scheduler, device=None) -> TimeGrid:
    """The grid of a diffusers flow-matching scheduler after ``set_timesteps`` (any configuration)."""
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(sigmas, torch.Tensor) or not isinstance(timesteps, torch.Tensor):
        raise TypeError(
            f"{type(scheduler).__name__} has no tensor `sigmas`/`timesteps`; pass a diffusers flow-matching "
            "scheduler (FlowMatchEulerDiscreteScheduler) after calling scheduler.set_timesteps(T)"
        )
    device = sigmas.device if device is None else device
    return TimeGrid(sigmas.to(device=device, dtype=torch.float32), timesteps.to(device=device, dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------
# Noise schedules: per-step coefficient tables
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDETable:
    """Per-step coefficients, each a ``(T,)`` fp32 tensor on the grid's device, indexed by step number.

    ``sigma`` is the schedule's noise scale ``sigma_t`` (Flow-GRPO's ``std_dev_t``); ``std`` the standard deviation
    of one step's Gaussian (``sigma sqrt(-dt)``, or ``t_next sin(a pi/2)`` for cps). ``logprob_kind`` is
    ``"gaussian"`` or, for cps, ``"squared"`` (Flow-GRPO scores cps as ``-mean (x_next - mean)^2``).
    """

    schedule: str
    noise_level: float
    grid: TimeGrid
    t: torch.Tensor
    t_next: torch.Tensor
    dt: torch.Tensor
    sigma: torch.Tensor
    std: torch.Tensor
    coef_x: torch.Tensor
    coef_v: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def logprob_kind(self) -> str:
        return "squared" if self.schedule == "cps" else "gaussian"

    def to(self, device) -> SDETable:
        return sde_table(self.grid.to(device), self.schedule, self.noise_level)


def sde_table(grid: TimeGrid, schedule: str = "flow-grpo", noise_level: float = 0.7) -> SDETable:
    """Coefficient tables of ``schedule`` on ``grid`` (computed in float64 on the grid's device, stored fp32;
    built with tensor ops only, so building one on the GPU does not synchronise).

    Args:
        schedule: ``"flow-grpo"`` (``a sqrt(t/(1-t))``), ``"cps"`` (coefficients-preserving) or ``"dance"``
            (constant ``a``).
        noise_level: ``a``: 0.7 for SD3.5-M, 0.9 for FLUX in Flow-GRPO; for cps in (0, 1].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    a = float(noise_level)
    if not a > 0 or not math.isfinite(a):
        raise ValueError(f"noise_level must be a positive number (SDE steps need noise), got {noise_level}")
    if schedule == "cps" and a > 1:
        raise ValueError(f"cps needs noise_level in (0, 1] (std = t_next sin(a pi/2) <= t_next), got {a}")
    fdt = torch.float64 if grid.device.type not in ("mps",) else torch.float32
    s = grid.sigmas.to(fdt)
    t, t_next = s[:-1], s[1:]
    dt = t_next - t
    if schedule == "cps":
        std = t_next * math.sin(a * math.pi / 2)
        root = torch.sqrt(torch.clamp_min(t_next**2 - std**2, 0.0))
        coef_x = (1 - t_next) + root
        coef_v = -t * (1 - t_next) + (1 - t) * root
        sigma = std
    else:
        if schedule == "flow-grpo":
            # at t = 1 the denominator uses the first grid point after 1 to stay finite
            denom_t = torch.where(t == 1, s[1], t)
            sigma = a * torch.sqrt(t / (1 - denom_t))
        else:  # dance
            sigma = torch.full_like(t, a)
        coef_x = 1 + sigma**2 / (2 * t) * dt
        coef_v = (1 + sigma**2 * (1 - t) / (2 * t)) * dt
        std = sigma * torch.sqrt(-dt)

    def f32(x):
        return x.to(torch.float32)

    return SDETable(schedule, a, grid, f32(t), f32(t_next), f32(dt), f32(sigma), f32(std), f32(coef_x), f32(coef_v))


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


class SDEStep(NamedTuple):
    """Result of :func:`sde_step`: the sample ``x_next``, the ``mean`` and ``std`` of its Gaussian (``std``
    broadcastable, ``(B, 1, ..., 1)`` or 0-d), and the mean-reduced ``log_prob`` of the sample."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def at_step(col: torch.Tensor, step, like: torch.Tensor) -> torch.Tensor:
    """``col[step]`` shaped to broadcast against ``like`` (``(B, ...)``): 0-d for an int step, else
    ``(B, 1, ..., 1)`` (or ``(B, K, 1, ...)`` for a ``(B, K)`` step tensor)."""
    if isinstance(step, torch.Tensor) and step.dim() > 0:
        if step.is_floating_point():
            raise TypeError("step must be an integer step number (or integer tensor), not a timestep value")
        if tuple(step.shape) != tuple(like.shape[: step.dim()]):
            raise ValueError(
                f"a per-sample step tensor must have the leading shape of the batch {tuple(like.shape[: step.dim()])}, "
                f"got {tuple(step.shape)}"
            )
        vals = col[step.to(col.device, torch.long)]
        return vals.reshape(*step.shape, *([1] * (like.dim() - step.dim())))
    if isinstance(step, torch.Tensor):
        if step.is_floating_point():
            raise TypeError("step must be an integer step number, not a timestep value")
        return col[step.to(col.device, torch.long)]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int or an integer tensor, got {type(step).__name__}")
    n = col.numel()
    if not -n <= step < n:
        raise IndexError(f"step {step} is outside the grid's {n} steps (0 .. {n - 1})")
    return col[int(step)]


def coefficients(step, table: SDETable, like: torch.Tensor):
    """``(coef_x, coef_v, std)`` of ``step``, shaped to broadcast against ``like``."""
    return (at_step(table.coef_x, step, like), at_step(table.coef_v, step, like), at_step(table.std, step, like))


def _check_pair(x: torch.Tensor, v: torch.Tensor, check_finite: bool) -> None:
    if x.shape != v.shape:
        raise ValueError(f"sample and velocity shapes differ: {tuple(x.shape)} vs {tuple(v.shape)}")
    if x.dim() < 1:
        raise ValueError("sample must have a batch dimension: (B, ...)")
    if not x.is_floating_point() or not v.is_floating_point():
        raise TypeError(f"sample and velocity must be floating point, got {x.dtype} and {v.dtype}")
    if check_finite and not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise FloatingPointError(
            f"velocity has {bad} non-finite values (NaN/Inf) of {v.numel()}: the model output is broken "
            "(check the precision, the learning rate, or the inputs fed to the model)"
        )


def sde_mean(x: torch.Tensor, v: torch.Tensor, step, table: SDETable) -> torch.Tensor:
    """``mean = coef_x[k] x + coef_v[k] v`` in fp32 (differentiable in ``v`` and ``x``)."""
    cx, cv, _ = coefficients(step, table, x)
    # two roundings, no fused multiply-add: every backend (C++ built with -ffp-contract=off, Triton without fp
    # fusion) reproduces this bit for bit on every CPU
    return x.float() * cx + v.float() * cv


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    step,
    table: SDETable,
    noise: torch.Tensor | None = None,
    *,
    sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> SDEStep:
    """One Euler-Maruyama step of the flow SDE and the log-prob of its result.

    Args:
        x: state ``x_t`` ``(B, ...)``, any float dtype.
        v: velocity ``v_theta(x_t, t)``, same shape.
        step: step number ``k`` (int) or a ``(B,)`` integer tensor of per-sample steps.
        table: the schedule's :class:`SDETable`.
        noise: ``eps`` of ``x``'s shape (e.g. from :func:`tempflow.rng.normal`); drawn with ``torch.randn`` and
            ``generator`` when omitted.
        sample: score a given ``x_next`` instead of drawing one (it is detached: data, not a function of ``v``).
        check_finite: raise on a NaN/Inf velocity (one host synchronisation); False for sync-free stepping.

    Returns:
        :class:`SDEStep` ``(sample, mean, std, log_prob)``; ``log_prob`` has shape ``(B,)``.
    """
    _check_pair(x, v, check_finite)
    mean = sde_mean(x, v, step, table)
    std = at_step(table.std, step, x)
    if sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        elif noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match the sample shape {tuple(x.shape)}")
        sample = mean + std * noise.float()
    elif sample.shape != x.shape:
        raise ValueError(f"given sample shape {tuple(sample.shape)} does not match {tuple(x.shape)}")
    sample = sample.float()
    lp = log_prob(sample, mean, std, kind=table.logprob_kind)
    return SDEStep(sample, mean, std, lp)


def ode_step(x: torch.Tensor, v: torch.Tensor, step, grid: TimeGrid | SDETable, *, to=None,
             check_finite: bool = False) -> torch.Tensor:  # fmt: skip
    """Deterministic Euler step ``x + dt[k] v`` in fp32 (``grid`` may be a :class:`TimeGrid` or an
    :class:`SDETable`). ``to``: the grid index to step to (per sample, like ``step``), for the coarse completions
    of a branch; default ``step + 1``. With a :class:`TimeGrid`, ``to = step + 1`` gives the same bits as the
    default (the same fp32 difference of grid times)."""
    _check_pair(x, v, check_finite)
    if to is not None:
        t = _grid_times(grid)
        return x.float() + (at_step(t, to, x) - at_step(t, step, x)) * v.float()
    if isinstance(grid, TimeGrid):
        dt_col = grid.sigmas[1:] - grid.sigmas[:-1]
    else:
        dt_col = grid.dt
    return x.float() + at_step(dt_col, step, x) * v.float()


def _grid_times(grid: TimeGrid | SDETable) -> torch.Tensor:
    return grid.sigmas if isinstance(grid, TimeGrid) else grid.grid.sigmas


def heun_step(x: torch.Tensor, v: torch.Tensor, v_end: torch.Tensor, step, to, grid: TimeGrid | SDETable):
    """Heun's corrector from grid point ``step`` to ``to``: ``x + (t_to - t_step) (v + v_end) / 2``, ``v`` the
    velocity at ``(x, t_step)`` and ``v_end`` the one at the Euler predictor ``(ode_step(x, v, step, to=to),
    t_to)``. Second order; used by the ``heun`` completion of a branch (not on an interval ending at t = 0, where
    the completion takes the Euler step, as diffusers' FlowMatchHeunDiscreteScheduler does)."""
    t = _grid_times(grid)
    dt = at_step(t, to, x) - at_step(t, step, x)
    return x.float() + dt * (0.5 * (v.float() + v_end.float()))


def data_prediction(x: torch.Tensor, v: torch.Tensor, step, grid: TimeGrid | SDETable) -> torch.Tensor:
    """The flow's data prediction ``x0 = x - t v`` at grid point ``step`` (fp32): the Euler step to t = 0."""
    return x.float() - at_step(_grid_times(grid), step, x) * v.float()


def dpm2m_step(x: torch.Tensor, v: torch.Tensor, d_prev: torch.Tensor, step, to, prev,
               grid: TimeGrid | SDETable) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++(2M) from grid point ``step`` to ``to`` written for a flow (``x_t = (1 - t) x0 + t eps``:
    ``alpha = 1 - t``, ``sigma = t``, ``lambda = log(alpha / sigma)``), ``d_prev`` the data prediction at the
    previous point ``prev`` of the same path::

        D0 = x - t v,   h = lambda_to - lambda_step,   r = (lambda_step - lambda_prev) / h
        D  = D0 + (D0 - d_prev) / (2 r)
        x_to = (t_to / t_step) x + (1 - t_to) (1 - exp(-h)) D

    (Lu et al. 2022, DPM-Solver++ multistep, second order.) With ``D = D0`` this is the Euler step of the flow (the
    first-order DPM-Solver++ step is DDIM, which for a flow is Euler); ``to`` must not be t = 0 (lambda is
    infinite there: take the Euler step, as diffusers' ``lower_order_final`` does). Times are taken in fp64."""
    t = _grid_times(grid).double()
    lam = torch.log((1 - t) / t)
    t_s, t_to = at_step(t, step, x), at_step(t, to, x)
    h = at_step(lam, to, x) - at_step(lam, step, x)
    r = (at_step(lam, step, x) - at_step(lam, prev, x)) / h
    d0 = data_prediction(x, v, step, grid)
    d = d0 + (d0 - d_prev.float()) * (0.5 / r).float()
    return (t_to / t_s).float() * x.float() + ((1 - t_to) * (-torch.expm1(-h))).float() * d


# --------------------------------------------------------------------------------------------------------------
# Log-prob, gradient, KL, weights
# --------------------------------------------------------------------------------------------------------------


def _reduce_dims(x: torch.Tensor, batch_dims: int) -> tuple[int, ...]:
    if not 0 <= batch_dims < x.dim():
        raise ValueError(f"batch_dims={batch_dims} leaves nothing to reduce for a tensor of shape {tuple(x.shape)}")
    return tuple(range(batch_dims, x.dim()))


def log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std, *, kind: str = "gaussian", batch_dims: int = 1
) -> torch.Tensor:
    """Mean-reduced Gaussian log-density of ``sample`` under ``N(mean, std^2 I)`` (fp32)::

        logp = mean_d[ -(sample - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi)) ]

    averaged (not summed) over all but the first ``batch_dims`` dimensions. ``kind="squared"`` gives cps's
    ``-mean_d (sample - mean)^2``. ``sample`` is detached. ``std`` broadcasts against ``mean``.
    """
    diff = sample.detach().float() - mean.float()
    dims = _reduce_dims(diff, batch_dims)
    if kind == "squared":
        return -diff.square().mean(dim=dims)
    if kind != "gaussian":
        raise ValueError(f"unknown log-prob kind {kind!r} (gaussian | squared)")
    std = torch.as_tensor(std, dtype=torch.float32, device=diff.device)
    quad = (diff.square() * (-0.5 / std.square())).mean(dim=dims)
    # the constant terms, averaged over the reduced dims without broadcasting them to the full shape
    log_std = torch.log(std).reshape((1,) * (diff.dim() - std.dim()) + tuple(std.shape))
    spread = [d for d in dims if log_std.shape[d] != 1]
    if spread:
        log_std = log_std.mean(dim=spread, keepdim=True)
    return quad - log_std.reshape(log_std.shape[:batch_dims]) - LOG_SQRT_2PI


def log_prob_grad_v(
    sample: torch.Tensor, mean: torch.Tensor, std, coef_v, *, kind: str = "gaussian", batch_dims: int = 1
) -> torch.Tensor:
    """Analytic ``d logp / d v`` per element (the ``1/D`` of the mean included)::

        gaussian: (sample - mean) / std^2 * coef_v / D        squared: 2 (sample - mean) * coef_v / D

    This is what a fused backward computes; tests check it against autograd of :func:`log_prob`.
    """
    diff = sample.detach().float() - mean.float()
    d = math.prod(diff.shape[batch_dims:])
    if kind == "squared":
        return 2 * diff * coef_v / d
    return diff / torch.as_tensor(std, dtype=torch.float32, device=diff.device) ** 2 * coef_v / d


def kl(mean: torch.Tensor, mean_ref: torch.Tensor, std, *, batch_dims: int = 1) -> torch.Tensor:
    """Exact KL between ``N(mean, std^2 I)`` and ``N(mean_ref, std^2 I)``, mean-reduced like the log-prob::

    KL = mean_d[(mean - mean_ref)^2] / (2 std^2)
    """
    diff = mean.float() - mean_ref.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=diff.device)
    return ((diff**2) / (2 * std**2)).mean(dim=_reduce_dims(diff, batch_dims))


def kl_from_velocity(v: torch.Tensor, v_ref: torch.Tensor, step, table: SDETable) -> torch.Tensor:
    """Exact KL of one step between the policy and a reference model at the same state:
    ``mean - mean_ref = coef_v (v - v_ref)``, so ``KL = coef_v^2 mean_d (v - v_ref)^2 / (2 std^2)``."""
    _, cv, std = coefficients(step, table, v)
    return kl(cv * v.float(), cv * v_ref.float(), std)


def noise_aware_weights(table: SDETable, trained_steps: Iterable[int] | torch.Tensor | None = None) -> torch.Tensor:
    """TempFlow-GRPO's per-step weights ``w_k = std_k / mean_{j in trained} std_j`` as a ``(T,)`` table.

    The normaliser is computed from the actual grid, noise level and schedule; the weights average exactly 1
    over ``trained_steps`` (default: the first ``T-1`` steps, Flow-GRPO's trained steps; all ``T`` when T = 1).
    """
    steps = _trained_steps(table.num_steps, trained_steps, table.std.device)
    norm = table.std.double()[steps].mean()
    if not bool(norm > 0):
        raise ValueError("the trained steps have zero noise (std = 0): nothing to weight by")
    return (table.std.double() / norm).to(torch.float32)


def _trained_steps(num_steps: int, trained_steps, device) -> torch.Tensor:
    if trained_steps is None:
        trained_steps = range(max(num_steps - 1, 1))
    steps = torch.as_tensor(list(trained_steps) if not isinstance(trained_steps, torch.Tensor) else trained_steps)
    steps = steps.to(device=device, dtype=torch.long).reshape(-1)
    if steps.numel() == 0:
        raise ValueError("trained_steps is empty")
    if int(steps.min()) < 0 or int(steps.max()) >= num_steps:
        raise IndexError(f"trained steps {steps.tolist()} are outside 0 .. {num_steps - 1}")
    if steps.unique().numel() != steps.numel():
        raise ValueError(f"trained steps repeat: {steps.tolist()}")
    return steps
