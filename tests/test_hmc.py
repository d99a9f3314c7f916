"""Batched HMC samples the exact posterior, keeps chains independent, and survives divergences."""

import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size

from vaebench import targets
from vaebench.config import HMCConfig, ModelConfig, TrainConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.inference import hmc
from vaebench.model import VAE
from vaebench.training import train

from conftest import make_linear_gaussian_vae, simulate


def moment_z_scores(draws, mean, variance):
    """z-scores of the sample mean and variance of ``draws [S, M, n, D]`` against known moments.

    Standard errors come from the effective sample size (pyro.ops.stats) of z and of (z − μ)²:
    se(mean) = √(var/ESS), se(variance) = √(Var[(z − μ)²] / ESS[(z − μ)²]).
    """
    s, m = draws.shape[:2]
    flat = draws.reshape(s * m, *draws.shape[2:])
    ess = effective_sample_size(draws, chain_dim=1, sample_dim=0)
    z_mean = (flat.mean(0) - mean) / (flat.var(0) / ess).sqrt()
    squared = (draws - mean).pow(2)
    ess_sq = effective_sample_size(squared, chain_dim=1, sample_dim=0)
    flat_sq = squared.reshape(s * m, *draws.shape[2:])
    z_var = (flat_sq.mean(0) - variance) / (flat_sq.var(0) / ess_sq).sqrt()
    return z_mean, z_var


def test_posterior_mean_and_variance_match_exact_linear_gaussian():
    model = make_linear_gaussian_vae()
    x = simulate(model, 20)
    config = HMCConfig(num_warmup=150, num_samples=300, num_leapfrog=5, chains=4)
    result = hmc.sample_posterior(model, x, config, torch.Generator().manual_seed(0))
    assert result.samples.shape == (300, 4, 20, 2) and result.samples.dtype == torch.float64
    exact = targets.exact_posterior(model, x)
    z_mean, z_var = moment_z_scores(result.samples, exact.mean, exact.covariance.diagonal())
    assert z_mean.abs().max() < 4, z_mean
    assert z_var.abs().max() < 4, z_var
    d = result.diagnostics
    assert d.ess.shape == (20, 2) and d.rhat.shape == (20, 2)
    assert int(d.divergences.sum()) == 0
    assert ((d.acceptance_rate > 0) & (d.acceptance_rate <= 1)).all()
    search = d.gradient_evaluations - 1 - (150 + 300) * 5
    assert 1 <= search <= 21                                  # the step-size search, then L per iteration
    assert set(d.summary()) >= {"acceptance_rate", "step_size_mean", "divergences", "ess_mean", "rhat_max",
                                "gradient_evaluations"}


def test_changing_one_datapoint_leaves_other_chains_draws_unchanged():
    model = make_linear_gaussian_vae()
    x = simulate(model, 6)
    other = x.clone()
    other[2] += 3.0
    config = HMCConfig(num_warmup=40, num_samples=20, num_leapfrog=3, chains=2)
    a = hmc.sample_posterior(model, x, config, torch.Generator().manual_seed(5)).samples
    b = hmc.sample_posterior(model, other, config, torch.Generator().manual_seed(5)).samples
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(a[:, :, keep], b[:, :, keep])
    assert not torch.equal(a[:, :, 2], b[:, :, 2])


def test_too_large_step_size_gives_counted_divergences_and_no_nan():
    model = make_linear_gaussian_vae()
    x = simulate(model, 5)
    z0 = torch.zeros(3, 5, 2, dtype=torch.float64)
    config = HMCConfig(num_warmup=0, num_samples=10, num_leapfrog=20, initial_step_size=50.0, step_size_jitter=0)
    result = hmc.sample(lambda z: model.log_joint(x, z), z0, config, torch.Generator().manual_seed(0))
    d = result.diagnostics
    assert (d.divergences == 10).all()                       # every transition of every chain
    assert (d.acceptance_rate == 0).all()
    assert torch.isfinite(result.samples).all() and torch.equal(result.samples[-1], z0)
    state = hmc.init(z0, lambda z: model.log_joint(x, z), step_size=50.0)
    _, info = hmc.step(torch.Generator().manual_seed(1), state, lambda z: model.log_joint(x, z), 20)
    assert info.divergent.all() and not info.accepted.any()
    assert not torch.isnan(info.energy_error).any() and torch.isinf(info.energy_error).all()


def test_non_finite_target_region_is_rejected_not_propagated():
    """A half-normal target (log density −inf for z₀ < 0): leaving the support is a counted divergence."""
    def log_density(z):
        inside = z[..., 0] > 0
        return torch.where(inside, -0.5 * z.pow(2).sum(-1), torch.full_like(z[..., 0], -float("inf")))

    z0 = torch.full((50, 2), 0.5, dtype=torch.float64)
    config = HMCConfig(num_warmup=50, num_samples=100, num_leapfrog=5, adapt_mass=False)
    result = hmc.sample(log_density, z0, config, torch.Generator().manual_seed(0))
    assert torch.isfinite(result.samples).all()
    assert (result.samples[..., 0] > 0).all()
    assert int(result.diagnostics.divergences.sum()) + int(result.diagnostics.warmup_divergences.sum()) > 0
    assert torch.isfinite(result.state.log_density).all()


def test_non_finite_start_is_a_clear_error():
    from vaebench.errors import VaebenchError
    with pytest.raises(VaebenchError, match="not finite at the starting point of 1 chain"):
        hmc.init(torch.tensor([[1.0], [-1.0]]), lambda z: torch.where(z[..., 0] > 0, -z[..., 0], -float("inf")))


@pytest.fixture(scope="module")
def small_trained_model():
    """A 64-16-2 Bernoulli decoder trained for a few epochs of VI on digits, in float64, frozen."""
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = VAE(ModelConfig(data_dim=64, latent_dim=2, hidden=(16,)))
    config = TrainConfig(method="vi", dataset="digits", epochs=3, lr=1e-2, dtype="float64")
    train(model, dataset, config, progress=False)
    model.requires_grad_(False)                     # constants for NUTS's TorchScript potential
    return model, evaluation_data(dataset, "test", "bernoulli").double()[:2]


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_agrees_with_pyro_nuts_on_a_small_trained_model(small_trained_model):
    """Posterior means and variances of two datapoints agree with Pyro's NUTS within 4 MC standard errors."""
    model, x = small_trained_model
    config = HMCConfig(num_warmup=100, num_samples=200, num_leapfrog=5, chains=8)
    ours = hmc.sample_posterior(model, x, config, torch.Generator().manual_seed(0)).samples   # [S, M, n, D]
    flat = ours.reshape(-1, *ours.shape[2:])
    ess = effective_sample_size(ours, chain_dim=1, sample_dim=0)
    sq = (ours - flat.mean(0)).pow(2)
    ess_sq = effective_sample_size(sq, chain_dim=1, sample_dim=0)
    for i in range(x.shape[0]):
        kernel = NUTS(model.generative.model, jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=300, warmup_steps=150, disable_progbar=True)
        mcmc.run(x[i:i + 1])
        nuts = mcmc.get_samples()["z"][:, 0].detach()                                         # [S, D]
        nuts_ess = effective_sample_size(nuts.unsqueeze(0), chain_dim=0, sample_dim=1)
        nuts_sq = (nuts - nuts.mean(0)).pow(2)
        nuts_ess_sq = effective_sample_size(nuts_sq.unsqueeze(0), chain_dim=0, sample_dim=1)
        se_mean = (flat[:, i].var(0) / ess[i] + nuts.var(0) / nuts_ess).sqrt()
        assert ((flat[:, i].mean(0) - nuts.mean(0)).abs() < 4 * se_mean).all(), i
        ours_sq = sq[:, :, i].reshape(-1, sq.shape[-1])
        se_var = (ours_sq.var(0) / ess_sq[i] + nuts_sq.var(0) / nuts_ess_sq).sqrt()
        assert ((ours_sq.mean(0) - nuts_sq.mean(0)).abs() < 4 * se_var).all(), i


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    model = make_linear_gaussian_vae().cuda()
    x = simulate(model.cpu(), 4).cuda()
    model.cuda()
    config = HMCConfig(num_warmup=20, num_samples=10, num_leapfrog=3, chains=2)
    result = hmc.sample_posterior(model, x, config, torch.Generator(device="cuda").manual_seed(0))
    assert result.samples.is_cuda and torch.isfinite(result.samples).all()
