"""The reward protocol: ``reward(images, prompts, metadata) -> (B,)``, and a weighted sum of rewards."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Reward", "RewardError", "WeightedSum", "checked", "check_images"]


class RewardError(RuntimeError):
    """A reward returned something unusable (wrong shape, NaN/Inf); the message names the reward."""


def check_images(images: torch.Tensor, prompts: Sequence[str], who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be (B, C, H, W) with C = 1 or 3 in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{who}: {len(prompts)} prompts for {images.shape[0]} images")


def checked(name: str, out, batch: int) -> torch.Tensor:
    """``out`` as a float tensor of shape ``(batch,)``, or a :class:`RewardError` naming reward ``name``."""
    if not isinstance(out, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a tensor of shape ({batch},)")
    if out.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(out.shape)}, expected ({batch},)")
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        raise RewardError(f"reward {name!r} returned {int((~torch.isfinite(out)).sum())} non-finite values (NaN/Inf)")
    return out


class Reward:
    """Base class of rewards: subclasses set ``name`` and implement ``score``; calling one checks the inputs and
    the output. ``device`` is where the reward model runs; images are moved there and the result comes back on
    the images' device."""

    name = "reward"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
        check_images(images, prompts, self.name)
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        out = self.score(images.to(self.device, torch.float32).clamp(0, 1), list(prompts), metadata)
        return checked(self.name, out, images.shape[0]).to(images.device)


class WeightedSum(Reward):
    """``sum_i w_i r_i``: ``WeightedSum({DigitCorrectness(): 1.0, JpegCompressibility(): 0.1})``. Each part is
    checked on its own, so a broken part is named in the error."""

    name = "weighted-sum"

    def __init__(self, parts: dict[Reward, float] | Sequence[tuple[Reward, float]]):
        items = list(parts.items()) if isinstance(parts, dict) else list(parts)
        if not items:
            raise ValueError("WeightedSum needs at least one (reward, weight)")
        for reward, weight in items:
            if not callable(reward):
                raise TypeError(f"{reward!r} is not a reward (callable images, prompts, metadata -> (B,))")
            if not isinstance(weight, (int, float)):
                raise TypeError(f"weight of {getattr(reward, 'name', reward)!r} must be a number, got {weight!r}")
        super().__init__("cpu")
        self.parts = items

    def _values(self, images, prompts, metadata) -> list[torch.Tensor]:
        out = []
        for reward, _ in self.parts:
            name = getattr(reward, "name", type(reward).__name__)
            out.append(checked(name, reward(images, prompts, metadata), images.shape[0]).to(images.device))
        return out

    def components(self, images, prompts, metadata=None) -> dict[str, torch.Tensor]:
        """Each part's (checked) reward, by name, for logging."""
        out = {}
        for (reward, _), value in zip(self.parts, self._values(images, prompts, metadata), strict=True):
            name = getattr(reward, "name", type(reward).__name__)
            out[name if name not in out else f"{name}#{len(out)}"] = value
        return out

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        check_images(images, prompts, self.name)
        values = self._values(images, prompts, metadata)
        return sum(w * v for (_, w), v in zip(self.parts, values, strict=True))
