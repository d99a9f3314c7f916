"""Batch sizes from free memory: the probe's byte count, the rows that fit, and what evaluate records."""

import pytest
import torch

from vaebench import memory
from vaebench.config import AISConfig
from vaebench.errors import ConfigError
from vaebench.evaluation import CPU_BATCH, EstimatorSettings, evaluate, resolve_sizes

from conftest import make_linear_gaussian_vae, simulate

CPU = torch.device("cpu")


def test_the_allocation_counter_sees_every_new_tensor_and_no_view():
    def fn():
        a = torch.zeros(10, 100)          # 4,000 bytes
        b = a.t()                         # a view: nothing new
        return (b * 2).sum()              # 4,000 + 4 bytes
    assert memory.allocated_bytes(fn, CPU) == 8004


def test_bytes_per_row_cancels_the_fixed_cost():
    weights = torch.randn(50, 50)

    def probe(rows):
        fixed = weights * 2                               # 10,000 bytes whatever the rows
        return torch.zeros(rows, 250) + fixed[0, 0]       # 1,000 bytes per row, twice
    assert memory.bytes_per_row(probe, CPU) == pytest.approx(2000)


def test_rows_that_fit_is_the_preferred_size_when_memory_is_ample_and_less_when_short():
    probe = lambda rows: torch.zeros(rows, 256)           # 1 KiB per row  # noqa: E731
    assert memory.rows_that_fit(probe, CPU, free=1 << 40) == memory.PREFERRED_ROWS["cpu"]
    assert memory.rows_that_fit(probe, CPU, free=1 << 20) == (1 << 20) // 2 // 1024
    assert memory.rows_that_fit(probe, CPU, free=10) == 1
    assert memory.free_bytes(CPU) > 0


def test_probing_draws_no_random_numbers():
    torch.manual_seed(0)
    memory.rows_that_fit(lambda rows: torch.randn(rows, 8), CPU)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


@pytest.fixture(scope="module")
def model_and_data():
    model = make_linear_gaussian_vae()
    return model, simulate(model, 150)


def test_on_a_cpu_with_memory_to_spare_the_automatic_sizes_are_the_fixed_defaults(model_and_data):
    model, x = model_and_data
    auto = evaluate(model, x, "iwae", EstimatorSettings(k=50), seed=3)
    fixed = evaluate(model, x, "iwae", EstimatorSettings(k=50, batch_size=CPU_BATCH, max_rows=32768), seed=3)
    assert (auto["batch_size"], auto["max_rows"]) == (CPU_BATCH, 32768)
    assert auto["log_likelihood"] == fixed["log_likelihood"]           # the same draws: reproducible
    ais = resolve_sizes(model, x, "ais", EstimatorSettings(ais=AISConfig(steps=5)))
    assert ais.batch_size == CPU_BATCH


def test_short_memory_shrinks_the_rows_per_call_and_the_record_says_so(model_and_data, monkeypatch):
    model, x = model_and_data
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200_000)
    settings = resolve_sizes(model, x, "iwae", EstimatorSettings(k=500))
    assert 1 <= settings.max_rows < 32768
    result = evaluate(model, x, "iwae", EstimatorSettings(k=500), seed=3)
    assert result["max_rows"] == settings.max_rows
    rerun = evaluate(model, x, "iwae", EstimatorSettings(k=500, batch_size=result["batch_size"],
                                                         max_rows=result["max_rows"]), seed=3)
    assert rerun["log_likelihood"] == result["log_likelihood"]         # the recorded sizes reproduce it
    ais = resolve_sizes(model, x, "ais", EstimatorSettings(ais=AISConfig(steps=5, chains=16)))
    assert 1 <= ais.batch_size < CPU_BATCH


def test_max_rows_is_refused_for_annealing_estimators(model_and_data):
    model, x = model_and_data
    with pytest.raises(ConfigError, match="--max-rows applies to --estimator elbo or iwae"):
        evaluate(model, x, "ais", EstimatorSettings(max_rows=100, ais=AISConfig(steps=5)))
