"""Velocity models behind one adapter protocol (:class:`FlowModel`): the embedded default ``digits`` (an
SD3-architecture model shipped with the package) and an analytic Gaussian-mixture flow for demos and tests."""

from .base import Conditioning, FlowModel, load_model, sample
from .mixture import GaussianMixtureFlow

__all__ = ["Conditioning", "FlowModel", "GaussianMixtureFlow", "load_model", "sample"]
