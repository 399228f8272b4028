"""Adapters for diffusers models: SD3 / SD3.5 (``SD3Transformer2DModel``) and FLUX.1 (``FluxTransformer2DModel``);
Qwen-Image (:mod:`tempflow.models.qwenimage`) builds on the same base.

Build one from a local diffusers folder (``SD3Model.from_pretrained(path)``; nothing is downloaded), from a pipeline
object you already have (``SD3Model.from_pipeline(pipe)``), or from a transformer and VAE plus precomputed prompt
embeddings (``embeddings={prompt: (hidden, pooled)}``, the empty prompt "" being the unconditional one). The engine
and the trainer see only the :class:`~tempflow.models.base.FlowModel` protocol.

Attention runs on torch SDPA by default; ``attention="xformers"`` or ``"flash"`` switches the transformer to those
kernels when the package is installed, and says what to install when it is not.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from .. import sde
from .base import Conditioning, FlowModel

__all__ = ["SD3Model", "FluxModel", "set_attention"]


def set_attention(transformer, attention: str = "sdpa") -> None:
    """Select the attention kernels of a diffusers transformer: ``sdpa`` (default), ``xformers`` or ``flash``."""
    if attention in (None, "sdpa"):
        return
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ImportError("attention='xformers' needs xformers: pip install tempflow[xformers] (or use 'sdpa')")
        transformer.enable_xformers_memory_efficient_attention()
        return
    if attention == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            raise ImportError("attention='flash' needs flash-attn (CUDA only): pip install tempflow[flash] (or 'sdpa')")
        if not hasattr(transformer, "set_attention_backend"):
            raise RuntimeError("this diffusers has no attention backends; upgrade diffusers or use attention='sdpa'")
        transformer.set_attention_backend("flash")
        return
    raise ValueError(f"unknown attention {attention!r}: choose sdpa, xformers or flash")


def scheduler_config_reader(config):
    """``get(key, default)`` over a diffusers scheduler config (a FrozenDict, a dict or an object; None: every key
    takes its default)."""
    if config is None:
        return lambda key, default=None: default
    return config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)


def check_scheduler_config(get, family: str, follows: str, *, dynamic: bool = False, also=(), extra=()) -> None:
    """Refuse a scheduler config whose sigmas are not the linspace-and-exponential-shift grid an adapter's
    ``time_grid`` computes: Karras, exponential, beta or inverted sigmas (and the flags in ``also``), another
    ``time_shift_type``, ``use_dynamic_shifting`` off where the grid needs it (``dynamic``), and the adapter's own
    findings (``extra``). ``follows`` says what the grid is, for the message."""
    flags = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", *also)
    unsupported = [k for k in flags if get(k, False)]
    if dynamic and not get("use_dynamic_shifting", False):
        unsupported.append("use_dynamic_shifting=False")
    if get("time_shift_type", "exponential") != "exponential":
        unsupported.append(f"time_shift_type={get('time_shift_type')!r}")
    unsupported += list(extra)
    if unsupported:
        raise ValueError(f"the scheduler config sets {', '.join(unsupported)}, which tempflow's {family} grid does not "
                         f"follow ({follows}); use {family}'s own scheduler config")  # fmt: skip


class _DiffusersModel(FlowModel):
    """What the diffusers adapters share: prompt encoding (pipeline or precomputed), the VAE decode, trainable
    parameters. Subclasses encode with :meth:`_encode_texts` (a dict of batch tensors per prompt list), and may
    change how precomputed embeddings become tensors (:meth:`_embedding_rows`), how the conditional and
    unconditional tensors are joined (:meth:`_conditioning`), the VAE's scale (:meth:`_vae_scale`) and the latent
    to image path (:meth:`_decode_latents`)."""

    #: the form of one precomputed embedding, for error messages
    embedding_format = "(hidden, pooled)"

    def __init__(self, transformer, vae=None, pipeline=None, embeddings=None, height: int | None = None,
                 width: int | None = None, guidance: float = 4.5, attention: str = "sdpa",
                 max_sequence_length: int = 128, device=None):  # fmt: skip
        if pipeline is None and embeddings is None:
            raise ValueError(
                f"give a pipeline (for its text encoders) or precomputed embeddings={{prompt: {self.embedding_format}}}"
            )
        self.transformer, self.vae, self.pipeline, self.embeddings = transformer, vae, pipeline, embeddings
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.default_guidance = guidance
        self.max_sequence_length = int(max_sequence_length)
        self.vae_scale = self._vae_scale(vae) if vae is not None else 8
        native = self.native_resolution()
        height, width = height or native, width or native
        if height % (self.vae_scale * 2) or width % (self.vae_scale * 2):
            raise ValueError(f"height and width must be multiples of {self.vae_scale * 2}, got {height}x{width}")
        self.height, self.width = height, width
        self._set_attention(transformer, attention)

    @staticmethod
    def _set_attention(transformer, attention: str) -> None:
        """Switch the transformer's attention kernels (:func:`set_attention`)."""
        set_attention(transformer, attention)

    @staticmethod
    def _vae_scale(vae) -> int:
        """How many pixels one latent spans per side (AutoencoderKL: 2 per down block after the first)."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype (inputs are cast to it; read live, so casting the transformer is enough)."""
        return next(self.transformer.parameters()).dtype

    @property
    def noise_dtype(self) -> torch.dtype:
        """The pipelines draw their starting noise in the prompt embeddings' dtype, which is the weights' here."""
        return self.dtype

    def native_resolution(self) -> int:
        """The pipeline's default image size (diffusers': ``default_sample_size * vae_scale_factor``)."""
        size = getattr(self.pipeline, "default_sample_size", None) or getattr(self.transformer.config, "sample_size",
                                                                              64)  # fmt: skip
        return int(size) * self.vae_scale

    @classmethod
    def from_pipeline(cls, pipe, **kwargs):
        return cls(pipe.transformer, pipe.vae, pipeline=pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype=torch.bfloat16, device="cpu", pipeline_kwargs=None, **kwargs):
        """Load a diffusers pipeline folder (never from a hub): transformer and text encoders in ``torch_dtype``, the
        VAE in fp32 (as Flow-GRPO decodes). ``pipeline_kwargs`` go to ``DiffusionPipeline.from_pretrained`` (e.g.
        ``{"text_encoder_3": None, "tokenizer_3": None}``)."""
        import json
        import os

        from diffusers import DiffusionPipeline

        if not os.path.isdir(path):
            raise FileNotFoundError(f"no diffusers pipeline folder at {path!r} (tempflow loads local folders only)")
        # components saved as absent (e.g. SD3 without its T5) must be passed as None explicitly to diffusers
        index = json.load(open(os.path.join(path, "model_index.json")))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
        pipe = DiffusionPipeline.from_pretrained(
            path, torch_dtype=torch_dtype, local_files_only=True, **{**absent, **(pipeline_kwargs or {})}
        ).to(device)
        if pipe.vae is not None and pipe.vae.dtype != torch.float32:
            pipe.vae.to(torch.float32)
        return cls.from_pipeline(pipe, **kwargs)

    def _encode_texts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text encoders' output for ``prompts``: named tensors with the prompt first."""
        raise NotImplementedError

    def _embedding_rows(self, rows: list) -> dict[str, torch.Tensor]:
        """Precomputed embeddings (one ``embeddings[prompt]`` per row) as the tensors :meth:`_encode_texts` gives."""
        hidden = torch.stack([h for h, _ in rows]).to(self.device, self.dtype)
        pooled = torch.stack([p for _, p in rows]).to(self.device, self.dtype)
        return {"hidden": hidden, "pooled": pooled}

    def _check_hidden_rows(self, rows: list, family: str, hint: str, length: int | None = None) -> None:
        """Precomputed embeddings of the families whose prompt is one tensor: each row ``hidden`` ``(L, D)``
        (``length`` tokens when given), else an error naming :attr:`embedding_format`, what came, and ``hint`` (how
        to get them from ``encode_prompt``)."""
        bad = [tuple(getattr(h, "shape", ())) or type(h).__name__ for h in rows
               if not isinstance(h, torch.Tensor) or h.dim() != 2 or length not in (None, h.shape[0])]  # fmt: skip
        if bad:
            raise ValueError(f"{family} embeddings are one tensor {self.embedding_format} per prompt; got {bad[:3]} "
                             f"({hint})")  # fmt: skip

    def _conditioning(self, cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor]) -> Conditioning:
        """The prompts' tensors and the unconditional prompt's (a leading 1) joined into a Conditioning."""
        return Conditioning(cond, null)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        if self.embeddings is not None:
            missing = [p for p in [*prompts, ""] if p not in self.embeddings]
            if missing:
                raise KeyError(f"no precomputed embedding for prompts {missing[:5]} (the unconditional one is '')")
            cond = self._embedding_rows([self.embeddings[p] for p in prompts])
            null = self._embedding_rows([self.embeddings[""]])
        else:
            cond, null = self._encode_texts(prompts), self._encode_texts([""])
        return self._conditioning(cond, null)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] from latents ``(B, *latent_shape)`` (the VAE in its own dtype)."""
        if self.vae is None:
            raise RuntimeError("this adapter has no VAE to decode with; pass vae= (or build it from a pipeline)")
        with torch.no_grad():
            images = self._decode_latents(latents)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's images in [-1, 1]: AutoencoderKL's scaling and shift factors undone, as the pipelines do."""
        z = self.unpack(latents).to(self.vae.dtype)
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(z).sample

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def trained_module(self):
        return self.transformer


class SD3Model(_DiffusersModel):
    """SD3 / SD3.5: latents ``(C, H/8, W/8)``, static time shift 3, CFG 4.5 by default (Flow-GRPO's SD3.5-M)."""

    shift = 3.0

    def __init__(self, transformer, vae=None, **kwargs):
        super().__init__(transformer, vae, **kwargs)
        c = transformer.config.in_channels
        self.latent_shape = (c, self.height // self.vae_scale, self.width // self.vae_scale)

    def _encode_texts(self, prompts):
        hidden, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return {"hidden": hidden.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def forward_velocity(self, x, t, cond):
        dtype = self.dtype
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=(t * 1000).to(dtype),
            encoder_hidden_states=cond["hidden"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
        ).sample


class _PackedModel(_DiffusersModel):
    """What FLUX and Qwen-Image share: VAE latents ``(C, h, w)`` (h = H / vae_scale) packed into 2x2 patches, so
    the denoiser sees ``(L, 4C)`` with ``L = (h/2)(w/2)`` tokens, and the pipelines' default size of 128 latents a
    side."""

    def __init__(self, transformer, vae=None, **kwargs):
        super().__init__(transformer, vae, **kwargs)
        self.channels = transformer.config.in_channels // 4
        self.h, self.w = self.height // self.vae_scale, self.width // self.vae_scale
        self.latent_shape = ((self.h // 2) * (self.w // 2), self.channels * 4)

    def native_resolution(self) -> int:
        # FluxPipeline and QwenImagePipeline: default_sample_size 128 latents x the VAE scale (1024 px)
        return int(getattr(self.pipeline, "default_sample_size", None) or 128) * self.vae_scale

    def _noise_shape(self, n: int) -> tuple[int, ...]:
        """The shape the pipeline's ``prepare_latents`` draws its noise in, before packing."""
        return (n, self.channels, self.h, self.w)

    def initial_latents(self, n: int, generator=None, dtype=None) -> torch.Tensor:
        """As the pipeline's ``prepare_latents``: ``randn_tensor`` of the unpacked shape, then packed."""
        from .base import randn_tensor

        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"a list of generators needs one per latent: {len(generator)} for {n} latents")
        generator = list(generator) if isinstance(generator, tuple) else generator
        z = randn_tensor(self._noise_shape(int(n)), generator=generator, device=self.device,
                         dtype=dtype or self.noise_dtype)  # fmt: skip
        return self._pack_noise(z)

    def _pack_noise(self, z: torch.Tensor) -> torch.Tensor:
        """The noise drawn in :meth:`_noise_shape` as packed latents (FLUX, Qwen-Image: unpacked, then packed)."""
        return self.pack(z.reshape(z.shape[0], self.channels, self.h, self.w))

    def _embedded_guidance_velocity(self, x, t, cond, index, guidance=None):
        """A guidance-distilled model's velocity (FLUX.1-dev, FLUX.2-dev): the guidance scale is an input of the
        transformer (``guidance`` (B,) in the weights' dtype), one forward of the conditional rows, no CFG pair."""
        g = self.default_guidance if guidance is None else float(guidance)
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        gv = torch.full((b,), g, device=x.device, dtype=self.dtype)
        return self.forward_velocity(x, t, cond.select(index), guidance=gv)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed ``(B, L, 4C)`` to ``(B, C, h, w)``."""
        b, n, d = latents.shape
        z = latents.view(b, self.h // 2, self.w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return z.reshape(b, d // 4, self.h, self.w)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` to packed ``(B, L, 4C)`` (the pipelines' ``_pack_latents``)."""
        b, c, h, w = latents.shape
        z = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(b, (h // 2) * (w // 2), c * 4)


class FluxModel(_PackedModel):
    """FLUX.1: packed latents ``(L, 4C)`` with L = (H/16)(W/16) tokens, image and text position ids, the dynamic
    time shift of L tokens; FLUX.1-dev's guidance embedding replaces classifier-free guidance (one forward)."""

    def __init__(self, transformer, vae=None, guidance: float = 3.5, **kwargs):
        super().__init__(transformer, vae, guidance=guidance, **kwargs)
        ids = torch.zeros(self.h // 2, self.w // 2, 3)
        ids[..., 1] += torch.arange(self.h // 2)[:, None]
        ids[..., 2] += torch.arange(self.w // 2)[None, :]
        self.image_ids = ids.reshape(-1, 3).to(self.device)
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        return sde.flux_time_grid(num_steps, self.latent_shape[0], device=device)

    def forward_rows(self, guidance=None) -> int:
        return 1 if self.guidance_embeds else super().forward_rows(guidance)

    def _encode_texts(self, prompts):
        hidden, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"hidden": hidden.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def forward_velocity(self, x, t, cond, guidance: torch.Tensor | None = None):
        dtype = self.dtype
        text_ids = torch.zeros(cond["hidden"].shape[1], 3, device=self.device, dtype=dtype)
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=cond["hidden"].to(dtype),
            txt_ids=text_ids,
            img_ids=self.image_ids.to(dtype),
        ).sample

    def velocity(self, x, t, cond, index, guidance=None):
        if not self.guidance_embeds:
            return super().velocity(x, t, cond, index, guidance)
        return self._embedded_guidance_velocity(x, t, cond, index, guidance)
