"""What every record carries so a number can be traced and regenerated: versions, commit, device."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from vaebench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``/``cuda:N`` (an error if none is present) or ``auto`` (CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The commit of the vaebench source tree, with ``+dirty`` for uncommitted changes, or ``unknown``.

    Dirty means the code that computes the numbers differs from the commit: the package itself
    and ``pyproject.toml``. Results, tests and documentation are not code of a run (regenerating the
    committed ``results/`` deletes tracked files, which must not mark its own records dirty); a
    user model's file is identified by its own SHA-256 in the run's config.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "vaebench",
                                "pyproject.toml"], cwd=root, capture_output=True, text=True, timeout=5,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"


def versions() -> dict[str, str]:
    import numpy
    import pyro

    from vaebench import __version__
    return {"vaebench": __version__, "torch": torch.__version__, "pyro": pyro.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def provenance(device: torch.device) -> dict[str, Any]:
    """Versions, git commit, device, command line and UTC time of this process."""
    from vaebench.inference.latent_density import default_backend

    return {"versions": versions(), "git_commit": git_commit(), "device": device_description(device),
            "latent_density_backend": default_backend(),
            "command": " ".join(sys.argv), "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
