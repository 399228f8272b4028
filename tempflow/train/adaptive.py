"""Adaptive branch steps for TempFlow-GRPO: skip the branch points whose K branches stopped disagreeing.

A branch step k whose K branches all reach nearly the same reward teaches little, yet costs its K completions, its
main-path steps and its training forwards. The paper's figure of the within-group reward spread per step shows it
near zero at the last steps. :class:`AdaptiveSteps` keeps, per branch step, its recent spreads (the standard
deviation of the K rewards of a (prompt, seed, step) group, averaged over the iteration's groups, relative to the
widest step's spread in the same iteration); a step whose last ``window`` spreads all stayed below ``threshold`` is
skipped, and every ``probe_every``-th iteration runs every step again so that a skipped step is re-measured (and
comes back as soon as its spread rises). Settings ``skip_spread``, ``skip_window``, ``skip_probe`` of TrainConfig.

The state is saved in the checkpoint, so a resumed run skips exactly what the uninterrupted one would.
"""

from __future__ import annotations

import torch

__all__ = ["AdaptiveSteps", "spread_per_step"]


def spread_per_step(reward: torch.Tensor, step: torch.Tensor, K: int) -> dict[int, tuple[float, int]]:
    """Rows in (prompt, seed, step, branch) order, K per group: step -> (sum of the groups' reward std, groups)."""
    groups = reward.double().view(-1, K)
    std = groups.std(-1, unbiased=False) if K > 1 else torch.zeros(groups.shape[0], dtype=torch.float64)
    first = step.view(-1, K)[:, 0]
    return {int(k): (float(std[first == k].sum()), int((first == k).sum())) for k in first.unique().tolist()}


class AdaptiveSteps:
    """Which branch steps run in an iteration (see the module docstring). ``threshold`` 0 turns it off."""

    def __init__(self, steps, threshold: float = 0.0, window: int = 3, probe_every: int = 10):
        self.steps = tuple(int(k) for k in steps)
        self.threshold, self.window, self.probe_every = float(threshold), int(window), int(probe_every)
        self.history: dict[int, list[float]] = {k: [] for k in self.steps}

    def active(self, iteration: int) -> tuple[int, ...]:
        """The branch steps of iteration ``iteration`` (0-based): every step when off, on a probe iteration, or
        until a step has ``window`` observations."""
        if self.threshold <= 0 or (self.probe_every and iteration % self.probe_every == 0):
            return self.steps
        keep = tuple(k for k in self.steps if not self._quiet(k))
        return keep or self.steps

    def _quiet(self, k: int) -> bool:
        recent = self.history[k][-self.window :]
        return len(recent) >= self.window and all(s < self.threshold for s in recent)

    def observe(self, parts: list[dict[int, tuple[float, int]]]) -> dict[int, float]:
        """Record an iteration's spreads (:func:`spread_per_step` of every rank); returns step -> relative spread."""
        total: dict[int, list[float]] = {}
        for part in parts:
            for k, (s, n) in part.items():
                acc = total.setdefault(k, [0.0, 0])
                acc[0] += s
                acc[1] += n
        mean = {k: s / n for k, (s, n) in total.items() if n}
        top = max(mean.values(), default=0.0)
        rel = {k: (m / top if top > 0 else 1.0) for k, m in sorted(mean.items())}
        for k, r in rel.items():
            if k in self.history:
                self.history[k] = (self.history[k] + [r])[-max(self.window, 1) :]
        return rel

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            for k, v in state["history"].items():
                if int(k) in self.history:
                    self.history[int(k)] = [float(x) for x in v]
