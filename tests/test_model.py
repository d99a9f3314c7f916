"""The traced densities of the one Pyro model equal hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaebench.config import ModelConfig
from vaebench.model import VAE

from conftest import make_linear_gaussian_vae, simulate


def hand_log_prior(z):
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def test_bernoulli_densities_match_formula_with_sample_dims():
    torch.manual_seed(0)
    model = VAE(ModelConfig(data_dim=12, latent_dim=3, hidden=(7, 5))).double()
    x = torch.bernoulli(torch.full((4, 12), 0.4, dtype=torch.float64))
    z = torch.randn(3, 2, 4, 3, dtype=torch.float64)              # two extra leading sample dims
    logits = model.decoder(z)
    expected_lik = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
    assert model.log_likelihood(x, z).shape == (3, 2, 4)
    torch.testing.assert_close(model.log_likelihood(x, z), expected_lik)
    torch.testing.assert_close(model.log_prior(x, z), hand_log_prior(z))
    torch.testing.assert_close(model.log_joint(x, z), hand_log_prior(z) + expected_lik)


@pytest.mark.parametrize("fixed_scale", [None, 0.7])
def test_gaussian_densities_match_formula(fixed_scale):
    torch.manual_seed(1)
    model = VAE(ModelConfig(data_dim=5, latent_dim=2, hidden=(8,), likelihood="gaussian",
                            gaussian_scale=fixed_scale)).double()
    if fixed_scale is None:
        with torch.no_grad():
            model.decoder.log_scale.copy_(torch.linspace(-1, 0.5, 5, dtype=torch.float64))
    x = torch.randn(6, 5, dtype=torch.float64)
    z = torch.randn(10, 6, 2, dtype=torch.float64)
    mean, scale = model.decoder(z), model.decoder.scale()
    expected = (-0.5 * ((x - mean) / scale).pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(model.log_likelihood(x, z), expected)
    if fixed_scale is not None:
        torch.testing.assert_close(scale, torch.full((5,), fixed_scale, dtype=torch.float64))


def test_guide_density_and_proposal_shapes():
    model = make_linear_gaussian_vae()
    x = simulate(model, 7)
    z, log_q = model.encoder_proposal(x, 11)
    assert z.shape == (11, 7, 2) and log_q.shape == (11, 7)
    loc, scale = model.encode(x)
    expected = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    torch.testing.assert_close(log_q, expected)
    torch.testing.assert_close(model.log_q(x, z), expected)


def test_model_without_encoder_says_so():
    model = VAE(ModelConfig(data_dim=4, latent_dim=2, hidden=(3,), encoder=False))
    assert model.encoder is None
    with pytest.raises(Exception, match="no encoder"):
        model.encode(torch.zeros(2, 4))


def test_ancestral_samples_are_probabilities():
    model = VAE(ModelConfig(data_dim=9, latent_dim=2, hidden=(4,)))
    z, means = model.sample(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, 2) and means.shape == (5, 9)
    assert ((means >= 0) & (means <= 1)).all()
