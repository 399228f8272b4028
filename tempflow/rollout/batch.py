"""RolloutBatch: the training rows of one rollout, one per (prompt, seed, step, branch), in that order."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class RolloutBatch:
    """Rows sorted by (prompt, seed, step, branch). ``state`` is ``x_k``, ``action`` the sampled ``x_{k+1}``,
    ``old_log_prob`` its log-prob under the sampling policy, ``reward`` the reward of the image the row led to.
    ``images``: the final images (one per finished path, on the CPU), ``image_prompt`` their prompt index and
    ``scores`` the reward's named values for each (its parts, e.g. ``{"pickscore": (F,), "jpeg": (F,)}``), for
    logging."""

    prompts: list[str]
    prompt_index: torch.Tensor  # (R,) index into prompts
    prompt_id: torch.Tensor  # (R,) global prompt id (the noise stream's)
    seed_index: torch.Tensor  # (R,)
    step: torch.Tensor  # (R,)
    branch: torch.Tensor  # (R,)
    state: torch.Tensor  # (R, *latent)
    action: torch.Tensor  # (R, *latent)
    old_log_prob: torch.Tensor  # (R,)
    reward: torch.Tensor  # (R,)
    images: torch.Tensor  # (F, C, H, W)
    image_prompt: torch.Tensor  # (F,)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (F,)

    _ROW_FIELDS = ("prompt_index", "prompt_id", "seed_index", "step", "branch", "state", "action", "old_log_prob",
                   "reward")  # fmt: skip

    def __len__(self) -> int:
        return self.step.numel()

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The given rows (and every image), e.g. one rank's share."""
        picked = {name: getattr(self, name)[rows] for name in self._ROW_FIELDS}
        return RolloutBatch(self.prompts, **picked, images=self.images, image_prompt=self.image_prompt,
                            scores=self.scores)  # fmt: skip

    def shard(self, rank: int, world: int) -> RolloutBatch:
        """Rows of the prompts ``rank, rank + world, ...``: whole prompts stay on one rank."""
        return self.select(torch.nonzero(self.prompt_index % world == rank).flatten())

    def to(self, device) -> RolloutBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    def save(self, path: str) -> None:
        """Atomic save (temporary file, then rename)."""
        from .._io import atomic_torch_save

        atomic_torch_save({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: str) -> RolloutBatch:
        return cls(**torch.load(path, weights_only=True))
