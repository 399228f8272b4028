"""Branch plans: which steps of a T-step rollout are stochastic, and how (docs/ALGORITHM.md sections 2 and 3).

* ``BranchPlan.tempflow(T, K)``: TempFlow-GRPO. Each seed follows a deterministic ODE main path; at every branch
  step k (default 0 .. T-2) K one-step SDE branches leave the main path and are completed by the ODE. Rows:
  ``(prompt, seed, k, j)`` with the reward of branch j's completion.
* ``BranchPlan.flow_grpo(T)``: Flow-GRPO. Each seed is one trajectory, SDE at every step; rows ``(prompt, seed,
  k, 0)`` for the trained steps, all with the terminal reward.
* ``BranchPlan.window(T, start, size)``: SDE on a window of steps and ODE elsewhere (MixGRPO), same rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BranchPlan:
    """``mode`` "branch" (K branches per branch step off an ODE main path) or "trajectory" (one path per seed,
    SDE on ``sde_steps``). ``trained_steps``: the steps that produce training rows."""

    num_steps: int
    mode: str
    sde_steps: tuple[int, ...]
    K: int = 1

    def __post_init__(self):
        if self.mode not in ("branch", "trajectory"):
            raise ValueError(f"plan mode must be 'branch' or 'trajectory', got {self.mode!r}")
        if self.num_steps < 1:
            raise ValueError(f"a plan needs at least one step, got T = {self.num_steps}")
        if not self.sde_steps:
            raise ValueError("a plan needs at least one stochastic step")
        bad = [k for k in self.sde_steps if not 0 <= k < self.num_steps]
        if bad or len(set(self.sde_steps)) != len(self.sde_steps):
            raise ValueError(
                f"stochastic steps {list(self.sde_steps)} must be distinct and within 0 .. {self.num_steps - 1}"
            )
        if self.K < 1 or (self.mode == "trajectory" and self.K != 1):
            raise ValueError(f"K must be >= 1 (and 1 for trajectory plans), got {self.K}")

    @classmethod
    def tempflow(cls, num_steps: int = 10, K: int = 6, branch_steps=None) -> BranchPlan:
        steps = tuple(range(num_steps - 1)) if branch_steps is None else tuple(sorted(branch_steps))
        return cls(num_steps, "branch", steps, K)

    @classmethod
    def flow_grpo(cls, num_steps: int = 10, sde_steps=None) -> BranchPlan:
        steps = tuple(range(num_steps)) if sde_steps is None else tuple(sorted(sde_steps))
        return cls(num_steps, "trajectory", steps, 1)

    @classmethod
    def window(cls, num_steps: int, start: int, size: int) -> BranchPlan:
        return cls(num_steps, "trajectory", tuple(range(start, min(start + size, num_steps))), 1)

    @property
    def rows_per_seed(self) -> int:
        return len(self.sde_steps) * self.K

    def model_calls_per_seed(self) -> int:
        """Per-seed forwards (per sample): TempFlow 9 + 45K for T = 10 with all branch steps; Flow-GRPO T."""
        if self.mode == "trajectory":
            return self.num_steps
        last = max(self.sde_steps)
        return (last + 1) + self.K * sum(self.num_steps - 1 - k for k in self.sde_steps)
