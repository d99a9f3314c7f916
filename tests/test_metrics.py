"""Aggregate-posterior split, bound spread and gradient SNR against cases with known answers."""

import math

import pyro
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaebench.config import ModelConfig
from vaebench.metrics import aggregate_posterior, bound_spread, gradient_snr
from vaebench.model import VAE


def linear_model(data_dim=2, latent_dim=2, noise=0.5):
    """A float64 linear-Gaussian VAE with a linear encoder (no hidden layers)."""
    config = ModelConfig(data_dim=data_dim, latent_dim=latent_dim, hidden=(), model="linear",
                         likelihood="gaussian", gaussian_scale=noise, encoder_hidden=())
    return VAE(config).double()


def set_encoder(model, weight, bias, log_scale_bias):
    with torch.no_grad():
        model.encoder.loc.weight.copy_(weight)
        model.encoder.loc.bias.copy_(bias)
        model.encoder.log_scale.weight.zero_()
        model.encoder.log_scale.bias.copy_(log_scale_bias)


def test_encoder_ignoring_x_has_no_mutual_information():
    """q(z|x) = N(μ0, σ0²) for every x: q(z) = q(z|x), so I = 0 and KL(q(z)‖p) = KL(N(μ0, σ0²)‖N(0, I))."""
    model = linear_model()
    mu0, log_sigma0 = torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor([-0.5, 0.3], dtype=torch.float64)
    set_encoder(model, torch.zeros(2, 2), mu0, log_sigma0)
    x = torch.randn(80, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    result = aggregate_posterior(model, x, samples=20)
    exact = float(kl_divergence(Normal(mu0, log_sigma0.exp()), Normal(0.0, 1.0)).sum())
    assert abs(result.mutual_information[0]) < 1e-9
    for mean, se in (result.marginal_kl, result.average_kl):
        assert abs(mean - exact) < 3 * se, (mean, se, exact)


def test_separated_posteriors_have_information_log_n():
    """Posteriors 12σ apart do not overlap: log q(z) = log q(z|x_n) − log n, so I = log n, and the
    average KL matches its closed form."""
    model = linear_model()
    n = 40
    set_encoder(model, torch.eye(2), torch.zeros(2), torch.zeros(2))
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[:, 0] = 12.0 * (torch.arange(n, dtype=torch.float64) - n / 2)
    pyro.set_rng_seed(1)
    result = aggregate_posterior(model, x, samples=10)
    assert result.n == n
    assert result.mutual_information[0] == pytest.approx(math.log(n), abs=1e-6)
    exact = float(kl_divergence(Normal(x, 1.0), Normal(0.0, 1.0)).sum(-1).mean())
    mean, se = result.average_kl
    assert abs(mean - exact) < 3 * se
    assert result.average_kl[0] == pytest.approx(result.mutual_information[0] + result.marginal_kl[0], rel=1e-12)


def exact_posterior_model(noise=0.5):
    """Linear-Gaussian model with orthogonal W and isotropic noise, so p(z|x) is a diagonal Gaussian,
    and a linear encoder set to that exact posterior: every importance weight equals p(x)."""
    g = torch.Generator().manual_seed(0)
    model = linear_model(data_dim=5, latent_dim=2, noise=noise)
    q, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64, generator=g))
    weight = q * torch.tensor([2.0, 0.7], dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64, generator=g)
    with torch.no_grad():
        model.decoder.net.weight.copy_(weight)
        model.decoder.net.bias.copy_(bias)
    variance = 1.0 / (1.0 + (weight ** 2).sum(0) / noise ** 2)               # diagonal Σ
    gain = variance.unsqueeze(-1) * weight.T / noise ** 2                     # Σ Wᵀ / σ²
    set_encoder(model, gain, -gain @ bias, 0.5 * variance.log())
    x = torch.randn(30, 5, dtype=torch.float64, generator=g) + bias
    return model, x


def test_bound_spread_is_zero_for_the_exact_posterior_and_shrinks_with_k():
    model, x = exact_posterior_model()
    pyro.set_rng_seed(0)
    for k in (1, 10):
        mean, _ = bound_spread(model, x, k, replicates=5)
        assert mean < 1e-10
    with torch.no_grad():                                                      # now an imperfect encoder
        model.encoder.log_scale.bias.add_(0.8)
    one, one_se = bound_spread(model, x, 1, replicates=30)
    many, many_se = bound_spread(model, x, 100, replicates=30)
    assert one - many > 3 * math.hypot(one_se, many_se)


def test_gradient_snr_at_the_exact_posterior():
    """At q = p(z|x) the bound is maximal in φ, so the encoder gradient has mean zero: its SNR is only
    the noise of the sample mean, |t|/√R, below 3/√R for any K; the decoder gradient,
    ∇θ log p_θ(x) ≠ 0, carries signal, and more of it with more samples."""
    model, x = exact_posterior_model()
    replicates = 60
    pyro.set_rng_seed(0)
    one = gradient_snr(model, x, k=1, replicates=replicates)
    many = gradient_snr(model, x, k=8, replicates=replicates)
    for snr in (one, many):
        assert snr.encoder < 3 / math.sqrt(replicates)
        assert snr.decoder > 3 / math.sqrt(replicates)
        assert snr.replicates == replicates
    assert many.decoder > one.decoder
    assert all(p.grad is None for p in model.parameters())


def test_replicates_must_be_at_least_two():
    model, x = exact_posterior_model()
    with pytest.raises(ValueError, match="at least 2 replicates"):
        gradient_snr(model, x, k=1, replicates=1)
    with pytest.raises(ValueError, match="at least 2 replicates"):
        bound_spread(model, x, 1, replicates=1)
