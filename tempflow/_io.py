"""Atomic writes (temporary file, then rename): nothing half-written survives a crash."""

from __future__ import annotations

import json
import os

import torch


def synced_torch_save(obj, path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk before it returns."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_torch_save(obj, path: str) -> None:
    """``obj`` at ``path``: written to ``path.tmp``, flushed to disk, then renamed over ``path``."""
    synced_torch_save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_weights(path: str, state_dict: dict, meta: dict) -> None:
    """``state_dict`` as safetensors at ``path`` and ``meta`` as JSON beside it (same name, .json), each atomic."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    meta_path = os.path.splitext(path)[0] + ".json"
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    os.replace(meta_path + ".tmp", meta_path)
