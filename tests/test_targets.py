"""Exact linear-Gaussian answers agree with the traced model through Bayes' rule."""

import torch

from vaebench import targets
from vaebench.config import ModelConfig
from vaebench.errors import ConfigError
from vaebench.model import VAE

from conftest import make_linear_gaussian_vae, simulate


def test_bayes_rule_identity_holds_for_every_z():
    """log p(x) = log p(x, z) − log p(z|x) for any z: ties marginal, posterior and traced joint."""
    model = make_linear_gaussian_vae(data_dim=7, latent_dim=3)
    x = simulate(model, 20)
    posterior = targets.exact_posterior(model, x).distribution()
    z = torch.randn(5, 20, 3, dtype=torch.float64) * 3.0            # arbitrary points, not posterior draws
    implied = model.log_joint(x, z) - posterior.log_prob(z)
    exact = targets.exact_log_marginal(model, x)
    torch.testing.assert_close(implied, exact.expand_as(implied), atol=1e-9, rtol=0)


def test_posterior_covariance_is_symmetric_positive_definite():
    model = make_linear_gaussian_vae(data_dim=7, latent_dim=3)
    cov = targets.exact_posterior(model, simulate(model, 3)).covariance
    torch.testing.assert_close(cov, cov.T)
    assert (torch.linalg.eigvalsh(cov) > 0).all()


def test_exact_needs_linear_gaussian():
    model = VAE(ModelConfig(data_dim=4, latent_dim=2, hidden=(3,)))
    try:
        targets.exact_log_marginal(model, torch.zeros(1, 4))
    except ConfigError as exc:
        assert "linear decoder" in str(exc)
    else:
        raise AssertionError("expected ConfigError")
