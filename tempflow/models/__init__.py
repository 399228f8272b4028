"""Velocity models behind one adapter protocol (:class:`FlowModel`): the embedded default ``digits`` (an
SD3-architecture model shipped with the package), SD3/SD3.5, FLUX.1, Qwen-Image, Wan 2.1 text-to-video, Z-Image and
FLUX.2-dev from local diffusers folders (found by :func:`load_model` through the family registry), and an analytic
Gaussian-mixture flow for demos and tests."""

from .base import Conditioning, FlowModel, sample
from .mixture import GaussianMixtureFlow
from .registry import FAMILIES, detect_family, load_model, register_family

__all__ = [
    "Conditioning",
    "FlowModel",
    "GaussianMixtureFlow",
    "FAMILIES",
    "detect_family",
    "load_model",
    "register_family",
    "sample",
]
