"""Z-Image (``ZImageTransformer2DModel``, diffusers' ``ZImagePipeline``) behind the FlowModel protocol.

Build one from a local diffusers folder (``ZImageModel.from_pretrained(path)``; nothing is downloaded), from a
pipeline (``ZImageModel.from_pipeline(pipe)``), or from a transformer and VAE plus precomputed prompt embeddings
(``embeddings={prompt: hidden}``, ``hidden`` ``(L_p, D)`` the prompt's valid tokens, as ``pipe.encode_prompt(prompt,
do_classifier_free_guidance=False)[0][0]`` gives; the empty prompt "" is the unconditional one).

Conventions, each as ``ZImagePipeline`` (diffusers 0.42) computes it:

* latents: the VAE's ``(C, h, w)`` (h = H/8), unpacked (the transformer patchifies 2x2 itself and takes a list of
  ``(C, 1, h, w)`` tensors, one per sample); :meth:`ZImageModel.initial_latents` draws ``(n, C, h, w)`` as
  ``prepare_latents`` does (the pipeline draws in fp32; so does this adapter);
* prompts: the pipeline's ``_encode_prompt``: Qwen3's chat template (``enable_thinking=True``, a user turn and the
  generation prompt), tokens padded to ``max_sequence_length``, the text encoder's second-to-last hidden states of
  the valid tokens, one tensor per prompt. The transformer takes a *list* of variable-length tensors; the
  Conditioning holds them zero-padded to one length, ``hidden`` ``(N, L_text, D)`` and ``mask`` ``(N, L_text)``,
  the unconditional prompt "" padded to the same length, so rows gather by prompt index and the two halves of
  classifier-free guidance go through one batched forward; :meth:`ZImageModel.forward_velocity` hands the
  transformer each row's valid tokens only (``hidden[i][mask[i]]``), so a prompt's velocity does not depend on the
  padding;
* time and sign: the transformer is given ``timestep = 1 - t`` (the pipeline passes ``(1000 - 1000 t) / 1000``,
  and so does this adapter) and predicts the *negated* velocity: the pipeline steps the scheduler with
  ``-output`` (cast to fp32 first). This adapter returns ``-output`` in fp32, i.e. ``v = noise - x0`` for
  ``x_t = (1 - t) x0 + t noise``;
* guidance: the pipeline's ``pred = v_c + s (v_c - v_u)`` with ``guidance_scale`` s (0 turns it off) is
  ``v_u + g (v_c - v_u)`` with ``g = s + 1``: tempflow's ``guidance`` g is the pipeline's ``guidance_scale`` + 1
  (g = 1 skips the unconditional half, as the pipeline's s = 0 does). ``cfg_normalization`` c > 0 (the pipeline's
  option, off by default) rescales a sample's guided velocity to at most c times the conditional one's norm over the
  whole latent (:meth:`ZImageModel.guide`). ``cfg_truncation`` c (the pipeline's option, off at its default 1.0):
  where the normalised time ``(1000 - 1000 t) / 1000`` exceeds c, the sample goes unguided (the conditional
  velocity alone, one forward row), per sample where the pipeline decides per step (:meth:`ZImageModel.velocity`);
* grid: the pipeline's sigmas ``linspace(1, 1/T, T)`` through its scheduler: a static ``shift`` (Z-Image's config:
  3.0), or, with ``use_dynamic_shifting``, FLUX's ``mu`` of the image's ``(h/2)(w/2)`` tokens;
* decode: ``z / scaling_factor + shift_factor`` (the VAE config's), the AutoencoderKL's decode, [-1, 1] to [0, 1].
"""

from __future__ import annotations

import torch

from .. import sde
from .diffusers_models import _DiffusersModel, check_scheduler_config, scheduler_config_reader
from .qwenimage import QwenImageModel, _pad_rows

__all__ = ["ZImageModel"]

#: ZImageTransformer2DModel's attention projections (diffusers' Attention in every refiner and main block)
ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ZImageModel(_DiffusersModel):
    """Z-Image: latents ``(C, H/8, W/8)``, variable-length prompt embeddings with a mask, the negated-velocity
    output at time ``1 - t``, classifier-free guidance with the optional ``cfg_normalization`` and the time grid of
    the pipeline's scheduler config (without a pipeline: a static shift of 3). ``cfg_normalization`` and
    ``cfg_truncation``: the pipeline's options of those names (off by default). ``guidance``: tempflow's, the
    pipeline's ``guidance_scale`` + 1 (default 1: no CFG, as Z-Image-Turbo is run; Z-Image's pipeline default 5.0 is
    ``guidance=6``). ``max_sequence_length``: at most that many tokens of the templated prompt are kept (default 512,
    the pipeline's; the transformer sees the valid tokens only, so a longer limit costs nothing for short prompts)."""

    embedding_format = "hidden (L_p, D), the prompt's valid tokens"

    def __init__(self, transformer, vae=None, guidance: float = 1.0, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, **kwargs):  # fmt: skip
        patch = tuple(getattr(transformer.config, "all_patch_size", (2,)))
        if 2 not in patch or getattr(transformer.config, "siglip_feat_dim", None):
            raise ValueError("this ZImageTransformer2DModel has no 2x2 patch embedder or is the Omni variant (SigLIP "
                             "features), which this text-to-image adapter does not drive; use Z-Image's own "
                             "text-to-image transformer")  # fmt: skip
        kwargs.setdefault("max_sequence_length", 512)  # the pipeline's (it keeps the valid tokens: no padding cost)
        super().__init__(transformer, vae, guidance=guidance, **kwargs)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        self.channels = transformer.config.in_channels
        self.h, self.w = self.height // self.vae_scale, self.width // self.vae_scale
        self.latent_shape = (self.channels, self.h, self.w)
        scheduler = getattr(self.pipeline, "scheduler", None)
        self.schedule = _schedule(getattr(scheduler, "config", None))

    @staticmethod
    def _set_attention(transformer, attention: str) -> None:
        """Z-Image's transformer pads each sample's text and image tokens to the batch's longest and masks the rest
        in attention (diffusers' attention dispatcher): ``sdpa`` or ``xformers`` (whose dispatcher backend takes the
        mask); ``flash`` (flash-attn 2 takes no mask) refused."""
        if attention == "flash":
            raise ValueError("attention='flash' (flash-attn 2) takes no attention mask, which Z-Image's batches of "
                             "prompts of different lengths need; use attention='sdpa' or 'xformers'")  # fmt: skip
        QwenImageModel._set_attention(transformer, attention)  # xformers through the dispatcher, as Qwen-Image

    def native_resolution(self) -> int:
        return 1024  # ZImagePipeline: height = height or 1024

    @property
    def noise_dtype(self) -> torch.dtype:
        return torch.float32  # ZImagePipeline.prepare_latents draws in fp32 whatever the weights' dtype

    def use_lora(self, rank: int = 32, alpha: int = 64, targets=None) -> None:
        super().use_lora(rank, alpha, list(targets or ZIMAGE_LORA_TARGETS))

    def time_grid(self, num_steps: int, device=None) -> sde.TimeGrid:
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()  # get_default_z_image_sigmas
        s = self.schedule
        mu = None
        if s["dynamic"]:
            tokens = (self.h // 2) * (self.w // 2)
            m = (s["max_shift"] - s["base_shift"]) / (s["max_seq_len"] - s["base_seq_len"])
            mu = tokens * m + (s["base_shift"] - m * s["base_seq_len"])  # calculate_shift
        return sde.time_grid(num_steps, shift=s["shift"], mu=mu, sigmas=sigmas, shift_terminal=s["shift_terminal"],
                             device=device)  # fmt: skip

    def _encode_texts(self, prompts):
        rows = self.pipeline.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_sequence_length)[0]  # fmt: skip
        return self._embedding_rows(rows)

    def _embedding_rows(self, rows):
        self._check_hidden_rows(rows, "Z-Image", "encode_prompt gives a list of them: take its entry i")
        masks = [torch.ones(h.shape[0], dtype=torch.long, device=self.device) for h in rows]
        return _pad_rows([h.to(self.device, self.dtype) for h in rows], masks)

    _conditioning = QwenImageModel._conditioning  # both padded to the longer of the two lengths

    def forward_velocity(self, x, t, cond):
        dtype = self.dtype
        valid = cond["mask"].bool()
        caps = [h[m].to(dtype) for h, m in zip(cond["hidden"], valid, strict=True)]
        t_model = (1000 - (t.float() * 1000)) / 1000  # the pipeline's (1000 - timestep) / 1000
        out = self.transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), t_model, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).float()  # the pipeline steps with -output, in fp32

    def velocity(self, x, t, cond, index, guidance=None):
        """The base class's guided velocity, except that with ``cfg_truncation`` c < 1 the samples whose normalised
        time ``(1000 - 1000 t) / 1000`` exceeds c (late steps) take the conditional velocity alone, as the pipeline
        turns guidance off there; only the others forward the unconditional half."""
        g = self.default_guidance if guidance is None else float(guidance)
        if g == 1.0 or self.cfg_truncation >= 1.0:
            return super().velocity(x, t, cond, index, g)
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        late = (1000 - t * 1000) / 1000 > self.cfg_truncation  # the pipeline's _precomputed_t_norms > cfg_truncation
        if not late.any():
            return super().velocity(x, t, cond, index, g)
        if late.all():
            return super().velocity(x, t, cond, index, 1.0)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for rows, scale in ((late, 1.0), (~late, g)):
            out[rows] = super().velocity(x[rows], t[rows], cond, index.to(x.device)[rows], scale)
        return out

    def guide(self, v_u, v_c, g):
        """``v_u + g (v_c - v_u)`` (the pipeline's ``v_c + (g - 1)(v_c - v_u)``), in fp32 as the pipeline; with
        ``cfg_normalization`` c > 0 each sample rescaled to at most ``c ||v_c||`` (norms over the whole latent)."""
        v_u, v_c = v_u.float(), v_c.float()
        pred = v_c + (g - 1) * (v_c - v_u)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, v_c.dim()))
            cap = torch.linalg.vector_norm(v_c, dim=dims, keepdim=True) * self.cfg_normalization
            norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
            pred = torch.where(norm > cap, pred * (cap / norm), pred)
        return pred

    def _decode_latents(self, latents):
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        return self.vae.decode(z, return_dict=False)[0]


def _schedule(config) -> dict:
    """The scheduler config's time-shift settings (None: Z-Image's published static shift 3). Only what the
    pipeline's grid follows is supported: linspace sigmas with a static or exponential dynamic shift."""
    get = scheduler_config_reader(config)
    timesteps = get("num_train_timesteps", 1000)
    check_scheduler_config(get, "Z-Image", "linspace sigmas, a static or exponential dynamic shift",
                           extra=[f"num_train_timesteps={timesteps}"] if timesteps != 1000 else [])  # fmt: skip
    return {
        "dynamic": bool(get("use_dynamic_shifting", False)),
        "shift": float(get("shift", 3.0)),
        "base_seq_len": get("base_image_seq_len", 256),
        "max_seq_len": get("max_image_seq_len", 4096),
        "base_shift": get("base_shift", 0.5),
        "max_shift": get("max_shift", 1.15),
        "shift_terminal": get("shift_terminal", None),
    }
