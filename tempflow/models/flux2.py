"""FLUX.2 (``Flux2Transformer2DModel``, diffusers' ``Flux2Pipeline``) behind the FlowModel protocol.

Build one from a local diffusers folder (``Flux2Model.from_pretrained(path)``; nothing is downloaded), from a pipeline
(``Flux2Model.from_pipeline(pipe)``), or from a transformer and VAE plus precomputed prompt embeddings
(``embeddings={prompt: hidden}``, ``hidden`` ``(L, D)``, e.g. ``pipe.encode_prompt(prompt)[0][0]``; every prompt the
same length L, as the pipeline pads them; the empty prompt "" is the unconditional one, which guidance-distilled
FLUX.2-dev never uses).

Conventions, each as ``Flux2Pipeline`` (diffusers 0.42) computes it:

* latents: the VAE's ``(C, h, w)`` (h = H/8, C = 32 in FLUX.2-dev) patchified into 2x2 patches, ``(4C, h/2, w/2)``,
  then flattened to tokens, ``(L, 4C)`` with ``L = (h/2)(w/2)`` (4096 at 1024 px; the channel order is FLUX.1's
  packing, so :meth:`Flux2Model.pack` is :class:`~tempflow.models.diffusers_models._PackedModel`'s).
  :meth:`Flux2Model.initial_latents` draws ``(n, 4C, h/2, w/2)`` as ``prepare_latents`` does (already patchified,
  not FLUX.1's ``(n, C, h, w)``), then flattens;
* positions: 4-axis ids ``(t, h, w, l)``: image token (i, j) is ``(0, i, j, 0)``, text token l ``(0, 0, 0, l)``,
  shared by every row of a batch (the transformer reads the first row's);
* prompts: the pipeline's ``encode_prompt``: Mistral's chat template with the pipeline's system message, padded
  (and truncated) to ``max_sequence_length`` tokens (512, the pipeline's default), hidden states 10, 20 and 30 of
  the Mistral3 text encoder stacked along the channels (``(N, 512, 3 x 5120)``). The transformer takes no text mask:
  every prompt is padded to the same length and the padding is attended to, as in the pipeline, so rows gather by
  prompt index with no padding of their own;
* guidance: FLUX.2-dev is guidance-distilled: the guidance scale (4.0 by default, the pipeline's ``guidance_scale``)
  is an input of the transformer, one forward, no unconditional half (``forward_rows`` 1);
* time: ``timestep = t`` (the pipeline passes the scheduler's ``1000 t`` in the latents' dtype, divided by 1000, and
  so does this adapter); the grid is the pipeline's (:func:`tempflow.sde.flux2_time_grid`): ``s = linspace(1, 1/T,
  T)`` with the exponential shift of ``mu = compute_empirical_mu(L, T)``, which depends on the step count T too;
* decode: tokens back to ``(4C, h/2, w/2)``, the VAE's batch-norm statistics undone, ``z * sqrt(running_var + eps)
  + running_mean`` (over the 4C patchified channels), unpatchified to ``(C, h, w)``, the VAE's decode, mapped from
  [-1, 1] to [0, 1].

Not driven: reference images (FLUX.2's editing inputs, ``image=``), caption upsampling, FLUX.2 klein (its own
pipeline, real CFG).
"""

from __future__ import annotations

import torch

from .. import sde
from .diffusers_models import _PackedModel, check_scheduler_config, scheduler_config_reader

__all__ = ["Flux2Model", "FLUX2_LORA_TARGETS"]

#: LoRA targets in both kinds of FLUX.2 block: the double-stream blocks' image and text attention projections, and
#: the single-stream blocks' fused QKV + MLP input projection (``to_qkv_mlp_proj``; FLUX.2 has no separate to_q there)
FLUX2_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "to_qkv_mlp_proj"]  # fmt: skip


class Flux2Model(_PackedModel):
    """FLUX.2-dev: packed latents ``(L, 4C)``, 4-axis positions, prompts padded to ``max_sequence_length`` (512, the
    pipeline's), the guidance embedding (4.0 by default; one forward) and the pipeline's empirical time shift."""

    embedding_format = "hidden (L, D), padded to the pipeline's max_sequence_length"

    def __init__(self, transformer, vae=None, guidance: float = 4.0, max_sequence_length: int = 512, **kwargs):
        if not getattr(transformer.config, "guidance_embeds", False):
            raise ValueError("this Flux2Transformer2DModel has no guidance embedding (guidance_embeds=False): a FLUX.2 "
                             "klein-like model, which Flux2Pipeline would run without guidance and its own pipeline "
                             "with classifier-free guidance; tempflow's FLUX.2 adapter drives FLUX.2-dev")  # fmt: skip
        super().__init__(transformer, vae, guidance=guidance, max_sequence_length=max_sequence_length, **kwargs)
        hh, ww = self.h // 2, self.w // 2
        self.image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(hh), torch.arange(ww),
                                              torch.arange(1)).to(self.device)  # fmt: skip
        scheduler = getattr(self.pipeline, "scheduler", None)
        self.shift_terminal = _check_schedule(getattr(scheduler, "config", None))

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        return sde.flux2_time_grid(num_steps, self.latent_shape[0], device=device, shift_terminal=self.shift_terminal)

    def forward_rows(self, guidance=None) -> int:
        return 1

    def use_lora(self, rank: int = 32, alpha: int = 64, targets=None) -> None:
        super().use_lora(rank, alpha, targets or FLUX2_LORA_TARGETS)

    def _noise_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.channels * 4, self.h // 2, self.w // 2)  # Flux2Pipeline.prepare_latents: already patchified

    def _pack_noise(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], z.shape[1], -1).permute(0, 2, 1)  # Flux2Pipeline._pack_latents

    def _encode_texts(self, prompts):
        hidden, _ = self.pipeline.encode_prompt(prompts, device=self.device,
                                                max_sequence_length=self.max_sequence_length)  # fmt: skip
        return {"hidden": hidden.to(self.dtype)}

    def _embedding_rows(self, rows):
        self._check_hidden_rows(rows, "FLUX.2", "a batch from encode_prompt: take row i, hidden[i]")
        lengths = sorted({h.shape[0] for h in rows})
        if len(lengths) > 1:
            raise ValueError(f"FLUX.2 embeddings must all have one length (the pipeline pads every prompt to "
                             f"max_sequence_length), got lengths {lengths}")  # fmt: skip
        return {"hidden": torch.stack(rows).to(self.device, self.dtype)}

    def _conditioning(self, cond, null):
        if cond["hidden"].shape[1] != null["hidden"].shape[1]:
            raise ValueError(f"FLUX.2 embeddings must all have one length (the pipeline pads every prompt to "
                             f"max_sequence_length): the prompts' are {cond['hidden'].shape[1]} tokens, the "
                             f"unconditional prompt's {null['hidden'].shape[1]}")  # fmt: skip
        return super()._conditioning(cond, null)

    def forward_velocity(self, x, t, cond, guidance: torch.Tensor | None = None):
        dtype = self.dtype
        hidden = cond["hidden"]
        text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                        torch.arange(hidden.shape[1])).to(self.device)  # fmt: skip
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=(t * 1000).to(dtype) / 1000,  # the pipeline's timestep / 1000, in the same dtype
            guidance=guidance,
            encoder_hidden_states=hidden.to(dtype),
            txt_ids=text_ids,
            img_ids=self.image_ids,
            return_dict=False,
        )[0]

    def velocity(self, x, t, cond, index, guidance=None):
        return self._embedded_guidance_velocity(x, t, cond, index, guidance)

    def _decode_latents(self, latents):
        vae = self.vae
        b = latents.shape[0]
        z = latents.permute(0, 2, 1).reshape(b, self.channels * 4, self.h // 2, self.w // 2).to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = z * std + mean
        z = z.reshape(b, self.channels, 2, 2, self.h // 2, self.w // 2).permute(0, 1, 4, 2, 5, 3)
        z = z.reshape(b, self.channels, self.h, self.w)  # Flux2Pipeline._unpatchify_latents
        return vae.decode(z, return_dict=False)[0]


def _check_schedule(config) -> float | None:
    """The scheduler config's ``shift_terminal``, after checking that its grid is the one
    :func:`tempflow.sde.flux2_time_grid` computes (None config: FLUX.2's form, no terminal stretch)."""
    if config is None:
        return None
    get = scheduler_config_reader(config)
    check_scheduler_config(get, "FLUX.2", "the exponential dynamic shift of compute_empirical_mu on linspace sigmas",
                           dynamic=True, also=("use_flow_sigmas",))  # fmt: skip
    return get("shift_terminal", None)
