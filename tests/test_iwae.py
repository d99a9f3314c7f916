"""Pyro's RenyiELBO(alpha=0) is the IWAE bound; DReG has the same expectation as plain IWAE."""

import pyro
import pytest
import torch

from vaebench.estimators import log_mean_exp
from vaebench.inference.iwae import DReGObjective, iwae_objective
from vaebench.inference.vi import elbo_objective

from conftest import make_linear_gaussian_vae, simulate


def recording_guide(model, store):
    def guide(x):
        store["z"] = model.guide(x)
        return store["z"]
    return guide


def test_renyi_alpha0_equals_hand_written_iwae_bound_on_same_samples():
    model = make_linear_gaussian_vae()
    x = simulate(model, 9)
    store = {}
    objective = iwae_objective(k=13)
    loss = objective.elbo.loss(model.model, recording_guide(model, store), x)
    z = store["z"]
    assert z.shape == (13, 9, 2)
    log_w = model.log_joint(x, z) - model.log_q(x, z)
    hand = log_mean_exp(log_w, 0).sum()
    assert -float(loss) == pytest.approx(float(hand), abs=1e-9)


def test_trace_elbo_equals_hand_written_elbo_on_same_samples():
    model = make_linear_gaussian_vae()
    x = simulate(model, 9)
    store = {}
    loss = elbo_objective().elbo.loss(model.model, recording_guide(model, store), x)
    z = store["z"]
    hand = (model.log_joint(x, z) - model.log_q(x, z)).sum()
    assert -float(loss) == pytest.approx(float(hand), abs=1e-9)


@pytest.mark.parametrize("make", [lambda: iwae_objective(5), lambda: DReGObjective(5), elbo_objective])
def test_gradients_reach_encoder_and_decoder(make):
    model = make_linear_gaussian_vae()
    x = simulate(model, 8)
    bound = make().accumulate_gradients(model, x, torch.arange(8))
    assert torch.isfinite(torch.tensor(bound))
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def _gradient_draws(model, x, objective, repetitions):
    encoder, decoder = list(model.encoder.parameters()), list(model.decoder.parameters())
    draws_enc, draws_dec = [], []
    for _ in range(repetitions):
        model.zero_grad(set_to_none=True)
        objective.accumulate_gradients(model, x, torch.arange(x.shape[0]))
        draws_enc.append(_flat_grads(encoder))
        draws_dec.append(_flat_grads(decoder))
    return torch.stack(draws_enc), torch.stack(draws_dec)


def test_dreg_has_the_expectation_of_the_plain_iwae_gradient():
    """Projected on random directions, mean gradients agree within 4 standard errors of the difference."""
    pyro.set_rng_seed(3)
    model = make_linear_gaussian_vae(encoder_hidden=(8,))
    x = simulate(model, 4)
    reps = 300
    plain_enc, plain_dec = _gradient_draws(model, x, iwae_objective(10), reps)
    dreg_enc, dreg_dec = _gradient_draws(model, x, DReGObjective(10), reps)
    g = torch.Generator().manual_seed(0)
    for plain, dreg in ((plain_dec, dreg_dec), (plain_enc, dreg_enc)):
        directions = torch.randn(plain.shape[1], 3, generator=g, dtype=plain.dtype)
        a, b = plain @ directions, dreg @ directions
        diff = a.mean(0) - b.mean(0)
        se = (a.var(0) / reps + b.var(0) / reps).sqrt()
        assert (diff.abs() <= 4 * se).all(), (diff, se)
        assert (a.mean(0).abs() > 4 * a.std(0) / reps ** 0.5).any(), "gradients must be non-trivial"
    # and DReG's encoder gradient is less noisy than the plain reparameterised one (Tucker et al.)
    assert dreg_enc.var(0).sum() < plain_enc.var(0).sum()
