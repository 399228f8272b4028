"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 0..16), upsampled: the data of the embedded default.

Nothing is downloaded: the digits ship inside scikit-learn (install with ``pip install scikit-learn`` or the
``dev`` extra). The train / held-out split is a fixed permutation, so every command that uses it agrees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPLIT_SEED = 20260101
HELD_OUT_FRACTION = 0.2


def digits(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, size, size) fp32 in [0, 1], labels (N,) int64)`` for ``split`` in train | held-out | all."""
    if split not in ("train", "held-out", "all"):
        raise ValueError(f"split must be train, held-out or all, got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data ship with scikit-learn: pip install scikit-learn (or tempflow[dev])"
        ) from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held = int(round(HELD_OUT_FRACTION * len(labels)))
    pick = {"held-out": order[:n_held], "train": order[n_held:], "all": torch.arange(len(labels))}[split]
    return images[pick], labels[pick]
