"""Rollouts: branch plans, the batched tree-rollout engine, and the naive official-style loop it must equal."""

from .batch import RolloutBatch
from .engine import (
    CallableModel,
    RolloutConfig,
    buckets,
    compile_model,
    compile_stats,
    prompt_major,
    rollout,
    start_latents,
)
from .naive import naive_rollout
from .plan import BranchPlan

__all__ = ["BranchPlan", "RolloutBatch", "RolloutConfig", "CallableModel", "rollout", "naive_rollout",
           "start_latents", "prompt_major", "buckets", "compile_model", "compile_stats"]  # fmt: skip
