"""The embedded default: a small text-conditioned flow model with the SD3 transformer architecture (diffusers'
``SD3Transformer2DModel``) on 16x16 handwritten digits, prompted "a handwritten 7". It ships with the package
(tempflow/assets/digits_model.*), so the whole method runs on a laptop with nothing to download.

The text side is a word-level tokenizer over a fixed vocabulary and a learned embedding (SD3's
``encoder_hidden_states`` and ``pooled_projections``); the image side works in pixel space (no VAE): latents are
``2 * image - 1``. ``tempflow pretrain digits`` rebuilds the weights: the same command and seed give the same
weights on the same number of threads (2).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Conditioning, FlowModel, sample

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
WEIGHTS = os.path.join(ASSETS, "digits_model.safetensors")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOCAB = ["<pad>", "<unk>", "a", "an", "the", "handwritten", "digit", "number", "of", *map(str, range(10)), *WORDS]
PRETRAIN_STEPS = 450  # the shipped recipe (see tempflow/assets/digits_model.json)
TEMPLATES = ["a handwritten {n}", "a handwritten {w}", "the digit {w}", "the number {n}", "a {w}", "{n}"]


def prompt_for(digit: int, template: int = 0) -> str:
    return TEMPLATES[template].format(n=digit, w=WORDS[digit])


@dataclass
class DigitsConfig:
    image_size: int = 16
    num_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 2
    text_dim: int = 64
    max_tokens: int = 6
    shift: float = 1.0
    default_guidance: float = 2.0


class WordTokenizer:
    """Lower-cased words (and single digits) -> ids of :data:`VOCAB`, padded or cut to ``max_tokens``."""

    def __init__(self, max_tokens: int = 6):
        self.max_tokens = max_tokens
        self.ids = {w: i for i, w in enumerate(VOCAB)}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z]+|\d", prompt.lower())[: self.max_tokens]
            out[row, : len(words)] = torch.tensor([self.ids.get(w, 1) for w in words], dtype=torch.long)
        return out


class DigitsNet(nn.Module):
    """Word embedding (-> SD3's text inputs) and an SD3 transformer on 1x16x16 pixels."""

    def __init__(self, cfg: DigitsConfig):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.cfg = cfg
        self.embed = nn.Embedding(len(VOCAB), cfg.text_dim)
        self.position = nn.Parameter(torch.zeros(cfg.max_tokens, cfg.text_dim))
        self.pool = nn.Linear(cfg.text_dim, cfg.text_dim)
        self.transformer = SD3Transformer2DModel(
            sample_size=cfg.image_size,
            patch_size=2,
            in_channels=1,
            out_channels=1,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.text_dim,
            caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
            pooled_projection_dim=cfg.text_dim,
            pos_embed_max_size=cfg.image_size,
        )

    def text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = self.pool((emb * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return emb, pooled

    def forward(self, x, t, hidden, pooled):
        return self.transformer(
            hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t * 1000.0
        ).sample


class DigitsModel(FlowModel):
    """The embedded default as a :class:`FlowModel` adapter. ``DigitsModel.load()`` takes the shipped weights."""

    def __init__(self, cfg: DigitsConfig | None = None, net: DigitsNet | None = None, device="cpu"):
        self.cfg = cfg or DigitsConfig()
        self.net = (net or DigitsNet(self.cfg)).to(device)
        self.tokenizer = WordTokenizer(self.cfg.max_tokens)
        self.latent_shape = (1, self.cfg.image_size, self.cfg.image_size)
        self.shift = self.cfg.shift
        self.default_guidance = self.cfg.default_guidance
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str = WEIGHTS, device="cpu", dtype=torch.float32, height: int | None = None,
             width: int | None = None, attention: str = "sdpa") -> DigitsModel:  # fmt: skip
        """The shipped weights (or ``path``); ``dtype`` casts the transformer (the trained module), ``height`` /
        ``width`` must be the model's 16 pixels when given."""
        from safetensors.torch import load_file

        from .diffusers_models import set_attention

        meta = os.path.splitext(path)[0] + ".json"
        if not os.path.exists(path) or not os.path.exists(meta):
            raise FileNotFoundError(f"digits model not found at {path}; rebuild it with `tempflow pretrain digits`")
        cfg = DigitsConfig(**json.load(open(meta))["config"])
        for name, size in (("height", height), ("width", width)):
            if size not in (None, 0, cfg.image_size):
                raise ValueError(f"the digits model makes {cfg.image_size}x{cfg.image_size} images; {name}={size} is "
                                 f"not possible (leave resolution unset or {cfg.image_size})")  # fmt: skip
        model = cls(cfg, device="cpu")
        model.net.load_state_dict(load_file(path))
        model.net.to(device).eval()
        if dtype != torch.float32:
            model.net.transformer.to(dtype)
        set_attention(model.net.transformer, attention)
        model.device = torch.device(device)
        return model

    def save(self, path: str = WEIGHTS, **meta) -> None:
        """Weights (safetensors) and config + recipe (JSON), each written atomically."""
        from .._io import save_weights

        save_weights(path, self.net.state_dict(), {"config": asdict(self.cfg), **meta})

    @torch.no_grad()  # the text side is frozen in fine-tuning, as SD3's and FLUX's encoders are
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        hidden, pooled = self.net.text(tokens)
        null_hidden, null_pooled = self.net.text(
            torch.zeros(1, self.cfg.max_tokens, dtype=torch.long, device=self.device)
        )
        return Conditioning({"hidden": hidden, "pooled": pooled}, {"hidden": null_hidden, "pooled": null_pooled})

    def forward_velocity(self, x, t, cond):
        dtype = self.net.transformer.dtype  # bf16 / fp16 weights: cast in, fp32 out
        h, pooled = cond["hidden"].to(dtype), cond["pooled"].to(dtype)
        return self.net(x.to(dtype), t.to(dtype), h, pooled).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    @property
    def transformer(self):
        return self.net.transformer

    def trained_module(self):
        return self.net.transformer


def pretrain(
    steps: int = PRETRAIN_STEPS,
    batch: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    drop: float = 0.1,
    threads: int = 2,
    cfg: DigitsConfig | None = None,
    log=print,
    eval_every: int = 0,
    evaluate=None,
) -> DigitsModel:
    """Rectified-flow pretraining on the train split: ``x_t = (1 - t) x_0 + t eps``, target ``eps - x_0``,
    ``t`` logit-normal, prompts from random templates, ``drop`` of them emptied for classifier-free guidance."""
    from .. import datasets

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitsModel(cfg)
        images, labels = datasets.digits("train", size=model.cfg.image_size)
        x0_all = model.encode_images(images)
        opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / (steps + 1)))
        start = time.perf_counter()
        for step in range(steps):
            model.net.train()
            idx = torch.randint(len(labels), (batch,), generator=gen)
            templates = torch.randint(len(TEMPLATES), (batch,), generator=gen).tolist()
            keep = (torch.rand(batch, generator=gen) >= drop).tolist()
            prompts = [prompt_for(int(d), k) if m else "" for d, k, m in zip(labels[idx], templates, keep, strict=True)]
            x0 = x0_all[idx]
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.sigmoid(torch.randn(batch, generator=gen))
            xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
            hidden, pooled = model.net.text(model.tokenizer(prompts))
            loss = F.mse_loss(model.net(xt, t, hidden, pooled), eps - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0:
                log(f"step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
            if eval_every and evaluate is not None and (step + 1) % eval_every == 0:
                model.net.eval()
                evaluate(model, step + 1)
        model.net.eval()
        return model
    finally:
        torch.set_num_threads(previous)


@functools.lru_cache(maxsize=1)
def _shipped_classifier():
    """The shipped classifier, loaded once per process (evaluation runs many times in a training run)."""
    from ..rewards.digits import load_classifier

    return load_classifier()


@torch.no_grad()
def prompt_agreement(model: DigitsModel, steps: int = 10, guidance: float | None = None, per_digit: int = 50,
                     seed: int = 1) -> float:  # fmt: skip
    """Fraction of ODE samples for "a handwritten d" (d = 0..9) that the shipped classifier reads as d."""
    digits = torch.arange(10).repeat_interleave(per_digit)
    images = model.decode(sample(model, [prompt_for(int(d)) for d in digits], steps, guidance, seed))
    pred = _shipped_classifier()(images).argmax(1)
    return (pred == digits).float().mean().item()
