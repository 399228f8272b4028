"""``patch()`` for the drop-ins of :mod:`tempflow.compat`: find a peer's step function wherever it was imported and
put a drop-in in its place, recognising the peer's function by its signature and by what it does on a tiny input,
never by the name of the package it lives in (Flow-GRPO and TempFlow-GRPO are both packages named ``flow_grpo``,
and both name their functions ``sde_step_with_logprob``).

Kinds of function told apart:

* ``flow_grpo``: Flow-GRPO's step, ``(self, model_output, timestep, sample, noise_level, prev_sample, generator
  [, sde_type [, return_sqrt_dt]])``; given a ``prev_sample`` it returns the same numbers as
  :func:`tempflow.compat.flow_grpo.sde_step_with_logprob` (``std_dev_t`` without ``sqrt(-dt)``).
* ``tempflow_grpo.perstep`` and ``tempflow_grpo.scorer``: TempFlow-GRPO's functions, both ``(self, model_output,
  timestep, sample, prev_sample, generator, determistic)``. The probe tells them apart by behaviour, not by module
  name: given a ``prev_sample`` (and no generator) the scorer returns it, while the per-step function draws fresh
  branches; with a generator, the number of rows it returns gives K (6 in the released code). Its noise level is
  read from the 4th output (``std_dev_t * sqrt(-dt)``) and both are then checked against tempflow's function with
  those settings on the same generator (the same noise, bit for bit, so the samples must agree).

The probe runs on CPU tensors of shape (2, 2, 4, 4), under ``torch.no_grad()``, with torch's global CPU RNG saved and
restored, on a stand-in scheduler (the 4-step SD3 grid) that has ``sigmas``, ``timesteps`` and ``index_for_timestep``.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import sde

FLOW_GRPO = "flow_grpo"
PERSTEP = "tempflow_grpo.perstep"
SCORER = "tempflow_grpo.scorer"

_FLOW_PARAMS = ["model_output", "timestep", "sample", "noise_level", "prev_sample", "generator"]
_FLOW_OPTIONAL = ["sde_type", "return_sqrt_dt"]
_TEMPFLOW_PARAMS = ["model_output", "timestep", "sample", "prev_sample", "generator", "determistic"]

USE = {
    FLOW_GRPO: "tempflow.compat.flow_grpo.patch()",
    PERSTEP: "tempflow.compat.tempflow_grpo.patch_perstep()",
    SCORER: "tempflow.compat.tempflow_grpo.patch_scorer()",
}
DESCRIBE = {
    FLOW_GRPO: "Flow-GRPO's step (noise_level, sde_type; std_dev_t without sqrt(-dt))",
    PERSTEP: "TempFlow-GRPO's per-step function (determistic; K branches per call; std_dev_t * sqrt(-dt))",
    SCORER: "TempFlow-GRPO's training-time scorer (determistic; one sample per row; std_dev_t * sqrt(-dt))",
}


@dataclass
class Identity:
    """What a function was recognised as: ``kind`` (None when not recognised), why, and the settings read from it
    (TempFlow-GRPO: ``noise_level`` and, per-step, ``num_samples``)."""

    kind: str | None
    reason: str
    settings: dict = field(default_factory=dict)


class Patch:
    """Record of a ``patch()``: ``replaced`` (module, name, original) triples; ``skipped`` (``module.name``, reason) for
    functions of that name left alone. ``undo()`` (or leaving the ``with`` block) restores the originals."""

    def __init__(self, replaced: list[tuple[object, str, object]], skipped: list[tuple[str, str]] | None = None):
        self.replaced = replaced
        self.skipped = skipped or []

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

    def __repr__(self) -> str:
        return f"Patch(replaced in {self.modules}, skipped {[w for w, _ in self.skipped]})"


# --------------------------------------------------------------------------------------------------------------
# Recognising a function
# --------------------------------------------------------------------------------------------------------------


class ProbeScheduler:
    """The two tensors the peers' steps read from a diffusers scheduler, and diffusers' ``index_for_timestep``."""

    def __init__(self, grid: sde.TimeGrid):
        self.sigmas, self.timesteps = grid.sigmas, grid.timesteps

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()


def _signature_kind(fn) -> tuple[str | None, str]:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        return None, f"no inspectable signature ({e})"
    rest = params[1:]
    if rest[: len(_FLOW_PARAMS)] == _FLOW_PARAMS:
        extra = rest[len(_FLOW_PARAMS) :]
        if extra == _FLOW_OPTIONAL[: len(extra)]:
            return FLOW_GRPO, ""
    if rest == _TEMPFLOW_PARAMS:
        return "tempflow_grpo", ""
    return None, f"signature ({', '.join(params)}) is neither Flow-GRPO's nor TempFlow-GRPO's"


def _close(a, b, what: str) -> str:
    """'' when ``a`` and ``b`` are tensors of one shape with close values, else what differs."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"{what} is {type(a).__name__}, expected a tensor"
    if a.shape != b.shape:
        return f"{what} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
    if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
        return f"{what} differs (max abs difference {float((a.float() - b.float()).abs().max()):.3g})"
    return ""


def _compare(theirs, ours, names) -> str:
    if not isinstance(theirs, tuple) or len(theirs) != len(ours):
        return f"returned {type(theirs).__name__} of length {len(theirs) if isinstance(theirs, tuple) else '?'}"
    for a, b, name in zip(theirs, ours, names, strict=True):
        why = _close(a, b, name)
        if why:
            return why
    return ""


def _probe_inputs():
    g = torch.Generator().manual_seed(20240613)
    shape = (2, 2, 4, 4)
    x, v, prev = (torch.randn(shape, generator=g) for _ in range(3))
    return ProbeScheduler(sde.time_grid(4, shift=3.0)), x, v, prev


_NAMES = ("prev_sample", "log_prob", "prev_sample_mean", "4th output")


def _probe_flow_grpo(fn) -> Identity:
    from .flow_grpo import sde_step_with_logprob as ours

    sched, x, v, prev = _probe_inputs()
    ts = sched.timesteps[[0, 2]]  # per-sample steps, one at t = 1
    why = _compare(fn(sched, v, ts, x, 0.7, prev), ours(sched, v, ts, x, 0.7, prev), _NAMES)
    if why:
        return Identity(None, f"has Flow-GRPO's signature but not its numbers: {why}")
    return Identity(FLOW_GRPO, DESCRIBE[FLOW_GRPO])


def _probe_tempflow(fn) -> Identity:
    from . import tempflow_grpo as tg

    sched, x, v, prev = _probe_inputs()
    ts = sched.timesteps[[1]]
    b = x.shape[0]
    seed = 7
    # scorer or per-step: the scorer returns a given prev_sample, the per-step function draws fresh branches
    given = fn(sched, v, ts, x, prev, None, False)
    if not isinstance(given, tuple) or not given or not isinstance(given[0], torch.Tensor):
        return Identity(None, "has TempFlow-GRPO's signature but does not return a tuple of tensors")
    kind = SCORER if given[0].shape == prev.shape and torch.equal(given[0], prev) else PERSTEP
    drawn = fn(sched, v, ts, x, None, torch.Generator().manual_seed(seed), False)
    if not isinstance(drawn, tuple) or len(drawn) != 4 or not isinstance(drawn[0], torch.Tensor):
        return Identity(None, "has TempFlow-GRPO's signature but does not return 4 tensors")
    rows = drawn[0].shape[0]
    if rows % b:
        return Identity(None, f"returned {rows} rows for a batch of {b}")
    k = rows // b
    if kind == SCORER and k != 1:
        return Identity(None, f"returns a given prev_sample but draws {k} rows per item")
    # the noise level, from the 4th output std_dev_t * sqrt(-dt) = a * sqrt(t / (1 - t)) * sqrt(-dt)
    t, t_next = sched.sigmas[1].double(), sched.sigmas[2].double()
    unit = float(torch.sqrt(t / (1 - t)) * torch.sqrt(t - t_next))
    try:
        a = float(f"{float(drawn[3].reshape(-1)[0]) / unit:.6g}")
    except (TypeError, ValueError, RuntimeError) as e:
        return Identity(None, f"4th output is not std_dev_t * sqrt(-dt) ({e})")
    if not a > 0:
        return Identity(None, f"4th output gives noise level {a}")
    settings = {"noise_level": a} if kind == SCORER else {"noise_level": a, "num_samples": k}
    ours = tg.sde_step_with_logprob if kind == SCORER else tg.sde_step_with_logprob_perstep
    mine = ours(sched, v, ts, x, None, torch.Generator().manual_seed(seed), False, **settings)
    why = _compare(drawn, mine, _NAMES)
    if not why:
        det = fn(sched, v, ts, x, None, torch.Generator().manual_seed(seed), True)
        why = _compare(det, ours(sched, v, ts, x, None, torch.Generator().manual_seed(seed), True, **settings), _NAMES)
    if why:
        return Identity(None, f"has TempFlow-GRPO's signature but not its numbers: {why}")
    return Identity(kind, DESCRIBE[kind], settings)


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def identify(fn: Callable) -> Identity:
    """What ``fn`` is (cached per function object). Calling it on the probe's tiny input is the only side effect,
    and the global RNG is restored afterwards."""
    try:
        return _IDENTITIES[fn]
    except (KeyError, TypeError):
        pass
    kind, why = _signature_kind(fn)
    if kind is None:
        ident = Identity(None, why)
    else:
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                ident = _probe_flow_grpo(fn) if kind == FLOW_GRPO else _probe_tempflow(fn)
        except Exception as e:  # a function that fails on the probe is not one we can stand in for
            ident = Identity(None, f"has a peer's signature but failed on the probe: {type(e).__name__}: {e}")
    try:
        _IDENTITIES[fn] = ident
    except TypeError:
        pass
    return ident


# --------------------------------------------------------------------------------------------------------------
# Finding and replacing
# --------------------------------------------------------------------------------------------------------------


def _outside_modules():
    """Imported modules that are not tempflow's (whose drop-ins and their module-level names are ours)."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name == "tempflow" or mod_name.startswith("tempflow."):
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            yield module, namespace


def holders(name: str, package: str | None = None) -> list[tuple[Callable, list[object]]]:
    """Every distinct plain function bound to ``name`` in an imported module outside tempflow (tempflow's drop-ins
    excluded), with the modules that hold it. ``package`` keeps only functions defined in that package."""
    found: dict[int, tuple[Callable, list[object]]] = {}
    for module, namespace in _outside_modules():
        fn = namespace.get(name)
        if not inspect.isfunction(fn) or getattr(fn, "__tempflow_compat__", None):
            continue
        origin = getattr(fn, "__module__", "") or ""
        if package is not None and not (origin == package or origin.startswith(package + ".")):
            continue
        found.setdefault(id(fn), (fn, []))[1].append(module)
    return list(found.values())


def _where(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def apply(
    kinds: dict[str, Callable[[Identity], Callable]],
    caller: str,
    name: str = "sde_step_with_logprob",
    package: str | None = None,
) -> Patch:
    """Replace every holder of a function recognised as one of ``kinds`` by ``kinds[kind](identity)``.

    Raises ``RuntimeError`` naming each function found and why it was left alone when none is recognised (and none
    was already replaced by an earlier ``patch()``)."""
    replaced, skipped = [], []
    already = any(getattr(ns.get(name), "__tempflow_compat__", None) in kinds for _, ns in _outside_modules())
    found = holders(name, package)
    for fn, modules in found:
        ident = identify(fn)
        if ident.kind in kinds:
            replacement = kinds[ident.kind](ident)
            for module in modules:
                replaced.append((module, name, fn))
                setattr(module, name, replacement)
        else:
            hint = f" -> use {USE[ident.kind]}" if ident.kind in USE else ""
            skipped.append((_where(fn), f"{ident.reason}{hint}"))
    if not replaced and not already:
        wanted = " or ".join(DESCRIBE[k] for k in kinds)
        if not found:
            raise RuntimeError(
                f"{caller}: no imported module holds a function named {name}: import the flow_grpo modules (e.g. "
                f"flow_grpo.diffusers_patch.sd3_sde_with_logprob) before calling {caller}"
            )
        lines = "\n".join(f"  {where}: {why}" for where, why in skipped)
        raise RuntimeError(
            f"{caller}: none of the imported functions named {name} is {wanted}, so nothing was replaced:\n{lines}"
        )
    return Patch(replaced, skipped)
