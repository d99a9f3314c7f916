"""The benchmark suite's yardstick is the same step: same densities, same update, same Adam."""

import json
import os
import sys
from pathlib import Path

import pyro
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VAEBENCH_BENCH_THREADS", "0")     # importing bench.common must not re-thread pytest

from bench.common import StepRatio, measure_step_ratio, training_step  # noqa: E402
from bench.common import GRADIENT_VARIANTS, gradient_flops, latent_gradient  # noqa: E402
from bench.reference import ReferenceLatentGradient, ReferenceStep  # noqa: E402
from bench import latent_gradient as latent_gradient_script, step_ratio  # noqa: E402
from vaebench.config import ModelConfig, TrainConfig  # noqa: E402
from vaebench.inference.iwae import iwae_bound  # noqa: E402
from vaebench.model import VAE  # noqa: E402
from vaebench.training import make_objective, train_step  # noqa: E402

SMALL = ModelConfig(data_dim=12, latent_dim=3, hidden=(9, 7))


def small_model(seed=0):
    torch.manual_seed(seed)
    return VAE(SMALL).double()


def binary(n=10):
    return (torch.rand(n, SMALL.data_dim, generator=torch.Generator().manual_seed(4)) < 0.3).double()


@pytest.mark.parametrize("k", [1, 5])
def test_reference_bound_is_the_pyro_models_bound_on_the_same_draws(k):
    model, x = small_model(), binary()
    reference = ReferenceStep(model, k)
    pyro.set_rng_seed(7)
    by_hand = reference.bound(x)
    pyro.set_rng_seed(7)
    from_pyro, _ = iwae_bound(model, x, k)
    torch.testing.assert_close(by_hand, from_pyro, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("method,k", [("vi", 1), ("iwae", 5)])
def test_reference_step_takes_the_same_adam_step_as_vaebench(method, k):
    ours, theirs, x = small_model(), small_model(), binary()
    config = TrainConfig(method=method, k=k)
    objective = make_objective(config)
    optimizer = torch.optim.Adam(ours.parameters(), lr=config.lr, eps=config.adam_eps)
    reference = ReferenceStep(theirs, k, lr=config.lr, eps=config.adam_eps)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        bound = train_step(ours, objective, optimizer, x, torch.arange(x.shape[0]))
        pyro.set_rng_seed(seed)
        assert reference(x) == pytest.approx(bound, rel=1e-10)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_reference_rejects_models_it_does_not_write_out():
    gaussian = VAE(ModelConfig(data_dim=4, latent_dim=2, hidden=(), model="linear", likelihood="gaussian"))
    with pytest.raises(ValueError, match="Bernoulli"):
        ReferenceStep(gaussian, 1)


def test_training_step_is_the_training_loops_step():
    step = training_step("iwae-5", torch.device("cpu"), 8, SMALL)
    before = [p.detach().clone() for p in step.model.parameters()]
    bound = step()
    assert torch.isfinite(torch.tensor(bound))
    assert all(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    assert step.objective.name == "iwae-5"


def test_measure_step_ratio_pairs_interleaved_blocks():
    result = measure_step_ratio("vi", batch=8, repeats=3, block_seconds=0.0, warmup=1, model_config=SMALL)
    assert isinstance(result, StepRatio) and len(result.seconds) == len(result.reference_seconds) == 3
    assert result.ratio > 0 and result.ratio_of_minima > 0
    assert StepRatio("vi", 1, "cpu", (2.0, 9.0, 3.0), (1.0, 3.0, 1.0)).ratio == 3.0
    assert StepRatio("vi", 1, "cpu", (2.0, 9.0, 3.0), (1.0, 3.0, 1.0)).ratio_of_minima == 2.0


def test_step_ratio_script_prints_one_json_object_per_method(capsys):
    assert step_ratio.main(["--methods", "vi", "iwae-5", "--data-dim", "16", "--repeats", "1",
                            "--block-seconds", "0", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["method"] for r in records] == ["vi", "iwae-5"]
    assert all(r["network"] == "16-200-200-50" and r["ratio"] > 0 for r in records)


@pytest.mark.parametrize("analytic", [False, True])
def test_the_hand_written_latent_gradient_is_the_pyro_models_gradient(analytic):
    model = small_model()
    x, u = binary(), torch.randn(10, SMALL.latent_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value, grad = ReferenceLatentGradient(model, analytic=analytic)(x, u)
    want = model.latent_density(x, compiled=False).evaluate(u)
    torch.testing.assert_close(value, want.log_density)
    torch.testing.assert_close(grad, want.grad)


@pytest.mark.parametrize("variant", GRADIENT_VARIANTS)
def test_every_timed_gradient_variant_computes_the_same_gradient(variant):
    model = small_model()
    model.requires_grad_(False)
    x, u = binary(), torch.randn(10, SMALL.latent_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = latent_gradient(variant, model, x)(u)
    grad = out[0] if variant in ("func-grad", "make-fx") else \
        (out.grad if hasattr(out, "grad") else out.grad_prior + out.grad_likelihood)
    torch.testing.assert_close(grad, model.latent_density(x, compiled=False).evaluate(u).grad)


def test_gradient_flops_count_the_six_matrix_products():
    assert gradient_flops(SMALL, 10) == 4 * 10 * (3 * 9 + 9 * 7 + 7 * 12)


def test_latent_gradient_script_prints_one_json_object_per_row_count(capsys):
    assert latent_gradient_script.main(["--rows", "8", "16", "--variants", "traced", "compiled", "--repeats", "1",
                                        "--block-seconds", "0", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["rows"] for r in records] == [8, 16]
    assert all(set(r["variants"]) == {"six-matmuls", "hand-written", "analytic", "traced", "compiled"} and r["matmul_gflops"] > 0 for r in records)
