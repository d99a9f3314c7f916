"""Summary metrics of a trained model that are not log-likelihoods."""

from __future__ import annotations

import torch

from vaebench.model import VAE

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al. (2016, §5.2) call unit u active when Cov_x(E_{q(u|x)}[u]) > 10⁻²."""


@torch.no_grad()
def encoder_mean_variance(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Variance over datapoints of the encoder mean, per latent dimension ``[D]``."""
    means = torch.cat([model.encode(x[i:i + batch_size])[0] for i in range(0, x.shape[0], batch_size)])
    return means.double().var(dim=0, unbiased=True)


def active_units(model: VAE, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dimensions whose encoder-mean variance over ``x`` exceeds ``threshold``."""
    return int((encoder_mean_variance(model, x) > threshold).sum())
