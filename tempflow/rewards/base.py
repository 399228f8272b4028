"""The reward protocol: ``reward(images, prompts, metadata) -> (B,)``, and a weighted sum of rewards.

``images`` are what the model's ``decode`` gives: images ``(B, C, H, W)`` or, from a video model, videos
``(B, F, C, H, W)`` (frames second), in [0, 1]. An image reward refuses videos with a message; score a video with
:class:`tempflow.rewards.FrameReward` (any image reward over chosen frames) or a video reward
(:class:`tempflow.rewards.TemporalConsistency`). A reward class says which it takes with ``video`` (False: images,
True: videos, None: either).

Any callable with that signature is a reward. A :class:`Reward` may also report named values beside the one it
returns (:meth:`Reward.detailed`: a weighted sum's parts, a classifier's accuracy next to its probability); the
trainer logs them, and :func:`score` gives ``(total, named values)`` for any reward, plain functions included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Reward", "RewardError", "WeightedSum", "FunctionReward", "checked", "check_images", "score", "reward_name"]


class RewardError(RuntimeError):
    """A reward returned something unusable (wrong shape, NaN/Inf); the message names the reward."""


def check_images(images: torch.Tensor, prompts: Sequence[str], who: str, video: bool | None = False) -> None:
    """Images ``(B, C, H, W)`` (``video`` False), videos ``(B, F, C, H, W)`` (True) or either (None), C = 1 or 3,
    with one prompt per image or video."""
    tensor = isinstance(images, torch.Tensor)
    shape = tuple(images.shape) if tensor else type(images).__name__
    is_video = tensor and images.dim() == 5 and images.shape[2] in (1, 3)
    is_image = tensor and images.dim() == 4 and images.shape[1] in (1, 3)
    if video is False and is_video:
        raise ValueError(f"{who}: scores images (B, C, H, W) but got videos {shape} (B, F, C, H, W); score videos "
                         f"with tempflow.rewards.FrameReward({who!r} reward) (its mean over frames; setting "
                         f"{{frames: {{reward: {who}}}}}) or a video reward such as temporal-consistency")  # fmt: skip
    if video is True and is_image:
        raise ValueError(f"{who}: scores videos (B, F, C, H, W) but got images {shape}; it needs a video model's "
                         "samples")  # fmt: skip
    if not ((video is not True and is_image) or (video is not False and is_video)):
        want = {False: "(B, C, H, W)", True: "(B, F, C, H, W)", None: "(B, C, H, W) or videos (B, F, C, H, W)"}
        raise ValueError(f"{who}: images must be {want[video]} with C = 1 or 3 in [0, 1], got {shape}")
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


def reward_name(reward) -> str:
    """What a reward is called in errors and metrics: its ``name``, else its function or class name."""
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def score(reward, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
    """``(total (B,), {name: (B,)})`` for any reward: what to train on, and the named values to log (the reward
    itself for a plain function). Every value is checked (shape, finite) and named in the error."""
    b = images.shape[0]
    if isinstance(reward, Reward):
        total, parts = reward.detailed(images, prompts, metadata)
    else:
        total = reward(images, list(prompts), metadata)
        parts = {reward_name(reward): total}
    total = checked(reward_name(reward), total, b).to(images.device)
    return total, {k: checked(k, v, b).to(images.device) for k, v in parts.items()}


class Reward:
    """Base class of rewards: subclasses set ``name`` and implement ``score``; calling one checks the inputs and
    the output. ``device`` is where the reward model runs (None: wherever the images are); images are moved there
    and the result comes back on the images' device."""

    name = "reward"
    #: what it scores: images (False), videos (True) or either (None)
    video: bool | None = False

    def __init__(self, device: torch.device | str | None = "cpu"):
        self.device = torch.device(device) if device is not None else None

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, images, prompts, metadata) -> tuple[torch.Tensor, list[str], list[dict]]:
        """The checked inputs as ``score`` takes them: images fp32 in [0, 1] on the reward's device, the prompts, one
        metadata dict per image."""
        check_images(images, prompts, self.name, self.video)
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        return images.to(self.device or images.device, torch.float32).clamp(0, 1), list(prompts), metadata

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
        out = self.score(*self.inputs(images, prompts, metadata))
        return checked(self.name, out, images.shape[0]).to(images.device)

    def detailed(self, images, prompts, metadata=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(reward, {name: values})``: the reward and the values to log beside it (by default itself)."""
        value = self(images, prompts, metadata)
        return value, {self.name: value}


class FunctionReward(Reward):
    """A plain ``fn(images, prompts, metadata) -> (B,)`` as a :class:`Reward` named ``name`` (its inputs and output
    checked like every reward's). Images arrive on the images' device, fp32 in [0, 1]: images or videos, as the
    model decodes them (the function takes what it is given)."""

    video = None

    def __init__(self, fn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable: a reward is fn(images, prompts, metadata) -> (B,)")
        super().__init__(device=None)
        self.fn, self.name = fn, name or reward_name(fn)

    def score(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


class WeightedSum(Reward):
    """``sum_i w_i r_i``: ``WeightedSum({DigitCorrectness(): 1.0, JpegCompressibility(): 0.1})``. Each part is
    checked on its own, so a broken part is named in the error; :meth:`detailed` reports every part."""

    name = "weighted-sum"
    video = None  # each part checks what it takes

    def __init__(self, parts: dict[Reward, float] | Sequence[tuple[Reward, float]]):
        items = list(parts.items()) if isinstance(parts, dict) else list(parts)
        if not items:
            raise ValueError("WeightedSum needs at least one (reward, weight)")
        for reward, weight in items:
            if not callable(reward):
                raise TypeError(f"{reward!r} is not a reward (callable images, prompts, metadata -> (B,))")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"weight of {reward_name(reward)!r} must be a number, got {weight!r}")
        super().__init__("cpu")
        self.parts = items

    @torch.no_grad()
    def detailed(self, images, prompts, metadata=None):
        check_images(images, prompts, self.name, None)
        total, named = 0.0, {}
        for reward, weight in self.parts:
            value, parts = score(reward, images, prompts, metadata)
            total = total + weight * value
            for k, v in parts.items():
                named[k if k not in named else f"{k}#{len(named)}"] = v
        return total, named

    def components(self, images, prompts, metadata=None) -> dict[str, torch.Tensor]:
        """Each part's (checked) values, by name, for logging."""
        return self.detailed(images, prompts, metadata)[1]

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        return self.detailed(images, prompts, metadata)[0]
