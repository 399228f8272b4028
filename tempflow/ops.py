"""Fast paths behind one backend choice.

Backends:
  ``torch``   the pure-torch reference (tempflow.rng, tempflow.sde); always available, any device.
  ``cpu``     C++ with OpenMP (csrc/cpu), CPU tensors; available when the extension was built.
  ``triton``  Triton kernels (kernels/), CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``.

The choice is made per call from the tensor's device: ``backend=`` (argument) or ``TEMPFLOW_BACKEND``
(environment) name one explicitly, and a named backend that cannot serve the device raises; ``auto``
(the default) takes the fastest available one and says once, through ``logging``, why it fell back.
"""

from __future__ import annotations

import logging
import os

import torch

from . import _ext, kernels, rng

__all__ = ["BACKENDS", "backend_status", "resolve_backend", "philox_normal"]

BACKENDS = ("torch", "cpu", "triton")
_log = logging.getLogger("tempflow.ops")
_warned: set[str] = set()
# Looked up once at import, so that resolving a backend inside torch.compile is plain Python.
_CPU_LOADED, _CPU_REASON = _ext.load("_C")


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
    return {"torch": "", "cpu": cpu, "triton": _triton_status(device)}


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
    preferred = ("triton", "torch") if device.type == "cuda" else ("cpu", "torch")
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
        return torch.ops.tempflow.philox_normal(keys, n, offset)
    if name == "triton":
        from .kernels.philox import philox_normal as triton_philox_normal

        return triton_philox_normal(keys, n, offset)
    return rng.normal_from_keys(keys, (n,), offset=offset)
