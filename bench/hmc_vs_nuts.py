"""Batched HMC against Pyro's NUTS: effective samples per second for posterior sampling.

Samples p_θ(z_i | x_i) for ``--n`` test datapoints of a 784-200-200-50 Bernoulli decoder (trained
briefly with VI on ``mnist-5k`` by this script, or loaded with ``--run-dir``) on the CPU, two ways,
in the same process:

* vaebench's batched HMC (:func:`vaebench.inference.hmc.sample_posterior`): all datapoints (and
  ``--chains`` chains each) advanced together, per-chain step size and diagonal mass matrix;
* Pyro's ``NUTS(jit_compile=True)`` run one datapoint at a time, as a user of Pyro would.

Figure of merit: effective samples per second summed over datapoints, where a datapoint's ESS is
the mean over its 50 latent dimensions of ``pyro.ops.stats.effective_sample_size`` (over its
chains), and the time includes warm-up and compilation (the latent density's for batched HMC, the
TorchScript compilation each new datapoint needs for NUTS) but not the ESS computation. Running NUTS on all ``--n`` datapoints would take long, so it runs on
``--nuts-datapoints`` of them and the sequential cost for ``--n`` is extrapolated linearly:
NUTS ESS/s summed over n datapoints = (Σ_k ESS_k) / (Σ_k seconds_k) for the k it ran (both sums
scale by n/k). The script prints that it extrapolated.

This is a benchmark script, not a test: run it by hand, e.g. ::

    python bench/hmc_vs_nuts.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size

from vaebench.config import HMCConfig, ModelConfig, TrainConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.inference import hmc
from vaebench.model import VAE
from vaebench.rundir import load_run
from vaebench.training import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="test datapoints sampled by batched HMC")
    p.add_argument("--nuts-datapoints", type=int, default=3, help="datapoints NUTS runs on (then extrapolated)")
    p.add_argument("--warmup", type=int, default=500, help="warm-up iterations, both samplers")
    p.add_argument("--samples", type=int, default=500, help="kept iterations, both samplers")
    p.add_argument("--leapfrog", type=int, default=10, help="batched HMC leapfrog steps per iteration")
    p.add_argument("--chains", type=int, default=1, help="batched HMC chains per datapoint")
    p.add_argument("--target-accept", type=float, default=0.8,
                   help="batched HMC's dual-averaging acceptance target (NUTS keeps Pyro's 0.8)")
    p.add_argument("--jitter", type=float, default=HMCConfig.step_size_jitter, help="batched HMC step-size jitter")
    p.add_argument("--run-dir", default=None, help="use this run's decoder (must be 784-200-200-50)")
    p.add_argument("--train-epochs", type=int, default=10, help="VI epochs on mnist-5k when no --run-dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", choices=("jit", "inductor", "eager"), default=None,
                   help="batched HMC's latent-density backend (default: $VAEBENCH_COMPILE, else jit)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[VAE, torch.Tensor, str]:
    """The decoder and the first ``n`` binarised test images."""
    if args.run_dir:
        model, train_config, _ = load_run(args.run_dir)
        dataset = load_dataset(train_config.dataset, train_config.data_dir)
        source = f"run {args.run_dir}"
    else:
        dataset = load_dataset("mnist-5k")
        pyro.set_rng_seed(args.seed)
        model = VAE(ModelConfig(data_dim=784, latent_dim=50, hidden=(200, 200)))
        config = TrainConfig(method="vi", dataset="mnist-5k", epochs=args.train_epochs, seed=args.seed)
        result = train(model, dataset, config, progress=False)
        model = result.model
        source = (f"VI on mnist-5k, {args.train_epochs} epochs (test ELBO "
                  f"{result.history[-1]['test_elbo']:.1f} nats)" if result.history else "untrained")
    cfg = model.config
    if (cfg.data_dim, cfg.latent_dim, tuple(cfg.hidden)) != (784, 50, (200, 200)):
        sys.exit(f"hmc_vs_nuts: the decoder must be 784-200-200-50, got {cfg.data_dim}-{cfg.hidden}-{cfg.latent_dim}")
    model = model.float().eval()
    model.requires_grad_(False)            # decoder weights are constants for both samplers (and TorchScript)
    x = evaluation_data(dataset, "test", model.likelihood)[: args.n].float()
    return model, x, source


def run_batched_hmc(model: VAE, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    config = HMCConfig(num_warmup=args.warmup, num_samples=args.samples, num_leapfrog=args.leapfrog,
                       chains=args.chains, step_size_jitter=args.jitter,
                       target_accept=args.target_accept)
    generator = torch.Generator().manual_seed(args.seed)
    result = hmc.sample_posterior(model, x, config, generator)
    seconds = result.diagnostics.seconds        # sampling, warm-up and compilation; not the ESS computation
    ess = result.diagnostics.ess.mean(-1)                 # [n]: mean over latent dims of ESS over chains
    summary = result.diagnostics.summary()
    return {"seconds": seconds, "ess_total": float(ess.sum()), "ess_per_datapoint": float(ess.mean()),
            "ess_per_iteration": float(ess.mean()) / (args.samples * args.chains),
            "grads_per_datapoint": result.diagnostics.gradient_evaluations * args.chains,
            "acceptance": summary["acceptance_rate"], "step_size": summary["step_size_mean"],
            "divergences": summary["divergences"], "rhat_max": summary.get("rhat_max", math.nan)}


def run_nuts(model: VAE, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    seconds, ess = [], []
    for i in range(args.nuts_datapoints):
        pyro.set_rng_seed(args.seed + i)
        kernel = NUTS(model.generative.model, jit_compile=True, ignore_jit_warnings=True, target_accept_prob=0.8)
        mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup, disable_progbar=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mcmc.run(x[i:i + 1])
        seconds.append(time.perf_counter() - start)
        z = mcmc.get_samples()["z"][:, 0]                                     # [S, D]
        ess.append(float(effective_sample_size(z.unsqueeze(0).double(), chain_dim=0, sample_dim=1).mean()))
    k = args.nuts_datapoints
    return {"seconds_per_datapoint": sum(seconds) / k, "ess_per_datapoint": sum(ess) / k,
            "ess_per_second": sum(ess) / sum(seconds), "ess_per_iteration": sum(ess) / k / args.samples,
            "seconds": seconds, "ess": ess}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compile:
        import os
        os.environ["VAEBENCH_COMPILE"] = args.compile
    from vaebench.inference.latent_density import default_backend
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    model, x, source = build_model(args)
    print(f"command: {command}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), pyro {pyro.__version__}")
    print(f"model: 784-200-200-50 Bernoulli decoder, {source}; data: first {x.shape[0]} binarised test images")
    print(f"both samplers: {args.warmup} warm-up + {args.samples} kept iterations, target acceptance "
          f"{args.target_accept} (batched HMC) / 0.8 (NUTS), "
          "diagonal mass matrix adapted in warm-up; time includes warm-up")

    ours = run_batched_hmc(model, x, args)
    ours_rate = ours["ess_total"] / ours["seconds"]
    print(f"\nbatched HMC ({x.shape[0]} datapoints at once, {args.chains} chain(s) each, L={args.leapfrog}, "
          f"jitter {args.jitter}, latent density: {default_backend()}):")
    print(f"  {ours['seconds']:.1f} s total; ESS per datapoint {ours['ess_per_datapoint']:.1f} "
          f"(ESS/iteration {ours['ess_per_iteration']:.3f}); acceptance {ours['acceptance']:.3f}, "
          f"divergences {ours['divergences']}, max split R-hat {ours['rhat_max']:.3f}, "
          f"{ours['grads_per_datapoint']} gradient evaluations per datapoint")
    print(f"  effective samples per second, summed over datapoints: {ours_rate:.1f}")

    nuts = run_nuts(model, x, args)
    k = args.nuts_datapoints
    print(f"\nPyro NUTS (jit_compile=True), one datapoint at a time, run on {k} datapoint(s):")
    for i, (s, e) in enumerate(zip(nuts["seconds"], nuts["ess"])):
        print(f"  datapoint {i}: {s:.1f} s (incl. TorchScript compilation), ESS {e:.1f}")
    print(f"  ESS per datapoint {nuts['ess_per_datapoint']:.1f} (ESS/iteration {nuts['ess_per_iteration']:.3f}); "
          f"{nuts['seconds_per_datapoint']:.1f} s per datapoint")
    print(f"  EXTRAPOLATED to {x.shape[0]} datapoints run one after another: "
          f"{nuts['seconds_per_datapoint'] * x.shape[0]:.0f} s; effective samples per second, summed over "
          f"datapoints: {nuts['ess_per_second']:.2f} (= Σ ESS / Σ seconds over the {k} datapoints run)")

    print(f"\nratio (batched HMC / NUTS, effective samples per second): {ours_rate / nuts['ess_per_second']:.1f}x "
          f"(target >= 100x)")


if __name__ == "__main__":
    main()
