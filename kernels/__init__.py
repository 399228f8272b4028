"""Triton kernels of tempflow, installed as the subpackage ``tempflow.kernels``.

Importing this package never fails: ``AVAILABLE`` says whether Triton could be imported and ``REASON`` why
not. Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors (tests do).
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    AVAILABLE = True
    REASON = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    AVAILABLE = False
    REASON = f"triton is not importable ({type(exc).__name__}: {exc})"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["AVAILABLE", "REASON", "INTERPRET"]
