"""Advantages of GRPO rows (docs/ALGORITHM.md sections 2 and 3): pure functions of rewards and group ids.

TempFlow-GRPO's process advantage at step k: ``A = clip((R - mean_g R) / (std_g R + 1e-4), -5, 5)`` with g the
group of the row at that step: the K branches of the same (prompt, seed, k) ("seed", the default), all N*K branches
of the prompt at k ("prompt"), or every row at k ("global"). Flow-GRPO: one terminal reward per trajectory, the
mean over the prompt's G trajectories, the std over the prompt's trajectories ("prompt") or the whole batch
("global", its default), the same advantage at every step. Standard deviations are population ones (ddof 0, as
Flow-GRPO's numpy statistics).
"""

from __future__ import annotations

import torch

from ..rollout.batch import RolloutBatch
from ..rollout.keys import pack

EPS = 1e-4
CLIP = 5.0


def _group_stats(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and population std of ``values`` over the elements sharing its group id."""
    _, inverse = torch.unique(groups, return_inverse=True)
    n = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(values, dtype=torch.float64)
    )
    total = torch.zeros_like(n).index_add_(0, inverse, values.double())
    mean = total / n
    dev = values.double() - mean[inverse]
    var = torch.zeros_like(n).index_add_(0, inverse, dev * dev) / n
    return mean[inverse], var.sqrt()[inverse]


def group_normalize(reward: torch.Tensor, mean_groups: torch.Tensor, std_groups: torch.Tensor | None = None,
                    eps: float = EPS, clip: float = CLIP) -> torch.Tensor:  # fmt: skip
    """``clip((R - mean) / (std + eps), -clip, clip)``: the mean over ``mean_groups``, the std over ``std_groups``
    (default: the same groups). Returns fp32 of ``reward``'s shape."""
    if reward.dim() != 1 or mean_groups.shape != reward.shape:
        raise ValueError(f"reward and group ids must be 1-D of one length, got {tuple(reward.shape)}, "
                         f"{tuple(mean_groups.shape)}")  # fmt: skip
    if not bool(torch.isfinite(reward).all()):
        raise ValueError("rewards contain NaN/Inf: check the reward function")
    mean, _ = _group_stats(reward, mean_groups)
    _, std = _group_stats(reward, mean_groups if std_groups is None else std_groups)
    return ((reward.double() - mean) / (std + eps)).clamp(-clip, clip).float()


def tempflow_advantages(batch: RolloutBatch, group: str = "seed", clip: float = CLIP) -> torch.Tensor:
    """Per-step process advantages ``(R,)`` of a TempFlow rollout; ``group``: seed | prompt | global; advantages
    clipped to ``[-clip, clip]``."""
    if group == "seed":
        groups = pack(batch.prompt_id, batch.seed_index, batch.step)
    elif group == "prompt":
        groups = pack(batch.prompt_id, 0, batch.step)
    elif group == "global":
        groups = batch.step
    else:
        raise ValueError(f"advantage group must be seed, prompt or global, got {group!r}")
    return group_normalize(batch.reward, groups, clip=clip)


def flow_grpo_advantages(batch: RolloutBatch, std: str = "global", clip: float = CLIP) -> torch.Tensor:
    """Flow-GRPO's advantages ``(R,)``: per-trajectory, normalised over the prompt's trajectories (mean) and over the
    prompt or the whole batch (std), broadcast to every step row of the trajectory."""
    if std not in ("global", "prompt"):
        raise ValueError(f"Flow-GRPO std must be global or prompt, got {std!r}")
    traj = pack(batch.prompt_id, batch.seed_index)
    keys, first = _first_rows(traj)
    reward, prompt = batch.reward[first], batch.prompt_id[first]
    std_groups = torch.zeros_like(prompt) if std == "global" else prompt
    adv = group_normalize(reward, prompt, std_groups, clip=clip)
    return adv[torch.searchsorted(keys, traj)]


def _first_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and, for each, the index of one row holding it."""
    keys, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((keys.numel(),), -1, dtype=torch.long).scatter_(0, inverse, torch.arange(key.numel()))
    return keys, first


def signal_rows(batch: RolloutBatch, adv: torch.Tensor) -> torch.Tensor:
    """Mask of the rows worth training: those of a (prompt, seed, step) state whose advantages are not all zero
    (a group whose K rewards are all equal carries no signal)."""
    state = pack(batch.prompt_id, batch.seed_index, batch.step)
    _, inverse = torch.unique(state, return_inverse=True)
    nonzero = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, (adv != 0).float())
    return nonzero[inverse] > 0
