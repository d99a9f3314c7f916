"""Time each training step built from the Pyro model against the hand-written PyTorch step.

Usage::

    python bench/step_ratio.py                     # vi, iwae-5, iwae-50 at batch 100 on CPU
    python bench/step_ratio.py --batch 1000 --device cuda --methods vi iwae-50

One process; each method's step and the reference (``bench/reference.py``: same network, same
objective, same Adam) are timed in interleaved blocks, and the median paired ratio is printed
with the ratio of the fastest blocks. The target is a ratio of at most 1.10 on CPU at batch 100.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import STEP_MODEL, apply_script_options, measure_step_ratio  # noqa: E402
from vaebench.config import ModelConfig  # noqa: E402

TARGET = 1.10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["vi", "iwae-5", "iwae-50"],
                        choices=["vi", "iwae-5", "iwae-50"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per method")
    parser.add_argument("--block-seconds", type=float, default=0.2, help="approximate length of one block")
    parser.add_argument("--data-dim", type=int, default=STEP_MODEL.data_dim,
                        help="pixels (784: MNIST-sized; 64: the digits data set)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: VAEBENCH_BENCH_THREADS, else 1)")
    parser.add_argument("--pyro-elbo", action="store_true",
                        help="also time Pyro's eager Trace_ELBO/RenyiELBO loss_and_grads step "
                             "(the path before the compiled trace)")
    parser.add_argument("--json", action="store_true", help="one JSON object per method")
    args = parser.parse_args(argv)
    import torch

    apply_script_options(parser, args, "step_ratio.py")
    model_config = ModelConfig(**{**STEP_MODEL.to_dict(), "data_dim": args.data_dim})
    arch = "-".join(map(str, (model_config.data_dim, *model_config.hidden, model_config.latent_dim)))
    if not args.json:
        print(f"{arch} network, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; ratio = vaebench step / hand-written PyTorch step (target <= {TARGET})")
    runs = [(method, False) for method in args.methods]
    if args.pyro_elbo:
        runs += [(method, True) for method in args.methods]
    for method, pyro_elbo in runs:
        result = measure_step_ratio(method, args.batch, args.device, args.repeats, args.block_seconds,
                                    model_config=model_config, pyro_elbo=pyro_elbo)
        label = f"{method} (Pyro ELBO, eager)" if pyro_elbo else method
        if args.json:
            print(json.dumps({"method": label, "batch": args.batch, "device": args.device, "network": arch,
                              "ratio": result.ratio, "ratio_of_minima": result.ratio_of_minima,
                              "seconds": min(result.seconds), "reference_seconds": min(result.reference_seconds)}))
        else:
            ours, reference = min(result.seconds) * 1e3, min(result.reference_seconds) * 1e3
            print(f"{label:26s} {ours:9.2f} ms  reference {reference:9.2f} ms  ratio {result.ratio:.3f} (median of {len(result.seconds)} paired blocks), "
                  f"{result.ratio_of_minima:.3f} (fastest blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
