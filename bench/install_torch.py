"""Install a PyTorch that fits this machine into asv's environment (asv.conf.json's first install step).

Run by asv with the environment's interpreter, before vaebench and its other dependencies:

* torch already importable in the environment: nothing to do (every later commit reuses it);
* a GPU machine (``nvidia-smi -L`` lists a GPU), or not Linux (PyPI's macOS and Windows wheels are
  CPU builds): nothing to do -- the next step, ``pip install vaebench``, takes PyPI's default torch
  (on Linux a CUDA build with the nvidia libraries, about 5 GB);
* a Linux machine without a GPU: install the newest CPU-only build (``torch==X+cpu``, about
  200 MB) that pip can see -- from https://download.pytorch.org/whl/cpu, or any index, mirror
  or ``--find-links`` directory in the pip configuration -- within vaebench's ``torch`` range.
  If none can be found it stops with a message rather than fall back to the CUDA build.

``VAEBENCH_TORCH=cpu`` or ``=cuda`` overrides the detection; ``--dry-run`` prints the decision and
the pip command without installing anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_RANGE = (2, 1), (3, 0)
"""vaebench's ``torch>=2.1,<3`` (pyproject.toml)."""


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible (``nvidia-smi -L`` lists one)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def flavour() -> str:
    """``cpu``, ``cuda`` or ``default`` (leave torch to pip)."""
    forced = os.environ.get("VAEBENCH_TORCH", "").strip().lower()
    if forced in ("cpu", "cuda"):
        return forced
    if forced:
        raise SystemExit(f"install_torch.py: VAEBENCH_TORCH must be cpu or cuda, got {forced!r}")
    if not sys.platform.startswith("linux"):
        return "default"
    return "cuda" if has_gpu() else "cpu"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def cpu_versions(listing: str) -> list[str]:
    """The ``X+cpu`` versions in ``pip index versions torch`` output within vaebench's range, newest first."""
    match = re.search(r"Available versions:\s*(.+)", listing)
    if match is None:
        return []
    found = [v.strip() for v in match.group(1).split(",")]
    low, high = TORCH_RANGE
    cpu = [v for v in found if re.fullmatch(r"\d+(\.\d+)*\+cpu", v) and low <= _release(v) < high]
    return sorted(cpu, key=_release, reverse=True)


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the decision, install nothing")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is not None and not args.dry_run:
        return 0
    kind = flavour()
    if kind != "cpu":
        print(f"install_torch.py: {kind} torch: left to `pip install vaebench`")
        return 0
    listing = subprocess.run(pip("index", "versions", "torch", "--extra-index-url", CPU_INDEX,
                                 "--retries", "1", "--timeout", "15"),
                             capture_output=True, text=True)
    versions = cpu_versions(listing.stdout)
    if not versions:
        raise SystemExit("install_torch.py: no CPU-only torch build (torch==X+cpu) was found on "
                         f"{CPU_INDEX} or in pip's configured indexes; without one pip would install the "
                         "CUDA build (about 5 GB). Make one reachable, or set VAEBENCH_TORCH=cuda to accept it.")
    for version in versions:                 # newest first; a pip constraint may rule out the newest
        command = pip("install", f"torch=={version}", "--extra-index-url", CPU_INDEX)
        print("install_torch.py: no GPU:", " ".join(command[2:]), flush=True)
        if args.dry_run:
            return 0
        if subprocess.run(command).returncode == 0:
            return 0
    raise SystemExit(f"install_torch.py: could not install any of torch=={', =='.join(versions)}")


if __name__ == "__main__":
    sys.exit(main())
