"""Qwen-Image (``QwenImageTransformer2DModel``, diffusers' ``QwenImagePipeline``) behind the FlowModel protocol.

Build one from a local diffusers folder (``QwenImageModel.from_pretrained(path)``; nothing is downloaded), from a
pipeline (``QwenImageModel.from_pipeline(pipe)``), or from a transformer and VAE plus precomputed prompt embeddings
(``embeddings={prompt: hidden}``, ``hidden`` ``(L_p, D)`` the prompt's valid tokens, e.g.
``pipe.encode_prompt(prompt)[0][0]``; the empty prompt "" is the unconditional one).

Conventions, each as ``QwenImagePipeline`` (diffusers 0.42) computes it:

* latents: the VAE's ``(C, 1, h, w)`` (one frame, h = H/8) packed into 2x2 patches, ``(L, 4C)`` with
  ``L = (h/2)(w/2)`` tokens (4096 at 1024 px); :meth:`QwenImageModel.initial_latents` draws ``(n, 1, C, h, w)``
  as ``prepare_latents`` does, then packs;
* prompts: the pipeline's ``encode_prompt`` (the chat template, its 34 system-prompt tokens dropped, the last
  hidden states of the valid tokens), at most ``max_sequence_length`` tokens. Prompts have different lengths:
  the Conditioning holds ``hidden`` ``(N, L_text, D)`` zero-padded to one length and ``mask`` ``(N, L_text)`` (1
  on valid tokens), the unconditional prompt "" padded to the same length, so rows gather by prompt index and the
  two halves of classifier-free guidance go through one batched forward; the transformer masks padded tokens out
  of attention (``encoder_hidden_states_mask``) and gives text token i the RoPE position it has unpadded, so a
  prompt's velocity does not depend on the padding;
* guidance: Qwen-Image's "true CFG" with its norm rescale, ``comb = v_u + g (v_c - v_u)``, then
  ``comb * ||v_c|| / ||comb||`` with norms over the channels of each token (:meth:`QwenImageModel.guide`);
* time: ``timestep = t`` (the pipeline passes ``(1000 t) / 1000`` in the weights' dtype, and so does this
  adapter); the grid is the pipeline's (:func:`tempflow.sde.qwenimage_time_grid`): FLUX's exponential dynamic
  shift with the scheduler config's constants (``mu`` from 0.5 at 256 tokens to 0.9 at 8192) stretched to end at
  ``shift_terminal`` 0.02;
* decode: unpacked to ``(B, C, 1, h, w)``, ``z * latents_std + latents_mean`` (the VAE config's), the VAE's first
  frame, mapped from [-1, 1] to [0, 1].
"""

from __future__ import annotations

import importlib.util

import torch

from .. import sde
from .base import Conditioning
from .diffusers_models import _PackedModel, check_scheduler_config, scheduler_config_reader, set_attention

__all__ = ["QwenImageModel"]


def _check_masking_transformer() -> None:
    """diffusers before the fix of huggingface/diffusers#12294 (PR #12702) accepted ``encoder_hidden_states_mask``
    but ignored it (padded prompt tokens were attended to) and took ``txt_seq_lens`` for the RoPE instead."""
    import inspect

    try:
        from diffusers.models.transformers import transformer_qwenimage
    except ImportError as exc:
        raise ImportError(
            "Qwen-Image needs a diffusers with QwenImageTransformer2DModel: pip install -U diffusers"
        ) from exc
    old_api = "txt_seq_lens" in inspect.signature(transformer_qwenimage.QwenImageTransformer2DModel.forward).parameters
    if old_api and not hasattr(transformer_qwenimage, "compute_text_seq_len_from_mask"):
        raise ImportError(
            "this diffusers' QwenImageTransformer2DModel ignores encoder_hidden_states_mask (diffusers issue #12294), "
            "so a prompt's velocity would depend on its padding; upgrade diffusers (pip install -U diffusers; the "
            "fix is in huggingface/diffusers PR #12702)"
        )


class QwenImageModel(_PackedModel):
    """Qwen-Image: packed latents ``(L, 4C)``, variable-length prompt embeddings with a mask, true CFG with the norm
    rescale (4.0 by default, the pipeline's ``true_cfg_scale``; 1 skips the unconditional half; below 1 the formula
    still applies, where the pipeline would turn guidance off) and the dynamic time shift of the pipeline's
    scheduler config (without a pipeline: Qwen-Image's published one, :data:`tempflow.sde.QWENIMAGE_SHIFT`).
    ``max_sequence_length``: the prompt tokens kept after the template (the pipeline truncates there; the pipeline's
    default is 512, tempflow's 128); prompts are not padded to it. ``attention``: ``sdpa`` or ``xformers`` (both
    take the padding mask)."""

    embedding_format = "hidden (L_p, D), the prompt's valid tokens"

    def __init__(self, transformer, vae=None, guidance: float = 4.0, **kwargs):
        _check_masking_transformer()
        variant = [k for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
                   if getattr(transformer.config, k, False)]  # fmt: skip
        if variant:
            raise ValueError(f"this QwenImageTransformer2DModel sets {', '.join(variant)}: a guidance-distilled, "
                             "editing or layered variant, which this text-to-image adapter does not drive; use "
                             "Qwen-Image's own transformer")  # fmt: skip
        super().__init__(transformer, vae, guidance=guidance, **kwargs)
        self.img_shape = (1, self.h // 2, self.w // 2)  # (frames, h, w) of the packed tokens, the RoPE's grid
        scheduler = getattr(self.pipeline, "scheduler", None)
        self.schedule = _schedule(getattr(scheduler, "config", None))

    @staticmethod
    def _set_attention(transformer, attention: str) -> None:
        """Qwen-Image's attention takes the prompts' padding mask: ``xformers`` through diffusers' attention
        dispatcher (its xformers backend takes a mask; the older ``enable_xformers_memory_efficient_attention``
        would replace Qwen's joint-attention processor), ``flash`` (flash-attn 2 takes no mask) refused."""
        if attention == "flash":
            raise ValueError("attention='flash' (flash-attn 2) takes no attention mask, which Qwen-Image's padded "
                             "prompts need; use attention='sdpa' or 'xformers'")  # fmt: skip
        if attention == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise ImportError("attention='xformers' needs xformers: pip install tempflow[xformers] (or 'sdpa')")
            transformer.set_attention_backend("xformers")
            return
        set_attention(transformer, attention)

    @staticmethod
    def _vae_scale(vae) -> int:
        # QwenImagePipeline.vae_scale_factor: one 2x spatial downsampling per entry of temperal_downsample
        return 2 ** len(vae.config.temperal_downsample)

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        return sde.qwenimage_time_grid(num_steps, self.latent_shape[0], device=device, **self.schedule)

    def _noise_shape(self, n: int) -> tuple[int, ...]:
        return (n, 1, self.channels, self.h, self.w)  # QwenImagePipeline.prepare_latents: a frame dimension first

    def _encode_texts(self, prompts):
        hidden, mask = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return {"hidden": hidden.to(self.dtype), "mask": mask.to(torch.long)}

    def _embedding_rows(self, rows):
        self._check_hidden_rows(rows, "Qwen-Image", "a batch from encode_prompt: take row i's valid tokens, "
                                "hidden[i][mask[i].bool()]")  # fmt: skip
        masks = [torch.ones(h.shape[0], dtype=torch.long, device=self.device) for h in rows]
        return _pad_rows([h.to(self.device, self.dtype) for h in rows], masks)

    def _conditioning(self, cond, null) -> Conditioning:
        """Both padded to the longer of the prompts' and the unconditional prompt's lengths."""
        length = max(cond["hidden"].shape[1], null["hidden"].shape[1])
        return Conditioning(_pad_to(cond, length), _pad_to(null, length))

    def forward_velocity(self, x, t, cond):
        dtype = self.dtype
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=(t * 1000).to(dtype) / 1000,  # the pipeline's timestep / 1000, in the same dtype
            encoder_hidden_states=cond["hidden"].to(dtype),
            encoder_hidden_states_mask=cond["mask"],
            img_shapes=[[self.img_shape]],  # the RoPE reads the first entry only (the pipeline repeats it)
            return_dict=False,
        )[0]

    def guide(self, v_u, v_c, g):
        """``QwenImagePipeline``'s true CFG: ``comb = v_u + g (v_c - v_u)`` rescaled per token to the conditional
        velocity's norm over the packed channels, ``comb * (||v_c|| / ||comb||)``."""
        comb = v_u + g * (v_c - v_u)
        cond_norm = torch.norm(v_c, dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / comb_norm)

    def _decode_latents(self, latents):
        cfg = self.vae.config
        z = self.unpack(latents).unsqueeze(2).to(self.vae.dtype)  # (B, C, 1, h, w)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        z = z / inv_std + mean  # divided by 1/std as the pipeline writes it (z * std may differ in the last bit)
        return self.vae.decode(z, return_dict=False)[0][:, :, 0]


def _pad_rows(hidden: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of different lengths stacked, zero-padded at the end (as ``encode_prompt`` pads a batch)."""
    length = max(h.shape[0] for h in hidden)
    out_h = torch.stack([torch.cat([h, h.new_zeros(length - h.shape[0], h.shape[1])]) for h in hidden])
    out_m = torch.stack([torch.cat([m, m.new_zeros(length - m.shape[0])]) for m in masks])
    return {"hidden": out_h, "mask": out_m}


def _pad_to(tensors: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    hidden, mask = tensors["hidden"], tensors["mask"]
    extra = length - hidden.shape[1]
    if extra == 0:
        return {"hidden": hidden, "mask": mask}
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], extra, hidden.shape[2])], 1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
    return {"hidden": hidden, "mask": mask}


def _schedule(config) -> dict:
    """The time-shift settings of a scheduler config, in :func:`tempflow.sde.qwenimage_time_grid`'s names (None:
    Qwen-Image's published config). Only what the pipeline's grid uses is supported: the exponential dynamic shift
    with linspace sigmas."""
    if config is None:
        return dict(sde.QWENIMAGE_SHIFT)
    get = scheduler_config_reader(config)
    check_scheduler_config(get, "Qwen-Image", "the exponential dynamic shift of Qwen-Image's published config",
                           dynamic=True)  # fmt: skip
    return {
        "base_seq_len": get("base_image_seq_len", 256),
        "max_seq_len": get("max_image_seq_len", 4096),
        "base_shift": get("base_shift", 0.5),
        "max_shift": get("max_shift", 1.15),
        "shift_terminal": get("shift_terminal", None),
    }
