"""CLIP-based preference rewards, loaded from local folders the user already has (nothing is downloaded):

* :class:`PickScore`   a CLIP model fine-tuned on Pick-a-Pic (transformers ``CLIPModel`` folder, e.g. a copy of
  yuvalkirstain/PickScore_v1, with the processor of laion/CLIP-ViT-H-14); score = logit_scale * cos(image, text).
* :class:`Aesthetic`   the LAION improved aesthetic predictor: an MLP on normalised CLIP ViT-L/14 image embeddings
  (a transformers ``CLIPModel`` folder plus the MLP's ``.pth`` / ``.safetensors`` file).
* :class:`HPSv2`       Human Preference Score v2: open_clip ViT-H-14 with the HPS checkpoint (needs ``open_clip``).

Images go through CLIP's own preprocessing on the reward's device (resize, centre crop, normalise) without a
round trip through PIL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Reward

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(path: str, what: str, hint: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {path!r}: {hint} (tempflow downloads nothing)")
    return path


def clip_pixels(images: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> CLIP input: RGB, shorter side resized to ``size``, centre crop, normalised."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class _TransformersCLIP(Reward):
    """A transformers CLIPModel and its processor from local folders."""

    def __init__(self, path: str, processor_path: str | None, device, what: str, hint: str):
        super().__init__(device)
        _require(path, what, hint)
        try:
            from transformers import AutoProcessor, CLIPModel
        except ImportError as exc:
            raise ImportError(f"{what} needs transformers: pip install transformers (or tempflow[diffusers])") from exc
        self.processor = AutoProcessor.from_pretrained(processor_path or path, local_files_only=True)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        ip = self.processor.image_processor
        crop = ip.crop_size if isinstance(ip.crop_size, int) else ip.crop_size["height"]
        self.size, self.mean, self.std = crop, tuple(ip.image_mean), tuple(ip.image_std)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(images, self.size, self.mean, self.std).to(self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        return _features(self.model.get_text_features(**tok))


def _features(out) -> torch.Tensor:
    """transformers returns a tensor, or (newer releases) an output object holding the pooled projection."""
    if isinstance(out, torch.Tensor):
        return out.float()
    return out.pooler_output.float()


class PickScore(_TransformersCLIP):
    """PickScore: ``logit_scale * cos(image, text)`` of a Pick-a-Pic fine-tuned CLIP (about 18..23 for SD images;
    Flow-GRPO divides by 26). ``path``: the CLIPModel folder; ``processor_path``: the processor folder if apart."""

    name = "pickscore"

    def __init__(self, path: str, processor_path: str | None = None, device="cpu"):
        super().__init__(path, processor_path, device, "PickScore model", "pass the folder of a PickScore CLIPModel")

    def score(self, images, prompts, metadata):
        img = F.normalize(self.image_features(images), dim=-1)
        txt = F.normalize(self.text_features(prompts), dim=-1)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (its state-dict layout: layers.0/2/4/6/7)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class Aesthetic(_TransformersCLIP):
    """LAION aesthetic score (about 1..10) of normalised CLIP image embeddings; the prompt is not used.
    ``clip_path``: a CLIP ViT-L/14 CLIPModel folder; ``head_path``: the MLP weights (.pth or .safetensors)."""

    name = "aesthetic"

    def __init__(self, clip_path: str, head_path: str, processor_path: str | None = None, device="cpu"):
        super().__init__(clip_path, processor_path, device, "CLIP model for the aesthetic predictor",
                         "pass a CLIP ViT-L/14 CLIPModel folder")  # fmt: skip
        _require(
            head_path, "aesthetic predictor head", "pass the MLP weights file (e.g. sac+logos+ava1-l14-linearMSE.pth)"
        )
        if head_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head_path)
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.head = AestheticHead(state["layers.0.weight"].shape[1]).to(self.device).eval()
        self.head.load_state_dict(state)

    def score(self, images, prompts, metadata):
        return self.head(F.normalize(self.image_features(images), dim=-1)).squeeze(-1)


class HPSv2(Reward):
    """Human Preference Score v2: cosine of open_clip ViT-H-14 image and text features with the HPS v2 weights
    (``checkpoint``: e.g. HPS_v2_compressed.pt). Needs the ``open_clip_torch`` package."""

    name = "hpsv2"

    def __init__(self, checkpoint: str, device="cpu", arch: str = "ViT-H-14"):
        super().__init__(device)
        _require(checkpoint, "HPS v2 checkpoint", "pass the path of HPS_v2_compressed.pt")
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("HPSv2 needs open_clip: pip install open_clip_torch") from exc
        model = open_clip.create_model(arch, pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.size = (
            model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        )

    def score(self, images, prompts, metadata):
        img = F.normalize(self.model.encode_image(clip_pixels(images, self.size)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1)
