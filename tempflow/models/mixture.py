"""A flow whose velocity is known exactly: data ``x_0`` from a Gaussian mixture, ``x_1 ~ N(0, I)``.

Under the rectified-flow path ``x_t = (1 - t) x_0 + t x_1``, given component ``m`` the pair ``(x_0, x_t)`` is
jointly Gaussian, so the ideal velocity ``v(x, t) = E[x_1 - x_0 | x_t = x]`` is a posterior-weighted sum of
per-component linear maps. With this velocity the ODE and every marginal-preserving SDE carry ``N(0, I)`` at
t = 1 to the mixture at t = 0 (up to discretisation error), which makes it a sharp end-to-end check of the
time grids and noise schedules in :mod:`tempflow.sde`.
"""

from __future__ import annotations

import torch


class GaussianMixtureFlow:
    """Isotropic Gaussian mixture ``sum_m w_m N(mu_m, s_m^2 I)`` in ``D`` dimensions.

    Args:
        means: ``(M, D)`` component means.
        stds: ``(M,)`` component standard deviations (> 0).
        weights: ``(M,)`` mixture weights (normalised here); uniform by default.
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be (M, D), got shape {tuple(self.means.shape)}")
        m = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(m).clone()
        if not bool((self.stds > 0).all()):
            raise ValueError("component stds must be > 0")
        w = torch.ones(m, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (m,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be {m} positive numbers")
        self.weights = w / w.sum()

    @classmethod
    def ring(cls, modes: int = 4, radius: float = 2.0, std: float = 0.3, dim: int = 2) -> GaussianMixtureFlow:
        """``modes`` equal components on a circle in the first two of ``dim`` coordinates."""
        angle = torch.arange(modes, dtype=torch.float64) * (2 * torch.pi / modes)
        means = torch.zeros(modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
        return cls(means, torch.full((modes,), std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """Exact ``v(x, t)`` for ``x`` ``(B, D)`` and ``t`` a float or ``(B,)`` tensor in (0, 1]."""
        dtype = x.dtype
        x = x.double()
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        mu, s2 = self.means.to(x.device), (self.stds.to(x.device) ** 2).reshape(1, -1, 1)
        var = (1 - t) ** 2 * s2 + t**2  # (B, M, 1): variance of x_t given the component
        resid = x.unsqueeze(1) - (1 - t) * mu.unsqueeze(0)  # (B, M, D)
        logw = torch.log(self.weights.to(x.device)).reshape(1, -1) - 0.5 * (
            (resid**2).sum(-1) / var.squeeze(-1) + self.dim * torch.log(var.squeeze(-1))
        )
        post = torch.softmax(logw, dim=1).unsqueeze(-1)  # (B, M, 1)
        e_x1 = t / var * resid
        e_x0 = mu.unsqueeze(0) + (1 - t) * s2 / var * resid
        return (post * (e_x1 - e_x0)).sum(1).to(dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the data distribution, ``(n, D)`` fp64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * eps

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the most likely component of each point of ``x`` ``(B, D)``."""
        d2 = ((x.double().unsqueeze(1) - self.means.to(x.device)) ** 2).sum(-1)
        score = torch.log(self.weights.to(x.device)) - 0.5 * d2 / self.stds.to(x.device) ** 2
        score = score - self.dim * torch.log(self.stds.to(x.device))
        return score.argmax(1)
