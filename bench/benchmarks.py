"""The asv suite: log-likelihood (``track_*``, nats), step time (``time_*``) and memory.

asv counts every number as lower-is-better, so log-likelihoods are tracked as negative
log-likelihoods (positive nats) and speed as seconds per call.

Log-likelihood
    A small seeded configuration (``digits``, 64-100-100-10 tanh, Bernoulli, ``SCORE_EPOCHS``
    epochs per method) is trained once per commit in ``setup_cache`` (shared by every class that
    uses :func:`train_and_score`) and scored on the fixed test binarisation: the ELBO (K = 1),
    importance sampling with ``IS_K`` = 5000 samples, their difference (the ELBO gap), and, where
    this vaebench has them, AIS and the BDMC gap on data simulated from each model.
Speed and memory
    One training step (:func:`vaebench.training.train_step`) of ``vi``, ``iwae`` K = 5 and 50 and
    ``hmc`` on the 784-200-200-50 network of Burda et al. (2016), over device and batch size; the
    hand-written PyTorch step of ``bench/reference.py`` beside it, and their ratio on CPU at batch
    100; one HMC transition for a batch of datapoints; AIS seconds per datapoint.

Every benchmark runs single-threaded on CPU unless ``VAEBENCH_BENCH_THREADS`` says otherwise
(``bench/common.py``). Parameters a machine cannot run raise ``NotImplementedError`` in ``setup``, which asv reports as
skipped: ``cuda`` without a GPU, batches above ``CPU_MAX_BATCH`` on CPU (to keep one ``asv run``
of a commit under ten minutes), and methods or estimators this vaebench does not have yet.
"""

from __future__ import annotations

import functools
import importlib.util
import time

import pyro
import torch

from vaebench.config import METHODS, ModelConfig, TrainConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.evaluation import ESTIMATORS, EstimatorSettings, evaluate
from vaebench.model import VAE
from vaebench.training import train

from .common import (DEVICES, QUICK, STEP_METHODS, STEP_MODEL, binary_batch, gradient_flops, gradient_model,
                     latent_gradient, measure_step_ratio, median_ratio, method_available, paired_blocks,
                     reference_step, synchronize, torch_device, training_step)
from .reference import ReferenceLatentGradient

# ------------------------------------------------------------------------------- log-likelihood
SCORE_DATASET = "digits"
SCORE_MODEL = {"latent_dim": 10, "hidden": (100, 100), "activation": "tanh", "likelihood": "bernoulli"}
SCORE_EPOCHS = {"vi": 1, "iwae-5": 1, "hmc": 1} if QUICK else {"vi": 40, "iwae-5": 40, "hmc": 10}
SCORE_METHODS = {"vi": {"method": "vi"}, "iwae-5": {"method": "iwae", "k": 5}, "hmc": {"method": "hmc"}}
SCORE_SEED = 0
IS_K = 20 if QUICK else 5000
AIS_DATAPOINTS = 10 if QUICK else 100
"""Test datapoints AIS scores (the first ones of the fixed test binarisation)."""
BDMC_DATAPOINTS = 5 if QUICK else 50
AIS_SETTINGS = {"steps": 5, "leapfrog": 2, "chains": 2} if QUICK else {"steps": 200, "leapfrog": 5, "chains": 4}
"""A fixed, small AIS configuration (:class:`vaebench.config.AISConfig` fields)."""


def train_and_score() -> dict:
    """Train each available method once on the small configuration; score ELBO and IS-``IS_K``.

    Returns a picklable dict: ``models[method] = (model config dict, state dict)``,
    ``scores[method] = {"elbo": NLL, "is": NLL}`` in nats (methods with an encoder only) and the
    binary test set ``x_test``.
    """
    dataset = load_dataset(SCORE_DATASET)
    x_test = evaluation_data(dataset, "test", "bernoulli")
    models, scores = {}, {}
    for method, fields in SCORE_METHODS.items():
        if fields["method"] not in METHODS:
            continue
        config = TrainConfig(dataset=SCORE_DATASET, epochs=SCORE_EPOCHS[method], batch_size=100, seed=SCORE_SEED,
                             **fields)
        torch.manual_seed(SCORE_SEED)
        model = VAE(ModelConfig(data_dim=dataset.data_dim, encoder=config.method != "hmc", **SCORE_MODEL))
        train(model, dataset, config, progress=False)
        models[method] = (model.config.to_dict(), {k: v.detach().cpu() for k, v in model.state_dict().items()})
        if model.encoder is not None:
            elbo = evaluate(model, x_test, "elbo", EstimatorSettings(k=1), seed=SCORE_SEED)["log_likelihood"]
            iwae = evaluate(model, x_test, "iwae", EstimatorSettings(k=IS_K), seed=SCORE_SEED)["log_likelihood"]
            scores[method] = {"elbo": -elbo, "is": -iwae}
    return {"models": models, "scores": scores, "x_test": x_test}


train_and_score.timeout = 600


def trained_model(cache: dict, method: str) -> VAE:
    """Rebuild the model ``train_and_score`` trained with ``method``."""
    config, state = cache["models"][method]
    model = VAE(ModelConfig.from_dict(config))
    model.load_state_dict(state)
    return model.eval()


class LogLikelihood:
    """Test negative log-likelihood (nats per datapoint) of the small seeded models."""

    unit = "nats"
    timeout = 600
    setup_cache = staticmethod(train_and_score)
    params = (["vi", "iwae-5"],)
    param_names = ["method"]

    def setup(self, cache: dict, method: str) -> None:
        if method not in cache["scores"]:
            raise NotImplementedError(f"no {method} model in this vaebench")

    def track_test_nll_elbo(self, cache: dict, method: str) -> float:
        """−ELBO (K = 1), averaged over the test set."""
        return float(cache["scores"][method]["elbo"])

    def track_test_nll_is(self, cache: dict, method: str) -> float:
        """−log p̂(x) by importance sampling from the encoder with K = 5000."""
        return float(cache["scores"][method]["is"])

    def track_elbo_gap(self, cache: dict, method: str) -> float:
        """IS-5000 estimate minus the ELBO: how much the bound gives away (≥ 0 up to noise)."""
        scores = cache["scores"][method]
        return float(scores["elbo"] - scores["is"])


class AnnealedImportanceSampling:
    """AIS test NLL per method and the BDMC gap on simulated data (once ``ais``/``bdmc`` exist)."""

    unit = "nats"
    timeout = 900
    setup_cache = staticmethod(train_and_score)
    params = (["vi", "iwae-5", "hmc"],)
    param_names = ["method"]

    def setup(self, cache: dict, method: str) -> None:
        if "ais" not in ESTIMATORS or "bdmc" not in ESTIMATORS:
            raise NotImplementedError("this vaebench has no ais/bdmc estimators")
        if method not in cache["models"]:
            raise NotImplementedError(f"no {method} model in this vaebench")
        from vaebench.config import AISConfig

        self.model = trained_model(cache, method)
        self.settings = EstimatorSettings(ais=AISConfig(**AIS_SETTINGS))

    def track_test_nll_ais(self, cache: dict, method: str) -> float:
        """−AIS estimate of log p(x) on the first ``AIS_DATAPOINTS`` test images."""
        x = cache["x_test"][:AIS_DATAPOINTS]
        return -float(evaluate(self.model, x, "ais", self.settings, seed=SCORE_SEED)["log_likelihood"])

    def track_bdmc_gap(self, cache: dict, method: str) -> float:
        """Upper minus lower BDMC bound on ``BDMC_DATAPOINTS`` images simulated from the model."""
        x = cache["x_test"][:BDMC_DATAPOINTS]
        return float(evaluate(self.model, x, "bdmc", self.settings, seed=SCORE_SEED)["gap"])


# ------------------------------------------------------------------------------ speed and memory
BATCHES = [100, 1000, 10000]
CPU_MAX_BATCH = 100 if QUICK else 1000
WARMUP_STEPS = 1 if QUICK else 3


@functools.lru_cache(maxsize=4)
def _warm_step(kind: str, method: str, device: str, batch: int):
    """A training (or reference) step, built and warmed up once per process (asv reruns setup per sample)."""
    dev = torch_device(device)
    step = training_step(method, dev, batch) if kind == "vaebench" else reference_step(method, dev, batch)
    for _ in range(WARMUP_STEPS):
        step()
    synchronize(dev)
    return step


def _check_size(device: str, batch: int) -> torch.device:
    dev = torch_device(device)
    if dev.type == "cpu" and batch > CPU_MAX_BATCH:
        raise NotImplementedError(f"batch {batch} is GPU-only (CPU runs batch <= {CPU_MAX_BATCH})")
    return dev


class _StepTiming:
    """asv timing settings shared by the per-step benchmarks: one call per sample, 3-10 samples."""

    number = 1
    repeat = (3, 10, 10.0)
    rounds = 1
    warmup_time = 0.0
    timeout = 300


class TrainStep(_StepTiming):
    """One training step (forward, backward, Adam) of each method; seconds and peak memory."""

    params = (list(STEP_METHODS), DEVICES, BATCHES)
    param_names = ["method", "device", "batch"]

    def setup(self, method: str, device: str, batch: int) -> None:
        self.device = _check_size(device, batch)
        if not method_available(method):
            raise NotImplementedError(f"this vaebench has no training method {method!r}")
        self.step = _warm_step("vaebench", method, device, batch)

    def time_train_step(self, method: str, device: str, batch: int) -> None:
        self.step()
        synchronize(self.device)


class TrainStepMemory:
    """Peak resident memory (bytes) of a process that builds and takes training steps, on CPU."""

    params = (list(STEP_METHODS), [100, 1000])
    param_names = ["method", "batch"]
    timeout = 300

    def setup(self, method: str, batch: int) -> None:
        _check_size("cpu", batch)
        if not method_available(method):
            raise NotImplementedError(f"this vaebench has no training method {method!r}")
        self.step = _warm_step("vaebench", method, "cpu", batch)

    def peakmem_train_step(self, method: str, batch: int) -> None:
        self.step()


class HandWrittenStep(_StepTiming):
    """The same step written directly in PyTorch (``bench/reference.py``), for comparison."""

    params = (["vi", "iwae-5", "iwae-50"], DEVICES, BATCHES)
    param_names = ["method", "device", "batch"]

    def setup(self, method: str, device: str, batch: int) -> None:
        self.device = _check_size(device, batch)
        self.step = _warm_step("reference", method, device, batch)

    def time_reference_step(self, method: str, device: str, batch: int) -> None:
        self.step()
        synchronize(self.device)


class RatioToHandWritten:
    """vaebench step time / hand-written PyTorch step time, CPU, batch 100, interleaved in one process.

    The target is at most 1.10 for ``vi`` and ``iwae``.
    """

    unit = "ratio"
    params = (["vi", "iwae-5", "iwae-50"],)
    param_names = ["method"]
    timeout = 300

    def track_step_ratio(self, method: str) -> float:
        if QUICK:
            return float(measure_step_ratio(method, 100, "cpu", repeats=1, block_seconds=0.0, warmup=1).ratio)
        return float(measure_step_ratio(method, batch=100, device="cpu", repeats=11).ratio)


class CudaMemory:
    """Peak GPU memory allocated by one training step (bytes)."""

    unit = "bytes"
    params = (list(STEP_METHODS), [100, 10000])
    param_names = ["method", "batch"]
    timeout = 300

    def setup(self, method: str, batch: int) -> None:
        self.device = torch_device("cuda")
        if not method_available(method):
            raise NotImplementedError(f"this vaebench has no training method {method!r}")
        self.step = _warm_step("vaebench", method, "cuda", batch)

    def track_cuda_peak_memory_train_step(self, method: str, batch: int) -> float:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device))


HMC_LEAPFROG = 10
HMC_STEP_SIZE = 0.05


class HMCTransition(_StepTiming):
    """One batched HMC transition (``HMC_LEAPFROG`` leapfrog steps), one chain per datapoint, on the
    compiled latent density (``vaebench/inference/latent_density.py``)."""

    params = (DEVICES, BATCHES)
    param_names = ["device", "batch"]

    def setup(self, device: str, batch: int) -> None:
        self.device = _check_size(device, batch)
        if importlib.util.find_spec("vaebench.inference.hmc") is None:
            raise NotImplementedError("this vaebench has no batched HMC")
        from vaebench.inference import hmc

        torch.manual_seed(0)
        model = VAE(ModelConfig(**{**STEP_MODEL.to_dict(), "encoder": False})).to(self.device)
        x = binary_batch(batch, model.config.data_dim, self.device)
        self.hmc = hmc
        self.log_density = model.latent_density(x) if hasattr(model, "latent_density") else \
            (lambda z: model.log_joint(x, z))
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        z0 = model.sample_prior(x, 1, self.generator)[0]
        self.state = hmc.init(z0, self.log_density, step_size=HMC_STEP_SIZE)
        synchronize(self.device)

    def time_hmc_transition(self, device: str, batch: int) -> None:
        self.hmc.step(self.generator, self.state, self.log_density, HMC_LEAPFROG)
        synchronize(self.device)


AIS_TIME_SETTINGS = {"steps": 2, "leapfrog": 2, "chains": 2} if QUICK else {"steps": 50, "leapfrog": 5, "chains": 4}


def _ais_setup(bench: object, device: str, batch: int) -> None:
    """Give an AIS benchmark its device, a fresh 784-200-200-50 decoder, ``batch`` images and the AIS settings."""
    bench.device = _check_size(device, batch)
    if "ais" not in ESTIMATORS:
        raise NotImplementedError("this vaebench has no ais estimator")
    from vaebench.config import AISConfig
    from vaebench.inference.ais import ais

    torch.manual_seed(0)
    bench.model = VAE(ModelConfig(**{**STEP_MODEL.to_dict(), "encoder": False})).to(bench.device)
    bench.x = binary_batch(batch, bench.model.config.data_dim, bench.device)
    bench.config = AISConfig(**AIS_TIME_SETTINGS)
    bench.ais = ais


class AISCost:
    """Seconds of AIS per datapoint (``AIS_TIME_SETTINGS``, batch of datapoints at once, fastest of 3 runs)."""

    unit = "seconds"
    params = (DEVICES, [10, 100])
    param_names = ["device", "batch"]
    timeout = 300

    def setup(self, device: str, batch: int) -> None:
        _ais_setup(self, device, batch)

    def track_ais_seconds_per_datapoint(self, device: str, batch: int) -> float:
        generator = torch.Generator(device=self.device).manual_seed(0)
        pyro.set_rng_seed(0)
        best = float("inf")
        for _ in range(3):
            synchronize(self.device)
            start = time.perf_counter()
            self.ais(self.model, self.x, self.config, generator, batch_size=batch)
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best / batch


# ------------------------------------------------------------------------------ latent gradients
GRADIENT_ROWS = [100, 1600, 6400, 10000]
CPU_MAX_GRADIENT_ROWS = 100 if QUICK else 6400
GRADIENT_PATHS = ["compiled", "traced", "hand-written"]


def _gradient_call(path: str, device: torch.device, rows: int):
    """``() -> ∇_u log p(x, u)`` of the 784-200-200-50 decoder at ``rows`` rows, the ``path`` way."""
    model = gradient_model(device)
    x = binary_batch(rows, model.config.data_dim, device)
    u = torch.randn(rows, model.latent_dim, generator=torch.Generator().manual_seed(rows)).to(device)
    if path == "hand-written":
        reference = ReferenceLatentGradient(model)
        return lambda: reference(x, u)
    if not hasattr(model, "latent_density"):
        raise NotImplementedError("this vaebench has no compiled latent density")
    fn = latent_gradient("compiled" if path == "compiled" else "traced-one-pass", model, x)
    return lambda: fn(u)


class LatentGradient(_StepTiming):
    """One gradient ∇_u log p_θ(x, u) (HMC's unit of work): compiled, eager-traced and hand-written.

    GPU timings synchronise; fp32 with TF32 off.
    """

    params = (GRADIENT_PATHS, DEVICES, GRADIENT_ROWS)
    param_names = ["path", "device", "rows"]

    def setup(self, path: str, device: str, rows: int) -> None:
        self.device = torch_device(device)
        if self.device.type == "cpu" and rows > CPU_MAX_GRADIENT_ROWS:
            raise NotImplementedError(f"{rows} rows is GPU-only (CPU runs rows <= {CPU_MAX_GRADIENT_ROWS})")
        torch.backends.cuda.matmul.allow_tf32 = False
        self.call = _gradient_call(path, self.device, rows)
        for _ in range(WARMUP_STEPS):
            self.call()
        synchronize(self.device)

    def time_latent_gradient(self, path: str, device: str, rows: int) -> None:
        self.call()
        synchronize(self.device)


class LatentGradientRatio:
    """Compiled ∇_u log p(x, u) over the hand-written PyTorch gradient, and its share of the matmul
    FLOP rate, CPU, interleaved in one process (targets: ratio <= 1.10; share >= 0.70 at n >= 1600)."""

    params = ([100, 1600, 6400],)
    param_names = ["rows"]
    timeout = 300

    def setup(self, rows: int) -> None:
        if QUICK and rows > 100:
            raise NotImplementedError("quick run: 100 rows only")
        cpu = torch.device("cpu")
        calls = {path: _gradient_call(path, cpu, rows) for path in ("compiled", "hand-written")}
        hidden, data_dim = STEP_MODEL.hidden[-1], STEP_MODEL.data_dim
        a, b = torch.randn(rows, hidden), torch.randn(hidden, data_dim)
        calls["matmul"] = lambda: torch.mm(a, b)
        repeats, block = (1, 0.0) if QUICK else (11, 0.2)
        self.seconds = paired_blocks(calls, cpu, repeats, block)
        self.rows = rows

    def track_ratio_to_hand_written(self, rows: int) -> float:
        return float(median_ratio(self.seconds["compiled"], self.seconds["hand-written"]))

    track_ratio_to_hand_written.unit = "ratio"

    def track_matmul_fraction(self, rows: int) -> float:
        """FLOP rate of the compiled gradient's six matrix products / the rate of one plain matmul."""
        matmul_rate = 2 * self.rows * STEP_MODEL.hidden[-1] * STEP_MODEL.data_dim / min(self.seconds["matmul"])
        return float(gradient_flops(STEP_MODEL, self.rows) / min(self.seconds["compiled"]) / matmul_rate)

    track_matmul_fraction.unit = "fraction"


class AISThroughput:
    """AIS gradient evaluations (chain-rows) per second, ``AIS_TIME_SETTINGS``; higher is better."""

    unit = "gradient evaluations / s"
    params = (DEVICES, [100, 1000, 10000])
    param_names = ["device", "batch"]
    timeout = 300

    def setup(self, device: str, batch: int) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        _ais_setup(self, device, batch)
        self.ais(self.model, self.x, self.config, torch.Generator(device=self.device).manual_seed(0), batch_size=batch)

    def track_ais_gradient_evaluations_per_second(self, device: str, batch: int) -> float:
        generator = torch.Generator(device=self.device).manual_seed(0)
        synchronize(self.device)
        start = time.perf_counter()
        result = self.ais(self.model, self.x, self.config, generator, batch_size=self.x.shape[0])
        synchronize(self.device)
        rows = (self.config.chains + self.config.tuning_chains) * self.x.shape[0]
        return rows * result.gradient_evaluations / (time.perf_counter() - start)
