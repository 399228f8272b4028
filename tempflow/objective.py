"""GRPO's clipped policy objective with per-step weights and the exact KL (docs/ALGORITHM.md, sections 2 and 3).

Works on per-row log-probs, so it serves Flow-GRPO (rows = trajectory steps) and TempFlow-GRPO (rows = the K
branches of a (seed, step) state) alike; the fused op :func:`tempflow.ops.branch_grpo_loss` feeds it."""

from __future__ import annotations

import torch

__all__ = ["clipped_policy_loss", "grpo_objective"]


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Per-row ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, ``r = exp(logp - old_logp)`` (the shape of ``logp``)."""
    ratio = torch.exp(logp - old_logp)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps))


def grpo_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    weight: torch.Tensor | None,
    clip_eps: float,
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean over rows (b, k) of [ w_b max(-A r, -A clip(r)) + beta KL_b ]``.

    Args:
        logp, old_logp, adv: ``(B, K)`` (or ``(B,)``, K = 1) per-row log-probs and advantages.
        weight: ``(B,)`` noise-aware weight of each row's step (None: all 1). The KL term is not weighted.
        kl: ``(B,)`` exact KL of each state's step to the reference model (needed when ``beta != 0``).
    """
    if logp.shape != old_logp.shape or logp.shape != adv.shape:
        raise ValueError(
            f"logp, old_logp and adv must have one shape, got {tuple(logp.shape)}, {tuple(old_logp.shape)}, "
            f"{tuple(adv.shape)}"
        )
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    rows = logp.reshape(logp.shape[0], -1)
    policy = clipped_policy_loss(rows, old_logp.reshape(rows.shape).float(), adv.reshape(rows.shape).float(), clip_eps)
    if weight is not None:
        if weight.shape != (logp.shape[0],):
            raise ValueError(f"weight must be (B,) = ({logp.shape[0]},), got {tuple(weight.shape)}")
        policy = policy * weight.float().unsqueeze(1)
    loss = policy.mean()
    if beta:
        if kl is None or kl.shape != (logp.shape[0],):
            raise ValueError(f"beta = {beta} needs kl of shape (B,) = ({logp.shape[0]},)")
        loss = loss + beta * kl.mean()
    return loss
