"""Prompt sources: the digits prompts, a ``.txt`` file (one prompt a line) or a ``.jsonl`` file (one object a line with
``prompt`` and any metadata, e.g. GenEval's ``tag`` / ``include`` / ``exclude``), and the seeded epoch sampler that
picks each training iteration's prompts.

The sampler walks through the prompts in epochs, each a fresh permutation, without replacement inside an epoch.
Iteration ``i`` takes positions ``i * P .. (i + 1) * P - 1`` of that endless walk (P prompts per iteration; an
iteration may straddle two epochs), so which prompts an iteration sees is a pure function of (seed, iteration): a
resumed run, or a run on any number of ranks, sees the same ones. The position is also the prompt's id for the
noise streams, so every draw gets fresh noise. Ranks take whole prompts: rank r of w takes slots r, r + w, ...
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

__all__ = ["PromptSource", "load_prompts", "digits_prompts"]

EPOCH_TAG = 0x5EED_E90C  # mixed into the epoch permutation's seed so it differs from other seeded draws


@dataclass
class PromptSource:
    """Prompts with one metadata dict each (handed to every reward); ``name`` says where they came from."""

    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)
    name: str = "prompts"

    def __post_init__(self):
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"{self.name}: {len(self.prompts)} prompts but {len(self.metadata)} metadata entries")
        if not self.prompts:
            raise ValueError(f"{self.name}: no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of the prompts in ``epoch`` (a pure function of seed and epoch)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + EPOCH_TAG) % (2**63))
        return torch.randperm(len(self.prompts), generator=g)

    def draw(self, iteration: int, count: int, seed: int) -> tuple[list[str], list[dict], torch.Tensor]:
        """Iteration ``iteration``'s ``count`` prompts: ``(prompts, metadata, ids)``, ids (count,) int64 being the
        draws' positions in the walk (unique over the run: the noise streams' prompt ids)."""
        n = len(self.prompts)
        ids = torch.arange(iteration * count, (iteration + 1) * count, dtype=torch.long)
        orders: dict[int, torch.Tensor] = {}
        picks = []
        for pos in ids.tolist():
            if pos // n not in orders:
                orders[pos // n] = self.epoch_order(seed, pos // n)
            picks.append(int(orders[pos // n][pos % n]))
        return [self.prompts[i] for i in picks], [self.metadata[i] for i in picks], ids


def digits_prompts() -> PromptSource:
    """The embedded default's prompts: "a handwritten 0" .. "a handwritten 9", metadata ``{"digit": d}``."""
    from .models.digits import prompt_for

    return PromptSource([prompt_for(d) for d in range(10)], [{"digit": d} for d in range(10)], "digits")


def load_prompts(spec) -> PromptSource:
    """``"digits"``, a ``.txt`` / ``.jsonl`` path, a list of prompts, or a :class:`PromptSource` (returned as is)."""
    if isinstance(spec, PromptSource):
        return spec
    if isinstance(spec, (list, tuple)):
        bad = [p for p in spec if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"prompts must be non-empty strings, got {bad[:3]!r}")
        return PromptSource(list(spec), name="prompt list")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"prompts must be 'digits' or a .txt / .jsonl file, got {spec!r}")
    if spec == "digits":
        return digits_prompts()
    path = os.path.expanduser(spec)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file {spec!r}: use .txt (one prompt a line) or .jsonl (one JSON object a line "
                         "with a 'prompt' key), or 'digits'")  # fmt: skip
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {spec!r} not found")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    prompts, metadata = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not prompts
        if ext == ".txt":
            prompts.append(line.strip())
            metadata.append({})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{spec}, line {number}: each line must be a JSON object with a non-empty string "
                             f"'prompt', got {line[:80]!r}")  # fmt: skip
        prompts.append(row.pop("prompt").strip())
        metadata.append(row)
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts")
    return PromptSource(prompts, metadata, os.path.basename(path))
