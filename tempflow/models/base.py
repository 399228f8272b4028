"""The one model protocol the engine and the trainer use: they never branch on the model type.

An adapter encodes each prompt once into a :class:`Conditioning` whose tensors are gathered by prompt index (no
copy per branch or per seed), runs the velocity with classifier-free guidance as one batched forward of the
conditional and unconditional halves, accepts a per-sample time vector, and decodes latents to images
``(B, C, H, W)`` in [0, 1], or, for a video model, to videos ``(B, F, C, H, W)`` (frames second): latents may have any
``latent_shape``, and what the decode gives goes to the rewards as it is (video rewards:
:mod:`tempflow.rewards.video`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import sde

__all__ = ["Conditioning", "FlowModel", "sample", "randn_tensor", "randn_like_diffusers"]


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
        """Images ``(B, C, H, W)``, or videos ``(B, F, C, H, W)``, in [0, 1] from latents ``(B, *latent_shape)``."""
        raise NotImplementedError

    def trained_module(self) -> torch.nn.Module:
        """The module whose parameters fine-tuning changes: the denoiser (``transformer``); text encoders stay
        frozen. It is also what DeepSpeed partitions."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """What the optimizer updates: every parameter of :meth:`trained_module` (full fine-tuning), or only the
        LoRA weights after :meth:`use_lora`."""
        return [p for p in self.trained_module().parameters() if p.requires_grad]

    def use_lora(self, rank: int = 32, alpha: int = 64, targets: Sequence[str] | None = None) -> None:
        """Freeze the model and attach LoRA adapters (peft) to the attention projections of its transformer
        (Flow-GRPO's defaults: r = 32, alpha = 64). The adapters start at zero, so the model is unchanged."""
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise ImportError("LoRA needs peft: pip install peft (or tempflow[diffusers])") from exc
        targets = list(targets or ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                   "to_add_out"])  # fmt: skip
        self.trained_module().requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        )
        self.lora = True

    def keep_reference_copy(self) -> None:
        """Full fine-tuning's KL reference: keep a frozen copy of the trained weights (call before training)."""
        self._frozen = [p.detach().clone() for p in self.trained_module().parameters()]

    @contextmanager
    def reference(self):
        """Within this block the model is its frozen base: LoRA adapters disabled (no second copy of the weights),
        or, for full fine-tuning, the copy kept by :meth:`keep_reference_copy` swapped in."""
        if getattr(self, "lora", False):
            self.transformer.disable_adapters()
            try:
                yield self
            finally:
                self.transformer.enable_adapters()
            return
        frozen = getattr(self, "_frozen", None)
        if frozen is None:
            raise RuntimeError("reference() needs LoRA (use_lora) or, for full fine-tuning, keep_reference_copy()")
        live = list(self.trained_module().parameters())
        for p, f in zip(live, frozen, strict=True):
            p.data, f.data = f.data, p.data
        try:
            yield self
        finally:
            for p, f in zip(live, frozen, strict=True):
                p.data, f.data = f.data, p.data

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        return sde.time_grid(num_steps, shift=self.shift, device=device)

    def forward_rows(self, guidance: float | None = None) -> int:
        """Rows one sample takes in a transformer forward of :meth:`velocity`: 2 with classifier-free guidance
        (the unconditional and conditional halves go through together), 1 without (``guidance`` 1)."""
        g = self.default_guidance if guidance is None else float(guidance)
        return 1 if g == 1.0 else 2

    def samples_per_forward(self, max_rows: int, guidance: float | None = None) -> int:
        """How many samples one forward may take so that it sees at most ``max_rows`` rows, a CFG pair counting
        two (what ``max_batch`` bounds in the rollout engine, :func:`sample` and the trainer)."""
        rows = self.forward_rows(guidance)
        if int(max_rows) < rows:
            raise ValueError(f"max_batch={max_rows} rows cannot hold one sample's forward ({rows} rows: "
                             f"classifier-free guidance forwards a pair); set max_batch >= {rows}")  # fmt: skip
        return int(max_rows) // rows

    def initial_latents(self, n: int, generator=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``n`` starting latents ``(n, *latent_shape)`` drawn as the diffusers pipelines' ``prepare_latents``
        draws them: ``randn_tensor(shape, generator, device, dtype)`` (one ``torch.Generator`` for the whole batch,
        or a list of n, one per row, as Flow-GRPO's ``create_generator`` gives). ``dtype``: the dtype the noise is
        drawn in (the pipelines use the prompt embeddings'; default :attr:`noise_dtype`)."""
        shape = (int(n), *self.latent_shape)
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"a list of generators needs one per latent: {len(generator)} for {shape[0]} latents")
            generator = list(generator)
        device = getattr(self, "device", None) or torch.device("cpu")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype or self.noise_dtype)

    @property
    def noise_dtype(self) -> torch.dtype:
        """The dtype :meth:`initial_latents` draws in by default (fp32; diffusers adapters: their weights')."""
        return torch.float32

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: Conditioning,
        index: torch.Tensor,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """``v(x, t, prompt[index])`` with classifier-free guidance (:meth:`guide`, ``v_u + g (v_c - v_u)`` by
        default) as one batched forward of the unconditional and conditional halves (``guidance`` 1 or
        None-with-default-1 skips the unconditional half). ``t``: float or ``(B,)``."""
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
        return self.guide(v_u, v_c, g)

    def guide(self, v_u: torch.Tensor, v_c: torch.Tensor, g: float) -> torch.Tensor:
        """The guided velocity from the unconditional and conditional ones (``guidance`` g != 1): classifier-free
        guidance ``v_u + g (v_c - v_u)``; an adapter whose pipeline combines them otherwise overrides this."""
        return v_u + g * (v_c - v_u)


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """diffusers' ``randn_tensor`` (the official pipelines' noise), or :func:`randn_like_diffusers` without
    diffusers: drawn on the generator's device (a CPU generator draws on the CPU, then the tensor moves to
    ``device``); a list of generators draws row i from generator i."""
    try:
        from diffusers.utils.torch_utils import randn_tensor as diffusers_randn
    except ImportError:
        return randn_like_diffusers(shape, generator, device, dtype)
    return diffusers_randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def randn_like_diffusers(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """The draws of diffusers' ``randn_tensor`` (as of diffusers 0.42), for installs without diffusers."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    shape = tuple(shape)
    if isinstance(generator, list):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


@torch.no_grad()
def sample(model: FlowModel, prompts: Sequence[str], steps: int = 10, guidance: float | None = None, seed: int = 0,
           batch: int = 48, progress: bool = False, noise_ids=None) -> torch.Tensor:  # fmt: skip
    """Deterministic ODE samples (B, *latent_shape) from counter-based initial noise (sample id i, seed): the i-th
    sample does not depend on the batch it is drawn in. ``noise_ids`` (B,): the samples' ids (default 0..B-1), so
    that a rank's share of a larger set draws the noise the whole set would. ``batch``: the most rows one
    transformer forward sees, a classifier-free-guidance pair counting two (as ``RolloutConfig.max_batch``)."""
    from .. import rng

    device = getattr(model, "device", None)
    grid = model.time_grid(steps, device=device)
    cond = model.encode(prompts)
    ids_all = torch.arange(len(prompts)) if noise_ids is None else torch.as_tensor(noise_ids, dtype=torch.long)
    if ids_all.shape != (len(prompts),):
        raise ValueError(f"noise_ids must hold one id per prompt ({len(prompts)}), got {tuple(ids_all.shape)}")
    per = model.samples_per_forward(batch, guidance)
    out = []
    for start in range(0, len(prompts), per):
        index = torch.arange(start, min(start + per, len(prompts)))
        ids = torch.stack([ids_all[index], torch.full_like(index, -1)], 1)
        x = rng.normal(seed, ids, model.latent_shape, device=device)
        for k in range(steps):
            v = model.velocity(x, grid.sigmas[k], cond, index, guidance)
            x = sde.ode_step(x, v, k, grid)
            if progress:
                done = start + len(index) * (k + 1) // steps
                print(f"\rsampling {done}/{len(prompts)} [step {k + 1}/{steps}]", end="", file=sys.stderr, flush=True)
        out.append(x)
    if progress:
        print(file=sys.stderr)
    return torch.cat(out)
