"""Rewards for videos ``(B, F, C, H, W)`` in [0, 1] (what a video model's ``decode`` gives, e.g. Wan's):
:class:`FrameReward` scores chosen frames with any image reward and averages them; :class:`TemporalConsistency`
scores how little consecutive frames differ.

From settings (``tempflow train``'s ``reward``)::

    reward:
      frames: {weight: 1.0, reward: {pickscore: {path: /models/PickScore_v1}}, frames: all}
      temporal-consistency: 0.2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward, reward_name, score

__all__ = ["FrameReward", "TemporalConsistency", "frames_reward"]


class FrameReward(Reward):
    """The mean of an image reward over chosen frames of each video: ``frames`` is ``"all"``, ``"first"``,
    ``"last"`` or a list of frame indices (negative ones count from the end). Every chosen frame is scored with its
    video's prompt and metadata, in one call of the image reward (B x frames images). Its name is ``name`` (default
    ``"frames"``)."""

    video = True

    def __init__(self, image_reward, frames: str | Sequence[int] = "all", name: str = "frames"):
        if not callable(image_reward):
            raise TypeError(f"{image_reward!r} is not a reward (callable images, prompts, metadata -> (B,))")
        if isinstance(frames, str):
            if frames not in ("all", "first", "last"):
                raise ValueError(f"frames must be 'all', 'first', 'last' or a list of frame indices, got {frames!r}")
        else:
            frames = list(frames)
            if not frames or not all(isinstance(i, int) and not isinstance(i, bool) for i in frames):
                raise ValueError(f"frames must be a non-empty list of integer frame indices, got {frames!r}")
        super().__init__(device=None)
        self.image_reward, self.frames, self.name = image_reward, frames, name

    def indices(self, num_frames: int) -> list[int]:
        """The frames scored in a video of ``num_frames`` frames."""
        if self.frames == "all":
            return list(range(num_frames))
        if self.frames == "first":
            return [0]
        if self.frames == "last":
            return [num_frames - 1]
        bad = [i for i in self.frames if not -num_frames <= i < num_frames]
        if bad:
            raise ValueError(f"{self.name}: frame indices {bad} are outside a video of {num_frames} frames")
        return [i % num_frames for i in self.frames]

    def score(self, videos, prompts, metadata):
        b, f = videos.shape[:2]
        idx = self.indices(f)
        images = videos[:, idx].reshape(b * len(idx), *videos.shape[2:])
        texts = [p for p in prompts for _ in idx]
        meta = [m for m in metadata for _ in idx]
        values, _ = score(self.image_reward, images, texts, meta)
        return values.view(b, len(idx)).mean(1)

    def __repr__(self) -> str:
        return f"FrameReward({reward_name(self.image_reward)}, frames={self.frames!r})"


class TemporalConsistency(Reward):
    """``1 - mean |x_{f+1} - x_f|``: one minus the mean absolute difference of consecutive frames over pixels and
    channels (frames in [0, 1]), so it lies in [0, 1]: 1 for a still video (or a single frame), lower the more the
    frames change. It rewards stillness as much as smoothness, so use it with a small weight beside a per-frame
    quality reward (:class:`FrameReward`), never alone: alone, a static video is its optimum."""

    name = "temporal-consistency"
    video = True

    def score(self, videos, prompts, metadata):
        if videos.shape[1] < 2:
            return torch.ones(videos.shape[0], device=videos.device)
        return 1 - (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


def frames_reward(reward, frames: str | Sequence[int] = "all", device=None, name: str = "frames") -> FrameReward:
    """:class:`FrameReward` from settings: ``reward`` is any reward setting (a name, an import path, a weighted
    mapping; see :func:`tempflow.rewards.build_reward`), built on ``device``."""
    from .registry import build_reward

    return FrameReward(build_reward(reward, device=device), frames=frames, name=name)
