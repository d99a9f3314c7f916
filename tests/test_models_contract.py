"""A user's Pyro program goes through every method and estimator, checked against exact answers.

Ground truth: ``examples/hierarchical_linear_gaussian.py`` (two latent sites of different sizes,
z1 → z2 → x, linear-Gaussian, so p(x) and p(z1, z2 | x) are closed-form), and a model with a
positive (LogNormal) latent against one-dimensional quadrature. Tolerances are 3 standard errors
over datapoints of the paired differences (or ESS-based z-scores for HMC moments).
"""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vaebench.config import AISConfig, HMCConfig, ModelConfig, TrainConfig
from vaebench.data import Dataset
from vaebench.estimators import elbo, importance_sampling, mean_and_stderr
from vaebench.inference import ais, hmc
from vaebench.model import LatentModel
from vaebench.models.contract import ModelContractError
from vaebench.models.loading import resolve_factory
from vaebench.training import train

from test_hmc import moment_z_scores

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hierarchical_linear_gaussian.py"
SPEC = f"{EXAMPLE}:make_model"
DATA_DIM = 6


def hierarchical(seed: int = 0, guide: str = "gaussian", encoder: bool = True) -> LatentModel:
    module = resolve_factory(SPEC)(data_dim=DATA_DIM, d1=2, d2=3, seed=seed)
    config = ModelConfig(data_dim=DATA_DIM, model=SPEC, guide=guide, encoder=encoder, encoder_hidden=(32,))
    return LatentModel(config, module).double()


def simulated_dataset(model: LatentModel, n_train: int = 400, n_test: int = 60) -> Dataset:
    x, _ = model.simulate(n_train + n_test, torch.Generator().manual_seed(11))
    return Dataset("simulated", x[:n_train].float(), x[n_train:].float(), "real")


def test_the_contract_flattens_both_sites_in_model_order():
    model = hierarchical()
    assert model.space.names == ("z1", "z2") and model.latent_dim == 5
    assert [s.size for s in model.space.sites] == [2, 3] and model.likelihood == "continuous"
    x, u = model.simulate(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, DATA_DIM) and u.shape == (7, 5)
    mean, covariance = model.generative.exact_posterior(x)
    exact = dist.MultivariateNormal(mean, covariance_matrix=covariance)
    draws = exact.sample((4,))
    # with the exact posterior as proposal every importance weight equals p(x): the traced joint is exact
    log_w = model.log_joint(x, draws) - exact.log_prob(draws)
    torch.testing.assert_close(log_w, model.generative.exact_log_marginal(x).expand(4, 7))


@pytest.fixture(scope="module")
def trained_user_models():
    """The two-site user model trained by vi, iwae (K = 5) and hmc on data simulated from it."""
    out = {}
    for method, k in (("vi", 1), ("iwae", 5), ("hmc", 1)):
        pyro.set_rng_seed(0)
        model = hierarchical(seed=1, encoder=method != "hmc")
        data = simulated_dataset(hierarchical(seed=0))
        config = TrainConfig(method=method, k=k, epochs=6, batch_size=50, lr=1e-2, dtype="float64", seed=0,
                             hmc_transitions=2, hmc_leapfrog=5)
        out[method] = (train(model, data, config, progress=False).model, data.test.double())
    return out


@pytest.mark.parametrize("method", ["vi", "iwae"])
def test_encoder_estimators_of_a_trained_user_model_against_exact(trained_user_models, method):
    model, x = trained_user_models[method]
    exact = model.generative.exact_log_marginal(x).detach()
    pyro.set_rng_seed(0)
    with torch.no_grad():
        bound = elbo(model.log_joint, model.encoder_proposal, x, k=10)
        result = importance_sampling(model.log_joint, model.encoder_proposal, x, k=40_000)
    below, below_se = mean_and_stderr(exact - bound)
    assert below > -3 * below_se                                  # the ELBO is on its side of log p(x)
    iwae_gap, iwae_se = mean_and_stderr(exact - result.log_marginal)
    assert abs(iwae_gap) < 3 * iwae_se, (iwae_gap, iwae_se)      # IS-40000 has converged to log p(x)
    assert below > iwae_gap + 3 * iwae_se                         # and much tighter than the ELBO


@pytest.mark.parametrize("method", ["vi", "hmc"])
def test_ais_and_bdmc_of_a_trained_user_model_against_exact(trained_user_models, method):
    model, x = trained_user_models[method]
    exact = model.generative.exact_log_marginal(x).detach()
    config = AISConfig(steps=300, leapfrog=5, chains=8)
    with torch.no_grad():
        result = ais.ais(model, x, config, torch.Generator().manual_seed(0))
    error, se = mean_and_stderr(result.log_marginal - exact)
    assert abs(error) < 3 * se + 1e-3, (error, se)
    x_sim, u_sim = model.simulate(40, torch.Generator().manual_seed(5))
    with torch.no_grad():
        sandwich = ais.bdmc(model, x_sim, u_sim, config, torch.Generator().manual_seed(1))
    exact_sim = model.generative.exact_log_marginal(x_sim).detach()
    below, below_se = mean_and_stderr(sandwich.lower.log_marginal - exact_sim)
    above, above_se = mean_and_stderr(sandwich.upper.log_marginal - exact_sim)
    assert below < 3 * below_se and above > -3 * above_se


def test_batched_hmc_moments_of_a_user_model_match_the_exact_posterior(trained_user_models):
    model, x = trained_user_models["hmc"]
    x = x[:15]
    config = HMCConfig(num_warmup=150, num_samples=300, num_leapfrog=5, chains=4)
    with torch.no_grad():
        draws = hmc.sample_posterior(model, x, config, torch.Generator().manual_seed(0)).samples
    mean, covariance = model.generative.exact_posterior(x)
    z_mean, z_var = moment_z_scores(draws, mean.detach(), covariance.diagonal().detach())
    assert z_mean.abs().max() < 4.5, z_mean
    assert z_var.abs().max() < 4.5, z_var


# ---------------------------------------------------------------- a constrained latent: quadrature truth
class LogNormalScale(nn.Module):
    """s ~ LogNormal(0, 0.5) per datapoint, x | s ~ N(0, s² I_P): one positive latent."""

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[-2], dim=-1):
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), x.new_full((), 0.5)))
            pyro.sample("x", dist.Normal(x.new_zeros(x.shape[-1]), s.unsqueeze(-1)).to_event(1), obs=x)


def quadrature(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) and E[s | x] by the trapezoidal rule on a fine grid of s (float64)."""
    grid = torch.linspace(1e-3, 8.0, 40001, dtype=torch.float64)
    log_prior = dist.LogNormal(0.0, 0.5).log_prob(grid)
    log_lik = dist.Normal(0.0, grid[:, None, None]).log_prob(x[None]).sum(-1)      # [G, n]
    log_f = log_prior[:, None] + log_lik
    shift = log_f.max(0).values
    f = (log_f - shift).exp()
    z = torch.trapezoid(f, grid, dim=0)
    mean = torch.trapezoid(f * grid[:, None], grid, dim=0) / z
    return z.log() + shift, mean


@pytest.fixture(scope="module")
def constrained():
    model = LatentModel(ModelConfig(data_dim=3, model="tests:LogNormalScale", encoder_hidden=(8,)),
                        LogNormalScale()).double()
    x, u = model.simulate(40, torch.Generator().manual_seed(2))
    return model, x, u


def test_a_positive_latent_is_mapped_to_the_reals_with_its_jacobian(constrained):
    model, x, u = constrained
    site = model.space.sites[0]
    assert model.latent_dim == 1 and not site.identity
    s = u.exp()                                                    # biject_to(positive) is exp
    expected = dist.LogNormal(0.0, 0.5).log_prob(s[..., 0]) + u[..., 0]      # + log|ds/du|
    torch.testing.assert_close(model.log_prior(x, u), expected)
    draws = model.sample_prior(x, 2000, torch.Generator().manual_seed(0))
    assert abs(float(draws.mean())) < 3 * 0.5 / math.sqrt(draws.numel())   # u = log s ~ N(0, 0.5²)


def test_ais_and_hmc_on_a_positive_latent_match_quadrature(constrained):
    model, x, _ = constrained
    truth, posterior_mean = quadrature(x)
    with torch.no_grad():
        result = ais.ais(model, x, AISConfig(steps=200, leapfrog=5, chains=16), torch.Generator().manual_seed(0))
    error, se = mean_and_stderr(result.log_marginal - truth)
    assert abs(error) < 3 * se + 1e-3, (error, se)
    config = HMCConfig(num_warmup=150, num_samples=400, num_leapfrog=5, chains=4)
    with torch.no_grad():
        draws = hmc.sample_posterior(model, x, config, torch.Generator().manual_seed(1)).samples
    s = draws.exp()                                                 # [S, M, n, 1]
    from pyro.ops.stats import effective_sample_size
    ess = effective_sample_size(s, chain_dim=1, sample_dim=0)[..., 0]
    flat = s.reshape(-1, *s.shape[2:])[..., 0]
    z = (flat.mean(0) - posterior_mean) / (flat.var(0) / ess).sqrt()
    assert z.abs().max() < 4.5, z


def test_the_built_guide_emits_the_model_sites_for_pyro_elbos(constrained):
    """Pyro's Trace_ELBO on the built guide (auxiliary u, Delta sites) equals log p(u) − log q(u) on the same draw."""
    model, x, _ = constrained
    store = {}

    def guide(x):
        store["u"] = model.guide(x)

    loss = pyro.infer.Trace_ELBO().loss(model.model, guide, x)
    u = store["u"]
    hand = (model.log_joint(x, u) - model.log_q(x, u)).sum()
    assert -float(loss) == pytest.approx(float(hand), rel=1e-9, abs=1e-8)


# ---------------------------------------------------------------- models that break the contract
def test_a_guide_over_other_sites_is_refused():
    class WrongGuide(LogNormalScale):
        def guide(self, x):
            with pyro.plate("data", x.shape[-2], dim=-1):
                pyro.sample("t", dist.LogNormal(x.new_zeros(()), 1.0))

    with pytest.raises(ModelContractError, match="same sites"):
        LatentModel(ModelConfig(data_dim=3, model="tests:WrongGuide", guide="model"), WrongGuide())
