"""Time one compare with ``--workers 1`` and with ``--workers N`` in one run; print the speed-up.

    python bench/compare_workers.py                    # the quick preset, 1 against 2 workers
    python bench/compare_workers.py --preset tiny      # a smoke test in seconds (its numbers mean nothing)

Each compare runs as ``vaebench compare`` in a fresh subprocess into a fresh temporary results
directory (deleted afterwards), so both start cold; the two runs' records are checked to hold
the same metrics (the result must not depend on the number of workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_compare(preset: str, workers: int, out: Path) -> float:
    argv = [sys.executable, "-m", "vaebench.cli", "compare", "--out", str(out), "--preset", preset,
            "--workers", str(workers), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--workers", type=int, default=2, help="the parallel run's workers (default 2)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from vaebench.results import comparable, read_records

    root = Path(tempfile.mkdtemp(prefix="vaebench-compare-workers-"))
    try:
        serial = timed_compare(args.preset, 1, root / "w1")
        parallel = timed_compare(args.preset, args.workers, root / f"w{args.workers}")
        same = ({r["key"]: comparable(r) for r in read_records(root / "w1")}
                == {r["key"]: comparable(r) for r in read_records(root / f"w{args.workers}")})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"preset {args.preset}: --workers 1 {serial:.1f} s, --workers {args.workers} {parallel:.1f} s, "
          f"speed-up {serial / parallel:.2f}x on {len(os.sched_getaffinity(0))} usable cores; "
          f"records identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
