"""Time ∇_u log p_θ(x, u) from the Pyro model against the hand-written gradient, and the FLOP rate.

Usage::

    python bench/latent_gradient.py                       # n = 100, 1600, 6400 rows on CPU, one thread
    python bench/latent_gradient.py --variants traced compiled func-grad make-fx
    python bench/latent_gradient.py --device cuda --rows 100 1000 10000

One process. For each row count n the 784-200-200-50 Bernoulli decoder's latent gradient is
computed the ways named by ``--variants`` (``bench/common.py``: ``GRADIENT_VARIANTS``) and by
``bench/reference.py::ReferenceLatentGradient`` -- ``hand-written`` (the log joint written directly
in PyTorch, one autograd pass: the yardstick) and ``analytic`` (the gradient's formula, three
matrix products forward and three back, no autograd: the floor) -- timed in interleaved blocks.
``six-matmuls`` times the gradient's six matrix products alone: the ceiling of any
implementation's FLOP rate. Printed are seconds per call, the median paired ratio to ``hand-written`` (target ≤ 1.10 for
``compiled``) and to ``analytic``, the GFLOP/s of the six matrix products, and that rate as a
fraction of a plain ``[n, 200] × [200, 784]`` matmul timed in the same blocks (target ≥ 0.70 at
n ≥ 1600). Timed GPU code synchronises; fp32 with TF32 off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (GRADIENT_VARIANTS, STEP_MODEL, apply_script_options, binary_batch, gradient_flops, gradient_model,  # noqa: E402
                          latent_gradient, median_ratio, paired_blocks, torch_device)
from bench.reference import ReferenceLatentGradient  # noqa: E402

RATIO_TARGET = 1.10
MATMUL_FRACTION_TARGET = 0.70


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[100, 1600, 6400],
                        help="rows n (chains × datapoints) per gradient evaluation")
    parser.add_argument("--variants", nargs="+", default=["traced", "compiled", "compiled-components"],
                        choices=GRADIENT_VARIANTS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant")
    parser.add_argument("--block-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: VAEBENCH_BENCH_THREADS, else 1)")
    parser.add_argument("--ais", nargs="*", type=int, default=[], metavar="N",
                        help="also run AIS (T=50, L=5, 4 chains) on N datapoints at once and print its gradient "
                             "evaluations (chain-rows) per second with the jit, inductor and eager (traced) backends")
    parser.add_argument("--json", action="store_true", help="one JSON object per row count")
    args = parser.parse_args(argv)
    import torch

    apply_script_options(parser, args, "latent_gradient.py")
    device = torch_device(args.device)
    model = gradient_model(device)
    hand_written, analytic = ReferenceLatentGradient(model), ReferenceLatentGradient(model, analytic=True)
    hidden, data_dim = STEP_MODEL.hidden[-1], STEP_MODEL.data_dim
    if not args.json:
        print(f"command: python bench/latent_gradient.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        print(f"784-200-200-50 Bernoulli decoder, {args.device}, {torch.get_num_threads()} thread(s), torch "
              f"{torch.__version__}, float32; ratio = variant / hand-written gradient (target <= {RATIO_TARGET} "
              f"for compiled), floor = variant / analytic gradient, matmul = [n,{hidden}]x[{hidden},{data_dim}] in the same blocks")
    for n in args.rows:
        x = binary_batch(n, data_dim, device)
        u = torch.randn(n, STEP_MODEL.latent_dim, generator=torch.Generator().manual_seed(n)).to(device)
        a = torch.randn(n, hidden, device=device)
        b = torch.randn(hidden, data_dim, device=device)
        calls = {"hand-written": lambda: hand_written(x, u), "analytic": lambda: analytic(x, u),
                 "matmul": lambda: torch.mm(a, b), "six-matmuls": six_matmuls(model, n, device)}
        calls.update({variant: (lambda fn=latent_gradient(variant, model, x): fn(u)) for variant in args.variants})
        seconds = paired_blocks(calls, device, args.repeats, args.block_seconds)
        flops = gradient_flops(STEP_MODEL, n)
        matmul_rate = 2 * n * hidden * data_dim / min(seconds["matmul"])
        rows = {}
        for name in ["six-matmuls", "hand-written", "analytic", *args.variants]:
            best = min(seconds[name])
            rows[name] = {"seconds": best, "ratio": median_ratio(seconds[name], seconds["hand-written"]),
                          "floor_ratio": median_ratio(seconds[name], seconds["analytic"]),
                          "gflops": flops / best / 1e9, "matmul_fraction": flops / best / matmul_rate}
        if args.json:
            print(json.dumps({"rows": n, "device": args.device, "threads": torch.get_num_threads(),
                              "matmul_gflops": matmul_rate / 1e9, "variants": rows}))
            continue
        print(f"\nn = {n}: matmul {matmul_rate / 1e9:.1f} GFLOP/s")
        for name, row in rows.items():
            print(f"  {name:20s} {row['seconds'] * 1e3:9.3f} ms  ratio {row['ratio']:.3f}  floor {row['floor_ratio']:.3f}  "
                  f"{row['gflops']:6.1f} GFLOP/s  {row['matmul_fraction']:.2f} of matmul")
    for n in args.ais:
        rates = ais_throughput(model, n, device)
        if args.json:
            print(json.dumps({"ais_datapoints": n, "device": args.device, "gradient_evaluations_per_second": rates}))
        else:
            print(f"\nAIS on {n} datapoints (T=50, L=5, 4 weighted + 2 tuning chains per datapoint): gradient evaluations per second "
                  + ", ".join(f"{path} {rate:,.0f}" for path, rate in rates.items())
                  + f"; jit / traced {rates['jit'] / rates['traced']:.2f}, inductor / traced "
                  f"{rates['inductor'] / rates['traced']:.2f}")
    return 0


def six_matmuls(model, n: int, device):
    """``() -> None``: only the gradient's six matrix products (three forward, three back) at ``n`` rows.

    No element-wise work at all: the ceiling of the FLOP rate any implementation of the gradient
    can reach, timed beside it.
    """
    import torch

    weights = [layer.weight.detach() for layer in model.decoder.net if isinstance(layer, torch.nn.Linear)]
    inputs = [torch.randn(n, w.shape[1], device=device) for w in weights]
    grads = [torch.randn(n, w.shape[0], device=device) for w in weights]

    def run() -> None:
        for w, h, g in zip(weights, inputs, grads):
            torch.mm(h, w.t())
            torch.mm(g, w)
    return run


class _Target:
    """A model whose AIS target uses the latent-density ``backend`` (``eager``: the Pyro trace)."""

    def __init__(self, model, backend: str) -> None:
        self.model, self.latent_dim, self.backend = model, model.latent_dim, backend

    def latent_density(self, x):
        return self.model.latent_density(x, backend=self.backend)

    def components(self, x):
        return self.latent_density(x).components

    def sample_prior(self, x, num, generator=None):
        return self.model.sample_prior(x, num, generator)

    def simulate(self, n, generator=None):
        return self.model.simulate(n, generator)


def ais_throughput(model, n: int, device) -> dict[str, float]:
    """Chain-row gradient evaluations per second of one AIS run on ``n`` datapoints, per backend."""
    import time

    import torch

    from bench.common import synchronize
    from vaebench.config import AISConfig
    from vaebench.inference.ais import ais

    config = AISConfig(steps=50, leapfrog=5, chains=4)
    x = binary_batch(n, STEP_MODEL.data_dim, device)
    rates = {}
    for path, backend in (("jit", "jit"), ("inductor", "inductor"), ("traced", "eager")):
        target = _Target(model, backend)
        ais(target, x, AISConfig(steps=2, leapfrog=1, chains=4), torch.Generator(device=device).manual_seed(0),
            batch_size=n)                                    # compile and warm up
        synchronize(device)
        start = time.perf_counter()
        result = ais(target, x, config, torch.Generator(device=device).manual_seed(0), batch_size=n)
        synchronize(device)
        rows = (config.chains + config.tuning_chains) * n
        rates[path] = rows * result.gradient_evaluations / (time.perf_counter() - start)
    return rates


if __name__ == "__main__":
    sys.exit(main())
