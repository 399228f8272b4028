"""The one model protocol the engine and the trainer use: they never branch on the model type.

An adapter encodes each prompt once into a :class:`Conditioning` whose tensors are gathered by prompt index (no
copy per branch or per seed), runs the velocity with classifier-free guidance as one batched forward of the
conditional and unconditional halves, accepts a per-sample time vector, and decodes latents to images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .. import sde

__all__ = ["Conditioning", "FlowModel"]


@dataclass
class Conditioning:
    """Encoded prompts: every tensor in ``cond`` has the prompt index first (``(N, ...)``); ``null`` holds the
    unconditional embedding with a leading 1. Gather rows with :meth:`select`."""

    cond: dict[str, torch.Tensor]
    null: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.index_select(0, index.to(v.device)) for k, v in self.cond.items()}

    def unconditional(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self.null.items()}


class FlowModel:
    """Base class of model adapters. Subclasses implement :meth:`encode`, :meth:`forward_velocity` and
    :meth:`decode`, and set ``latent_shape`` and ``shift``."""

    latent_shape: tuple[int, ...]
    shift: float = 3.0
    default_guidance: float = 4.5

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        raise NotImplementedError

    def forward_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward: ``x`` ``(B, *latent_shape)``, ``t`` ``(B,)`` in [0, 1], ``cond`` gathered rows."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        raise NotImplementedError

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        return sde.time_grid(num_steps, shift=self.shift, device=device)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: Conditioning,
        index: torch.Tensor,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """``v(x, t, prompt[index])`` with classifier-free guidance ``v_u + g (v_c - v_u)`` as one batched forward
        (``guidance`` 1 or None-with-default-1 skips the unconditional half). ``t``: float or ``(B,)``."""
        g = self.default_guidance if guidance is None else float(guidance)
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        rows = cond.select(index)
        if g == 1.0:
            return self.forward_velocity(x, t, rows)
        null = cond.unconditional(b)
        both = {k: torch.cat([null[k].to(rows[k].device), rows[k]]) for k in rows}
        v = self.forward_velocity(torch.cat([x, x]), torch.cat([t, t]), both)
        v_u, v_c = v.chunk(2)
        return v_u + g * (v_c - v_u)
