"""The ``vaebench`` command line: argument parsing only; the work is done by library functions.

Every user error (unknown name, out-of-range number, missing or corrupt file, NaNs, non-binary
data under a Bernoulli likelihood) is reported as one line ``vaebench: error: ...`` on stderr
with exit status 2; an interrupt exits with 130. Nothing partial is left on disk in either case.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from vaebench.config import ACTIVATIONS, DECODERS, LIKELIHOODS, METHODS, ModelConfig, TrainConfig
from vaebench.data import DATASETS
from vaebench.errors import VaebenchError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


# ---------------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="learn θ (and φ) with vi or iwae and write a run directory",
                       description="Train the model and write RUN_DIR (config.json, model.pt, log.jsonl).")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--epochs", type=_non_negative_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--k", type=_positive_int, default=None, help="importance samples for iwae (default 5)")
    p.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="latent dimension (default 50; 4 for linear-gaussian)")
    p.add_argument("--hidden", type=_hidden_sizes, default=(200, 200), help="decoder widths, e.g. 200,200")
    p.add_argument("--encoder-hidden", type=_hidden_sizes, default=None, help="encoder widths (default: --hidden)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="tanh")
    p.add_argument("--decoder", choices=DECODERS, default=None,
                   help="mlp or linear (default mlp; linear for linear-gaussian)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="default: bernoulli for image data, gaussian for real-valued data")
    p.add_argument("--gaussian-scale", type=_positive_float, default=None,
                   help="fixed observation std for the Gaussian likelihood (default: learned per dimension)")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "burda"), default="constant")
    p.add_argument("--vi-objective", choices=("trace", "meanfield"), default="trace",
                   help="Trace_ELBO, or TraceMeanField_ELBO (analytic KL)")
    p.add_argument("--dreg", action="store_true", help="doubly-reparameterised encoder gradients (iwae)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--data-dir", default=None, help="directory of IDX files (mnist, fashion-mnist)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from vaebench.data import load_dataset
    from vaebench.model import VAE
    from vaebench.provenance import provenance, resolve_device
    from vaebench.rundir import check_destination, staged_directory, write_run
    from vaebench.training import train

    if args.method == "vi" and args.k not in (None, 1):
        raise VaebenchError("--k applies to --method iwae (vi uses the single-sample ELBO)")
    check_destination(args.out, args.overwrite)
    dataset = load_dataset(args.dataset, args.data_dir)
    real_valued = dataset.kind == "real"
    model_config = ModelConfig(
        data_dim=dataset.data_dim,
        latent_dim=args.latent_dim or (dataset.metadata.get("latent_dim", 4) if real_valued else 50),
        hidden=args.hidden, activation=args.activation,
        decoder=args.decoder or ("linear" if args.dataset == "linear-gaussian" else "mlp"),
        likelihood=args.likelihood or ("gaussian" if real_valued else "bernoulli"),
        gaussian_scale=args.gaussian_scale, encoder_hidden=args.encoder_hidden)
    train_config = TrainConfig(
        method=args.method, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
        k=args.k or (5 if args.method == "iwae" else 1), lr=args.lr, seed=args.seed,
        vi_objective=args.vi_objective, dreg=args.dreg, lr_schedule=args.lr_schedule,
        data_dir=args.data_dir, dtype=args.dtype, device=args.device)
    device = resolve_device(train_config.device)
    with staged_directory(args.out, args.overwrite) as staging:
        result = train(VAE(model_config), dataset, train_config, progress=not args.quiet)
        last = result.history[-1] if result.history else {}
        summary = {"seconds": result.seconds, "gradient_evaluations": result.gradient_evaluations,
                   **{key: last[key] for key in ("train_bound", "test_elbo", "test_elbo_stderr") if key in last}}
        write_run(staging, result.model, train_config, dataset.metadata, provenance(device), result.history,
                  summary)
    elbo_text = (f", test ELBO {summary['test_elbo']:.3f} ± {summary['test_elbo_stderr']:.3f} nats"
                 if "test_elbo" in summary else "")
    print(f"wrote {args.out}: {args.method} on {args.dataset}, {args.epochs} epochs{elbo_text}, "
          f"{result.seconds:.1f} s")
    return 0


# ------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from vaebench.evaluation import ESTIMATORS

    p = sub.add_parser("evaluate", help="score a run directory with a log-likelihood estimator",
                       description="Estimate the test log-likelihood (nats per datapoint) of a trained run.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--estimator", required=True, choices=tuple(ESTIMATORS))
    p.add_argument("--k", type=_positive_int, default=None,
                   help="samples per datapoint (elbo default 1, iwae default 5000)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=100, help="datapoints per batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from vaebench.evaluation import EstimatorSettings, evaluate_run

    result = evaluate_run(args.run_dir, args.estimator, args.split,
                          EstimatorSettings(k=args.k, batch_size=args.batch_size), args.seed, args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    k = f" K={result['k']}" if result["k"] is not None else ""
    ess = f", ESS mean {result['ess_mean']:.1f}" if "ess_mean" in result else ""
    units = f", {result['active_units']} active units" if "active_units" in result else ""
    print(f"{result['estimator']}{k} on {result['dataset']}/{result['split']} (n={result['n']}): "
          f"log p(x) ≈ {result['log_likelihood']:.3f} ± {result['stderr']:.3f} nats{ess}{units}, "
          f"{result['seconds']:.1f} s")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate]
"""Each adds one sub-command; its parser sets ``handler(args) -> exit status``."""


def build_parser() -> argparse.ArgumentParser:
    from vaebench import __version__

    parser = _Parser(prog="vaebench", description="How good is my VAE inference, really?")
    parser.add_argument("--version", action="version", version=f"vaebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaebench`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except VaebenchError as exc:
        print(f"vaebench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vaebench: interrupted; no partial results were written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
