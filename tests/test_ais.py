"""AIS recovers exact normalisers; BDMC sandwiches the exact log p(x); the CLI exposes both."""

import json
import math

import pyro
import pytest
import torch

from vaebench import targets
from vaebench.config import AISConfig
from vaebench.estimators import mean_and_stderr
from vaebench.inference import ais

from conftest import make_linear_gaussian_vae, run_cli


@pytest.fixture(scope="module")
def linear_gaussian_bdmc():
    """BDMC with modest T (100) on 40 datapoints simulated from a float64 linear-Gaussian model.

    The observation noise is σ ∈ [1, 2] (posterior variances 0.14 and 0.39), a regime where T = 100
    is enough; the sharper conftest model needs T in the thousands for the same accuracy.
    """
    model = make_linear_gaussian_vae()
    with torch.no_grad():
        model.decoder.log_scale.uniform_(0.0, 0.7, generator=torch.Generator().manual_seed(3))
    pyro.set_rng_seed(0)
    x, z = ais.simulate(model, 40)
    config = AISConfig(steps=100, leapfrog=5, chains=16)
    result = ais.bdmc(model, x, z, config, torch.Generator().manual_seed(0), batch_size=40)
    return result, targets.exact_log_marginal(model, x)


def test_ais_matches_exact_log_marginal(linear_gaussian_bdmc):
    """Mean error over datapoints within 3 standard errors of 0, and within 0.05 nats per datapoint."""
    result, exact = linear_gaussian_bdmc
    assert result.lower.log_marginal.shape == (40,) and result.lower.log_weights.shape == (16, 40)
    error, stderr = mean_and_stderr(result.lower.log_marginal - exact)
    assert abs(error) < 3 * stderr, (error, stderr)
    assert abs(error) < 0.05
    assert ((result.lower.ess >= 1) & (result.lower.ess <= 16)).all()
    assert torch.isfinite(result.lower.log_weights).all() and torch.isfinite(result.lower.stderr).all()


def test_bdmc_bounds_sandwich_exact(linear_gaussian_bdmc):
    """E[lower] ≤ log p(x) ≤ E[upper]: each mean within 3 standard errors on its side, and gap ≥ 0."""
    result, exact = linear_gaussian_bdmc
    below, below_se = mean_and_stderr(result.lower.log_marginal - exact)
    above, above_se = mean_and_stderr(result.upper.log_marginal - exact)
    assert below < 3 * below_se
    assert above > -3 * above_se
    gap, gap_se = mean_and_stderr(result.gap)
    assert gap > -3 * gap_se


def mixture_target(a: float = 1.5, s: float = 0.3):
    """Prior N(0, I₂) times an unnormalised two-bump likelihood; Z = ∫ p(z) ℓ(z) dz in closed form.

    ℓ(z) = ½ exp(−|z − μ|²/2s²) + ½ exp(−|z + μ|²/2s²), μ = (a, 0), and each bump integrates against
    N(0, I) to (2πs²)^{D/2} N(μ; 0, (1 + s²) I), the same for both by symmetry.
    """
    mu = torch.tensor([a, 0.0], dtype=torch.float64)

    def components(z):
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        bumps = torch.stack([-(z - mu).pow(2).sum(-1), -(z + mu).pow(2).sum(-1)]) / (2 * s * s)
        return log_prior, torch.logsumexp(bumps, 0) + math.log(0.5)

    d = 2
    log_z = (0.5 * d * math.log(2 * math.pi * s * s)
             + float(torch.distributions.Normal(0.0, math.sqrt(1 + s * s)).log_prob(mu).sum()))
    return components, log_z


@pytest.mark.parametrize("steps,chains", [(1, 4000), (100, 200)])
def test_weights_recover_a_known_normaliser(steps, chains):
    """T = 1 is importance sampling from the prior; T = 100 anneals with HMC; both within 3 SE."""
    components, log_z = mixture_target()
    config = AISConfig(steps=steps, leapfrog=5, chains=chains)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(chains + config.tuning_chains, 3, 2, generator=g, dtype=torch.float64)
    run = ais.anneal(components, z0, ais.beta_schedule(steps), config, g)
    log_mean, stderr, ess = ais.summarize_log_weights(run.log_weights)
    assert run.log_weights.shape == (chains, 3)
    assert ((log_mean - log_z).abs() < 3 * stderr).all(), (log_mean, log_z, stderr)
    assert ((ess >= 1) & (ess <= chains)).all()


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_weight_bookkeeping_telescopes(schedule):
    """With log-likelihood ≡ c the increments Σ (β_t − β_{t−1}) c must sum to exactly c (−c reversed);
    with T = 1 the weight is exactly the log-likelihood at the starting point."""
    c = -7.25

    def constant(z):
        zero = 0 * z.sum(-1)                              # keeps z in the graph
        return zero, zero + c

    config = AISConfig(steps=37, leapfrog=2, chains=3, schedule=schedule)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    betas = ais.beta_schedule(37, schedule)
    forward = ais.anneal(constant, z0, betas, config, g)
    torch.testing.assert_close(forward.log_weights, torch.full((3, 4), c, dtype=torch.float64), rtol=0, atol=1e-12)
    reverse = ais.anneal(constant, z0, betas.flip(0), config, g)
    torch.testing.assert_close(reverse.log_weights, torch.full((3, 4), -c, dtype=torch.float64), rtol=0, atol=1e-12)

    components, _ = mixture_target()
    single = ais.anneal(components, z0, ais.beta_schedule(1), AISConfig(steps=1, chains=3), g)
    torch.testing.assert_close(single.log_weights, components(z0[:3])[1], rtol=0, atol=1e-12)


def test_beta_schedules_run_from_zero_to_one():
    for schedule in ("linear", "sigmoid"):
        betas = ais.beta_schedule(50, schedule)
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    sigmoid = ais.beta_schedule(50, "sigmoid").diff()
    assert sigmoid[0] < sigmoid[25] and sigmoid[-1] < sigmoid[25]     # denser at both ends


def test_chunking_over_datapoints_keeps_estimates_valid():
    """Chunks of 3 datapoints give the same estimates within Monte Carlo error as one chunk."""
    model = make_linear_gaussian_vae()
    pyro.set_rng_seed(2)
    x, _ = ais.simulate(model, 7)
    config = AISConfig(steps=30, leapfrog=3, chains=8)
    whole = ais.ais(model, x, config, torch.Generator().manual_seed(0), batch_size=100)
    chunked = ais.ais(model, x, config, torch.Generator().manual_seed(0), batch_size=3)
    assert chunked.log_marginal.shape == (7,) and chunked.log_weights.shape == (8, 7)
    diff, se = mean_and_stderr(whole.log_marginal - chunked.log_marginal)
    assert abs(diff) < 4 * max(se, 1e-12)


# ------------------------------------------------------------------------------------------- CLI
run = run_cli




FAST = ["--steps", "30", "--leapfrog", "2", "--chains", "3", "--batch-size", "500"]


def test_evaluate_ais_json_has_the_common_fields_and_the_settings(linear_gaussian_run, capsys):
    status, out, err = run(capsys, "evaluate", str(linear_gaussian_run), "--estimator", "ais", *FAST, "--no-certify",
                           "--json")
    assert status == 0, err
    result = json.loads(out)
    for key in ("estimator", "k", "n", "log_likelihood", "stderr", "seconds", "seed", "dataset", "split",
                "provenance", "steps", "leapfrog", "chains", "schedule", "ess_mean", "mc_stderr",
                "acceptance_rate", "gradient_evaluations"):
        assert key in result, key
    assert (result["steps"], result["leapfrog"], result["chains"], result["k"]) == (30, 2, 3, None)
    assert result["n"] == 500 and math.isfinite(result["log_likelihood"])
    exact = json.loads(run(capsys, "evaluate", str(linear_gaussian_run), "--estimator", "exact", "--json")[1])
    # a stochastic lower bound: not above exact by more than 3 Monte Carlo standard errors
    assert result["log_likelihood"] < exact["log_likelihood"] + 3 * result["mc_stderr"]


def test_evaluate_bdmc_reports_lower_upper_and_gap(linear_gaussian_run, capsys):
    status, out, err = run(capsys, "evaluate", str(linear_gaussian_run), "--estimator", "bdmc", *FAST, "--json")
    assert status == 0, err
    result = json.loads(out)
    for key in ("lower", "lower_stderr", "upper", "upper_stderr", "gap", "gap_stderr", "exact", "steps", "chains"):
        assert key in result, key
    assert result["log_likelihood"] == result["lower"]
    # stochastic lower and upper bounds on the same simulated data, up to 3 Monte Carlo standard errors
    assert result["lower"] - 3 * result["mc_stderr"] < result["exact"] < result["upper"] + 3 * result["upper_mc_stderr"]
    status, out, _ = run(capsys, "evaluate", str(linear_gaussian_run), "--estimator", "bdmc", *FAST)
    assert status == 0 and "lower" in out and "upper" in out and "gap" in out


@pytest.mark.parametrize("argv,message", [
    (["--estimator", "ais", "--steps", "0"], "expected a positive integer"),
    (["--estimator", "ais", "--steps", "2000000"], "AIS steps must be in 1..1000000"),
    (["--estimator", "ais", "--leapfrog", "5000"], "leapfrog steps must be in 1..1000"),
    (["--estimator", "ais", "--chains", "x"], "expected a positive integer"),
    (["--estimator", "iwae", "--chains", "4"], "apply to --estimator ais or bdmc"),
    (["--estimator", "ais", "--k", "4"], "--k does not apply to the ais estimator"),
])
def test_bad_ais_flags_are_one_line_errors(linear_gaussian_run, capsys, argv, message):
    status, out, err = run(capsys, "evaluate", str(linear_gaussian_run), *argv)
    assert status == 2 and out == ""
    assert err.startswith("vaebench: error: ") and err.count("\n") == 1 and message in err, err


def test_changing_one_datapoint_leaves_other_datapoints_weights_unchanged():
    model = make_linear_gaussian_vae()
    pyro.set_rng_seed(4)
    x, _ = ais.simulate(model, 5)
    other = x.clone()
    other[1] += 2.0
    config = AISConfig(steps=10, leapfrog=2, chains=3)
    a = ais.ais(model, x, config, torch.Generator().manual_seed(0)).log_weights
    b = ais.ais(model, other, config, torch.Generator().manual_seed(0)).log_weights
    keep = [0, 2, 3, 4]
    assert torch.equal(a[:, keep], b[:, keep]) and not torch.equal(a[:, 1], b[:, 1])
