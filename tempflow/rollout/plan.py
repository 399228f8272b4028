"""Branch plans: which steps of a T-step rollout are stochastic, and how (docs/ALGORITHM.md sections 2 and 3).

* ``BranchPlan.tempflow(T, K)``: TempFlow-GRPO. Each seed follows a deterministic ODE main path; at every branch
  step k (default 0 .. T-2) K one-step SDE branches leave the main path and are completed by the ODE. Rows:
  ``(prompt, seed, k, j)`` with the reward of branch j's completion.
* ``BranchPlan.flow_grpo(T)``: Flow-GRPO. Each seed is one trajectory, SDE at every step; rows ``(prompt, seed,
  k, 0)`` for the trained steps, all with the terminal reward.
* ``BranchPlan.window(T, start, size)``: SDE on a window of steps and ODE elsewhere (MixGRPO), same rows.

How a branch is completed is the plan's :class:`Completion` (``completion="euler"``: every remaining grid step, the
paper's; ``"euler:2"``, ``"heun:2"``, ``"dpm2m:3"``, ``"euler:3,3,2,2,1"``, ``"x0"``: cheaper ones). The completion only
has to rank the K branches of one (seed, step) as the exact one would (docs/ALGORITHM.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("euler", "heun", "dpm2m")


@dataclass(frozen=True)
class Completion:
    """How a branch leaving the main path at step k (its sample at grid point k + 1) is carried to t = 0.

    ``method``: ``euler`` (the ODE step of the main path), ``heun`` (Heun's second-order method: a predictor and a
    corrector forward per interval, the last interval, which ends at t = 0, an Euler step, as in Karras et al. and
    diffusers' FlowMatchHeunDiscreteScheduler) or ``dpm2m`` (DPM-Solver++(2M) written for flow velocities: one
    forward per interval, the data prediction ``x - t v`` extrapolated from the previous interval's; the first
    interval and the last one, which ends at t = 0, are first order, which for a flow is the Euler step).
    ``steps``: None (every remaining grid step: exact) or at most M intervals, one M for every branch step, or one M
    per branch step in the plan's order (the last one repeating). With M below the r = T - k - 1 remaining steps the
    intervals run on a sub-grid of the remaining grid points, ``k + 1 + round(j r / M)`` for j = 0 .. M, so the
    model's own time shift still spaces them. ``euler`` with M >= r is the exact completion, bit for bit.

    Text form (the ``completion`` setting): ``euler``, ``euler:2``, ``heun:2``, ``dpm2m:3``, ``euler:3,3,2,2,1``
    and ``x0`` (``euler:1``: the one-step prediction ``x - t v``)."""

    method: str = "euler"
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"completion method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.steps is not None:
            steps = (self.steps,) if isinstance(self.steps, int) else tuple(int(m) for m in self.steps)
            if not steps or min(steps) < 1:
                raise ValueError(f"completion steps {list(steps)}: each M must be >= 1 (or leave M out: every step)")
            object.__setattr__(self, "steps", steps)

    @classmethod
    def parse(cls, text) -> Completion:
        """``"euler"``, ``"heun:2"``, ``"euler:3,2,1"``, ``"x0"``; a :class:`Completion` is returned as it is."""
        if isinstance(text, Completion):
            return text
        raw = str(text).strip().lower()
        if raw == "x0":
            return cls("euler", (1,))
        method, _, budget = raw.partition(":")
        method = method.strip()
        if method not in METHODS:
            raise ValueError(f"completion {text!r}: write euler, heun or dpm2m, optionally with at most M steps "
                             "(euler:2, or one M per branch step: euler:3,2,1), or x0")  # fmt: skip
        if not budget.strip():
            return cls(method)
        try:
            steps = tuple(int(m) for m in budget.split(","))
        except ValueError:
            raise ValueError(
                f"completion {text!r}: M must be whole numbers separated by commas (euler:3,2,1)"
            ) from None
        return cls(method, steps)

    def __str__(self) -> str:
        if self.steps is None:
            return self.method
        return f"{self.method}:{','.join(map(str, self.steps))}"

    @property
    def exact(self) -> bool:
        """Whether this is the full Euler completion (no budget)."""
        return self.method == "euler" and self.steps is None

    def budget(self, position: int) -> int | None:
        """M for the branch step at ``position`` in the plan's branch steps (None: every step)."""
        if self.steps is None:
            return None
        return self.steps[min(position, len(self.steps) - 1)]

    def route(self, k: int, num_steps: int, position: int = 0) -> tuple[int, ...]:
        """The grid indices a branch from step k visits, from k + 1 (its sample) to T (t = 0)."""
        start, r = k + 1, num_steps - k - 1
        m = r if self.budget(position) is None else min(r, self.budget(position))
        if m == 0:
            return (start,)
        return tuple(start + (2 * j * r + m) // (2 * m) for j in range(m + 1))

    def calls(self, k: int, num_steps: int, position: int = 0) -> int:
        """Forwards of one branch's completion from step k (per sample; a CFG pair is one call)."""
        intervals = len(self.route(k, num_steps, position)) - 1
        if self.method == "heun" and intervals:
            return 2 * intervals - 1  # the last interval ends at t = 0: an Euler step
        return intervals


@dataclass(frozen=True)
class BranchPlan:
    """``mode`` "branch" (K branches per branch step off an ODE main path) or "trajectory" (one path per seed,
    SDE on ``sde_steps``). ``completion``: how the branches are completed (a :class:`Completion` or its text; branch
    plans only)."""

    num_steps: int
    mode: str
    sde_steps: tuple[int, ...]
    K: int = 1
    completion: Completion = Completion()

    def __post_init__(self):
        object.__setattr__(self, "completion", Completion.parse(self.completion))
        if self.mode == "trajectory" and not self.completion.exact:
            raise ValueError(f"completion={self.completion} needs a branch plan (TempFlow-GRPO); a trajectory plan "
                             "completes nothing")  # fmt: skip
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
    def tempflow(cls, num_steps: int = 10, K: int = 6, branch_steps=None, completion="euler") -> BranchPlan:
        steps = tuple(range(num_steps - 1)) if branch_steps is None else tuple(sorted(branch_steps))
        return cls(num_steps, "branch", steps, K, Completion.parse(completion))

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

    def subset(self, steps) -> BranchPlan:
        """This branch plan on some of its branch steps, each keeping its completion budget."""
        steps = tuple(sorted(steps))
        if not set(steps) <= set(self.sde_steps):
            raise ValueError(f"steps {list(steps)} are not all branch steps of {list(self.sde_steps)}")
        c = self.completion
        if c.steps is not None:
            c = Completion(c.method, tuple(c.budget(self.sde_steps.index(k)) for k in steps))
        return BranchPlan(self.num_steps, self.mode, steps, self.K, c)

    def routes(self) -> dict[int, tuple[int, ...]]:
        """Branch step -> the grid indices its completions visit (:meth:`Completion.route`)."""
        return {k: self.completion.route(k, self.num_steps, i) for i, k in enumerate(self.sde_steps)}

    def completion_calls(self) -> dict[int, int]:
        """Branch step -> forwards of one branch's completion (per sample)."""
        return {k: self.completion.calls(k, self.num_steps, i) for i, k in enumerate(self.sde_steps)}

    def model_calls_per_seed(self) -> int:
        """Per-seed forwards (per sample): TempFlow 9 + 45K for T = 10 with all branch steps and the exact
        completion (9 + 17K with ``euler:2``); Flow-GRPO T."""
        if self.mode == "trajectory":
            return self.num_steps
        last = max(self.sde_steps)
        return (last + 1) + self.K * sum(self.completion_calls().values())
