"""Import one peer checkout as the package ``flow_grpo`` (both peers use that name) and take it out again."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUTS = {"flow_grpo": "flow_grpo_checkout", "tempflow_grpo": "tempflow_grpo_checkout"}
MODULES = {
    "flow_grpo": [
        "flow_grpo.diffusers_patch.sd3_sde_with_logprob",
        "flow_grpo.diffusers_patch.sd3_pipeline_with_logprob",
    ],
    "tempflow_grpo": [
        "flow_grpo.diffusers_patch.sd3_sde_with_logprob",
        "flow_grpo.diffusers_patch.sd3_sde_with_logprob_perstep",
        "flow_grpo.diffusers_patch.sd3_pipeline_with_logprob_perstep",
    ],
}


def _drop_flow_grpo() -> None:
    for name in [m for m in sys.modules if m == "flow_grpo" or m.startswith("flow_grpo.")]:
        del sys.modules[name]


@contextlib.contextmanager
def checkout(which: str):
    """``with checkout("tempflow_grpo") as mods:`` imports that peer's modules (``mods[name]``) as ``flow_grpo``;
    on exit the package leaves ``sys.modules`` and ``sys.path``."""
    root = os.path.join(HERE, CHECKOUTS[which])
    _drop_flow_grpo()
    sys.path.insert(0, root)
    try:
        yield {name: importlib.import_module(name) for name in MODULES[which]}
    finally:
        sys.path.remove(root)
        _drop_flow_grpo()


_LOADED: dict[tuple[str, str], object] = {}


def load(which: str, module: str):
    """One step module of a peer checkout (no relative imports), executed under a private name and NOT registered
    in ``sys.modules``: both peers can be used side by side (benchmarks, reference functions in tests), and no
    ``patch()`` will find or replace what it holds."""
    import importlib.util

    key = (which, module)
    if key not in _LOADED:
        path = os.path.join(HERE, CHECKOUTS[which], "flow_grpo", "diffusers_patch", module + ".py")
        spec = importlib.util.spec_from_file_location(f"peer_{which}.{module}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _LOADED[key] = mod
    return _LOADED[key]


def source(which: str, module: str) -> str:
    """The text of a peer step module (to derive an edited checkout from it)."""
    with open(os.path.join(HERE, CHECKOUTS[which], "flow_grpo", "diffusers_patch", module + ".py")) as fh:
        return fh.read()
