"""Wan 2.1 text-to-video (``WanTransformer3DModel``, diffusers' ``WanPipeline``) behind the FlowModel protocol.

Conventions (what :class:`WanModel` reproduces of ``WanPipeline``, diffusers 0.42):

* latents are the VAE's, unpacked: ``(C, F', h, w)`` per sample with ``F' = (num_frames - 1) / 4 + 1`` latent
  frames and ``h, w = H / 8, W / 8`` (the VAE config's ``scale_factor_temporal`` and ``scale_factor_spatial``); the
  transformer patchifies them itself;
* prompts are encoded once by ``encode_prompt`` (UMT5's last hidden states of the valid tokens, zero-padded to
  ``max_sequence_length`` tokens, as the pipeline does; the transformer sees no mask, so the padding length is part
  of the conditioning: Wan is used with 512, the pipeline's default and this adapter's);
* the unconditional half is the negative prompt (``negative_prompt``, "" by default as in the pipeline), and
  classifier-free guidance ``v_u + g (v_c - v_u)`` (5.0 by default, the pipeline's ``guidance_scale``) runs as one
  batched forward of both halves (the pipeline runs two forwards); guidance 1 skips the unconditional half, and below
  1 the formula still applies, where the pipeline would turn guidance off;
* the transformer's timestep is ``1000 t`` (fp32). With Wan's UniPC scheduler the pipeline passes that scheduler's
  int64 timesteps, ``1000 t`` truncated, so at the grid's times the timestep embedding's input differs from the
  pipeline's by less than 1 (of 1000); with a FlowMatchEulerDiscreteScheduler it is the pipeline's own;
* sampling is tempflow's (Euler ODE / SDE steps on the grid), not UniPC's multistep predictor-corrector: the same
  times, not the same solver;
* the time grid is the static flow shift of the scheduler Wan ships (``UniPCMultistepScheduler`` with
  ``use_flow_sigmas`` and ``flow_shift``: :func:`tempflow.sde.wan_time_grid`); a pipeline carrying a
  ``FlowMatchEulerDiscreteScheduler`` gets that scheduler's grid. ``flow_shift`` overrides the scheduler's shift
  (the pipeline's docs: 5.0 for 720p, 3.0 for 480p); without a pipeline it defaults by size the same way;
* :meth:`WanModel.initial_latents` draws as ``prepare_latents`` does (fp32, the unpacked shape);
* :meth:`WanModel.decode` undoes ``latents_mean`` / ``latents_std`` as the pipeline does and returns videos
  ``(B, F, C, H, W)`` in [0, 1] (frames second, as ``postprocess_video`` gives them). Rewards for videos:
  :class:`tempflow.rewards.FrameReward` (any image reward over chosen frames) and
  :class:`tempflow.rewards.TemporalConsistency`.

Not handled (refused with a message): Wan 2.2's two experts (``transformer_2`` / ``boundary_ratio``), the per-token
timesteps of ``expand_timesteps`` (Wan 2.2 TI2V), image-conditioned transformers (I2V: ``image_dim``,
``added_kv_proj_dim``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from .. import sde
from .base import Conditioning, randn_tensor
from .diffusers_models import _DiffusersModel, set_attention

__all__ = ["WanModel"]


def _get(config, key, default=None):
    if config is None:
        return default
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


class WanModel(_DiffusersModel):
    """Wan 2.1 text-to-video: latents ``(C, F', h, w)``, UMT5 prompts zero-padded to ``max_sequence_length`` (512 by
    default, the pipeline's), CFG 5.0 against ``negative_prompt`` ("" by default) in one batched forward, the
    shipped scheduler's flow-shift grid (``flow_shift`` overrides it), videos ``(B, F, C, H, W)`` in [0, 1].
    ``num_frames``: frames per video, ``k * scale_factor_temporal + 1`` (81 by default, the pipeline's); ``height``
    and ``width``: multiples of 16 (480 x 832 by default)."""

    embedding_format = "hidden (max_sequence_length, D), one row of encode_prompt"

    def __init__(self, transformer, vae=None, guidance: float = 5.0, num_frames: int = 81,
                 negative_prompt: str = "", flow_shift: float | None = None, max_sequence_length: int = 512,
                 height: int | None = None, width: int | None = None, **kwargs):  # fmt: skip
        _check_text_to_video(transformer, kwargs.get("pipeline"))
        super().__init__(transformer, vae, guidance=guidance, max_sequence_length=max_sequence_length,
                         height=height or 480, width=width or 832, **kwargs)  # fmt: skip
        self.temporal_scale = int(_get(getattr(vae, "config", None), "scale_factor_temporal", 4) or 4)
        num_frames = int(num_frames)
        if num_frames < 1 or (num_frames - 1) % self.temporal_scale:
            k = max(0, (num_frames - 1) // self.temporal_scale)
            raise ValueError(f"num_frames must be k * {self.temporal_scale} + 1 (the VAE compresses "
                             f"{self.temporal_scale} frames into one after the first), got {num_frames}; e.g. "
                             f"{k * self.temporal_scale + 1} or {(k + 1) * self.temporal_scale + 1}")  # fmt: skip
        self.num_frames = num_frames
        if flow_shift is not None and not float(flow_shift) > 0:
            raise ValueError(f"flow_shift must be > 0 (Wan: 3.0 at 480p, 5.0 at 720p), got {flow_shift}")
        self.negative_prompt = str(negative_prompt)
        c = transformer.config.in_channels
        frames = (num_frames - 1) // self.temporal_scale + 1
        self.latent_shape = (c, frames, self.height // self.vae_scale, self.width // self.vae_scale)
        self.schedule = _schedule(getattr(self.pipeline, "scheduler", None), flow_shift, self.height, self.width)
        self.shift = self.schedule["shift"]

    @staticmethod
    def _vae_scale(vae) -> int:
        # WanPipeline.vae_scale_factor_spatial
        return int(_get(vae.config, "scale_factor_spatial", 8) or 8)

    @staticmethod
    def _set_attention(transformer, attention: str) -> None:
        """``xformers`` and ``flash`` through diffusers' attention dispatcher (Wan's processor calls it; the older
        ``enable_xformers_memory_efficient_attention`` would replace Wan's processor and its rotary embedding)."""
        packages = {"xformers": ("xformers", "tempflow[xformers]"), "flash": ("flash_attn", "tempflow[flash]")}
        if attention in packages:
            module, extra = packages[attention]
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"attention={attention!r} needs {module}: pip install {extra} (or use 'sdpa')")
            transformer.set_attention_backend(attention)
            return
        set_attention(transformer, attention)

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype: its patch embedding's (Wan keeps ``scale_shift_table``, the time embedder
        and the norms in fp32 when loaded in bf16, so the first parameter does not tell)."""
        return self.transformer.patch_embedding.weight.dtype

    @property
    def noise_dtype(self) -> torch.dtype:
        """``WanPipeline.prepare_latents`` draws its noise in fp32 whatever the weights' dtype."""
        return torch.float32

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        if self.schedule["kind"] == "flowmatch":
            return sde.time_grid(num_steps, shift=self.shift, device=device,
                                 num_train_timesteps=self.schedule["num_train_timesteps"])  # fmt: skip
        return sde.wan_time_grid(num_steps, self.shift, num_train_timesteps=self.schedule["num_train_timesteps"],
                                 device=device)  # fmt: skip

    def initial_latents(self, n: int, generator=None, dtype=None) -> torch.Tensor:
        """As ``WanPipeline.prepare_latents``: ``randn_tensor((n, C, F', h, w))`` in fp32 by default."""
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"a list of generators needs one per latent: {len(generator)} for {n} latents")
        generator = list(generator) if isinstance(generator, tuple) else generator
        return randn_tensor((int(n), *self.latent_shape), generator=generator, device=self.device,
                            dtype=dtype or self.noise_dtype)  # fmt: skip

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The prompts and the negative prompt (the unconditional half), each encoded once."""
        prompts = list(prompts)
        if self.embeddings is not None:
            missing = [p for p in [*prompts, self.negative_prompt] if p not in self.embeddings]
            if missing:
                raise KeyError(f"no precomputed embedding for prompts {missing[:5]} (the unconditional one is the "
                               f"negative prompt {self.negative_prompt!r})")  # fmt: skip
            cond = self._embedding_rows([self.embeddings[p] for p in prompts])
            null = self._embedding_rows([self.embeddings[self.negative_prompt]])
        else:
            cond, null = self._encode_texts(prompts), self._encode_texts([self.negative_prompt])
        return Conditioning(cond, null)

    def _encode_texts(self, prompts):
        hidden, _ = self.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                max_sequence_length=self.max_sequence_length)  # fmt: skip
        return {"hidden": hidden.to(self.dtype)}

    def _embedding_rows(self, rows):
        want = self.max_sequence_length
        self._check_hidden_rows(rows, "Wan", f"padded to max_sequence_length={want} tokens as encode_prompt pads them",
                                length=want)  # fmt: skip
        return {"hidden": torch.stack(rows).to(self.device, self.dtype)}

    def forward_velocity(self, x, t, cond):
        dtype = self.dtype
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=t.float() * 1000,  # the pipeline's timestep (Wan embeds it in fp32)
            encoder_hidden_states=cond["hidden"].to(dtype),
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, F, C, H, W)`` in [0, 1] from latents ``(B, C, F', h, w)``: ``latents_mean`` and
        ``latents_std`` undone as ``WanPipeline`` does, the VAE in its own dtype, ``postprocess_video``'s
        ``x / 2 + 0.5`` clamped."""
        if self.vae is None:
            raise RuntimeError("this adapter has no VAE to decode with; pass vae= (or build it from a pipeline)")
        cfg = self.vae.config
        with torch.no_grad():
            z = latents.to(self.vae.dtype)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, C, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def use_lora(self, rank: int = 32, alpha: int = 64, targets: Sequence[str] | None = None) -> None:
        """LoRA on Wan's self- and cross-attention projections (``attn1`` / ``attn2``: ``to_q``, ``to_k``, ``to_v``,
        ``to_out.0``; text-to-video Wan has no ``add_k_proj`` / ``add_v_proj``, which only the I2V image branch
        has)."""
        super().use_lora(rank, alpha, targets or ["to_q", "to_k", "to_v", "to_out.0"])


def _check_text_to_video(transformer, pipeline) -> None:
    """Refuse what this adapter does not drive, naming it."""
    name = type(transformer).__name__
    if name != "WanTransformer3DModel":
        raise TypeError(f"WanModel drives a WanTransformer3DModel, got {name}")
    cfg = transformer.config
    if _get(cfg, "image_dim") or _get(cfg, "added_kv_proj_dim"):
        raise ValueError("this WanTransformer3DModel takes image conditioning (image_dim / added_kv_proj_dim: an "
                         "image-to-video model); WanModel is text-to-video: use a Wan T2V transformer")  # fmt: skip
    if pipeline is None:
        return
    if getattr(pipeline, "transformer_2", None) is not None or _get(pipeline.config, "boundary_ratio") is not None:
        raise ValueError("this is a Wan 2.2 two-expert pipeline (transformer_2 / boundary_ratio switch the denoiser "
                         "by timestep), which WanModel does not train; use a single-transformer Wan 2.1 T2V "
                         "pipeline")  # fmt: skip
    if _get(pipeline.config, "expand_timesteps", False):
        raise ValueError("this pipeline sets expand_timesteps (Wan 2.2 TI2V's per-token timesteps), which WanModel "
                         "does not follow; use a Wan 2.1 T2V pipeline")  # fmt: skip


def _schedule(scheduler, flow_shift, height: int, width: int) -> dict:
    """The grid settings of the pipeline's scheduler: ``kind`` (``unipc``: UniPCMultistepScheduler with flow sigmas,
    what Wan ships; ``flowmatch``: FlowMatchEulerDiscreteScheduler with a static shift), ``shift`` and
    ``num_train_timesteps``. ``flow_shift`` (if given) replaces the config's shift; without a scheduler: UniPC with
    5.0 at 720p and above, 3.0 below (the pipeline's docs)."""
    if scheduler is None:
        default = 5.0 if height * width >= 720 * 1280 else 3.0
        return {
            "kind": "unipc",
            "shift": float(default if flow_shift is None else flow_shift),
            "num_train_timesteps": 1000,
        }
    cfg = scheduler.config
    name = type(scheduler).__name__
    bad = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting",
                       "invert_sigmas") if _get(cfg, k, False)]  # fmt: skip
    if _get(cfg, "shift_terminal"):
        bad.append("shift_terminal")
    if name == "UniPCMultistepScheduler":
        if not _get(cfg, "use_flow_sigmas", False):
            bad.append("use_flow_sigmas=False")
        if _get(cfg, "final_sigmas_type", "zero") != "zero":
            bad.append(f"final_sigmas_type={_get(cfg, 'final_sigmas_type')!r}")
        if _get(cfg, "timestep_spacing", "linspace") != "linspace":
            bad.append(f"timestep_spacing={_get(cfg, 'timestep_spacing')!r}")
        kind, shift = "unipc", _get(cfg, "flow_shift", 1.0)
    elif name == "FlowMatchEulerDiscreteScheduler":
        kind, shift = "flowmatch", _get(cfg, "shift", 1.0)
    else:
        raise ValueError(f"the pipeline's scheduler is {name}; WanModel follows Wan's UniPCMultistepScheduler (flow "
                         "sigmas) or a FlowMatchEulerDiscreteScheduler")  # fmt: skip
    if bad:
        raise ValueError(f"the scheduler config sets {', '.join(bad)}, which tempflow's Wan grid does not follow (it "
                         "follows UniPC flow sigmas with a static flow_shift, as Wan ships); use such a scheduler "
                         "config")  # fmt: skip
    return {
        "kind": kind,
        "shift": float(shift if flow_shift is None else flow_shift),
        "num_train_timesteps": _get(cfg, "num_train_timesteps", 1000),
    }
