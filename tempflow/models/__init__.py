"""Models that produce velocities. ``mixture``: an analytic Gaussian-mixture flow with the exact velocity field,
for demos and for tests of the samplers (no weights, no download)."""

from .mixture import GaussianMixtureFlow

__all__ = ["GaussianMixtureFlow"]
