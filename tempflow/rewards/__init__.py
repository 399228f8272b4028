"""Rewards: one protocol, ``reward(images (B, C, H, W) in [0, 1], prompts, metadata) -> (B,)``, composable as a
weighted sum. Built in: digit correctness (shipped classifier), JPEG compressibility, and CLIP-based preference
models loaded from local weights (PickScore, aesthetic predictor, HPS v2)."""

from .base import Reward, RewardError, WeightedSum, checked
from .clip import Aesthetic, HPSv2, PickScore
from .digits import DigitCorrectness, prompt_digit
from .jpeg import JpegCompressibility

__all__ = [
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
]
