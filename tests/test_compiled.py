"""The compiled trace replays the Pyro model's densities exactly: same draws, values and gradients."""

import pyro
import pytest
import torch

from vaebench.config import ModelConfig
from vaebench.inference.compiled import CompiledLogWeights, eager_log_weights
from vaebench.inference.iwae import DReGObjective, iwae_objective
from vaebench.inference.vi import PyroELBOObjective, elbo_objective
from vaebench.model import VAE

from conftest import make_linear_gaussian_vae, simulate


def bernoulli_vae():
    torch.manual_seed(0)
    model = VAE(ModelConfig(data_dim=12, latent_dim=3, hidden=(10,))).double()
    x = (torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    return model, x


def gaussian_vae():
    model = make_linear_gaussian_vae()
    return model, simulate(model, 7)


MODELS = [bernoulli_vae, gaussian_vae]


def _warm(compiled, model, x, k, detach=False, calls=3):
    """Run a few calls first so TorchScript's profiling executor has switched to its optimised graph."""
    for _ in range(calls):
        compiled(model, x, k, detach)


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("k,detach", [(1, False), (7, False), (7, True)])
def test_compiled_log_weights_equal_the_eager_pyro_traces_on_the_same_seed(make, k, detach):
    model, x = make()
    compiled = CompiledLogWeights()
    _warm(compiled, model, x, k, detach)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        eager = eager_log_weights(model, x, k, detach)
        pyro.set_rng_seed(seed)
        replay = compiled(model, x, k, detach)
        assert replay.shape == (k, x.shape[0])
        torch.testing.assert_close(replay, eager, rtol=1e-12, atol=1e-12)
    assert not torch.equal(compiled(model, x, k, detach), compiled(model, x, k, detach)), "fresh draws per call"


def test_compiling_consumes_no_random_numbers():
    model, x = bernoulli_vae()
    pyro.set_rng_seed(5)
    first = CompiledLogWeights()(model, x, 4)
    pyro.set_rng_seed(5)
    torch.testing.assert_close(first, eager_log_weights(model, x, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("k", [1, 5])
def test_bound_objective_has_the_value_and_gradients_of_the_pyro_elbo(make, k):
    """Same draws (same seed): the bound and every parameter gradient match Trace_ELBO / RenyiELBO(0)."""
    model, x = make()
    objective = elbo_objective() if k == 1 else iwae_objective(k)
    reference = PyroELBOObjective(objective.elbo, "reference", k)
    params = list(model.parameters())
    for _ in range(3):
        objective.accumulate_gradients(model, x, torch.arange(x.shape[0]))
    for seed in range(3):
        results = []
        for obj in (objective, reference):
            model.zero_grad(set_to_none=True)
            pyro.set_rng_seed(seed)
            bound = obj.accumulate_gradients(model, x, torch.arange(x.shape[0]))
            results.append((bound, [p.grad.clone() for p in params]))
        (bound_a, grads_a), (bound_b, grads_b) = results
        assert bound_a == pytest.approx(bound_b, rel=1e-10, abs=1e-10)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


def test_compiled_dreg_gradients_equal_eager_dreg():
    model, x = bernoulli_vae()
    params = list(model.parameters())
    fast, slow = DReGObjective(6), DReGObjective(6, compiled=False)
    for _ in range(3):
        fast.accumulate_gradients(model, x, None)
    grads = []
    for obj in (fast, slow):
        model.zero_grad(set_to_none=True)
        pyro.set_rng_seed(11)
        obj.accumulate_gradients(model, x, None)
        grads.append([p.grad.clone() for p in params])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


def test_compiled_program_sees_parameter_updates():
    model, x = bernoulli_vae()
    compiled = CompiledLogWeights()
    _warm(compiled, model, x, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    pyro.set_rng_seed(2)
    replay = compiled(model, x, 3)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(replay, eager_log_weights(model, x, 3), rtol=1e-12, atol=1e-12)


def test_one_program_per_input_signature_least_recently_used_evicted():
    model, x = bernoulli_vae()
    compiled = CompiledLogWeights(cache_size=2)
    assert compiled(model, x, 2).shape == (2, 6)
    assert compiled(model, x[:4], 2).shape == (2, 4)
    assert compiled(model, x, 2).shape == (2, 6)
    assert len(compiled._programs) == 2
    assert compiled(model, x, 3).shape == (3, 6)
    assert len(compiled._programs) == 2
    assert compiled(model, x[:4], 2).shape == (2, 4)
    with pytest.raises(ValueError, match="cache_size"):
        CompiledLogWeights(cache_size=0)


def test_uncompiled_path_runs_the_pyro_traces():
    model, x = bernoulli_vae()
    compiled = CompiledLogWeights(compiled=False)
    pyro.set_rng_seed(1)
    a = compiled(model, x, 3)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(a, eager_log_weights(model, x, 3))
    assert not compiled._programs


def test_a_new_model_at_a_freed_models_address_is_compiled_afresh(monkeypatch):
    """Programs are keyed on a weak reference, not ``id(model)``: CPython reuses freed addresses."""
    import gc

    compiled = CompiledLogWeights()
    compiles = []
    original = CompiledLogWeights._compile
    monkeypatch.setattr(CompiledLogWeights, "_compile",
                        staticmethod(lambda *a: compiles.append(id(a[0])) or original(*a)))
    x = bernoulli_vae()[1]
    seen_ids, reused = set(), False
    for seed in range(6):                      # free each model before building the next
        torch.manual_seed(seed)
        model = VAE(ModelConfig(data_dim=12, latent_dim=3, hidden=(10,))).double()
        reused |= id(model) in seen_ids
        seen_ids.add(id(model))
        pyro.set_rng_seed(3)
        replayed = compiled(model, x, 4)
        pyro.set_rng_seed(3)
        with torch.no_grad():
            expected = eager_log_weights(model, x, 4)
        torch.testing.assert_close(replayed.detach(), expected)     # this model's parameters, not a freed one's
        del model, replayed
        gc.collect()
    assert len(compiles) == 6                  # one compile per model, recycled address or not
    assert len(compiled._programs) <= 1        # programs of freed models are dropped
