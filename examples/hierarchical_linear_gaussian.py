"""A user model for vaebench: a two-level linear-Gaussian model written as a plain Pyro program.

    z1 ~ N(0, I_d1),   z2 | z1 ~ N(A z1, s² I_d2),   x | z1, z2 ~ N(W1 z1 + W2 z2 + b, diag σ²)

Two latent sites of different sizes, hierarchical (z1 → z2 → x), all in the ``data`` plate: exactly
the contract of :mod:`vaebench.models.contract`. Because everything is linear and Gaussian, the
marginal p(x) and the posterior p(z1, z2 | x) are known in closed form (:meth:`exact_log_marginal`,
:meth:`exact_posterior`), which the test suite uses as ground truth.

Run it through the whole benchmark with::

    vaebench compare --model examples/hierarchical_linear_gaussian.py:make_model --dataset linear-gaussian \\
        --out my-results/hierarchical

The factory is called as ``make_model(data_dim=P, **model_args)`` (``--model-arg d1=3`` ...).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class HierarchicalLinearGaussian(nn.Module):
    """z1 (``d1``) → z2 (``d2``) → x (``data_dim``), linear maps and Gaussian noise at every level."""

    def __init__(self, data_dim: int, d1: int = 2, d2: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d1, self.d2 = d1, d2
        self.a = nn.Parameter(torch.randn(d2, d1, generator=g))
        self.log_s = nn.Parameter(torch.tensor(-0.5))
        self.w1 = nn.Parameter(torch.randn(data_dim, d1, generator=g) / d1 ** 0.5)
        self.w2 = nn.Parameter(torch.randn(data_dim, d2, generator=g) / d2 ** 0.5)
        self.b = nn.Parameter(torch.zeros(data_dim))
        self.log_sigma = nn.Parameter(torch.full((data_dim,), -0.5))

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[-2], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(self.d1), x.new_ones(self.d1)).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ self.a.T, self.log_s.exp()).to_event(1))
            mean = z1 @ self.w1.T + z2 @ self.w2.T + self.b
            pyro.sample("x", dist.Normal(mean, self.log_sigma.exp()).to_event(1), obs=x)

    # ------------------------------------------------------------------ ground truth
    def _joint_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Covariance of z = [z1; z2] and the map W = [W1 W2] with x = W z + b + noise."""
        d1, d2 = self.d1, self.d2
        eye1 = torch.eye(d1, dtype=self.a.dtype)
        cov = torch.zeros(d1 + d2, d1 + d2, dtype=self.a.dtype)
        cov[:d1, :d1] = eye1
        cov[:d1, d1:] = self.a.T
        cov[d1:, :d1] = self.a
        cov[d1:, d1:] = self.a @ self.a.T + self.log_s.exp() ** 2 * torch.eye(d2, dtype=self.a.dtype)
        return cov, torch.cat([self.w1, self.w2], dim=1)

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(x; b, W Σ_z Wᵀ + diag σ²), ``[n]``."""
        cov, w = self._joint_latent()
        marginal = w @ cov @ w.T + torch.diag(self.log_sigma.exp() ** 2)
        return dist.MultivariateNormal(self.b, covariance_matrix=marginal).log_prob(x)

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[n, d1 + d2]`` and covariance of p(z1, z2 | x), z flattened as [z1, z2]."""
        cov, w = self._joint_latent()
        noise_precision = self.log_sigma.exp() ** -2
        precision = torch.linalg.inv(cov) + w.T @ (noise_precision[:, None] * w)
        covariance = torch.linalg.inv(precision)
        covariance = 0.5 * (covariance + covariance.T)
        mean = ((x - self.b) * noise_precision) @ w @ covariance
        return mean, covariance


def make_model(data_dim: int, d1: int = 2, d2: int = 3, seed: int = 0) -> HierarchicalLinearGaussian:
    """The factory ``vaebench --model examples/hierarchical_linear_gaussian.py:make_model`` calls."""
    return HierarchicalLinearGaussian(data_dim, d1, d2, seed)
