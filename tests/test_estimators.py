"""Estimators against exact log p(x) on a linear-Gaussian model (float64).

Tolerances are standard errors of per-datapoint *paired* differences (estimate_i − exact_i), so
they shrink and grow with the Monte Carlo noise actually present, never hand-tuned constants.
"""

import math

import numpy as np
import pytest
import torch

from vaebench import estimators, targets
from vaebench.estimators import importance_sampling, log_mean_exp, mean_and_stderr

from conftest import make_linear_gaussian_vae, simulate

Z = 3.0  # standard errors allowed


def imperfect_proposal(model, shift=0.4, inflate=1.6):
    """Diagonal Gaussian around the exact posterior, shifted and too wide: a deliberately poor q."""
    def proposal(x, k):
        post = targets.exact_posterior(model, x)
        q = torch.distributions.Normal(post.mean + shift, inflate * post.covariance.diagonal().sqrt())
        z = q.rsample((k,))
        return z, q.log_prob(z).sum(-1)
    return proposal


def paired(estimate, exact):
    return mean_and_stderr(estimate - exact)


def test_elbo_with_exact_posterior_guide_is_exact():
    model = make_linear_gaussian_vae()
    x = simulate(model, 50)
    exact = targets.exact_log_marginal(model, x)
    for k in (1, 7):
        value = estimators.elbo(model.log_joint, targets.exact_posterior_proposal(model), x, k)
        assert (value - exact).abs().max() < 1e-6
    result = importance_sampling(model.log_joint, targets.exact_posterior_proposal(model), x, 64)
    torch.testing.assert_close(result.ess, torch.full_like(result.ess, 64.0))   # equal weights


def test_elbo_le_iwae_le_exact(linear_gaussian):
    model, x = linear_gaussian
    exact = targets.exact_log_marginal(model, x)
    proposal = imperfect_proposal(model)
    elbo = estimators.elbo(model.log_joint, proposal, x, 1)
    iwae = importance_sampling(model.log_joint, proposal, x, 50).log_marginal
    gap_mean, gap_se = paired(elbo, exact)
    assert gap_mean < -Z * gap_se, "the proposal must be poor enough for the test to mean something"
    mean, se = paired(elbo, iwae)
    assert mean <= Z * se
    mean, se = paired(iwae, exact)
    assert mean <= Z * se


def test_iwae_approaches_exact_as_k_grows(linear_gaussian):
    model, x = linear_gaussian
    exact = targets.exact_log_marginal(model, x)
    proposal = imperfect_proposal(model)
    bounds = {k: importance_sampling(model.log_joint, proposal, x, k).log_marginal for k in (1, 10, 100, 5000)}
    # the gap shrinks: each larger K is higher than the smaller one (paired, within error) ...
    for small, large in ((1, 10), (10, 100), (100, 5000)):
        mean, se = paired(bounds[large], bounds[small])
        assert mean > -Z * se
    mean, se = paired(bounds[100], bounds[1])
    assert mean > Z * se                                            # ... and visibly so
    # ... and IWAE_5000 is within 3 standard errors of exact
    mean, se = paired(bounds[5000], exact)
    assert abs(mean) <= Z * se, (mean, se)


def test_chunked_evaluation_equals_one_shot():
    """Bounded-memory chunking combines chunks exactly (deterministic proposal pool)."""
    model = make_linear_gaussian_vae()
    x = simulate(model, 5)
    pool = torch.randn(23, 5, 2, dtype=torch.float64)
    q = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
    cursor = {"at": 0}

    def pooled(xb, k):
        z = pool[cursor["at"]:cursor["at"] + k]
        cursor["at"] += k
        return z, q.log_prob(z).sum(-1)

    chunked = importance_sampling(model.log_joint, pooled, x, 23, max_rows=4 * 5)   # chunks of 4
    log_w = model.log_joint(x, pool) - q.log_prob(pool).sum(-1)
    torch.testing.assert_close(chunked.log_marginal, log_mean_exp(log_w, 0))
    torch.testing.assert_close(chunked.elbo, log_w.mean(0))
    w = torch.softmax(log_w, 0)
    torch.testing.assert_close(chunked.ess, 1.0 / w.pow(2).sum(0))


def test_over_batches_concatenates():
    x = torch.arange(10.0).unsqueeze(-1)
    out = estimators.over_batches(lambda xb: xb[:, 0] * 2, x, 3)
    torch.testing.assert_close(out, torch.arange(10.0) * 2)


def test_mean_and_stderr_matches_numpy():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_and_stderr(values)
    assert mean == pytest.approx(np.mean(values.numpy()))
    assert se == pytest.approx(np.std(values.numpy(), ddof=1) / math.sqrt(4))


def test_log_mean_exp_is_stable():
    values = torch.tensor([1000.0, 1000.0])
    assert float(log_mean_exp(values)) == pytest.approx(1000.0)
