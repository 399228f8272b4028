"""Pure-torch fp32 references of the fused ops in :mod:`tempflow.ops`, composed from :mod:`tempflow.sde`.

Every fused kernel (C++, Triton) is tested against these, and they are the ``torch`` backend. Shapes:
``x``, ``v`` ``(B, ...)``; branch tensors ``(B, K, ...)``; per-row coefficients ``(B,)``.
"""

from __future__ import annotations

import torch

from . import objective, rng, sde


def _per_branch(coef: torch.Tensor) -> torch.Tensor:
    """A per-row coefficient shaped for ``(B, ...)`` reshaped for ``(B, K, ...)`` (a 0-d one broadcasts as is)."""
    return coef.unsqueeze(1) if coef.dim() else coef


def branch_sample(x, v, step, table: sde.SDETable, K: int, noise=None, keys=None):
    """K one-step SDE branches from one velocity: ``(samples (B, K, ...), log_prob (B, K), mean (B, ...))``.
    ``noise`` ``(B, K, ...)`` or ``keys`` ``(B, K)`` int64 stream keys (element ``i`` of branch ``(b, k)`` is
    ``rng.normal_from_keys(keys[b, k])[i]``)."""
    mean = sde.sde_mean(x, v, step, table)
    std = _per_branch(sde.at_step(table.std, step, x))
    if noise is None:
        noise = rng.normal_from_keys(keys, x.shape[1:])
    samples = mean.unsqueeze(1) + std * noise.float()
    logp = sde.log_prob(samples, mean.unsqueeze(1), std, kind=table.logprob_kind, batch_dims=2)
    return samples, logp, mean


def branch_logp_kl(v, x, actions, step, table: sde.SDETable, v_ref=None):
    """Log-probs of K given actions ``(B, K, ...)`` from one velocity, and the exact KL ``(B,)`` to ``v_ref`` (zeros
    without it). Differentiable in ``v``."""
    mean = sde.sde_mean(x, v, step, table).unsqueeze(1)
    std = _per_branch(sde.at_step(table.std, step, x))
    logp = sde.log_prob(actions, mean, std, kind=table.logprob_kind, batch_dims=2)
    kl = sde.kl_from_velocity(v, v_ref, step, table) if v_ref is not None else v.new_zeros(v.shape[0]).float()
    return logp, kl


def branch_grpo_loss(
    v, x, actions, step, table, old_logp, adv, weight, clip_eps: float, beta: float = 0.0, v_ref=None
) -> torch.Tensor:
    """The GRPO loss of K actions per state (:func:`tempflow.objective.grpo_objective`)."""
    logp, kl = branch_logp_kl(v, x, actions, step, table, v_ref)
    return objective.grpo_objective(logp, old_logp, adv, weight, clip_eps, beta, kl if v_ref is not None else None)
