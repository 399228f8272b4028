"""The one encoding of a training row's identity, (prompt id, seed index, step, branch), in its three uses:

* :func:`pack`: one sortable int64, ``((prompt * 4096 + seed) * 4096 + step) * 4096 + branch``: rows sort by it into
  the canonical (prompt, seed, step, branch) order, and its partial forms name groups (a (prompt, seed, step) state,
  a prompt's step, a trajectory) for the advantages. 12 bits each for seed, step and branch, 27 for the prompt id.
* :func:`noise_keys` / :func:`initial_noise`: counter-based noise streams keyed by the same tuple (tempflow.rng), so
  a sample does not depend on batching, order, backend or ranks.
* :func:`order_keys`: a Philox hash of (iteration, prompt, seed, step): the trainer sorts states by it, an order
  that is random but does not depend on which rank holds a state.
"""

from __future__ import annotations

import torch

from .. import rng

__all__ = ["FIELD_LIMIT", "PROMPT_LIMIT", "pack", "check_sizes", "noise_keys", "initial_noise", "order_keys"]

FIELD_LIMIT = 4096  # seed index, step and branch each take 12 bits
PROMPT_LIMIT = 2**27  # prompt ids take the remaining 27 bits of a non-negative int64
ORDER_TAG = 0x7F4A_0D3E  # stream id tag of the training-order hash (disjoint from the sampling noise streams)


def pack(prompt: torch.Tensor, seed: torch.Tensor | int = 0, step: torch.Tensor | int = 0,
         branch: torch.Tensor | int = 0) -> torch.Tensor:  # fmt: skip
    """A single int64 that orders rows by (prompt, seed, step, branch); omitted fields are 0 (group keys). A step of
    -1 (a trajectory's key) stays distinct from every real step."""
    prompt = torch.as_tensor(prompt, dtype=torch.int64)
    return ((prompt * FIELD_LIMIT + seed) * FIELD_LIMIT + step) * FIELD_LIMIT + branch


def check_sizes(prompt_ids: torch.Tensor, seeds: int, steps: int, branches: int) -> None:
    """Refuse sizes the packing cannot hold (seed, step and branch below 4095; prompt ids in 0 .. 2^27 - 1)."""
    if max(seeds, steps + 1, branches) >= FIELD_LIMIT or min(seeds, steps, branches) < 1:
        raise ValueError(f"seeds per prompt, steps and branches must each be in 1 .. {FIELD_LIMIT - 2}, got "
                         f"{seeds}, {steps}, {branches}")  # fmt: skip
    if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= PROMPT_LIMIT):
        raise ValueError(f"prompt ids must be in 0 .. {PROMPT_LIMIT - 1}, got {int(prompt_ids.min())} .. "
                         f"{int(prompt_ids.max())}")  # fmt: skip


def initial_noise(seed: int, prompt_id: torch.Tensor, seed_index: torch.Tensor, shape, device=None) -> torch.Tensor:
    """The starting noise ``(n, *shape)`` of n paths, from the streams (prompt id, seed index)."""
    return rng.normal(seed, torch.stack([prompt_id, seed_index], -1), shape, device=device)


def noise_keys(seed: int, prompt_id, seed_index, step, K: int) -> torch.Tensor:
    """``(n, K)`` stream keys of the branch noise of n paths at their step (branch j = 0 .. K-1)."""
    n = prompt_id.numel()
    branch = torch.arange(K, device=prompt_id.device).expand(n, K)
    ids = torch.stack([prompt_id[:, None].expand(n, K), seed_index[:, None].expand(n, K), step[:, None].expand(n, K),
                       branch], -1)  # fmt: skip
    return rng.stream_keys(seed, ids)


def order_keys(seed: int, iteration: int, prompt_id, seed_index, step) -> torch.Tensor:
    """A 64-bit hash per (seed, step) state of ``iteration``: sorting by it gives the run's training order."""
    ids = torch.stack([torch.full_like(step, ORDER_TAG), torch.full_like(step, iteration), prompt_id, seed_index, step],
                      dim=-1)  # fmt: skip
    return rng.stream_keys(seed, ids)
