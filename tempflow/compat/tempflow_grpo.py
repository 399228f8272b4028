"""Drop-in replacements for TempFlow-GRPO's two ``sde_step_with_logprob`` functions (its package is also named
``flow_grpo``):

* :func:`sde_step_with_logprob_perstep` for ``flow_grpo/diffusers_patch/sd3_sde_with_logprob_perstep.py``, the
  per-step sampler: ``determistic=True`` takes the Euler step; otherwise it draws K = 6 branches per item;
* :func:`sde_step_with_logprob` for ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, the training-time scorer
  (also the step of its non-per-step pipeline and of its evaluation).

Both keep the released code's signature ``(self, model_output, timestep, sample, prev_sample=None, generator=None,
determistic=False)`` and return ``(prev_sample, log_prob, prev_sample_mean, std_dev_t * sqrt(-dt))``; the noise
level (0.7 in the released code; its comment says 0.9 for FLUX) and K (6) are keyword arguments with those defaults.
Given the same generator they draw the same noise, bit for bit: ``randn_tensor`` with the velocity's shape (times
K) and the velocity's dtype, in the same order. The numbers agree to fp32 rounding (the originals do not upcast,
but their fp32 coefficient tensors promote every product to fp32; only the noise is in the velocity's dtype).

The elementwise work runs on the fused kernels of :mod:`tempflow.ops`: one pass draws the K branches' samples,
their log-probs and the mean; scoring a given sample is one pass for the log-prob and one for the mean; the Euler
step one more.

Use them directly::

    from tempflow.compat.tempflow_grpo import sde_step_with_logprob_perstep as sde_step_with_logprob

or swap them into an imported TempFlow-GRPO checkout without editing it::

    import flow_grpo.diffusers_patch.sd3_pipeline_with_logprob_perstep
    from tempflow.compat import tempflow_grpo
    tempflow_grpo.patch_perstep()   # the per-step function, wherever it was imported
    tempflow_grpo.patch_scorer()    # the training-time scorer (import the training script's modules first)

Each ``patch_*()`` replaces only functions that behave as that one does (:mod:`tempflow.compat._patch`): the
per-step function and the scorer share a name and a signature, and are told apart by what they do with a given
``prev_sample``. The noise level and K are read from the function being replaced, so an edited checkout (FLUX's
0.9) keeps its settings.

Behaviour kept from the originals (docs/ALGORITHM.md, section 5):

* both raise ``ValueError`` when ``prev_sample`` and ``generator`` are both given;
* the per-step function draws fresh branches even when ``prev_sample`` is given (the original overwrites it), and
  its branches need a timestep of length 1: with B > 1 items and B timestep values the original fails broadcasting
  ``(B, 1, ...)`` against ``(B * K, ...)``; this one raises ``RuntimeError`` saying so, before drawing;
* the scorer with ``prev_sample=None`` draws its noise even when ``determistic=True`` (then returns the Euler step),
  so the generator advances as the original's does.
"""

from __future__ import annotations

import functools

import torch

from . import _core, _patch
from ._patch import Patch
from .flow_grpo import randn_tensor

__all__ = [
    "sde_step_with_logprob_perstep",
    "sde_step_with_logprob",
    "patch_perstep",
    "patch_scorer",
    "patch",
    "Patch",
    "NOISE_LEVEL",
    "NUM_SAMPLES",
]

NOISE_LEVEL = 0.7  # the released code's constant (its comment: 0.9 for FLUX)
NUM_SAMPLES = 6  # branches per call of the per-step function

_BOTH = (
    "Cannot pass both generator and prev_sample. Please make sure that either `generator` or `prev_sample` stays "
    "`None`."
)


def _setup(scheduler, model_output, timestep, sample, noise_level):
    _core.check_inputs(model_output, sample)
    v = model_output if model_output.dtype in (torch.float32, torch.bfloat16, torch.float16) else model_output.float()
    x = sample if sample.dtype in (torch.float32, torch.bfloat16, torch.float16) else sample.float()
    table = _core.table_for(scheduler, noise_level, "flow-grpo", x.device)
    idx, rows = _core.steps(scheduler, timestep, x.shape[0], x.device)
    return v, x, table, idx, rows


def sde_step_with_logprob_perstep(
    self,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    determistic: bool = False,
    *,
    noise_level: float = NOISE_LEVEL,
    num_samples: int = NUM_SAMPLES,
):
    """TempFlow-GRPO's per-step ``sde_step_with_logprob``.

    Args:
        self: the scheduler (``sigmas``, ``timesteps`` after ``set_timesteps``).
        model_output, sample: velocity and state ``(B, ...)``; any float dtype (fp32 maths).
        timestep: 1-D tensor of scheduler timestep values, length 1 (or B with ``determistic=True``).
        prev_sample: ignored (the original overwrites it), but refused together with ``generator``.
        generator: noise source as for diffusers' ``randn_tensor`` (torch's global RNG when None).
        determistic: take the Euler step ``sample + dt * model_output`` (no noise drawn).
        noise_level: ``a`` of ``sigma_t = a sqrt(t / (1 - t))`` (0.7; the released code hard-codes it).
        num_samples: K, branches per item (6; hard-coded in the released code).

    Returns:
        ``determistic=True``: ``(x + dt v (B, ...), log_prob (B,), mean (B, ...), std (n, 1, ..., 1))``.
        Otherwise ``(samples (B*K, ...), log_prob (B*K,), mean repeated (B*K, ...), std (1, 1, ..., 1))`` with row
        ``b*K + j`` branch ``j`` of item ``b``, the noise ``randn_tensor((B*K, ...), generator, dtype=model_output's)``.
        All fp32; ``std = std_dev_t * sqrt(-dt)``; ``log_prob`` is scored against the (repeated) mean.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    v, x, table, idx, rows = _setup(self, model_output, timestep, sample, noise_level)
    if prev_sample is not None and generator is not None:
        raise ValueError(_BOTH)
    std = _core.column(table.std, idx, x.dim())
    if determistic:
        prev = _core.euler(x, v, rows, table)
        return prev, _core.score(x, v, prev, rows, table), _core.mean(x, v, rows, table), std
    b = x.shape[0]
    if idx.numel() != 1 and b > 1:
        raise RuntimeError(
            f"TempFlow-GRPO's per-step function draws its {num_samples} branches with a timestep of length 1: "
            f"with {b} timestep values its std_dev_t ({b}, 1, ...) does not broadcast against the {b * num_samples} "
            "branch rows (the original fails there too); pass t.unsqueeze(0)"
        )
    shape = [b * num_samples, *model_output.shape[1:]]
    noise = _core.draw_noise(shape, generator, model_output.device, v.dtype, randn_tensor, not _core.grad_needed(x, v))
    samples, log_prob, mean = _core.sample(x, v, noise, rows, table, num_samples)
    return samples, log_prob, mean.repeat_interleave(num_samples, dim=0), std


def sde_step_with_logprob(
    self,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    determistic: bool = False,
    *,
    noise_level: float = NOISE_LEVEL,
):
    """TempFlow-GRPO's training-time ``sde_step_with_logprob`` (the scorer).

    Args:
        self: the scheduler (``sigmas``, ``timesteps`` after ``set_timesteps``).
        model_output, sample: velocity and state ``(B, ...)``; any float dtype (fp32 maths).
        timestep: 1-D tensor of scheduler timestep values, length 1 or B (per-sample steps, as in training).
        prev_sample: score this ``x_next`` (returned as given, detached inside the log-prob); when None one is
            drawn: ``mean + std * randn_tensor(model_output.shape, generator, dtype=model_output's)``.
        generator: noise source as for diffusers' ``randn_tensor``; refused together with ``prev_sample``.
        determistic: return the Euler step ``sample + dt * model_output`` as ``prev_sample`` (after drawing the
            noise when ``prev_sample`` is None, as the original) and score it.
        noise_level: ``a`` of ``sigma_t = a sqrt(t / (1 - t))`` (0.7; the released code hard-codes it).

    Returns:
        ``(prev_sample, log_prob (B,), mean (B, ...), std_dev_t * sqrt(-dt) (n, 1, ..., 1))``; fp32 except a given
        ``prev_sample``, which is returned as it came. Differentiable in ``model_output`` (training).
    """
    v, x, table, idx, rows = _setup(self, model_output, timestep, sample, noise_level)
    if prev_sample is not None and generator is not None:
        raise ValueError(_BOTH)
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} does not match {tuple(sample.shape)}")
    std = _core.column(table.std, idx, x.dim())
    noise = None
    if prev_sample is None:
        reuse = not _core.grad_needed(x, v)
        noise = _core.draw_noise(model_output.shape, generator, model_output.device, v.dtype, randn_tensor, reuse)
    if determistic:
        prev = _core.euler(x, v, rows, table)
        return prev, _core.score(x, v, prev, rows, table), _core.mean(x, v, rows, table), std
    if noise is not None:
        prev, log_prob, mean = _core.sample(x, v, noise, rows, table)
        return prev, log_prob, mean, std
    return prev_sample, _core.score(x, v, prev_sample, rows, table), _core.mean(x, v, rows, table), std


sde_step_with_logprob_perstep.__tempflow_compat__ = _patch.PERSTEP
sde_step_with_logprob.__tempflow_compat__ = _patch.SCORER


def _bound(fn, kind: str, settings: dict):
    """``fn`` with the settings read from the function it replaces as defaults (``fn`` itself for the released
    code's settings)."""
    released = {"noise_level": NOISE_LEVEL, "num_samples": NUM_SAMPLES} if kind == _patch.PERSTEP else {}
    released.setdefault("noise_level", NOISE_LEVEL)
    if all(settings.get(k, value) == value for k, value in released.items()):
        return fn

    @functools.wraps(fn)
    def step(self, model_output, timestep, sample, prev_sample=None, generator=None, determistic=False, **kwargs):
        return fn(self, model_output, timestep, sample, prev_sample, generator, determistic, **{**settings, **kwargs})

    step.__tempflow_compat__ = kind
    step.settings = dict(settings)
    return step


def _replacement(fn, kind: str, overrides: dict):
    def make(ident: _patch.Identity):
        settings = {**ident.settings, **{k: v for k, v in overrides.items() if v is not None}}
        return _bound(fn, kind, settings)

    return make


def patch_perstep(
    noise_level: float | None = None,
    num_samples: int | None = None,
    package: str | None = None,
    name: str = "sde_step_with_logprob",
) -> Patch:
    """Put :func:`sde_step_with_logprob_perstep` in place of TempFlow-GRPO's per-step function in every imported
    module that holds it (its defining module, the per-step pipelines that imported it, ``__main__``).

    Only functions that behave as the per-step function are replaced (signature with ``determistic``; fresh
    branches drawn even when ``prev_sample`` is given; its numbers on a tiny input); the scorer and Flow-GRPO's
    step are left alone. ``noise_level`` and ``num_samples`` default to the values read from the function being
    replaced. Returns a :class:`Patch` (``undo()``, or use it as a context manager)."""
    make = _replacement(
        sde_step_with_logprob_perstep, _patch.PERSTEP, {"noise_level": noise_level, "num_samples": num_samples}
    )
    return _patch.apply({_patch.PERSTEP: make}, "tempflow.compat.tempflow_grpo.patch_perstep()", name, package)


def patch_scorer(
    noise_level: float | None = None, package: str | None = None, name: str = "sde_step_with_logprob"
) -> Patch:
    """Put :func:`sde_step_with_logprob` in place of TempFlow-GRPO's training-time scorer in every imported module
    that holds it (``sd3_sde_with_logprob``, its non-per-step pipeline, the training script's ``__main__``).

    Only functions that behave as the scorer are replaced (signature with ``determistic``; a given ``prev_sample``
    returned as is; its numbers on a tiny input); the per-step function and Flow-GRPO's step are left alone.
    ``noise_level`` defaults to the value read from the function being replaced."""
    make = _replacement(sde_step_with_logprob, _patch.SCORER, {"noise_level": noise_level})
    return _patch.apply({_patch.SCORER: make}, "tempflow.compat.tempflow_grpo.patch_scorer()", name, package)


def patch(package: str | None = None, name: str = "sde_step_with_logprob") -> Patch:
    """Both: the per-step function and the scorer, each replaced where it is recognised (settings read from each).
    Raises when neither is found."""
    kinds = {
        _patch.PERSTEP: _replacement(sde_step_with_logprob_perstep, _patch.PERSTEP, {}),
        _patch.SCORER: _replacement(sde_step_with_logprob, _patch.SCORER, {}),
    }
    return _patch.apply(kinds, "tempflow.compat.tempflow_grpo.patch()", name, package)
