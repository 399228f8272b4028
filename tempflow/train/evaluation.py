"""Held-out evaluation: deterministic ODE samples of the held-out prompts, scored by the rewards.

Each prompt is sampled ``per_prompt`` times from counter-based noise (sample i of the set draws the stream (i, -1)
of ``seed``: never a training stream, and the same for every run and any number of ranks). Ranks take equal
contiguous shares (the last padded with repeats that are not counted), so every rank makes the same model calls
(ZeRO-3 forwards are collective). The result is the mean of the reward and of each of its named values, and a grid
of the first prompts' first samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.base import FlowModel, sample
from ..prompts import PromptSource
from ..rewards.base import score

__all__ = ["EvalResult", "evaluate", "GRID_PROMPTS", "GRID_COLUMNS"]

GRID_PROMPTS, GRID_COLUMNS = 10, 4  # the sample grid: the first 10 prompts, up to 4 samples each


@dataclass
class EvalResult:
    """``values``: the mean reward (``reward``) and the mean of each named value; ``grid``: (G, C, H, W) images of
    the first prompts (prompt-major) with ``columns`` per prompt (on the main rank; None elsewhere)."""

    values: dict[str, float]
    grid: torch.Tensor | None
    columns: int
    samples: int


@torch.no_grad()
def evaluate(model: FlowModel, prompts: PromptSource, reward, steps: int = 40, guidance: float | None = None,
             per_prompt: int = 1, seed: int = 1, batch: int = 32, rt=None) -> EvalResult:  # fmt: skip
    """Score ``per_prompt`` deterministic samples of every prompt of ``prompts`` with ``reward``."""
    from .distributed import Runtime

    rt = rt or Runtime()
    n = len(prompts) * per_prompt
    share = math.ceil(n / rt.world)
    pos = torch.arange(rt.rank * share, (rt.rank + 1) * share)
    valid = pos < n
    pos = torch.where(valid, pos, torch.full_like(pos, n - 1))  # padding: the last sample again, not counted
    which = (pos // per_prompt).tolist()
    texts = [prompts.prompts[i] for i in which]
    meta = [prompts.metadata[i] for i in which]
    if per_prompt > 1:  # the first prompts, a row of their first samples each
        columns = min(per_prompt, GRID_COLUMNS)
        in_grid = valid & (pos // per_prompt < GRID_PROMPTS) & (pos % per_prompt < columns)
    else:  # one sample per prompt: the first 2 rows of prompts
        columns = min(len(prompts), 2 * GRID_COLUMNS)
        in_grid = valid & (pos < 2 * columns)
    sums: dict[str, float] = {}
    grid_pos, grid_img = [], []
    per = model.samples_per_forward(batch, guidance)  # ``batch`` counts rows, a CFG pair two
    for lo in range(0, share, per):
        sl = slice(lo, lo + per)
        latents = sample(model, texts[sl], steps, guidance, seed, batch=batch, noise_ids=pos[sl])
        images = model.decode(latents)
        total, parts = score(reward, images, texts[sl], meta[sl])
        keep = valid[sl].to(total.device)
        for name, values in {"reward": total, **parts}.items():
            sums[name] = sums.get(name, 0.0) + float(values.float()[keep].sum())
        pick = in_grid[sl]
        if bool(pick.any()):
            grid_pos.append(pos[sl][pick])
            grid_img.append(images[pick.to(images.device)].float().cpu())
    totals = rt.all_sum_dict(sums)
    values = {k: v / n for k, v in totals.items()}
    mine = (torch.cat(grid_pos), torch.cat(grid_img)) if grid_pos else None
    parts = rt.all_gather(mine)
    grid = None
    if rt.is_main:
        got = [p for p in parts if p is not None]
        if got:
            order = torch.cat([p[0] for p in got]).argsort()
            grid = torch.cat([p[1] for p in got])[order]
    return EvalResult(values, grid, columns, n)
