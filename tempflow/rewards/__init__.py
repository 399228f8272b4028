"""Rewards: one protocol, ``reward(images (B, C, H, W) in [0, 1], prompts, metadata) -> (B,)`` (videos
``(B, F, C, H, W)`` from video models), composable as a weighted sum. Built in: digit correctness (shipped
classifier), JPEG compressibility, and CLIP-based preference models loaded from local weights (PickScore, aesthetic
predictor, HPS v2); for videos, any image reward over chosen frames (FrameReward) and temporal consistency.
:func:`build_reward` makes one from a setting (a name, an import path of your own code, a weighted mapping, a reward
server's url); :func:`serve` and :class:`RemoteReward` score one in another process or on another machine."""

from .base import FunctionReward, Reward, RewardError, WeightedSum, checked, score
from .clip import Aesthetic, HPSv2, PickScore
from .digits import DigitCorrectness, prompt_digit
from .jpeg import JpegCompressibility
from .registry import REWARDS, build_reward, register_reward
from .remote import RemoteReward, serve
from .video import FrameReward, TemporalConsistency

__all__ = [
    "REWARDS",
    "build_reward",
    "register_reward",
    "score",
    "FunctionReward",
    "RemoteReward",
    "serve",
    "Reward",
    "RewardError",
    "WeightedSum",
    "checked",
    "DigitCorrectness",
    "prompt_digit",
    "JpegCompressibility",
    "PickScore",
    "Aesthetic",
    "HPSv2",
    "FrameReward",
    "TemporalConsistency",
]
