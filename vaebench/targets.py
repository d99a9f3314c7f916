"""Ground truth for the linear-Gaussian model.

With a linear decoder and a Gaussian likelihood the model is factor analysis,

.. math::

    z \\sim \\mathcal N(0, I_D), \\qquad x \\mid z \\sim \\mathcal N(W z + b, Ψ), \\quad Ψ = \\operatorname{diag}(σ^2),

so that (e.g. Bishop 2006, §12.2)

.. math::

    p_θ(x) = \\mathcal N(x; b, W W^\\top + Ψ), \\qquad
    p_θ(z \\mid x) = \\mathcal N\\big(Σ W^\\top Ψ^{-1}(x - b),\\; Σ\\big), \\quad
    Σ = (I + W^\\top Ψ^{-1} W)^{-1}.

These closed forms are the yardstick every estimator and sampler is tested against. They read
W, b and σ from the model's decoder, so they hold for a trained model too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch

from vaebench.errors import ConfigError
from vaebench.model import LatentModel, Proposal


@dataclass(frozen=True)
class GaussianPosterior:
    """Exact p_θ(z|x): per-datapoint means ``[n, D]`` and the shared covariance ``[D, D]``."""

    mean: torch.Tensor
    covariance: torch.Tensor

    def distribution(self) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.mean, covariance_matrix=self.covariance)


def linear_gaussian_parameters(model: LatentModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W ``[P, D]``, b ``[P]``, σ² ``[P]``) of a linear-Gaussian :class:`~vaebench.model.LatentModel`."""
    if not model.config.is_linear_gaussian:
        raise ConfigError("the exact estimator needs a linear decoder with a Gaussian likelihood "
                          f"(this model: --model {model.config.model}, likelihood={model.config.likelihood})")
    linear = model.decoder.net
    return linear.weight, linear.bias, model.decoder.scale() ** 2


def marginal(model: LatentModel) -> dist.MultivariateNormal:
    """p_θ(x) = N(b, W Wᵀ + Ψ)."""
    weight, bias, noise_var = linear_gaussian_parameters(model)
    covariance = weight @ weight.T + torch.diag(noise_var)
    return dist.MultivariateNormal(bias, covariance_matrix=covariance)


def exact_log_marginal(model: LatentModel, x: torch.Tensor) -> torch.Tensor:
    """Exact log p_θ(x) per datapoint, ``[n]``."""
    return marginal(model).log_prob(x)


def exact_posterior(model: LatentModel, x: torch.Tensor) -> GaussianPosterior:
    """Exact p_θ(z|x) for every row of ``x``."""
    weight, bias, noise_var = linear_gaussian_parameters(model)
    scaled = weight / noise_var.unsqueeze(-1)                       # Ψ^{-1} W
    eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    precision = eye + weight.T @ scaled
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    covariance = 0.5 * (covariance + covariance.T)
    mean = (x - bias) @ scaled @ covariance                         # Σ Wᵀ Ψ^{-1} (x − b), row-wise
    return GaussianPosterior(mean, covariance)


def exact_posterior_proposal(model: LatentModel) -> Proposal:
    """The exact posterior as an importance proposal: with it every weight equals p_θ(x)."""
    def proposal(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = exact_posterior(model, x).distribution()
        z = posterior.rsample((k,))
        return z, posterior.log_prob(z)
    return proposal
