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
    _register_fakes("tempflow_cpu" if name == "_C" else "tempflow_cuda")
    return True, ""


def _register_fakes(namespace: str) -> None:
    """Fake (meta) implementations so torch.compile and FakeTensor can trace through the compiled ops that Python
    calls directly. (The branch ops are reached through the device-independent custom ops of tempflow.ops, which
    carry their own fakes.)"""
    if namespace != "tempflow_cpu":
        return

    @torch.library.register_fake("tempflow_cpu::philox_normal")
    def _(keys, n, offset=0):
        return keys.new_empty((keys.numel(), n), dtype=torch.float32)
