"""JPEG compressibility (DDPO's reward): minus the size in kilobytes of the image saved as a JPEG."""

from __future__ import annotations

import io

import torch

from .base import Reward


class JpegCompressibility(Reward):
    """``-kilobytes`` of each image as an RGB JPEG at ``quality`` (95, as DDPO): simpler images score higher."""

    name = "jpeg-compressibility"

    def __init__(self, quality: int = 95, device="cpu"):
        super().__init__(device)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = quality

    def score(self, images, prompts, metadata) -> torch.Tensor:
        from PIL import Image

        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        sizes = []
        for img in pixels.permute(0, 2, 3, 1).cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(-buf.tell() / 1000.0)
        return torch.tensor(sizes, dtype=torch.float32)
