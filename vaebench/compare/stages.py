"""The stage functions of a compare: plain functions in one dict (:data:`STAGES`).

Each takes a :class:`Context` (the settings and the results directory) and a
:class:`~vaebench.compare.plan.Stage`, reads its inputs from the results directory (run
directories, per-datapoint values), writes its own outputs there atomically, and *returns* its
record (``train`` returns ``None``: its output is the run directory). A stage never appends to
``records.jsonl``; the driver does (:mod:`vaebench.compare.runner`).

Seeding. Every stage starts from its own seed, a hash of (seed, stage name)
(:func:`~vaebench.compare.plan.stage_seed`), and models are always re-loaded from their run
directories, so a stage's numbers do not depend on where, when, or after which other stages it
runs: any executor and any number of workers write the same records (up to wall times and
provenance, :data:`vaebench.results.VOLATILE_FIELDS`). Estimator stages use the same seed for
every method (common random numbers).

Model construction and loading live in :func:`model_configs`, :func:`build_model` and
:func:`load_model` only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pyro
import torch

from vaebench import evaluation
from vaebench.compare.plan import Model, Stage, stage_seed
from vaebench.compare.settings import CompareConfig
from vaebench.config import DECODERS, AISConfig, CertifyConfig, ModelConfig, TrainConfig
from vaebench.models.loading import make_model_config
from vaebench.data import Dataset, evaluation_data, load_dataset, subset_dataset
from vaebench.estimators import elbo, importance_sampling, mean_and_stderr, over_batches
from vaebench.inference.local_vi import fit_local_gaussians, fit_local_iaf, frozen
from vaebench.metrics import active_units, aggregate_posterior, bound_spread, gradient_snr
from vaebench.model import LatentModel
from vaebench.provenance import provenance, resolve_device, resolve_dtype
from vaebench.results import make_record
from vaebench.rundir import load_run, staged_directory, write_run
from vaebench.threads import torch_threads
from vaebench.training import train

RUNS_DIR, VALUES_DIR = "runs", "values"
_DATA: dict[tuple[Any, ...], tuple[Dataset, torch.Tensor]] = {}
"""Per process: the data of a compare, loaded once (a worker runs many stages)."""


@dataclass(frozen=True)
class Context:
    """What every stage needs besides its own identity; small and picklable (sent to workers)."""

    cfg: CompareConfig
    results_dir: Path
    progress: bool = False

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.dtype)

    def _data(self) -> tuple[Dataset, torch.Tensor]:
        cfg = self.cfg
        key = (cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, str(self.device), cfg.dtype)
        if key not in _DATA:
            data = subset_dataset(load_dataset(cfg.dataset, cfg.data_dir), cfg.train_subset, cfg.test_subset)
            x = evaluation_data(data, "test", likelihood(data)).to(device=self.device, dtype=self.dtype)
            _DATA[key] = (data, x)
        return _DATA[key]

    @property
    def dataset(self) -> Dataset:
        return self._data()[0]

    @property
    def x_test(self) -> torch.Tensor:
        return self._data()[1]

    def run_dir(self, stage: Stage) -> Path:
        return self.results_dir / RUNS_DIR / stage.name

    def values_path(self, stage: Stage) -> Path:
        return self.results_dir / VALUES_DIR / f"{stage.name}.pt"


def likelihood(data: Dataset) -> str:
    return "gaussian" if data.kind == "real" else "bernoulli"


# ----------------------------------------------------------------------------- the model, in one place
def model_configs(ctx: Context, model: Model, seed: int) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configuration of ``model`` trained with ``seed``."""
    cfg = ctx.cfg
    builtin = cfg.model in DECODERS
    model_config = make_model_config(
        cfg.model, ctx.dataset.data_dim, real_valued=ctx.dataset.kind == "real", encoder=model.has_encoder,
        model_args=cfg.model_args, guide=model.guide, flows=cfg.flows if model.guide == "iaf" else None,
        latent_dim=cfg.latent_dim if builtin else None, hidden=cfg.hidden if builtin else None,
        activation=cfg.activation, likelihood=likelihood(ctx.dataset) if builtin else None,
        encoder_hidden=cfg.hidden)
    extra = {"hmc_transitions": cfg.hmc_transitions, "hmc_leapfrog": cfg.hmc_leapfrog} if model.method == "hmc" else {}
    train_config = TrainConfig(
        method=model.method, dataset=cfg.dataset, epochs=cfg.epochs, batch_size=cfg.batch_size,
        k=model.k or 1, lr=cfg.lr, seed=seed, lr_schedule=cfg.lr_schedule, adam_eps=cfg.adam_eps,
        data_dir=cfg.data_dir, dtype=cfg.dtype, device=cfg.device, **extra)
    return model_config, train_config


def build_model(ctx: Context, model: Model, seed: int) -> tuple[LatentModel, TrainConfig]:
    """A freshly initialised model (its initial weights drawn from ``seed``) and its training configuration."""
    model_config, train_config = model_configs(ctx, model, seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)                      # the initial weights are part of the run
    return LatentModel(model_config), train_config


def load_model(ctx: Context, stage: Stage) -> tuple[LatentModel, dict[str, Any]]:
    """The trained model of ``stage``'s model and seed from its run directory, and its ``config.json``."""
    vae, _, saved = load_run(ctx.run_dir(stage), device=ctx.device, dtype=ctx.dtype, model_spec=ctx.cfg.model)
    return vae, saved


# ----------------------------------------------------------------------------- shared pieces
def record(ctx: Context, stage: Stage, saved: Mapping[str, Any], metrics: Mapping[str, Any],
           wall_time: Mapping[str, float], unavailable: Mapping[str, str], diagnostics: Mapping[str, Any],
           series: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return make_record(
        key=stage.key, kind=stage.kind, method=stage.model.method, k=stage.model.k, seed=stage.seed,
        guide=stage.model.guide, config={"model": saved["model"], "train": saved["train"],
                                         "compare": ctx.cfg.to_dict()},
        metrics=metrics, wall_time=wall_time, provenance=provenance(ctx.device), unavailable=unavailable,
        diagnostics=diagnostics, run_dir=str(ctx.run_dir(stage).relative_to(ctx.results_dir)), series=series)


def score(ctx: Context, vae: LatentModel, name: str, settings: evaluation.EstimatorSettings, seed: int
          ) -> tuple[torch.Tensor, dict[str, Any], float]:
    """Per-datapoint values of registered estimator ``name`` (as :func:`evaluation.evaluate` runs it)."""
    settings = evaluation.resolve_sizes(vae, ctx.x_test, name, settings)     # automatic sizes, from free memory
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        values, extra = evaluation.ESTIMATORS[name](vae, ctx.x_test, settings)
    if ctx.x_test.is_cuda:
        torch.cuda.synchronize(ctx.x_test.device)
    return values.detach().double().cpu(), jsonable(extra), time.perf_counter() - start


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """``torch.save`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_values(path: Path) -> dict[str, torch.Tensor] | None:
    """The per-datapoint values saved by a ``run`` stage, or ``None`` if missing or unreadable."""
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or foreign: torch raises several types
        return None
    if not isinstance(values, dict) or not all(isinstance(v, torch.Tensor) for v in values.values()):
        return None
    return values


def reference_log_px(ctx: Context, stage: Stage) -> tuple[torch.Tensor, str, dict[str, torch.Tensor]]:
    values = load_values(ctx.values_path(stage))
    if values is None:   # the runner reruns the run stage first; this is a guard, not a path
        raise FileNotFoundError(f"{ctx.values_path(stage)} is missing or corrupt")
    if "ais" in values:
        return values["ais"], "ais", values
    return values["is"], f"is-{ctx.cfg.is_k}", values


def jsonable(value: Any) -> Any:
    """Tensors to numbers or lists, tuples to lists, dataclasses to dicts, other objects to ``str``."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------- the stages
def train_stage(ctx: Context, stage: Stage) -> None:
    vae, train_config = build_model(ctx, stage.model, stage.seed)
    with staged_directory(ctx.run_dir(stage)) as staging:
        result = train(vae, ctx.dataset, train_config, progress=ctx.progress)
        last = result.history[-1] if result.history else {}
        summary = {"seconds": result.seconds, "gradient_evaluations": result.gradient_evaluations,
                   **{k: last[k] for k in ("train_bound", "test_elbo", "test_elbo_stderr") if k in last}}
        write_run(staging, result.model, train_config, ctx.dataset.metadata, provenance(ctx.device),
                  result.history, summary)
    return None


def run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    cfg, seed = ctx.cfg, stage.seed
    vae, saved = load_model(ctx, stage)
    summary = saved.get("summary", {})
    metrics: dict[str, Any] = {"gradient_evaluations": summary.get("gradient_evaluations"),
                               "n_test": int(ctx.x_test.shape[0])}
    wall = {"train": float(summary.get("seconds", 0.0))}
    values: dict[str, torch.Tensor] = {}
    diagnostics: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    certify = None if cfg.certify is None else CertifyConfig(**cfg.certify)
    settings = evaluation.EstimatorSettings(batch_size=cfg.ais_batch_size, ais=AISConfig(**cfg.ais), certify=certify)
    values["ais"], diagnostics["ais"], wall["ais"] = score(ctx, vae, "ais", settings, stage_seed(seed, "eval/ais"))
    diagnostics["ais_settings"] = jsonable(dataclasses.asdict(settings))
    metrics["log_px_ais"], metrics["log_px_ais_se"] = mean_and_stderr(values["ais"])
    metrics["ais_steps"] = diagnostics["ais"]["steps"]
    certificate = diagnostics["ais"].get("certificate")
    if certificate is not None:
        wall["certify"] = certificate.pop("seconds")           # a wall time, not a result: kept out of the diagnostics
        metrics["ais_certified"] = int(certificate["certified"])
        metrics["bdmc_gap"], metrics["bdmc_gap_se"] = certificate["bdmc_gap"], certificate["bdmc_gap_stderr"]
    else:
        unavailable["certificate"] = "AIS ran at the given T without BDMC certification (settings: certify = None)"
    encoder_note = None
    if not stage.model.has_encoder:
        vae, diagnostics["posthoc_encoder"], wall["posthoc_encoder"] = posthoc_encoder(ctx, vae, seed)
        encoder_note = "post-hoc"
    if vae.has_encoder:
        settings = evaluation.EstimatorSettings(k=cfg.is_k, batch_size=cfg.eval_batch_size)
        values["is"], diagnostics["is"], wall["is"] = score(ctx, vae, "iwae", settings, stage_seed(seed, "eval/is"))
        metrics["log_px_is"], metrics["log_px_is_se"] = mean_and_stderr(values["is"])
        metrics["is_k"] = cfg.is_k
        settings = evaluation.EstimatorSettings(k=cfg.elbo_k, batch_size=cfg.eval_batch_size)
        values["elbo"], _, wall["elbo"] = score(ctx, vae, "elbo", settings, stage_seed(seed, "eval/elbo"))
        metrics["elbo"], metrics["elbo_se"] = mean_and_stderr(values["elbo"])
        metrics["active_units"] = active_units(vae, ctx.x_test)
        # both are stochastic lower bounds: which one is tighter here?
        metrics["ais_minus_is"], metrics["ais_minus_is_se"] = mean_and_stderr(values["ais"] - values["is"])
        metrics["gap"], metrics["gap_se"] = mean_and_stderr(values["ais"] - values["elbo"])
        diagnostics["gap"] = "log p(x) by AIS − ELBO, paired"
        if encoder_note is not None:
            diagnostics["encoder"] = ("post-hoc: a Gaussian encoder fitted to the frozen decoder after training; "
                                      "IS, ELBO and gap use it, active units describe it")
            metrics["posthoc_encoder"] = 1
    save_tensors(ctx.values_path(stage), values)
    return record(ctx, stage, saved, metrics, wall, unavailable, diagnostics)


def posthoc_encoder(ctx: Context, vae: LatentModel, seed: int) -> tuple[LatentModel, dict[str, Any], float]:
    """A Gaussian encoder fitted to a trained decoder that has none, with the decoder frozen.

    The IWAE-K objective (:func:`vaebench.inference.iwae.iwae_objective`) trains only φ for the
    budget ``ctx.cfg.posthoc_encoder`` (epochs, K, learning rate) on the training set, so that an
    ``hmc``-trained decoder gets importance-sampled log p(x) and an ELBO that are independent of AIS.
    """
    cfg = ctx.cfg
    budget = dict(cfg.posthoc_encoder)
    config = dataclasses.replace(vae.config, encoder=True, guide="gaussian", flows=0)
    start = time.perf_counter()
    pyro.set_rng_seed(stage_seed(seed, "posthoc-encoder/init"))
    fitted = LatentModel(config, vae.generative).to(device=ctx.device, dtype=ctx.dtype)
    fitted.generative.requires_grad_(False)
    train_config = TrainConfig(method="iwae", dataset=cfg.dataset, epochs=int(budget["epochs"]), k=int(budget["k"]),
                               batch_size=cfg.batch_size, lr=float(budget["lr"]), seed=stage_seed(seed, "posthoc-encoder"),
                               adam_eps=cfg.adam_eps, data_dir=cfg.data_dir, dtype=cfg.dtype, device=cfg.device)
    fitted = train(fitted, ctx.dataset, train_config, progress=False).model
    info = {"objective": f"iwae-{budget['k']}", **budget, "decoder": "frozen", "guide": "gaussian"}
    return fitted, info, time.perf_counter() - start


def bounds_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    cfg, seed = ctx.cfg, stage.seed
    vae, saved = load_model(ctx, stage)
    log_px, reference, values = reference_log_px(ctx, stage)
    wall: dict[str, float] = {}
    reused = {}
    iwae, below = [], []
    for k in cfg.bound_ks:
        if k == cfg.is_k:                  # the run stage's IS-K is this very estimator: reuse its values
            bound = values["is"]
            reused[f"k{k}"] = f"the run stage's IS-{k} values (same estimator, seed of eval/is)"
        else:
            pyro.set_rng_seed(stage_seed(seed, f"bounds/k{k}"))
            start = time.perf_counter()
            with torch.no_grad():
                result = over_batches(lambda xb: importance_sampling(vae.log_joint, vae.encoder_proposal, xb, k),
                                      ctx.x_test, cfg.eval_batch_size)
            wall[f"iwae_k{k}"] = time.perf_counter() - start
            bound = result.log_marginal.double().cpu()
        mean, se = mean_and_stderr(bound)
        iwae.append({"k": k, "value": mean, "se": se})
        if not (k == cfg.is_k and reference.startswith("is")):   # else log p(x) − bound is 0 by construction
            mean, se = mean_and_stderr(log_px - bound)
            below.append({"k": k, "value": mean, "se": se})
    metrics: dict[str, Any] = {}
    metrics["log_px"], metrics["log_px_se"] = mean_and_stderr(log_px)
    metrics["elbo"], metrics["elbo_se"] = mean_and_stderr(values["elbo"])
    return record(ctx, stage, saved, metrics, wall, {}, {"log_px": reference, "reused": reused},
                  series={"iwae": iwae, "iwae_below_log_px": below})


def gaps_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    cfg, seed = ctx.cfg, stage.seed
    vae, saved = load_model(ctx, stage)
    log_px, reference, values = reference_log_px(ctx, stage)
    x = ctx.x_test
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(stage_seed(seed, "gaps/local-vi"))
    family = "iaf" if vae.config.guide == "iaf" else "gaussian"
    with frozen(vae):
        if family == "iaf":                  # each guide family gets a q* of its own family (Cremer et al. 2018)
            qstar = fit_local_iaf(vae.log_joint, x, vae.encoder, steps=cfg.local_vi_steps, lr=cfg.local_vi_lr,
                                  k=cfg.local_vi_k, generator=generator)
        else:
            with torch.no_grad():
                loc, scale = vae.encode(x)
            qstar = fit_local_gaussians(vae.log_joint, x, loc, scale.log(), steps=cfg.local_vi_steps,
                                        lr=cfg.local_vi_lr, k=cfg.local_vi_k, generator=generator)
    fit_seconds = time.perf_counter() - start
    pyro.set_rng_seed(stage_seed(seed, "gaps/elbo"))
    with torch.no_grad():
        elbo_qstar = elbo(vae.log_joint, qstar.proposal, x, k=cfg.elbo_k).double().cpu()
    elbo_q = values["elbo"]
    metrics = {}
    metrics["log_px"], metrics["log_px_se"] = mean_and_stderr(log_px)
    metrics["elbo_q"], metrics["elbo_q_se"] = mean_and_stderr(elbo_q)
    metrics["elbo_qstar"], metrics["elbo_qstar_se"] = mean_and_stderr(elbo_qstar)
    metrics["inference_gap"], metrics["inference_gap_se"] = mean_and_stderr(log_px - elbo_q)
    metrics["approximation_gap"], metrics["approximation_gap_se"] = mean_and_stderr(log_px - elbo_qstar)
    metrics["amortisation_gap"], metrics["amortisation_gap_se"] = mean_and_stderr(elbo_qstar - elbo_q)
    diagnostics = {"log_px": reference, "local_vi_history": qstar.history,
                   "local_vi": {"steps": cfg.local_vi_steps, "lr": cfg.local_vi_lr, "k": cfg.local_vi_k,
                                "init": "encoder", "family": family,
                                "q*": ("per-datapoint diagonal Gaussian" if family == "gaussian" else
                                       "per-datapoint base Gaussian and flow context, the guide's IAF flows")}}
    return record(ctx, stage, saved, metrics, {"local_vi": fit_seconds, "total": time.perf_counter() - start},
                  {}, diagnostics)


def variance_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    cfg, seed = ctx.cfg, stage.seed
    vae, saved = load_model(ctx, stage)
    x = ctx.x_test[:cfg.variance_batch]
    series: dict[str, list[dict[str, Any]]] = {"bound_std": [], "snr_encoder": [], "snr_decoder": [],
                                                "snr_encoder_dreg": []}
    unavailable: dict[str, str] = {}
    start = time.perf_counter()
    pyro.clear_param_store()
    for k in cfg.variance_ks:
        pyro.set_rng_seed(stage_seed(seed, f"variance/k{k}"))
        std, std_se = bound_spread(vae, x, k, cfg.variance_replicates)
        snr = gradient_snr(vae, x, k, cfg.variance_replicates)
        dreg_snr = None
        if vae.config.guide == "iaf":
            unavailable["snr_encoder_dreg"] = ("DReG needs the guide's density with φ stopped at its own draws, "
                                               "which an IAF guide gives only by inverting its flows")
        else:
            dreg_snr = gradient_snr(vae, x, k, cfg.variance_replicates, dreg=True).encoder
        for name, value, se in (("bound_std", std, std_se), ("snr_encoder", snr.encoder, None),
                                ("snr_decoder", snr.decoder, None), ("snr_encoder_dreg", dreg_snr, None)):
            if name == "snr_encoder_dreg" and value is None:
                continue
            kept = _finite(None if value is None else float(value))
            if kept is None:
                unavailable[f"{name}_k{k}"] = (f"{name} at K={k} is not a finite number ({value}): every "
                                               "replicate gradient component was constant or non-finite")
            series[name].append({"k": k, "value": kept, "se": _finite(se)})
    diagnostics = {"batch": int(x.shape[0]), "replicates": cfg.variance_replicates,
                   "snr": "mean over components of |mean|/std of the batch-mean gradient"}
    return record(ctx, stage, saved, {}, {"total": time.perf_counter() - start}, unavailable, diagnostics,
                  series=series)


def aggregate_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    cfg, seed = ctx.cfg, stage.seed
    vae, saved = load_model(ctx, stage)
    pyro.set_rng_seed(stage_seed(seed, "aggregate"))
    start = time.perf_counter()
    result = aggregate_posterior(vae, ctx.x_test, cfg.aggregate_samples)
    metrics: dict[str, Any] = {"log_n": float(torch.tensor(float(result.n)).log())}
    for name in ("average_kl", "mutual_information", "marginal_kl"):
        metrics[name], metrics[f"{name}_se"] = getattr(result, name)
    diagnostics = {"estimator": "full-data mixture log q(z) = logmeanexp_m log q(z|x_m) over the test set",
                   "samples_per_datapoint": cfg.aggregate_samples}
    return record(ctx, stage, saved, metrics, {"total": time.perf_counter() - start}, {}, diagnostics)


STAGES: dict[str, Callable[[Context, Stage], dict[str, Any] | None]] = {
    "train": train_stage, "run": run_stage, "bounds": bounds_stage, "gaps": gaps_stage,
    "variance": variance_stage, "aggregate": aggregate_stage,
}
"""Stage kind -> the function that runs it."""


def execute(ctx: Context, stage: Stage) -> dict[str, Any] | None:
    """Run one stage wherever an executor put it: one torch thread (or ``cfg.threads``), its own seeds."""
    with torch_threads(ctx.cfg.threads or 1):
        return STAGES[stage.kind](ctx, stage)
