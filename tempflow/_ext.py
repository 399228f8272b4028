"""Loading of the compiled extensions, with the reason recorded when one is missing.

``setup.py`` writes ``_build_info.json`` next to this file: which extensions it built and, for each one it
skipped, why. Import errors at run time are recorded the same way. ``tempflow doctor`` prints both.
"""

from __future__ import annotations

import importlib
import json
import os
from functools import cache

import torch

_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info() -> dict:
    """What setup.py recorded at install time (empty when the package was never built, e.g. a bare checkout)."""
    try:
        with open(_INFO_PATH) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


@cache
def load(name: str) -> tuple[bool, str]:
    """Import ``tempflow.<name>`` (``_C`` or ``_C_cuda``) once; returns ``(loaded, reason_if_not)``."""
    try:
        importlib.import_module(f"tempflow.{name}")
    except Exception as exc:
        recorded = build_info().get("extensions", {}).get(name, {})
        if recorded and not recorded.get("built", True):
            return False, f"not built at install: {recorded.get('reason', 'no reason recorded')}"
        if not recorded:
            hint = "the package was not built with setup.py; run `pip install --no-build-isolation -e .`"
            return False, f"{hint} ({type(exc).__name__}: {exc})"
        return False, f"built but failed to load ({type(exc).__name__}: {exc}); rebuild against torch " + (
            f"{torch.__version__} with `pip install --no-build-isolation -e .`"
        )
    if name == "_C":
        _register_fakes()
    return True, ""


def _register_fakes() -> None:
    """Fake (meta) implementations so torch.compile and FakeTensor can trace through the C++ ops."""
    lib = "tempflow_cpu::"

    @torch.library.register_fake(lib + "philox_normal")
    def _(keys, n, offset=0):
        return keys.new_empty((keys.numel(), n), dtype=torch.float32)

    @torch.library.register_fake(lib + "branch_sample")
    def _(x, v, coef_x, coef_v, std, noise, keys, K, return_mean):
        b, d = x.shape
        mean = x.new_empty((b, d) if return_mean else (0,), dtype=torch.float32)
        return x.new_empty((b, K, d), dtype=torch.float32), x.new_empty((b, K), dtype=torch.float32), mean

    @torch.library.register_fake(lib + "branch_logp")
    def _(v, x, actions, coef_x, coef_v, v_ref):
        b, k, _ = actions.shape
        return v.new_empty((b, k), dtype=torch.float32), v.new_empty((b,), dtype=torch.float32)

    @torch.library.register_fake(lib + "branch_logp_backward")
    def _(alpha, beta, v, x, actions, coef_x, coef_v, v_ref):
        return torch.empty_like(v)

    @torch.library.register_fake(lib + "cfg_ode_step")
    def _(x, v_uncond, v_cond, guidance, dt):
        return torch.empty_like(x, dtype=torch.float32)
