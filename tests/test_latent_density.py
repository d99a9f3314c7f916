"""The compiled latent log-density replays the Pyro model exactly: same values, same gradients.

Every model family the contract allows (the built-in MLP, the linear-Gaussian model, the two-site
user example, a constrained LogNormal latent) in float32 and float64, for the joint (HMC) and for
the prior/likelihood split (AIS); parameter updates, the θ-gradient of Monte Carlo EM's M-step,
copies of a model, and the one-line fallback for a program the tracer cannot replay.
"""

import copy
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from vaebench.config import ModelConfig
from vaebench.inference.latent_density import CompiledSiteLogProbs
from vaebench.model import LatentModel

from conftest import make_linear_gaussian_vae, simulate
from test_models_contract import LogNormalScale, hierarchical


def mlp():
    torch.manual_seed(0)
    model = LatentModel(ModelConfig(data_dim=12, latent_dim=3, hidden=(10,)))
    return model, (torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) < 0.4).float()


def linear_gaussian():
    model = make_linear_gaussian_vae()
    return model, simulate(model, 7)


def two_site_user_model():
    model = hierarchical()
    return model, model.simulate(5, torch.Generator().manual_seed(2))[0]


def lognormal_latent():
    model = LatentModel(ModelConfig(data_dim=3, model="tests:LogNormalScale", encoder_hidden=(8,)), LogNormalScale())
    return model, torch.randn(4, 3, generator=torch.Generator().manual_seed(3))


MODELS = [mlp, linear_gaussian, two_site_user_model, lognormal_latent]


def positions(model, x, chains=3, seed=4):
    return torch.randn(chains, x.shape[0], model.latent_dim, generator=torch.Generator().manual_seed(seed),
                       dtype=x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", MODELS)
def test_compiled_values_and_gradients_equal_the_traced_path(make, dtype):
    model, x = make()
    model, x = model.to(dtype), x.to(dtype)
    compiled, traced = model.latent_density(x), model.latent_density(x, compiled=False)
    for seed in range(3):                           # the profiling executor optimises after the first calls
        u = positions(model, x, seed=seed)
        got, want = compiled.evaluate(u), traced.evaluate(u)
        torch.testing.assert_close(got.log_density, want.log_density)
        torch.testing.assert_close(got.grad, want.grad)
        for a, b in zip(compiled.evaluate_components(u), traced.evaluate_components(u)):
            torch.testing.assert_close(a, b)
    cache = model.__dict__["_compiled_site_log_probs"]
    assert cache.fallback_reason is None and len(cache._programs) >= 1     # it really replayed a trace


def test_the_one_pass_gradient_is_the_sum_of_the_two_component_gradients():
    model, x = two_site_user_model()
    density = model.latent_density(x)
    u = positions(model, x)
    joint, parts = density.evaluate(u), density.evaluate_components(u)
    torch.testing.assert_close(joint.log_density, parts.log_prior + parts.log_likelihood)
    torch.testing.assert_close(joint.grad, parts.grad_prior + parts.grad_likelihood)


def test_the_replay_sees_parameter_updates_and_gives_the_m_step_its_theta_gradient():
    model, x = mlp()
    u = positions(model, x)
    density = model.latent_density(x)
    density.evaluate(u)
    with torch.no_grad():
        for p in model.decoder_parameters():
            p.mul_(1.5)
    torch.testing.assert_close(density.evaluate(u).grad, model.latent_density(x, compiled=False).evaluate(u).grad)
    params = model.decoder_parameters()
    compiled_grads = torch.autograd.grad(density(u).sum(), params)
    eager_grads = torch.autograd.grad(model.log_joint(x, u).sum(), params)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_a_model_with_compiled_programs_can_be_copied_and_pickled():
    model, x = mlp()
    u = positions(model, x)
    want = model.latent_density(x).evaluate(u).log_density
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_compiled_site_log_probs" not in clone.__dict__
        torch.testing.assert_close(clone.latent_density(x).evaluate(u).log_density, want)


class ValueDependentScale(nn.Module):
    """A model whose likelihood reads a latent's value into Python: a trace would bake it in."""

    def model(self, x):
        with pyro.plate("data", x.shape[-2], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            scale = 1.0 + float(z.detach().abs().max())
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(*z.shape[:-1], x.shape[-1]),
                                         scale).to_event(1), obs=x)


def test_a_program_the_trace_cannot_replay_falls_back_to_the_traced_path_with_one_line():
    model = LatentModel(ModelConfig(data_dim=3, model="tests:ValueDependentScale", encoder=False),
                        ValueDependentScale()).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = positions(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.latent_density(x).evaluate(u)
        again = model.latent_density(x).evaluate(u * 2)
    notes = [w for w in caught if "cannot be compiled" in str(w.message)]
    assert len(notes) == 1 and "\n" not in str(notes[0].message)
    assert "eager Pyro trace" in str(notes[0].message)
    want = model.latent_density(x, compiled=False)
    torch.testing.assert_close(got.grad, want.evaluate(u).grad)
    torch.testing.assert_close(again.log_density, want.evaluate(u * 2).log_density)


def test_one_program_per_signature_least_recently_used_evicted():
    model, x = mlp()
    cache = CompiledSiteLogProbs(model, cache_size=2)
    for chains in (1, 2, 3, 1):
        u = positions(model, x, chains=chains)
        torch.testing.assert_close(cache(x, u)[1], model.site_log_probs(x, u)[1])
    assert len(cache._programs) == 2
    with pytest.raises(ValueError, match="cache_size"):
        CompiledSiteLogProbs(model, cache_size=0)


# ---------------------------------------------------------------- the inductor backend
@pytest.mark.parametrize("make,dtype", [(mlp, torch.float32), (two_site_user_model, torch.float64)])
def test_inductor_values_and_gradients_equal_the_traced_path_and_see_updates(make, dtype):
    model, x = make()
    model, x = model.to(dtype), x.to(dtype)
    fused, traced = model.latent_density(x, backend="inductor"), model.latent_density(x, compiled=False)
    u = positions(model, x)
    with torch.no_grad():                                  # as the estimators call it
        got = fused.evaluate(u)
    want = traced.evaluate(u)
    torch.testing.assert_close(got.log_density, want.log_density)
    torch.testing.assert_close(got.grad, want.grad)
    for a, b in zip(fused.evaluate_components(u), traced.evaluate_components(u)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for p in model.decoder_parameters():
            p.mul_(0.5)
    torch.testing.assert_close(fused.evaluate(u).grad, traced.evaluate(u).grad)
    assert model.__dict__["_inductor_gradients"].fallback_reason is None


def test_where_inductor_cannot_compile_the_jit_replay_answers_after_one_line(monkeypatch):
    model, x = mlp()
    u = positions(model, x)

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")
    monkeypatch.setattr(torch, "compile", refuse)
    density = model.latent_density(x, backend="inductor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = density.evaluate(u), density.evaluate_components(u)
    notes = [str(w.message) for w in caught if "inductor cannot compile" in str(w.message)]
    assert notes == [notes[0]] and "no C++ compiler found" in notes[0] and "\n" not in notes[0]
    torch.testing.assert_close(first.grad, model.latent_density(x, compiled=False).evaluate(u).grad)
    torch.testing.assert_close(second.grad_likelihood,
                               model.latent_density(x, compiled=False).evaluate_components(u).grad_likelihood)


def test_backend_names_are_checked(monkeypatch):
    from vaebench.errors import ConfigError
    from vaebench.inference.latent_density import default_backend

    model, x = mlp()
    with pytest.raises(ConfigError, match="unknown latent-density backend 'tvm'"):
        model.latent_density(x, backend="tvm")
    monkeypatch.setenv("VAEBENCH_COMPILE", "fast")
    with pytest.raises(ConfigError, match="VAEBENCH_COMPILE='fast' is not a backend"):
        default_backend()
    monkeypatch.setenv("VAEBENCH_COMPILE", "eager")
    assert model.latent_density(x).site_log_probs == model.site_log_probs
