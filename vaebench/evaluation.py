"""Score a trained model with a named estimator; the ``vaebench evaluate`` back end.

Each estimator in :data:`ESTIMATORS` maps ``(model, x, settings)`` to per-datapoint values (nats)
plus estimator-specific diagnostics; :func:`evaluate` times it, summarises it as a test-set mean
with its standard error, and :func:`evaluate_run` adds the run's data set and provenance.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from vaebench import targets
from vaebench.config import MAX_K, AISConfig, CertifyConfig
from vaebench.data import check_binary, evaluation_data, load_dataset
from vaebench.errors import ConfigError, DataError
from vaebench.estimators import Progress, elbo, importance_sampling, mean_and_stderr, over_batches
from vaebench.metrics import active_units
from vaebench.model import LatentModel
from vaebench.provenance import provenance, resolve_device
from vaebench.rundir import load_run

DEFAULT_K = {"elbo": 1, "iwae": 5000}


@dataclass(frozen=True)
class EstimatorSettings:
    """Settings shared by the estimators.

    Attributes
    ----------
    k
        Importance samples per datapoint (``elbo``, ``iwae``); ``None`` for the default.
    batch_size
        Datapoints per batch; ``None`` (default): chosen from the device's free memory
        (:func:`resolve_sizes`).
    max_rows
        Cap on (sample × datapoint) rows per decoder call (IS and the ELBO); ``None`` (default):
        chosen from the device's free memory.
    ais
        Settings of ``ais`` and ``bdmc`` (steps T, leapfrog L, chains M, schedule...);
        ``None`` for the defaults of :class:`vaebench.config.AISConfig`.
    progress
        Optional callback ``progress(done)`` that estimators call as work completes (IS and the
        ELBO: (sample, datapoint) pairs scored); it never changes a result and is not a setting
        (excluded from comparison and repr). :func:`evaluate` sets it for its progress bar.
    certify
        ``ais`` only: certify T by BDMC on simulated data first
        (:func:`vaebench.inference.certify.certify`); ``None`` runs AIS at ``ais.steps`` as given.
        (The CLI certifies by default; library callers opt in.)
    """

    k: int | None = None
    batch_size: int | None = None
    max_rows: int | None = None
    ais: AISConfig | None = None
    progress: Progress | None = dataclasses.field(default=None, compare=False, repr=False)
    certify: CertifyConfig | None = None


Estimator = Callable[[LatentModel, torch.Tensor, EstimatorSettings], tuple[torch.Tensor, dict[str, Any]]]


def _elbo(model: LatentModel, x: torch.Tensor, s: EstimatorSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    k = s.k or DEFAULT_K["elbo"]
    values = over_batches(lambda xb: elbo(model.log_joint, model.encoder_proposal, xb, k, s.max_rows,
                                          s.progress), x, s.batch_size)
    return values, {"k": k}


def _iwae(model: LatentModel, x: torch.Tensor, s: EstimatorSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    k = s.k or DEFAULT_K["iwae"]
    result = over_batches(lambda xb: importance_sampling(model.log_joint, model.encoder_proposal, xb, k,
                                                         s.max_rows, s.progress), x, s.batch_size)
    ess = result.ess.double()
    return result.log_marginal, {"k": k, "ess_mean": float(ess.mean()), "ess_min": float(ess.min()),
                                 "elbo_k": float(result.elbo.double().mean())}


def _exact(model: LatentModel, x: torch.Tensor, s: EstimatorSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    if s.k is not None:
        raise ConfigError("--k does not apply to the exact estimator")
    return targets.exact_log_marginal(model, x), {"k": None}


ESTIMATORS: dict[str, Estimator] = {"elbo": _elbo, "iwae": _iwae, "exact": _exact}
"""Estimator name → function; later capabilities register theirs here."""


# ------------------------------------------------------------------------------ AIS and BDMC
AIS_ESTIMATORS = ("ais", "bdmc")
ENCODER_ESTIMATORS = ("elbo", "iwae")
"""Estimators that need q_φ(z|x); a decoder trained with ``--method hmc`` has none."""


def _ais_setup(name: str, x: torch.Tensor, s: EstimatorSettings) -> tuple[AISConfig, torch.Generator]:
    """The AIS settings and a generator seeded from the global RNG (which :func:`evaluate` seeds)."""
    if s.k is not None:
        raise ConfigError(f"--k does not apply to the {name} estimator; use --chains for chains per datapoint")
    seed = int(torch.randint(0, 2 ** 62, (1,)))
    return s.ais or AISConfig(), torch.Generator(device=x.device).manual_seed(seed)


def _ais(model: LatentModel, x: torch.Tensor, s: EstimatorSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward AIS on ``x``; with ``s.certify``, at the T that BDMC certifies (``certificate`` in the record)."""
    from vaebench.inference.ais import ais, as_target
    from vaebench.inference.certify import certified_ais

    config, generator = _ais_setup("ais", x, s)
    target = as_target(model)
    extra: dict[str, Any] = {}
    if s.certify is None:
        result = ais(target, x, config, generator, s.batch_size, s.progress)
    else:
        result, certificate = certified_ais(target, x, config, generator, s.certify, s.batch_size, s.progress)
        config = dataclasses.replace(config, steps=certificate.steps)
        extra["certificate"] = certificate.to_dict()
    return result.log_marginal, {"k": None, **config.to_dict(), **result.summary(), **extra}


def _bdmc(model: LatentModel, x: torch.Tensor, s: EstimatorSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """BDMC on ``len(x)`` datapoints simulated from the model (``x`` only fixes how many)."""
    from vaebench.inference.ais import as_target, bdmc

    config, generator = _ais_setup("bdmc", x, s)
    target = as_target(model)
    x_sim, z_sim = target.simulate(x.shape[0], generator)
    result = bdmc(target, x_sim, z_sim, config, generator, s.batch_size, progress=s.progress)
    lower, lower_se = mean_and_stderr(result.lower.log_marginal)
    upper, upper_se = mean_and_stderr(result.upper.log_marginal)
    gap, gap_se = mean_and_stderr(result.gap)
    extra: dict[str, Any] = {
        "k": None, **config.to_dict(), "data": "simulated from the model", "lower": lower,
        "lower_stderr": lower_se, "upper": upper, "upper_stderr": upper_se, "gap": gap, "gap_stderr": gap_se,
        **result.lower.summary(), **{f"upper_{key}": value for key, value in result.upper.summary().items()}}
    if getattr(getattr(model, "config", None), "is_linear_gaussian", False):
        extra["exact"], extra["exact_stderr"] = mean_and_stderr(targets.exact_log_marginal(model, x_sim))
    return result.lower.log_marginal, extra


ESTIMATORS.update({"ais": _ais, "bdmc": _bdmc})
SIMULATED_ESTIMATORS = ("bdmc",)
"""Estimators that score data simulated from the model, not the data they are given."""


def _annealing_steps(x: torch.Tensor, s: EstimatorSettings, runs: int) -> int | None:
    """Datapoint × annealing steps of ``runs`` AIS runs; ``None`` (unknown) when certification picks T."""
    if s.certify is not None:
        return None
    return runs * x.shape[0] * (s.ais or AISConfig()).steps


PROGRESS_UNITS: dict[str, Callable[[torch.Tensor, EstimatorSettings], int | None]] = {
    "elbo": lambda x, s: x.shape[0] * (s.k or DEFAULT_K["elbo"]),
    "iwae": lambda x, s: x.shape[0] * (s.k or DEFAULT_K["iwae"]),
    "ais": lambda x, s: _annealing_steps(x, s, 1),
    "bdmc": lambda x, s: _annealing_steps(x, s, 2),
}
"""Estimator name → total of the units its ``progress`` callback counts (``None``: not known in
advance; the bar then counts without a total): (sample, datapoint) pairs for IS and the ELBO,
(datapoint, annealing step) pairs for AIS and BDMC."""


def _progress_bar(estimator: str, x: torch.Tensor, settings: EstimatorSettings, progress: bool | None):
    """A tqdm bar (or ``None``): shown on a terminal, or whenever ``progress`` is True."""
    show = sys.stderr.isatty() if progress is None else progress
    if not show or estimator not in PROGRESS_UNITS or settings.progress is not None:
        return None
    from tqdm.auto import tqdm
    unit = "step" if estimator in AIS_ESTIMATORS else "sample"
    return tqdm(total=PROGRESS_UNITS[estimator](x, settings), desc=estimator, unit=unit, unit_scale=True,
                leave=False, dynamic_ncols=True, file=sys.stderr)


CPU_BATCH = 100
"""Datapoints per batch on a CPU (more rows per call run no faster there once past the cache)."""
MAX_AUTO_BATCH = 10000
"""Most datapoints per batch chosen automatically (AIS on a large GPU)."""


def resolve_sizes(model: LatentModel, x: torch.Tensor, estimator: str, settings: EstimatorSettings
                  ) -> EstimatorSettings:
    """``settings`` with an automatic ``batch_size`` and ``max_rows`` replaced by numbers that fit the device.

    IS and the ELBO evaluate (sample × datapoint) rows: ``max_rows`` is what fits in
    :data:`vaebench.memory.MEMORY_FRACTION` of the free memory, measured by probing
    log p(x, z) − log q(z|x) on a few rows, up to the device's preferred size (32,768 rows on a CPU
    -- the fixed cap vaebench used before -- and 2^20 on CUDA); datapoints per batch are
    :data:`CPU_BATCH` on a CPU and ``max_rows // k`` (at least 100) on CUDA. AIS and BDMC run
    (chains + tuning chains) rows per datapoint, each holding the autograd graph of one gradient
    evaluation: the batch is what fits, up to :data:`CPU_BATCH` datapoints on a CPU and
    :data:`MAX_AUTO_BATCH` on CUDA. Explicit numbers are kept. The sizes change the random draws,
    so :func:`evaluate` records them.
    """
    from vaebench.memory import PROBE_ROWS, rows_that_fit

    device, n = x.device, max(1, x.shape[0])
    on_cpu = device.type != "cuda"
    sample = x[torch.arange(2 * PROBE_ROWS, device=device) % n]          # probe rows: the data, repeated
    if estimator in ENCODER_ESTIMATORS:
        k = settings.k or DEFAULT_K[estimator]
        max_rows = settings.max_rows
        if max_rows is None:
            def probe(rows: int) -> None:
                with torch.no_grad():
                    model.log_joint(sample[:rows], model.encoder_proposal(sample[:rows], 1)[0])
            max_rows = rows_that_fit(probe, device)
        batch = settings.batch_size or (CPU_BATCH if on_cpu else max(CPU_BATCH, min(n, max_rows // k)))
        return dataclasses.replace(settings, max_rows=max_rows, batch_size=batch)
    if estimator in AIS_ESTIMATORS and settings.batch_size is None:
        config = settings.ais or AISConfig()
        chains = config.chains + config.tuning_chains

        def probe(rows: int) -> None:
            u = torch.zeros(rows, model.latent_dim, dtype=x.dtype, device=device)
            model.latent_density(sample[:rows], compiled=False).evaluate_components(u)
        rows = rows_that_fit(probe, device)
        batch = max(1, min(CPU_BATCH if on_cpu else MAX_AUTO_BATCH, rows // chains))
        return dataclasses.replace(settings, batch_size=batch)
    return dataclasses.replace(settings, batch_size=settings.batch_size or CPU_BATCH)


def evaluate(model: LatentModel, x: torch.Tensor, estimator: str, settings: EstimatorSettings = EstimatorSettings(),
             seed: int = 0, progress: bool | None = False) -> dict[str, Any]:
    """Score ``model`` on data ``x`` with ``estimator``.

    ``progress``: show a tqdm bar on stderr (``None``: only when stderr is a terminal); it does
    not change the result.

    Returns
    -------
    dict
        ``estimator``, ``k``, ``n``, ``log_likelihood`` (mean nats per datapoint), ``stderr`` (its
        standard error over datapoints), ``seconds``, ``seed`` and estimator diagnostics, plus
        ``active_units`` for models with an encoder.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if settings.k is not None and not 1 <= settings.k <= MAX_K:
        raise ConfigError(f"k must be in 1..{MAX_K}, got {settings.k}")
    if estimator in ENCODER_ESTIMATORS:
        model._require_encoder()            # before any Pyro trace, which would append its shapes to the message
    if settings.ais is not None and estimator not in AIS_ESTIMATORS:
        raise ConfigError(f"AIS settings (--steps, --leapfrog, --chains, --schedule) apply to --estimator ais or "
                          f"bdmc, not {estimator}")
    if settings.max_rows is not None and estimator not in ENCODER_ESTIMATORS:
        raise ConfigError(f"--max-rows applies to --estimator elbo or iwae, not {estimator}")
    if settings.certify is not None and estimator != "ais":
        raise ConfigError(f"certification (--certify-points, --max-steps, --gap-tolerance) applies to "
                          f"--estimator ais, not {estimator}")
    if model.likelihood == "bernoulli":
        check_binary(x, "evaluation data")
    elif not torch.isfinite(x).all():
        raise DataError("evaluation data contains NaN or infinite values")
    settings = resolve_sizes(model, x, estimator, settings)
    bar = _progress_bar(estimator, x, settings, progress)
    if bar is not None:
        settings = dataclasses.replace(settings, progress=bar.update)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            values, extra = ESTIMATORS[estimator](model, x, settings)
    finally:
        if bar is not None:
            bar.close()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    mean, stderr = mean_and_stderr(values)
    result = {"estimator": estimator, "k": extra.pop("k"), "n": int(x.shape[0]), "log_likelihood": mean,
              "stderr": stderr, "seconds": seconds, "seed": seed, "batch_size": settings.batch_size, **extra}
    if estimator in ENCODER_ESTIMATORS:
        result["max_rows"] = settings.max_rows
    if model.has_encoder and estimator not in SIMULATED_ESTIMATORS:
        result["active_units"] = active_units(model, x)
    return result


def evaluate_run(run_dir: str | Path, estimator: str, split: str = "test",
                 settings: EstimatorSettings = EstimatorSettings(), seed: int = 0, device: str = "auto",
                 progress: bool | None = False, model_spec: str | None = None) -> dict[str, Any]:
    """Load a run directory (a user model's with ``model_spec``), rebuild its data split, and :func:`evaluate` it.

    For ``bdmc``, which scores data simulated from the model (as many points as the split has),
    ``dataset`` says so and ``split`` is ``None``.
    """
    torch_device = resolve_device(device)
    model, train_config, _ = load_run(run_dir, device=torch_device, model_spec=model_spec)
    dataset = load_dataset(train_config.dataset, train_config.data_dir)
    dtype = next(model.parameters()).dtype
    x = evaluation_data(dataset, split, model.likelihood).to(device=torch_device, dtype=dtype)
    result = evaluate(model, x, estimator, settings, seed, progress)
    where = {"dataset": train_config.dataset, "split": split}
    if estimator in SIMULATED_ESTIMATORS:
        where = {"dataset": f"simulated from the model (n={result['n']})", "split": None}
    return {**result, **where, "method": train_config.method,
            "run_dir": str(run_dir), "provenance": provenance(torch_device)}
