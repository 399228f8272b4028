"""Model families by name: ``load_model("digits")`` or ``load_model("/models/stable-diffusion-3.5-medium")``.

A local diffusers folder's family is read from its ``model_index.json`` (the pipeline class and the transformer
class) and matched against the registered families; a new adapter registers here with :func:`register_family`
and nothing else in tempflow changes (the engine and the trainer see only the FlowModel protocol).

Every family takes the same loading options: ``device``, ``dtype`` (the denoiser's and text encoders' weights:
fp32 | bf16 | fp16; trainable LoRA weights are made fp32 by the trainer), ``height`` / ``width`` (None: the
model's own default size), ``attention`` (sdpa | xformers | flash) and ``max_sequence_length`` (T5 tokens;
Qwen-Image: the most prompt tokens kept; Wan: the UMT5 length prompts are zero-padded to, 512 as Wan is used;
Z-Image: the most templated prompt tokens kept, 512 as its pipeline; FLUX.2: the Mistral length prompts are padded
to, 512 as its pipeline; families without either ignore it). A family's own options go through as keyword
arguments (Wan: ``num_frames``, ``negative_prompt``, ``flow_shift``; Z-Image: ``cfg_normalization``,
``cfg_truncation``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import FlowModel

__all__ = ["Family", "FAMILIES", "register_family", "detect_family", "load_model", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Family:
    """``matches(model_index) -> bool`` recognises a folder; ``load(path, **options) -> FlowModel`` builds it."""

    name: str
    description: str
    matches: Callable[[dict], bool]
    load: Callable[..., FlowModel]


FAMILIES: dict[str, Family] = {}


def register_family(name: str, description: str, matches: Callable[[dict], bool], load: Callable[..., FlowModel]):
    """Register a model family (later registrations are tried first, so a specific family can refine a general
    one)."""
    FAMILIES[name] = Family(name, description, matches, load)
    return FAMILIES[name]


def _transformer_class(index: dict) -> str:
    entry = index.get("transformer")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else ""


def _load_sd3(path, **options):
    from .diffusers_models import SD3Model

    return SD3Model.from_pretrained(path, **options)


def _load_flux(path, **options):
    from .diffusers_models import FluxModel

    return FluxModel.from_pretrained(path, **options)


def _load_qwenimage(path, **options):
    from .qwenimage import QwenImageModel

    return QwenImageModel.from_pretrained(path, **options)


def _load_wan(path, **options):
    from .wan import WanModel

    return WanModel.from_pretrained(path, **options)


def _load_zimage(path, **options):
    from .zimage import ZImageModel

    return ZImageModel.from_pretrained(path, **options)


def _load_flux2(path, **options):
    from .flux2 import Flux2Model

    return Flux2Model.from_pretrained(path, **options)


def _has_transformer(name: str, pipeline: str | None = None) -> Callable[[dict], bool]:
    """The folder's transformer class is ``name`` (and, if given, its pipeline class ``pipeline``)."""
    return lambda index: _transformer_class(index) == name and pipeline in (None, index.get("_class_name"))


register_family("sd3", "SD3 / SD3.5 (SD3Transformer2DModel)", _has_transformer("SD3Transformer2DModel"), _load_sd3)
register_family("flux", "FLUX.1 (FluxTransformer2DModel)", _has_transformer("FluxTransformer2DModel"), _load_flux)
# Qwen-Image-Edit shares the transformer class but not the pipeline (its prompts take an image): not this adapter
register_family("qwenimage", "Qwen-Image (QwenImagePipeline, QwenImageTransformer2DModel)",
                _has_transformer("QwenImageTransformer2DModel", "QwenImagePipeline"), _load_qwenimage)  # fmt: skip
# Wan's image-to-video and video-to-video pipelines share the transformer class: only WanPipeline is text-to-video
register_family("wan", "Wan 2.1 text-to-video (WanPipeline, WanTransformer3DModel)",
                _has_transformer("WanTransformer3DModel", "WanPipeline"), _load_wan)  # fmt: skip
# Z-Image-Omni's and the image-to-image pipelines share the transformer class: only ZImagePipeline is this adapter
register_family("zimage", "Z-Image (ZImagePipeline, ZImageTransformer2DModel)",
                _has_transformer("ZImageTransformer2DModel", "ZImagePipeline"), _load_zimage)  # fmt: skip
# FLUX.2 klein's pipeline (Flux2KleinPipeline: real CFG, another text encoder) shares the transformer class: not this
register_family("flux2", "FLUX.2-dev (Flux2Pipeline, Flux2Transformer2DModel)",
                _has_transformer("Flux2Transformer2DModel", "Flux2Pipeline"), _load_flux2)  # fmt: skip


def _read_index(path: str) -> dict:
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "not found"
        raise FileNotFoundError(f"model {path!r}: {what}; give 'digits' (the embedded default) or a local diffusers "
                                "pipeline folder (tempflow downloads nothing)")  # fmt: skip
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        listing = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
        raise FileNotFoundError(f"model {path!r} is not a diffusers pipeline folder: no model_index.json (found "
                                f"{listing}); save one with pipeline.save_pretrained(folder)")  # fmt: skip
    try:
        with open(index_path) as fh:
            index = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(index, dict):
        raise ValueError(f"{index_path} is not a JSON object")
    return index


def detect_family(path: str) -> Family:
    """The registered family of a local diffusers folder, or an error saying what the folder holds."""
    index = _read_index(path)
    for family in reversed(FAMILIES.values()):
        if family.matches(index):
            return family
    found = f"pipeline {index.get('_class_name') or '(no _class_name)'} with transformer "
    found += _transformer_class(index) or "(none listed)"
    known = "; ".join(f.description for f in FAMILIES.values())
    raise ValueError(f"model {path!r}: model_index.json describes {found}, which no tempflow adapter handles "
                     f"(supported: {known}; register one with tempflow.models.register_family)")  # fmt: skip


def load_model(spec: str = "digits", device="cpu", dtype="fp32", height: int | None = None, width: int | None = None,
               attention: str = "sdpa", max_sequence_length: int | None = None, **kwargs) -> FlowModel:  # fmt: skip
    """``"digits"`` (the embedded default) or a local diffusers folder of a registered family. ``dtype``: fp32 |
    bf16 | fp16 or a torch dtype; ``max_sequence_length`` None: the family's own (128 for SD3, FLUX and Qwen-Image,
    512 for Wan and Z-Image); other keyword arguments go to the family's loader."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dtype = kwargs.pop("torch_dtype", dtype)
    if spec == "digits":
        from .digits import DigitsModel

        if kwargs:
            raise TypeError(f"the digits model takes no options {sorted(kwargs)} (model_args are a diffusers "
                            "family's own loading options, e.g. Wan's num_frames)")  # fmt: skip
        return DigitsModel.load(device=device, dtype=dtype, height=height, width=width, attention=attention)
    family = detect_family(spec)
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    return family.load(spec, device=device, torch_dtype=dtype, height=height, width=width, attention=attention,
                       **kwargs)  # fmt: skip
