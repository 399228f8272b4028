"""Digit correctness: the probability, under a small classifier shipped with the package, that an image shows the
digit its prompt asks for ("a handwritten 7" -> 7). The classifier is trained by ``tempflow pretrain classifier``
on the train split of scikit-learn's digits (tempflow.datasets) and its weights ship in tempflow/assets/."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Reward, checked

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CLASSIFIER_WEIGHTS = os.path.join(ASSETS, "digit_classifier.safetensors")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prompt_digit(prompt: str) -> int:
    """The digit a prompt asks for: the first numeral 0-9 or number word in it."""
    for token in re.findall(r"[a-z]+|\d", prompt.lower()):
        if token.isdigit():
            return int(token)
        if token in WORDS:
            return WORDS.index(token)
    raise ValueError(f"prompt {prompt!r} names no digit (0-9 or zero..nine); digit rewards need one")


class DigitClassifier(nn.Module):
    """A small CNN on 1x16x16 images in [0, 1] -> 10 logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 16, 10),
        )
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(prepare(images))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """Any (B, C, H, W) image in [0, 1] -> the classifier's (B, 1, 16, 16) grayscale input."""
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (16, 16):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_classifier(path: str = CLASSIFIER_WEIGHTS, device="cpu") -> DigitClassifier:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"digit classifier weights not found at {path}; rebuild them with `tempflow pretrain classifier`"
        )
    meta_path = os.path.splitext(path)[0] + ".json"
    width = json.load(open(meta_path))["width"] if os.path.exists(meta_path) else 32
    model = DigitClassifier(width)
    model.load_state_dict(load_file(path))
    return model.to(device).eval()


class DigitCorrectness(Reward):
    """``p(prompted digit | image)`` under the shipped classifier; the digit comes from ``metadata["digit"]`` when
    given, else from the prompt. :meth:`detailed` also reports ``digit-agreement``: 1 where the classifier's most
    likely digit is the prompted one (the held-out accuracy the README quotes), from the same forward."""

    name = "digit-correctness"

    def __init__(self, device="cpu", weights: str = CLASSIFIER_WEIGHTS):
        super().__init__(device)
        self.model = load_classifier(weights, self.device)

    def _probs(self, images, prompts, metadata) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.tensor(
            [int(m["digit"]) if "digit" in m else prompt_digit(p) for p, m in zip(prompts, metadata, strict=True)],
            device=self.device,
        )
        return torch.softmax(self.model(images), dim=1), target

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        probs, target = self._probs(images, prompts, metadata)
        return probs.gather(1, target[:, None]).squeeze(1)

    @torch.no_grad()
    def detailed(self, images, prompts, metadata=None):
        probs, target = self._probs(*self.inputs(images, prompts, metadata))
        p = checked(self.name, probs.gather(1, target[:, None]).squeeze(1), len(prompts)).to(images.device)
        agree = (probs.argmax(1) == target).float().to(images.device)
        return p, {self.name: p, "digit-agreement": agree}


def train_classifier(
    seed: int = 0, epochs: int = 40, width: int = 32, threads: int = 1, log=print
) -> tuple[DigitClassifier, float]:
    """Train the classifier on the train split (with small random shifts); returns it and its held-out accuracy.
    Deterministic for a given seed and ``threads`` (fixed data order); the bits also depend on the CPU kernels
    torch picks (oneDNN / MKL / ATen by instruction set), so another CPU can give other weights."""
    from .. import datasets

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = datasets.digits("train", size=16)
        xh, yh = datasets.digits("held-out", size=16)
        model = DigitClassifier(width)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 64):
                idx = order[i : i + 64]
                shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
                batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
                loss = F.cross_entropy(model(batch), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if (epoch + 1) % 10 == 0:
                log(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {accuracy(model, xh, yh):.4f}")
        return model.eval(), accuracy(model, xh, yh)
    finally:
        torch.set_num_threads(previous)


def save_classifier(model: DigitClassifier, path: str = CLASSIFIER_WEIGHTS, **meta) -> None:
    """Write the weights (safetensors) and a JSON of how they were made next to them, each atomically."""
    from .._io import save_weights

    save_weights(path, model.state_dict(), {"width": model.width, **meta})


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()
