"""The ``vaebench`` command line: argument parsing only; the work is done by library functions.

Every user error (unknown name, out-of-range number, missing or corrupt file, NaNs, non-binary
data under a Bernoulli likelihood) is reported as one line ``vaebench: error: ...`` on stderr
with exit status 2; an interrupt (SIGINT, SIGTERM, SIGHUP) exits with 128 + the signal's number
(130, 143, 129). Nothing partial is left on disk in either case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Callable, Sequence

from vaebench.config import ACTIVATIONS, GUIDE_CHOICES, LIKELIHOODS, MAX_K, MAX_SEED, METHODS, TrainConfig
from vaebench.data import DATASETS
from vaebench.models.builtin import BUILTIN_MODELS
from vaebench.errors import VaebenchError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
"""Signals that, like SIGINT, interrupt the command cleanly (staging folders removed)."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM or SIGHUP, so every ``except KeyboardInterrupt`` /
    ``finally`` cleanup (staging folders, progress bars) runs as it does for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    for other in TERMINATING_SIGNALS:   # one signal interrupts; a repeat must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _terminating_signals_interrupt():
    """Install :func:`_raise_terminated` for SIGTERM/SIGHUP (main thread only); restore on exit."""
    try:
        previous = {signum: signal.signal(signum, _raise_terminated) for signum in TERMINATING_SIGNALS}
    except ValueError:                  # not the main thread: leave signal handling alone
        previous = {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _interrupt_name(exc: KeyboardInterrupt) -> str:
    signum = getattr(exc, "signum", None)
    return "interrupted" if signum is None else f"interrupted by {signal.Signals(signum).name}"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"vaebench: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _int_in(low: int, high: int, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in low..high (the message names the range)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {value}")
        return value
    parse.__name__ = "integer"          # argparse names the type in some messages
    return parse


_seed = _int_in(0, MAX_SEED, "a seed")
_k = _int_in(1, MAX_K, "a number of samples")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _hidden_sizes(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 200,200, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"hidden widths must be positive, got {text!r}")
    return sizes


# ---------------------------------------------------------------------------------------- models
def _add_model_options(p: argparse.ArgumentParser, guides: bool = True) -> None:
    """``--model SPEC [--model-arg KEY=VALUE ...] [--guide ...] [--flows N]`` (train and compare)."""
    p.add_argument("--model", default=None, metavar="SPEC",
                   help=f"built-in ({', '.join(BUILTIN_MODELS)}), path/to/file.py:factory or package.module:factory "
                        "(default mlp; linear for linear-gaussian)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the model factory (JSON value, else a string); repeatable")
    if guides:
        p.add_argument("--guide", choices=GUIDE_CHOICES[1:], default=None,
                       help="model: the module's own guide(x) (default when it has one); gaussian: a diagonal "
                            "Gaussian over all latents (default otherwise); iaf: the Gaussian followed by --flows "
                            "inverse autoregressive flows")
        p.add_argument("--flows", type=_positive_int, default=None, help="iaf flows (default 2)")


# ---------------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="learn θ (and φ) with vi, iwae or hmc and write a run directory",
                       description="Train the model and write RUN_DIR (config.json, model.pt, log.jsonl).")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--epochs", type=_non_negative_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--k", type=_k, default=None, help=f"importance samples for iwae, 1..{MAX_K} (default 5)")
    _add_model_options(p)
    p.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="mlp/linear: latent dimension (default 50; 4 for linear-gaussian)")
    p.add_argument("--hidden", type=_hidden_sizes, default=None, help="mlp: decoder widths (default 200,200)")
    p.add_argument("--encoder-hidden", type=_hidden_sizes, default=None,
                   help="widths of a built guide (default: --hidden for mlp/linear, else 200,200)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None, help="mlp and built guides (default tanh)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="mlp/linear: default bernoulli for image data, gaussian for real-valued data")
    p.add_argument("--gaussian-scale", type=_positive_float, default=None,
                   help="mlp/linear: fixed observation std of a Gaussian likelihood (default: learned)")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "burda"), default="constant")
    p.add_argument("--vi-objective", choices=("trace", "meanfield"), default="trace",
                   help="Trace_ELBO, or TraceMeanField_ELBO (analytic KL)")
    p.add_argument("--dreg", action="store_true", help="doubly-reparameterised encoder gradients (iwae)")
    p.add_argument("--transitions", type=_positive_int, default=None,
                   help="hmc: HMC transitions per minibatch from the stored latents (default 3)")
    p.add_argument("--leapfrog", type=_positive_int, default=None,
                   help="hmc: leapfrog steps per HMC transition (default 10)")
    p.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED} (default 0)")
    p.add_argument("--data-dir", default=None, help="directory of IDX files (mnist, fashion-mnist)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_compile_option(p)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from vaebench.data import check_compatible, load_dataset
    from vaebench.models.loading import make_model_config, parse_model_args
    from vaebench.provenance import provenance, resolve_device
    from vaebench.rundir import check_destination, staged_directory, write_run
    from vaebench.training import initial_model, train

    if args.method == "vi" and args.k not in (None, 1):
        raise VaebenchError("--k applies to --method iwae (vi uses the single-sample ELBO)")
    if args.method == "hmc" and args.k is not None:
        raise VaebenchError("--k applies to --method iwae (hmc samples the posterior; see --transitions)")
    if args.method == "hmc" and args.encoder_hidden is not None:
        raise VaebenchError("--encoder-hidden does not apply to --method hmc (it learns the decoder without an "
                            "encoder)")
    if args.method != "hmc" and (args.transitions is not None or args.leapfrog is not None):
        raise VaebenchError("--transitions and --leapfrog apply to --method hmc")
    if args.method == "hmc" and (args.guide is not None or args.flows is not None):
        raise VaebenchError("--guide and --flows do not apply to --method hmc (it learns the decoder without a guide)")
    check_destination(args.out, args.overwrite)
    dataset = load_dataset(args.dataset, args.data_dir)
    real_valued = dataset.kind == "real"
    model_config = make_model_config(
        args.model or ("linear" if args.dataset == "linear-gaussian" else "mlp"), dataset.data_dim,
        real_valued=real_valued, encoder=args.method != "hmc", model_args=parse_model_args(args.model_arg),
        guide=args.guide, flows=args.flows, latent_dim=args.latent_dim, hidden=args.hidden,
        activation=args.activation, likelihood=args.likelihood, gaussian_scale=args.gaussian_scale,
        encoder_hidden=args.encoder_hidden,
        default_latent_dim=dataset.metadata.get("latent_dim", 4) if real_valued else 50)
    hmc_settings = {key: value for key, value in (("hmc_transitions", args.transitions),
                                                  ("hmc_leapfrog", args.leapfrog)) if value is not None}
    train_config = TrainConfig(
        method=args.method, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
        k=args.k or (5 if args.method == "iwae" else 1), lr=args.lr, seed=args.seed,
        vi_objective=args.vi_objective, dreg=args.dreg, lr_schedule=args.lr_schedule,
        data_dir=args.data_dir, dtype=args.dtype, device=args.device, **hmc_settings)
    device = resolve_device(train_config.device)
    model = initial_model(model_config, train_config.seed)      # a model that breaks the contract fails here
    check_compatible(dataset, model.likelihood)
    with staged_directory(args.out, args.overwrite) as staging:
        result = train(model, dataset, train_config, progress=not args.quiet)
        last = result.history[-1] if result.history else {}
        summary = {"seconds": result.seconds, "gradient_evaluations": result.gradient_evaluations,
                   **{key: last[key] for key in ("train_bound", "test_elbo", "test_elbo_stderr") if key in last}}
        write_run(staging, result.model, train_config, dataset.metadata, provenance(device), result.history,
                  summary)
    elbo_text = (f", test ELBO {summary['test_elbo']:.3f} ± {summary['test_elbo_stderr']:.3f} nats"
                 if "test_elbo" in summary else "")
    print(f"wrote {args.out}: {args.method} ({result.model.config.label}) on {args.dataset}, {args.epochs} epochs{elbo_text}, "
          f"{result.seconds:.1f} s")
    return 0


# ------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from vaebench.evaluation import ESTIMATORS

    p = sub.add_parser("evaluate", help="score a run directory with a log-likelihood estimator",
                       description="Estimate the test log-likelihood (nats per datapoint) of a trained run.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--estimator", required=True, choices=tuple(ESTIMATORS))
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="the user model the run was trained with (required for runs of user models: vaebench "
                        "never imports code because a run directory names it)")
    p.add_argument("--k", type=_k, default=None,
                   help=f"samples per datapoint, 1..{MAX_K} (elbo default 1, iwae default 5000)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED} (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="datapoints per batch (default: what fits in the device's free memory; 100 on a CPU)")
    p.add_argument("--max-rows", type=_positive_int, default=None, metavar="R",
                   help="elbo/iwae: most (sample x datapoint) rows per model call (default: what fits in the "
                        "device's free memory, up to 32768 on a CPU and 2^20 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="T",
                   help="ais/bdmc: annealing steps (default 500)")
    p.add_argument("--leapfrog", type=_positive_int, default=None, metavar="L",
                   help="ais/bdmc: leapfrog steps per HMC transition (default 10)")
    p.add_argument("--chains", type=_positive_int, default=None, metavar="M",
                   help="ais/bdmc: chains per datapoint (default 16)")
    p.add_argument("--schedule", choices=("sigmoid", "linear"), default=None,
                   help="ais/bdmc: spacing of the inverse temperatures (default sigmoid)")
    p.add_argument("--no-certify", action="store_true",
                   help="ais: run AIS at --steps as given, without choosing T by BDMC on simulated data")
    p.add_argument("--certify-points", type=_positive_int, default=None, metavar="N",
                   help="ais: datapoints simulated from the decoder for BDMC certification (default 100)")
    p.add_argument("--max-steps", type=_positive_int, default=None, metavar="T",
                   help="ais: largest T certification tries, doubling from --steps (default 8000)")
    p.add_argument("--gap-tolerance", type=_positive_float, default=None, metavar="NATS",
                   help="ais: certified when the mean BDMC gap plus its standard error is below this (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal)")
    _add_compile_option(p)
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from vaebench.config import AISConfig
    from vaebench.evaluation import AIS_ESTIMATORS, EstimatorSettings, evaluate_run

    ais_flags = {key: value for key, value in (("steps", args.steps), ("leapfrog", args.leapfrog),
                                                ("chains", args.chains), ("schedule", args.schedule))
                 if value is not None}
    if ais_flags and args.estimator not in AIS_ESTIMATORS:
        raise VaebenchError(f"--{', --'.join(ais_flags)} apply to --estimator ais or bdmc, not {args.estimator}")
    ais_config = AISConfig(**ais_flags) if args.estimator in AIS_ESTIMATORS else None
    certify_config = _certify_config(args)
    result = evaluate_run(args.run_dir, args.estimator, args.split,
                          EstimatorSettings(k=args.k, batch_size=args.batch_size, max_rows=args.max_rows, ais=ais_config,
                                            certify=certify_config), args.seed, args.device,
                          progress=args.progress, model_spec=args.model)
    if args.json:
        print(json.dumps(result))
        return 0
    k = f" K={result['k']}" if result["k"] is not None else ""
    ess = f", ESS mean {result['ess_mean']:.1f}" if "ess_mean" in result else ""
    units = f", {result['active_units']} active units" if "active_units" in result else ""
    where = f"{result['dataset']}/{result['split']} (n={result['n']})"
    if result["estimator"] == "bdmc":
        where = f"{result['n']} datapoints simulated from the model"
        units += (f"; lower {result['lower']:.3f}, upper {result['upper']:.3f}, "
                  f"gap {result['gap']:.3f} ± {result['gap_stderr']:.3f} nats")
    if result["estimator"] == "ais":
        units += f"; T={result['steps']} " + (_describe_certificate(result["certificate"]) if "certificate" in result
                                               else "as given, not certified (--no-certify)")
    print(f"{result['estimator']}{k} on {where}: "
          f"log p(x) ≈ {result['log_likelihood']:.3f} ± {result['stderr']:.3f} nats{ess}{units}, "
          f"{result['seconds']:.1f} s")
    return 0


def _certify_config(args: argparse.Namespace):
    """``CertifyConfig`` for ``evaluate --estimator ais`` (certified by default).

    ``None`` with ``--no-certify`` or another estimator; certification flags elsewhere are errors.
    """
    from vaebench.config import CertifyConfig

    flags = {key: value for key, value in (("points", args.certify_points), ("max_steps", args.max_steps),
                                            ("tolerance", args.gap_tolerance)) if value is not None}
    names = {"points": "--certify-points", "max_steps": "--max-steps", "tolerance": "--gap-tolerance"}
    given = ", ".join(names[key] for key in flags)
    verb = "apply" if len(flags) > 1 else "applies"
    if args.estimator != "ais":
        if flags or args.no_certify:
            raise VaebenchError(f"{given or '--no-certify'} {verb} to --estimator ais, not {args.estimator}")
        return None
    if args.no_certify:
        if flags:
            raise VaebenchError(f"{given} {verb} only when certifying; drop --no-certify")
        return None
    return CertifyConfig(**flags)


def _describe_certificate(c: dict) -> str:
    gap = f"BDMC gap {c['bdmc_gap']:.3f} ± {c['bdmc_gap_stderr']:.3f} nats on {c['points']} simulated points"
    if c["certified"]:
        return f"certified ({gap} < {c['tolerance']:g}, {c['seconds']:.1f} s)"
    return (f"UNCERTIFIED: reached --max-steps and {gap} is not below {c['tolerance']:g} by its standard error "
            f"({c['seconds']:.1f} s)")


# -------------------------------------------------------------------------- compare, table, report
def _int_list(text: str, high: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    if high is not None and any(v > high for v in values):
        raise argparse.ArgumentTypeError(f"expected integers in 0..{high}, got {text!r}")
    return values


def _seed_list(text: str) -> tuple[int, ...]:
    """Comma-separated seeds, each in 0..MAX_SEED."""
    return _int_list(text, MAX_SEED)


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from vaebench.compare import EXECUTORS, PUBLIC_PRESETS

    p = sub.add_parser("compare", help="train vi, iwae and hmc on the same data and score them all the same way",
                       description="Train every method with the same architecture, data and seeds; score each "
                                   "decoder with the same estimators; study the vi model's inference gaps, "
                                   "aggregate posterior and gradient variance. Appends records to RESULTS_DIR; "
                                   "rerunning the same command resumes an interrupted compare.")
    p.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results directory (created or resumed)")
    p.add_argument("--preset", default="quick", metavar="|".join(PUBLIC_PRESETS),
                   help="quick: offline digits, minutes on a CPU (default); paper: Burda et al.'s MNIST protocol")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help=f"comma-separated seeds in 0..{MAX_SEED} (preset: 0,1,2)")
    p.add_argument("--methods", type=_name_list, default=None, help="subset of vi,iwae,hmc (default: all three)")
    p.add_argument("--k", type=_int_list, default=None, help="K of each iwae run (default 5,50)")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="override the preset's data set")
    p.add_argument("--data-dir", default=None, help="directory of IDX files (mnist, fashion-mnist)")
    p.add_argument("--epochs", type=_non_negative_int, default=None, help="override the preset's epochs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (preset default)")
    _add_model_options(p, guides=False)
    p.add_argument("--guides", type=_name_list, default=None,
                   help="encoder families of vi and iwae, from gaussian,iaf,model (preset default); each is an "
                        "axis of the table: vi, vi+iaf, iwae-k5, iwae-k5+iaf ...")
    p.add_argument("--flows", type=_positive_int, default=None, help="flows of the iaf guide (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: a pool of --workers processes (default); dask: tasks on a distributed cluster; "
                        "slurm: submitit jobs")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="local: worker processes (default: usable cores; 1 runs in this process); "
                        "dask without --scheduler: LocalCluster workers")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="dask: scheduler address, e.g. tcp://host:8786")
    p.add_argument("--scheduler-file", default=None, metavar="FILE", help="dask: scheduler file of a running cluster")
    p.add_argument("--slurm-partition", default=None, metavar="P", help="slurm: partition")
    p.add_argument("--slurm-time", default=None, metavar="T", help="slurm: time limit per job, minutes or H:MM:SS "
                                                                   "(default 24:00:00)")
    p.add_argument("--slurm-gpus-per-job", type=_positive_int, default=None, metavar="G",
                   help="slurm: GPUs per job (default 1 with --device cuda, else 0)")
    p.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default=None,
                   help=argparse.SUPPRESS)   # submitit's local/debug executors: tests and dry runs
    _add_compile_option(p)
    p.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    import time

    from vaebench.compare import preset, run_compare
    from vaebench.results import read_records
    from vaebench.tables import format_table

    from vaebench.models.loading import parse_model_args

    cfg = preset(args.preset, seeds=args.seeds, methods=args.methods, iwae_ks=args.k, guides=args.guides,
                 dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, device=args.device,
                 model=args.model, model_args=parse_model_args(args.model_arg) or None, flows=args.flows)
    options = {"scheduler": args.scheduler, "scheduler_file": args.scheduler_file,
               "slurm_partition": args.slurm_partition, "slurm_time": args.slurm_time,
               "slurm_gpus_per_job": args.slurm_gpus_per_job, "slurm_cluster": args.slurm_cluster}
    needs = {"dask": ("distributed", "dask"), "slurm": ("submitit", "slurm")}.get(args.executor)
    if needs is not None:
        import importlib.util
        if importlib.util.find_spec(needs[0]) is None:
            raise VaebenchError(f"--executor {args.executor} needs the {needs[0]} package: "
                                f"pip install -e \".[{needs[1]}]\"")
    if args.executor == "slurm":
        from vaebench.compare.runner import parse_slurm_time
        parse_slurm_time(args.slurm_time)                 # a bad value is refused before anything is written
    if args.executor == "slurm" and args.slurm_cluster in (None, "slurm"):
        import shutil
        if shutil.which("sbatch") is None:            # submitit would quietly run the jobs here instead
            raise VaebenchError("--executor slurm: no Slurm on this machine (sbatch not found); run the driver on "
                                "a login node, or use --executor local or dask")
    start = time.perf_counter()
    try:
        outcome = run_compare(cfg, args.out, progress=not args.quiet, executor=args.executor, workers=args.workers,
                              **{k: v for k, v in options.items() if v is not None})
    except KeyboardInterrupt as exc:
        print(f"vaebench: compare {_interrupt_name(exc)}; finished stages are kept in {args.out}; rerun the "
              "same command to resume", file=sys.stderr)
        return interrupt_status(exc)
    print(format_table(read_records(args.out), "markdown"))
    resumed = f" ({outcome.skipped} already done, resumed)" if outcome.skipped else ""
    print(f"compare: {len(outcome.ran)} stages in {time.perf_counter() - start:.0f} s{resumed}; records in {args.out}")
    return 0


def _add_table(sub: argparse._SubParsersAction) -> None:
    from vaebench.tables import COLUMNS, DEFAULT_BY, DEFAULT_COLUMNS, FORMATS

    p = sub.add_parser("table", help="print the comparison table of a results directory",
                       description="Mean ± standard error across seeds of every method's test log-likelihood "
                                   "(AIS, IS), ELBO, gap, active units and training time.")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--format", choices=FORMATS, default="markdown")
    p.add_argument("--by", type=_name_list, default=DEFAULT_BY,
                   help=f"grouping columns (default {','.join(DEFAULT_BY)}), e.g. method")
    p.add_argument("--columns", type=_name_list, default=DEFAULT_COLUMNS,
                   help=f"columns to show, from {','.join(COLUMNS)}")
    p.set_defaults(handler=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    from vaebench.results import read_records
    from vaebench.tables import format_table

    print(format_table(read_records(args.results_dir), args.format, args.by, args.columns), end="")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a Markdown report with tables and PNG figures",
                       description="Write DIR/report.md, DIR/table.{md,tex,csv} and DIR/figures/*.png from "
                                   "the records of RESULTS_DIR.")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from vaebench.report import write_report

    skipped = write_report(args.results_dir, args.out, args.overwrite)
    for line in skipped:
        print(f"not drawn: {line}", file=sys.stderr)
    print(f"wrote {args.out}/report.md")
    return 0


# ------------------------------------------------------------------------------------ asv-table
def _add_asv_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("asv-table", help="print asv's benchmark results as a table",
                       description="Load asv's result files (one row per machine, commit, benchmark and "
                                   "parameters: benchmark, params, value, unit, status, commit, machine, "
                                   "environment, python, requirements, run_date, commit_date) "
                                   "and print them.")
    p.add_argument("results_dir", metavar="RESULTS_DIR", nargs="?", default=".asv/results",
                   help="asv results directory (default .asv/results)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--benchmark", default=None, metavar="TEXT", help="keep benchmarks whose name contains TEXT")
    p.add_argument("--include-skipped", action="store_true",
                   help="also list parameter combinations asv skipped (e.g. cuda without a GPU)")
    p.set_defaults(handler=_run_asv_table)


def _run_asv_table(args: argparse.Namespace) -> int:
    from vaebench.asv_results import format_table, load_asv_results

    table = load_asv_results(args.results_dir)
    if not args.include_skipped:
        table = table[table["status"] != "skipped"]
    if args.benchmark is not None:
        table = table[table["benchmark"].str.contains(args.benchmark, regex=False)]
    if table.empty:
        raise VaebenchError(f"no asv results in {args.results_dir} match the selection")
    print(format_table(table, args.format), end="" if args.format == "csv" else "\n")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_evaluate, _add_compare, _add_table, _add_report, _add_asv_table]
"""Each adds one sub-command; its parser sets ``handler(args) -> exit status``."""


def build_parser() -> argparse.ArgumentParser:
    from vaebench import __version__

    parser = _Parser(prog="vaebench", description="How good is my VAE inference, really?")
    parser.add_argument("--version", action="version", version=f"vaebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", choices=("jit", "inductor", "eager"), default=None,
                   help="how HMC, AIS and BDMC compute the latent log-density's gradient: jit (default, "
                        "$VAEBENCH_COMPILE), inductor (fused kernels, 15-25%% faster after 4-12 s of compilation per "
                        "batch shape; needs a C++ compiler) or eager (the Pyro trace); recorded in the provenance")


@contextlib.contextmanager
def _compile_backend(name: str | None):
    """Set ``$VAEBENCH_COMPILE`` (read by the latent density, inherited by local workers) for one command."""
    if name is None:
        from vaebench.inference.latent_density import default_backend

        default_backend()                      # a bad $VAEBENCH_COMPILE fails now, not after the training
        yield
        return
    from vaebench.inference.latent_density import default_backend

    old = os.environ.get("VAEBENCH_COMPILE")
    os.environ["VAEBENCH_COMPILE"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VAEBENCH_COMPILE", None)
        else:
            os.environ["VAEBENCH_COMPILE"] = old


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaebench`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _terminating_signals_interrupt(), _compile_backend(getattr(args, "compile", None)):
            return args.handler(args)
    except VaebenchError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__      # always exactly one line
        print(f"vaebench: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"vaebench: {_interrupt_name(exc)}; no partial results were written", file=sys.stderr)
        return interrupt_status(exc)


if __name__ == "__main__":
    sys.exit(main())
