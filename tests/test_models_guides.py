"""The built guides: the IAF guide's density is its base density minus the flows' log-det, computed
independently (autograd Jacobians), and on the exact model it beats the diagonal Gaussian."""

from __future__ import annotations

import pyro
import pytest
import torch

from vaebench import targets
from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import Dataset
from vaebench.estimators import elbo, mean_and_stderr
from vaebench.model import LatentModel
from vaebench.training import train

from conftest import make_linear_gaussian_vae, simulate


def test_iaf_log_density_is_the_base_density_minus_the_flows_log_det():
    torch.manual_seed(0)
    model = LatentModel(ModelConfig(data_dim=5, latent_dim=3, hidden=(7,), guide="iaf", flows=2))
    x = torch.bernoulli(torch.full((2, 5), 0.5))
    guide = model.encoder
    h = guide.body(x)
    loc, scale = guide.loc(h), guide.log_scale(h).exp()
    eps = loc + scale * torch.randn(2, 3)                              # a base draw per datapoint
    for i in range(2):                                                 # the map ε ↦ u for datapoint i, by hand
        def flow(e, i=i):
            for transform in guide.flows:
                e = transform.condition(h[i])(e)
            return e

        u = flow(eps[i])
        jacobian = torch.autograd.functional.jacobian(flow, eps[i])
        log_det = torch.linalg.slogdet(jacobian).logabsdet
        base = torch.distributions.Normal(loc[i], scale[i]).log_prob(eps[i]).sum()
        expected = base - log_det
        scored = model.log_q(x[i:i + 1], u.unsqueeze(0))               # Pyro's (inverting) density
        torch.testing.assert_close(scored[0], expected, atol=1e-4, rtol=1e-4)


def test_iaf_proposal_scores_its_own_draws_consistently():
    torch.manual_seed(1)
    model = LatentModel(ModelConfig(data_dim=5, latent_dim=3, hidden=(7,), guide="iaf", flows=3))
    x = torch.bernoulli(torch.full((4, 5), 0.5))
    u, log_q = model.encoder_proposal(x, 6)
    assert u.shape == (6, 4, 3) and log_q.shape == (6, 4)
    torch.testing.assert_close(model.log_q(x, u), log_q, atol=1e-4, rtol=1e-4)
    assert len(model.encoder_parameters()) > len(list(model.encoder.loc.parameters())) * 2   # flows are φ too


def _fit_guide(guide: str, steps_epochs: int = 60) -> tuple[LatentModel, torch.Tensor]:
    """The conftest linear-Gaussian decoder, frozen, with a freshly fitted guide of family ``guide``."""
    reference = make_linear_gaussian_vae(encoder_hidden=(16,))
    pyro.set_rng_seed(0)
    config = ModelConfig(data_dim=6, latent_dim=2, hidden=(), model="linear", likelihood="gaussian",
                         encoder_hidden=(16,), guide=guide, flows=2 if guide == "iaf" else 0)
    model = LatentModel(config).double()
    model.generative.load_state_dict(reference.generative.state_dict())
    model.generative.requires_grad_(False)                             # only φ learns: same decoder for both
    x = simulate(reference, 300, seed=4)
    data = Dataset("simulated", x[:200].float(), x[200:].float(), "real")
    train(model, data, TrainConfig(method="vi", epochs=steps_epochs, batch_size=50, lr=1e-2, dtype="float64"),
          progress=False)
    return model, x[200:]


def test_iaf_guide_beats_the_diagonal_gaussian_on_the_exact_model():
    """Same decoder, same optimisation budget: ELBO[iaf] ≥ ELBO[gaussian], paired over datapoints.

    The exact posterior of the linear-Gaussian model is a correlated Gaussian, which a diagonal
    Gaussian cannot represent and an IAF can; both ELBOs stay below the exact log p(x).
    """
    gaussian, x = _fit_guide("gaussian")
    iaf, _ = _fit_guide("iaf")
    exact = targets.exact_log_marginal(gaussian, x)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        elbo_gaussian = elbo(gaussian.log_joint, gaussian.encoder_proposal, x, k=200)
        elbo_iaf = elbo(iaf.log_joint, iaf.encoder_proposal, x, k=200)
    gain, gain_se = mean_and_stderr(elbo_iaf - elbo_gaussian)
    assert gain > -3 * gain_se, (gain, gain_se)
    for bound in (elbo_gaussian, elbo_iaf):
        below, below_se = mean_and_stderr(exact - bound)
        assert below > -3 * below_se
    gap_gaussian, _ = mean_and_stderr(exact - elbo_gaussian)
    gap_iaf, _ = mean_and_stderr(exact - elbo_iaf)
    assert gap_iaf < gap_gaussian, (gap_iaf, gap_gaussian)


def test_dreg_with_an_iaf_guide_is_refused_in_one_line():
    from vaebench.errors import ConfigError
    model = LatentModel(ModelConfig(data_dim=5, latent_dim=3, hidden=(7,), guide="iaf", flows=1))
    with pytest.raises(ConfigError, match="DReG"):
        model.encoder_proposal(torch.zeros(2, 5), 3, detach_parameters=True)
