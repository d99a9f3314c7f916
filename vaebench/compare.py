"""``vaebench compare``: learn the one model three ways, score every decoder the same way, resumably.

The plan, for every seed in :attr:`CompareConfig.seeds`:

``train``     each method (``vi``, ``iwae`` for every K in :attr:`~CompareConfig.iwae_ks`, ``hmc``)
              trains the same architecture on the same data with the same seed, into
              ``RESULTS_DIR/runs/<label>-seed<s>/`` (a run directory, written atomically).
``run``       each trained decoder is scored on the test set by the same yardsticks: AIS (every
              method), importance sampling with K = ``is_k`` and the ELBO (methods with an
              encoder), active units; the gap log p(x) − ELBO is paired per datapoint.
``bounds``    on the ``vi`` decoder and encoder: IWAE_K for K in :attr:`~CompareConfig.bound_ks`.
``gaps``      on the ``vi`` decoder: approximation and amortisation gaps with a per-datapoint
              optimised Gaussian q* (Cremer et al. 2018; :mod:`vaebench.inference.local_vi`).
``variance``  on the ``vi`` model: the Monte Carlo standard deviation of the K-sample bound and
              the gradient signal-to-noise ratio of encoder and decoder (IWAE and DReG) as K grows.
``aggregate`` each encoder: E KL(q(z|x)‖p(z)) = I_q(x; z) + KL(q(z)‖p(z)) (Hoffman & Johnson 2016).

Each finished stage appends one record to ``RESULTS_DIR/records.jsonl`` (:mod:`vaebench.results`);
per-datapoint estimates that later stages pair with are kept in ``RESULTS_DIR/values/``. A stage
whose record (or, for ``train``, whose run directory) exists is skipped, so an interrupted
compare rerun with the same command resumes where it stopped.

Seeding. Every stage starts from its own seed, a hash of (seed, stage name)
(:func:`stage_seed`), and models are always re-loaded from their run directories, so a stage's
numbers do not depend on which stages ran before it in the same process: an interrupted and
resumed compare writes the same records as an uninterrupted one (up to the wall times and
provenance, :data:`vaebench.results.VOLATILE_FIELDS`). Estimator stages use the same seed for
every method (common random numbers).

Optional capabilities are looked up in the registries, never assumed: the ``ais`` stage runs
when ``"ais" in vaebench.evaluation.ESTIMATORS`` and the ``hmc`` method when
``"hmc" in vaebench.config.METHODS``. When one is missing, the compare still runs the rest and
every record (and ``compare.json``) names what was unavailable and why; no number stands in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pyro
import torch
from tqdm.auto import tqdm

from vaebench import config as config_registry
from vaebench import evaluation
from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import DATASETS, Dataset, evaluation_data, load_dataset
from vaebench.errors import ConfigError, RunDirError
from vaebench.estimators import elbo, importance_sampling, mean_and_stderr, over_batches
from vaebench.inference.local_vi import fit_local_gaussians, frozen
from vaebench.metrics import active_units, aggregate_posterior, bound_spread, gradient_snr
from vaebench.model import VAE
from vaebench.provenance import provenance, resolve_device, resolve_dtype
from vaebench.results import ResultsError, append_record, make_record, read_records, records_path
from vaebench.rundir import (CONFIG_FILE, WEIGHTS_FILE, atomic_write_text, load_run, read_config, staged_directory,
                             write_run)
from vaebench.training import train

KNOWN_METHODS = ("vi", "iwae", "hmc")
MANIFEST_FILE = "compare.json"
RUNS_DIR, VALUES_DIR = "runs", "values"
STAGES = ("train", "run", "bounds", "gaps", "variance", "aggregate")


# ----------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CompareConfig:
    """Everything a compare does; stored in ``compare.json`` so a rerun can check it resumes the same job.

    Parameters
    ----------
    preset
        Name of the preset these settings started from (``quick``, ``paper`` or ``custom``).
    dataset, data_dir
        Data set and, for ``mnist``/``fashion-mnist``, its IDX directory.
    methods, iwae_ks, seeds
        Training methods, the K of each ``iwae`` run, and the seeds (mean ± SE over seeds).
    latent_dim, hidden, activation
        The one architecture every method shares (encoder widths mirror ``hidden``).
    epochs, batch_size, lr, lr_schedule, adam_eps, device, dtype
        Training settings shared by every method (:class:`~vaebench.config.TrainConfig`).
    train_subset, test_subset
        Use only the first n training / test points (``None``: all).
    eval_batch_size
        Datapoints per estimator batch.
    is_k, elbo_k
        Importance samples of the log-likelihood estimate; draws averaged in every ELBO estimate.
    bound_ks
        K of the IWAE_K-versus-K curve on the ``vi`` model.
    local_vi_steps, local_vi_lr, local_vi_k
        Adam steps, learning rate and draws per step of the per-datapoint q*.
    aggregate_samples
        Draws z ~ q(z|x) per datapoint for the aggregate-posterior estimates.
    variance_ks, variance_replicates, variance_batch
        K values, replicate draws and batch size of the bound-spread and gradient-SNR study.
    hmc_transitions, hmc_leapfrog
        HMC transitions per minibatch and leapfrog steps per transition of the ``hmc`` method
        (Monte Carlo EM; :class:`~vaebench.config.TrainConfig`).
    ais, ais_batch_size
        Settings of the ``ais`` estimator (field names of :class:`vaebench.config.AISConfig`) and
        the datapoints it anneals at once (its cost is mostly per step, so larger is faster).
    threads
        CPU threads for torch while the compare runs (``None``: torch's default). Small networks
        run fastest on one thread: on a busy 2-core machine two intra-op threads made one
        gradient of the quick preset's decoder ~20x slower than one thread did.
    """

    preset: str = "custom"
    dataset: str = "digits"
    data_dir: str | None = None
    methods: tuple[str, ...] = KNOWN_METHODS
    iwae_ks: tuple[int, ...] = (5, 50)
    seeds: tuple[int, ...] = (0, 1, 2)
    latent_dim: int = 10
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "tanh"
    epochs: int = 15
    batch_size: int = 100
    lr: float = 3e-3
    lr_schedule: str = "constant"
    adam_eps: float = 1e-4
    device: str = "cpu"
    dtype: str = "float32"
    train_subset: int | None = None
    test_subset: int | None = None
    eval_batch_size: int = 100
    is_k: int = 5000
    elbo_k: int = 100
    bound_ks: tuple[int, ...] = (1, 5, 50, 500, 5000)
    local_vi_steps: int = 500
    local_vi_lr: float = 0.05
    local_vi_k: int = 4
    aggregate_samples: int = 10
    variance_ks: tuple[int, ...] = (1, 10, 100)
    variance_replicates: int = 40
    variance_batch: int = 20
    hmc_transitions: int = 1
    hmc_leapfrog: int = 5
    ais: Mapping[str, Any] = field(default_factory=lambda: {"steps": 100, "leapfrog": 2, "chains": 4})
    ais_batch_size: int = 1000
    threads: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        check(len(self.methods) > 0 and len(set(self.methods)) == len(self.methods),
              f"methods must be a non-empty list without repeats, got {','.join(self.methods)}")
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        check(not unknown, f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_METHODS)}")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
              f"seeds must be distinct non-negative integers, got {self.seeds}")
        for name in ("iwae_ks", "bound_ks", "variance_ks"):
            values = getattr(self, name)
            check(len(values) > 0 and all(isinstance(v, int) and 1 <= v <= 100_000 for v in values)
                  and len(set(values)) == len(values),
                  f"{name} must be distinct integers in 1..100000, got {values}")
        for name in ("epochs",):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size", "is_k", "elbo_k", "local_vi_k", "aggregate_samples",
                     "variance_batch", "latent_dim", "hmc_transitions", "hmc_leapfrog", "ais_batch_size"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.local_vi_steps >= 0, f"local_vi_steps must be >= 0, got {self.local_vi_steps}")
        check(self.variance_replicates >= 2, f"variance_replicates must be >= 2, got {self.variance_replicates}")
        check(self.local_vi_lr > 0, f"local_vi_lr must be positive, got {self.local_vi_lr}")
        for name in ("train_subset", "test_subset", "threads"):
            value = getattr(self, name)
            check(value is None or value >= (1 if name == "threads" else 2),
                  f"{name} must be >= {1 if name == 'threads' else 2} or None, got {value}")
        # the shared training settings are validated by the dataclasses that use them
        ModelConfig(data_dim=1, latent_dim=self.latent_dim, hidden=self.hidden, activation=self.activation)
        TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, lr_schedule=self.lr_schedule,
                    adam_eps=self.adam_eps, dtype=self.dtype, device=self.device)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ais"] = dict(self.ais)
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompareConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown compare setting(s): {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


PRESETS: dict[str, CompareConfig] = {
    "quick": CompareConfig(
        preset="quick", dataset="digits", seeds=(0, 1, 2), latent_dim=10, hidden=(100, 100), epochs=20,
        batch_size=100, lr=3e-3, ais={"steps": 500, "leapfrog": 2, "chains": 4}, threads=1),
    "paper": CompareConfig(
        # Burda, Grosse & Salakhutdinov (2016), §5: 784-200-200-50 tanh, one stochastic layer, batch 20,
        # Adam(β=(0.9, 0.999), ε=1e-4), lr 1e-3·10^(-i/7) for 3^i epochs (i = 0..7, 3,280 epochs), K = 5000.
        preset="paper", dataset="mnist", seeds=(0, 1, 2), latent_dim=50, hidden=(200, 200), epochs=3280,
        batch_size=20, lr=1e-3, lr_schedule="burda", adam_eps=1e-4, device="auto", eval_batch_size=100,
        is_k=5000, elbo_k=1000, local_vi_steps=2000, local_vi_lr=0.02, local_vi_k=16, aggregate_samples=1,
        variance_ks=(1, 5, 50, 500), variance_replicates=100, hmc_transitions=3, hmc_leapfrog=10,
        ais={"steps": 10000, "leapfrog": 10, "chains": 16}),
    "tiny": CompareConfig(
        preset="tiny", dataset="digits", methods=("vi", "iwae"), iwae_ks=(3,), seeds=(0, 1), latent_dim=3,
        hidden=(16,), epochs=2, train_subset=200, test_subset=30, is_k=50, elbo_k=10, bound_ks=(1, 10, 50),
        local_vi_steps=20, aggregate_samples=2, variance_ks=(2,), variance_replicates=5, variance_batch=10,
        ais={"steps": 20, "leapfrog": 2, "chains": 2}, threads=1),
}
"""``quick``: the README's command, offline, a few minutes on a 2-core CPU. ``paper``: the IWAE
paper's protocol; for a GPU and a real MNIST (or Fashion-MNIST) IDX directory. ``tiny`` (not
advertised): seconds, for tests and smoke checks of the whole pipeline; its numbers mean nothing."""
PUBLIC_PRESETS = ("quick", "paper")


def preset(name: str, **overrides: Any) -> CompareConfig:
    """A preset with some settings replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PUBLIC_PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(PRESETS[name], **changes)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# ----------------------------------------------------------------------------------- availability
def unavailable_capabilities(cfg: CompareConfig) -> dict[str, str]:
    """``capability -> reason`` for what this installation cannot run (looked up in the registries)."""
    missing: dict[str, str] = {}
    if "ais" not in evaluation.ESTIMATORS:
        missing["ais"] = ("estimator 'ais' is not registered in vaebench.evaluation.ESTIMATORS; "
                          "log p(x) comes from importance sampling only")
    if "hmc" in cfg.methods and "hmc" not in config_registry.METHODS:
        missing["hmc"] = "training method 'hmc' is not registered in vaebench.config.METHODS; not trained"
    return missing


@dataclass(frozen=True)
class MethodSpec:
    """One trained model of the comparison: its label, training method and K (``None`` for hmc)."""

    label: str
    method: str
    k: int | None

    @property
    def has_encoder(self) -> bool:
        return self.method != "hmc"


def method_specs(cfg: CompareConfig, unavailable: Mapping[str, str]) -> list[MethodSpec]:
    """The models to train, in order; methods listed in ``unavailable`` are left out."""
    specs = []
    for method in cfg.methods:
        if method in unavailable:
            continue
        if method == "iwae":
            specs.extend(MethodSpec(f"iwae-k{k}", "iwae", k) for k in cfg.iwae_ks)
        else:
            specs.append(MethodSpec(method, method, 1 if method == "vi" else None))
    return specs


def stage_seed(seed: int, stage: str) -> int:
    """A seed for ``stage`` of the run with ``seed``: 31 bits of SHA-256("seed:stage")."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class Stage:
    """One resumable unit of work: ``kind`` of :data:`STAGES` for model ``spec`` and ``seed``."""

    kind: str
    spec: MethodSpec
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.spec.label}/seed{self.seed}"


def plan(cfg: CompareConfig, unavailable: Mapping[str, str]) -> list[Stage]:
    """Every stage of the compare, seed by seed, in the order they run."""
    specs = method_specs(cfg, unavailable)
    stages: list[Stage] = []
    for seed in cfg.seeds:
        for spec in specs:
            stages += [Stage("train", spec, seed), Stage("run", spec, seed)]
        vi = next((s for s in specs if s.method == "vi"), None)
        if vi is not None:
            stages += [Stage(kind, vi, seed) for kind in ("bounds", "gaps", "variance")]
        stages += [Stage("aggregate", spec, seed) for spec in specs if spec.has_encoder]
    return stages


class Comparison:
    """The state of one compare in one results directory; :meth:`run` does (or resumes) the work.

    Parameters
    ----------
    cfg
        The settings.
    results_dir
        Created if missing (its parent must exist); if it holds a compare already, ``cfg`` and the
        available capabilities must equal the stored ones.
    progress
        Show tqdm bars (stage, method, seed; time left).
    """

    def __init__(self, cfg: CompareConfig, results_dir: str | os.PathLike, progress: bool = True) -> None:
        self.cfg = cfg
        self.results_dir = Path(results_dir)
        self.progress = progress
        self.unavailable = unavailable_capabilities(cfg)
        self.stages = plan(cfg, self.unavailable)
        self._dataset: Dataset | None = None
        self._x_test: torch.Tensor | None = None
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype)

    # ---------------------------------------------------------------- directory and manifest
    def manifest(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "unavailable": self.unavailable}

    def prepare(self) -> None:
        """Create the results directory and ``compare.json``, or check they match (resume).

        The data are loaded before anything is written, so a missing data set leaves nothing behind.
        """
        out = self.results_dir
        if out.exists() and not out.is_dir():
            raise ResultsError(f"{out} exists and is not a directory")
        if not out.parent.is_dir():
            raise ResultsError(f"parent directory {out.parent} of {out} does not exist")
        path = out / MANIFEST_FILE
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except ValueError as exc:
                raise ResultsError(f"corrupt {path}: {exc}") from None
            mine = self.manifest()
            if stored != mine:
                diff = _differences(stored, mine)
                raise ResultsError(f"{out} holds a compare with different settings ({diff}); rerun it with the "
                                   "same settings to resume, or choose another --out")
            return
        if out.is_dir() and any(out.iterdir()):
            raise ResultsError(f"{out} is not empty and holds no {MANIFEST_FILE}; choose another --out")
        _ = self.x_test                                    # load and check the data before writing anything
        out.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(self.manifest(), indent=2) + "\n")

    def run_dir(self, stage: Stage) -> Path:
        return self.results_dir / RUNS_DIR / f"{stage.spec.label}-seed{stage.seed}"

    def values_path(self, spec: MethodSpec, seed: int) -> Path:
        return self.results_dir / VALUES_DIR / f"{spec.label}-seed{seed}.pt"

    def done(self, stage: Stage, keys: set[str]) -> bool:
        if stage.kind != "train":
            return stage.key in keys
        out = self.run_dir(stage)
        if not out.exists():
            return False
        if not ((out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()):
            raise RunDirError(f"{out} is incomplete (no {CONFIG_FILE} or {WEIGHTS_FILE}); delete it and rerun")
        saved = read_config(out)
        model_config, train_config = self.configs(stage.spec, stage.seed)
        expected = json.loads(json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict()}))
        if saved["model"] != expected["model"] or saved["train"] != expected["train"]:
            raise RunDirError(f"{out} was trained with other settings than this compare's; delete it and rerun")
        return True

    # ---------------------------------------------------------------- shared inputs
    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            data = load_dataset(self.cfg.dataset, self.cfg.data_dir)
            self._dataset = subset_dataset(data, self.cfg.train_subset, self.cfg.test_subset)
        return self._dataset

    @property
    def likelihood(self) -> str:
        return "gaussian" if self.dataset.kind == "real" else "bernoulli"

    @property
    def x_test(self) -> torch.Tensor:
        if self._x_test is None:
            x = evaluation_data(self.dataset, "test", self.likelihood)
            self._x_test = x.to(device=self.device, dtype=self.dtype)
        return self._x_test

    def configs(self, spec: MethodSpec, seed: int) -> tuple[ModelConfig, TrainConfig]:
        cfg = self.cfg
        model_config = ModelConfig(
            data_dim=self.dataset.data_dim, latent_dim=cfg.latent_dim, hidden=cfg.hidden, activation=cfg.activation,
            model="linear" if cfg.dataset == "linear-gaussian" else "mlp", likelihood=self.likelihood,
            encoder=spec.has_encoder, guide="gaussian" if spec.has_encoder else "auto")
        extra: dict[str, Any] = {}
        if spec.method == "hmc":
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            extra = {"hmc_transitions": cfg.hmc_transitions, "hmc_leapfrog": cfg.hmc_leapfrog}
            missing = sorted(set(extra) - fields)
            if missing:
                raise ConfigError(f"TrainConfig has no field(s) {', '.join(missing)} for the hmc method")
        train_config = TrainConfig(
            method=spec.method, dataset=cfg.dataset, epochs=cfg.epochs, batch_size=cfg.batch_size,
            k=spec.k or 1, lr=cfg.lr, seed=seed, lr_schedule=cfg.lr_schedule, adam_eps=cfg.adam_eps,
            data_dir=cfg.data_dir, dtype=cfg.dtype, device=cfg.device, **extra)
        return model_config, train_config

    def load(self, spec: MethodSpec, seed: int) -> tuple[VAE, dict[str, Any]]:
        """The trained model of ``spec``/``seed`` from its run directory, and its ``config.json``."""
        model, _, saved = load_run(self.run_dir(Stage("train", spec, seed)), device=self.device, dtype=self.dtype)
        return model, saved

    # ---------------------------------------------------------------- running
    def run(self) -> list[Stage]:
        """Run every stage not done yet; return the stages that ran in this call."""
        with torch_threads(self.cfg.threads):
            return self._run()

    def _run(self) -> list[Stage]:
        self.prepare()
        keys = {r["key"] for r in read_records(self.results_dir)} if records_path(self.results_dir).exists() else set()
        pending = [s for s in self.stages if not self.done(s, keys)]
        weights = {s: self.cost(s) for s in self.stages}
        total = sum(weights.values())
        finished = total - sum(weights[s] for s in pending)
        bar = tqdm(total=total, initial=finished, disable=not self.progress, dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        ran = []
        try:
            for stage in pending:
                bar.set_description(f"compare seed {stage.seed} · {stage.spec.label} · {stage.kind}")
                getattr(self, f"_stage_{stage.kind}")(stage)
                ran.append(stage)
                bar.update(weights[stage])
        finally:
            bar.close()
        return ran

    def cost(self, stage: Stage) -> float:
        """Rough work of a stage in gradient-evaluation-sized units (only for the bar's time left).

        Each unit is one batched network call; its Python overhead dominates at these sizes, so
        the count of calls matters more than their width.
        """
        cfg = self.cfg
        n_train = cfg.train_subset or 1500
        n_test = cfg.test_subset or 300
        batches = cfg.epochs * -(-n_train // cfg.batch_size)
        rows_per_call = 30_000
        if stage.kind == "train":
            if stage.spec.method == "hmc":
                return batches * (cfg.hmc_transitions * cfg.hmc_leapfrog * 1.5 + 2)
            return batches * (2 + 2 * (stage.spec.k or 1) * cfg.batch_size / rows_per_call)
        if stage.kind == "run":
            ais = cfg.ais.get("steps", 500) * cfg.ais.get("leapfrog", 10) * 1.5 * -(-n_test // cfg.ais_batch_size)
            encoder = n_test * (cfg.is_k + cfg.elbo_k) / rows_per_call + 4 * -(-n_test // cfg.eval_batch_size)
            return (ais if "ais" not in self.unavailable else 0) + (encoder if stage.spec.has_encoder else 0)
        if stage.kind == "bounds":
            return n_test * sum(cfg.bound_ks) / rows_per_call + len(cfg.bound_ks) * -(-n_test // cfg.eval_batch_size)
        if stage.kind == "gaps":
            return cfg.local_vi_steps * 1.5
        if stage.kind == "variance":
            return cfg.variance_replicates * len(cfg.variance_ks) * 5
        return 2.0

    def _record(self, stage: Stage, saved: Mapping[str, Any], metrics: Mapping[str, Any],
                wall_time: Mapping[str, float], unavailable: Mapping[str, str],
                diagnostics: Mapping[str, Any]) -> None:
        run_dir = self.run_dir(Stage("train", stage.spec, stage.seed)).relative_to(self.results_dir)
        record = make_record(
            key=stage.key, kind=stage.kind, method=stage.spec.method, k=stage.spec.k, seed=stage.seed,
            config={"model": saved["model"], "train": saved["train"], "compare": self.cfg.to_dict()},
            metrics=metrics, wall_time=wall_time, provenance=provenance(self.device),
            unavailable={**{f"method:{m}": why for m, why in self.unavailable.items() if m != "ais"},
                         **unavailable},
            diagnostics=diagnostics, run_dir=str(run_dir))
        append_record(self.results_dir, record)

    # ---------------------------------------------------------------- the stages
    def _stage_train(self, stage: Stage) -> None:
        model_config, train_config = self.configs(stage.spec, stage.seed)
        pyro.clear_param_store()
        pyro.set_rng_seed(stage.seed)                      # the initial weights are part of the run
        model = VAE(model_config)
        out = self.run_dir(stage)
        out.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(out) as staging:
            result = train(model, self.dataset, train_config, progress=self.progress)
            last = result.history[-1] if result.history else {}
            summary = {"seconds": result.seconds, "gradient_evaluations": result.gradient_evaluations,
                       **{k: last[k] for k in ("train_bound", "test_elbo", "test_elbo_stderr") if k in last}}
            write_run(staging, result.model, train_config, self.dataset.metadata, provenance(self.device),
                      result.history, summary)

    def _score(self, model: VAE, name: str, settings: evaluation.EstimatorSettings, seed: int
               ) -> tuple[torch.Tensor, dict[str, Any], float]:
        """Per-datapoint values of registered estimator ``name`` (as :func:`evaluation.evaluate` runs it)."""
        pyro.set_rng_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            values, extra = evaluation.ESTIMATORS[name](model, self.x_test, settings)
        if self.x_test.is_cuda:
            torch.cuda.synchronize(self.x_test.device)
        return values.detach().double().cpu(), _jsonable(extra), time.perf_counter() - start

    def ais_settings(self) -> evaluation.EstimatorSettings:
        """``EstimatorSettings`` carrying :attr:`CompareConfig.ais`, whichever way the registry takes them."""
        fields = {f.name for f in dataclasses.fields(evaluation.EstimatorSettings)}
        base = {"batch_size": self.cfg.ais_batch_size}
        if "ais" in fields:
            return evaluation.EstimatorSettings(**base, ais=config_registry.AISConfig(**self.cfg.ais))
        unknown = sorted(set(self.cfg.ais) - fields)
        if unknown:
            raise ConfigError(f"AIS setting(s) {', '.join(unknown)} are not fields of EstimatorSettings "
                              f"({', '.join(sorted(fields))})")
        return evaluation.EstimatorSettings(**base, **self.cfg.ais)

    def _stage_run(self, stage: Stage) -> None:
        cfg, seed = self.cfg, stage.seed
        model, saved = self.load(stage.spec, seed)
        summary = saved.get("summary", {})
        metrics: dict[str, Any] = {"gradient_evaluations": summary.get("gradient_evaluations"),
                                   "n_test": int(self.x_test.shape[0])}
        wall = {"train": float(summary.get("seconds", 0.0))}
        values: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        if "ais" in self.unavailable:
            unavailable["ais"] = self.unavailable["ais"]
        else:
            settings = self.ais_settings()
            values["ais"], diagnostics["ais"], wall["ais"] = self._score(model, "ais", settings,
                                                                         stage_seed(seed, "eval/ais"))
            diagnostics["ais_settings"] = _jsonable(dataclasses.asdict(settings))
            metrics["log_px_ais"], metrics["log_px_ais_se"] = mean_and_stderr(values["ais"])
        if stage.spec.has_encoder:
            settings = evaluation.EstimatorSettings(k=cfg.is_k, batch_size=cfg.eval_batch_size)
            values["is"], diagnostics["is"], wall["is"] = self._score(model, "iwae", settings,
                                                                      stage_seed(seed, "eval/is"))
            metrics["log_px_is"], metrics["log_px_is_se"] = mean_and_stderr(values["is"])
            metrics["is_k"] = cfg.is_k
            settings = evaluation.EstimatorSettings(k=cfg.elbo_k, batch_size=cfg.eval_batch_size)
            values["elbo"], _, wall["elbo"] = self._score(model, "elbo", settings, stage_seed(seed, "eval/elbo"))
            metrics["elbo"], metrics["elbo_se"] = mean_and_stderr(values["elbo"])
            metrics["active_units"] = active_units(model, self.x_test)
            if "ais" in values:               # both are stochastic lower bounds: which one is tighter here?
                metrics["ais_minus_is"], metrics["ais_minus_is_se"] = mean_and_stderr(values["ais"] - values["is"])
            reference = "ais" if "ais" in values else "is"
            metrics["gap"], metrics["gap_se"] = mean_and_stderr(values[reference] - values["elbo"])
            diagnostics["gap"] = f"log p(x) by {'AIS' if reference == 'ais' else f'IS-{cfg.is_k}'} − ELBO, paired"
        else:
            reason = "no encoder (hmc-trained decoder): importance sampling and the ELBO need q(z|x)"
            unavailable["is"] = unavailable["elbo"] = reason
        path = self.values_path(stage.spec, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_tensors(path, values)
        self._record(stage, saved, metrics, wall, unavailable, diagnostics)

    def _reference_log_px(self, spec: MethodSpec, seed: int) -> tuple[torch.Tensor, str, dict[str, torch.Tensor]]:
        values = torch.load(self.values_path(spec, seed), map_location="cpu", weights_only=True)
        if "ais" in values:
            return values["ais"], "ais", values
        return values["is"], f"is-{self.cfg.is_k}", values

    def _stage_bounds(self, stage: Stage) -> None:
        cfg, seed = self.cfg, stage.seed
        model, saved = self.load(stage.spec, seed)
        log_px, reference, values = self._reference_log_px(stage.spec, seed)
        metrics: dict[str, Any] = {}
        wall: dict[str, float] = {}
        reused = {}
        for k in cfg.bound_ks:
            if k == cfg.is_k:                  # the run stage's IS-K is this very estimator: reuse its values
                bound = values["is"]
                reused[f"iwae_k{k}"] = f"the run stage's IS-{k} values (same estimator, seed of eval/is)"
            else:
                pyro.set_rng_seed(stage_seed(seed, f"bounds/k{k}"))
                start = time.perf_counter()
                with torch.no_grad():
                    result = over_batches(
                        lambda xb: importance_sampling(model.log_joint, model.encoder_proposal, xb, k),
                        self.x_test, cfg.eval_batch_size)
                wall[f"iwae_k{k}"] = time.perf_counter() - start
                bound = result.log_marginal.double().cpu()
            metrics[f"iwae_k{k}"], metrics[f"iwae_k{k}_se"] = mean_and_stderr(bound)
            metrics[f"iwae_k{k}_below_log_px"], metrics[f"iwae_k{k}_below_log_px_se"] = mean_and_stderr(log_px - bound)
        metrics["log_px"], metrics["log_px_se"] = mean_and_stderr(log_px)
        metrics["elbo"], metrics["elbo_se"] = mean_and_stderr(values["elbo"])
        unavailable = {"ais": self.unavailable["ais"]} if "ais" in self.unavailable else {}
        self._record(stage, saved, metrics, wall, unavailable, {"log_px": reference, "reused": reused})

    def _stage_gaps(self, stage: Stage) -> None:
        cfg, seed = self.cfg, stage.seed
        model, saved = self.load(stage.spec, seed)
        log_px, reference, values = self._reference_log_px(stage.spec, seed)
        x = self.x_test
        start = time.perf_counter()
        with torch.no_grad():
            loc, scale = model.encode(x)
        generator = torch.Generator().manual_seed(stage_seed(seed, "gaps/local-vi"))
        with frozen(model):
            qstar = fit_local_gaussians(model.log_joint, x, loc, scale.log(), steps=cfg.local_vi_steps,
                                        lr=cfg.local_vi_lr, k=cfg.local_vi_k, generator=generator)
        fit_seconds = time.perf_counter() - start
        pyro.set_rng_seed(stage_seed(seed, "gaps/elbo"))
        with torch.no_grad():
            elbo_qstar = elbo(model.log_joint, qstar.proposal, x, k=cfg.elbo_k).double().cpu()
        elbo_q = values["elbo"]
        metrics = {}
        metrics["log_px"], metrics["log_px_se"] = mean_and_stderr(log_px)
        metrics["elbo_q"], metrics["elbo_q_se"] = mean_and_stderr(elbo_q)
        metrics["elbo_qstar"], metrics["elbo_qstar_se"] = mean_and_stderr(elbo_qstar)
        metrics["inference_gap"], metrics["inference_gap_se"] = mean_and_stderr(log_px - elbo_q)
        metrics["approximation_gap"], metrics["approximation_gap_se"] = mean_and_stderr(log_px - elbo_qstar)
        metrics["amortisation_gap"], metrics["amortisation_gap_se"] = mean_and_stderr(elbo_qstar - elbo_q)
        unavailable = {"ais": self.unavailable["ais"]} if "ais" in self.unavailable else {}
        diagnostics = {"log_px": reference, "local_vi_history": qstar.history,
                       "local_vi": {"steps": cfg.local_vi_steps, "lr": cfg.local_vi_lr, "k": cfg.local_vi_k,
                                    "init": "encoder"}}
        self._record(stage, saved, metrics, {"local_vi": fit_seconds, "total": time.perf_counter() - start},
                     unavailable, diagnostics)

    def _stage_variance(self, stage: Stage) -> None:
        cfg, seed = self.cfg, stage.seed
        model, saved = self.load(stage.spec, seed)
        x = self.x_test[:cfg.variance_batch]
        metrics: dict[str, Any] = {}
        start = time.perf_counter()
        pyro.clear_param_store()
        for k in cfg.variance_ks:
            pyro.set_rng_seed(stage_seed(seed, f"variance/k{k}"))
            metrics[f"bound_std_k{k}"], metrics[f"bound_std_k{k}_se"] = bound_spread(model, x, k,
                                                                                     cfg.variance_replicates)
            snr = gradient_snr(model, x, k, cfg.variance_replicates)
            metrics[f"snr_encoder_k{k}"], metrics[f"snr_decoder_k{k}"] = snr.encoder, snr.decoder
            dreg = gradient_snr(model, x, k, cfg.variance_replicates, dreg=True)
            metrics[f"snr_encoder_dreg_k{k}"] = dreg.encoder
        diagnostics = {"batch": int(x.shape[0]), "replicates": cfg.variance_replicates,
                       "snr": "mean over components of |mean|/std of the batch-mean gradient"}
        self._record(stage, saved, metrics, {"total": time.perf_counter() - start}, {}, diagnostics)

    def _stage_aggregate(self, stage: Stage) -> None:
        cfg, seed = self.cfg, stage.seed
        model, saved = self.load(stage.spec, seed)
        pyro.set_rng_seed(stage_seed(seed, "aggregate"))
        start = time.perf_counter()
        result = aggregate_posterior(model, self.x_test, cfg.aggregate_samples)
        metrics: dict[str, Any] = {"log_n": float(torch.tensor(float(result.n)).log())}
        for name in ("average_kl", "mutual_information", "marginal_kl"):
            metrics[name], metrics[f"{name}_se"] = getattr(result, name)
        diagnostics = {"estimator": "full-data mixture log q(z) = logmeanexp_m log q(z|x_m) over the test set",
                       "samples_per_datapoint": cfg.aggregate_samples}
        self._record(stage, saved, metrics, {"total": time.perf_counter() - start}, {}, diagnostics)


def run_compare(cfg: CompareConfig, results_dir: str | os.PathLike, progress: bool = True) -> Comparison:
    """Run (or resume) a compare into ``results_dir``; returns the :class:`Comparison`."""
    comparison = Comparison(cfg, results_dir, progress)
    comparison.run()
    return comparison


# ----------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subset_dataset(data: Dataset, train_n: int | None, test_n: int | None) -> Dataset:
    """The first ``train_n`` training and ``test_n`` test points of ``data`` (``None``: all)."""
    if train_n is None and test_n is None:
        return data
    metadata = {**data.metadata, "subset": f"first {train_n or 'all'} train, first {test_n or 'all'} test"}
    return dataclasses.replace(
        data, train=data.train[:train_n], test=data.test[:test_n], metadata=metadata,
        train_labels=None if data.train_labels is None else data.train_labels[:train_n],
        test_labels=None if data.test_labels is None else data.test_labels[:test_n])


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """Tensors to numbers or lists, tuples to lists, dataclasses to dicts, other objects to ``str``."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _differences(stored: Mapping[str, Any], mine: Mapping[str, Any], prefix: str = "") -> str:
    parts = []
    for key in sorted(set(stored) | set(mine)):
        a, b = stored.get(key), mine.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return "; ".join(parts)


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)``; a :class:`ConfigError` names ``name`` otherwise."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers like 0,1,2, got {text!r}") from None
    return values


def iter_unavailable(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Union of the ``unavailable`` entries of ``records`` (what a table or report must disclose)."""
    out: dict[str, str] = {}
    for record in records:
        out.update(record["unavailable"])
    return out


__all__ = ["CompareConfig", "Comparison", "KNOWN_METHODS", "MethodSpec", "PRESETS", "Stage", "iter_unavailable",
           "method_specs", "plan", "preset", "run_compare", "stage_seed", "unavailable_capabilities"]
