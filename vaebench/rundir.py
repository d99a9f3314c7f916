"""Run directories: config (JSON), weights, per-epoch log; written atomically, loaded safely.

A run directory holds

``config.json``
    ``{"model": ModelConfig, "train": TrainConfig, "dataset": metadata, "provenance": ...,
    "summary": ...}`` -- everything needed to rebuild and rerun the model.
``model.pt``
    The :class:`~vaebench.model.VAE` ``state_dict`` (loaded with ``weights_only=True``).
``log.jsonl``
    One JSON object per epoch.

The directory is assembled under a hidden staging name beside its destination and renamed into
place only when complete, so an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from vaebench.config import ModelConfig, TrainConfig
from vaebench.errors import ConfigError, RunDirError
from vaebench.model import VAE
from vaebench.models.loading import check_same_model

CONFIG_FILE, WEIGHTS_FILE, LOG_FILE = "config.json", "model.pt", "log.jsonl"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_destination(out: str | os.PathLike, overwrite: bool) -> Path:
    """Validate that ``out`` may be written (before any work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"run directory {out} already exists and is not empty; choose another --out "
                          "or pass --overwrite")
    if out.parent.exists() and not out.parent.is_dir():
        raise RunDirError(f"{out.parent} is not a directory")
    return out


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` on success and vanishes on any failure."""
    out = check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "run")
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def write_run(directory: Path, model: VAE, train_config: TrainConfig, dataset_metadata: dict[str, Any],
              provenance: dict[str, Any], history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the three files of a run directory into ``directory``."""
    config = {"model": model.config.to_dict(), "train": train_config.to_dict(),
              "dataset": dataset_metadata, "provenance": provenance, "summary": summary}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / LOG_FILE, "".join(json.dumps(row) + "\n" for row in history))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"corrupt {path}: {exc}") from None
    if not isinstance(config, dict) or not {"model", "train"} <= set(config):
        raise RunDirError(f"corrupt {path}: expected keys 'model' and 'train'")
    return config


def load_run(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None, model_spec: str | None = None
             ) -> tuple[VAE, TrainConfig, dict[str, Any]]:
    """Rebuild the model of a run directory with its trained weights.

    A run of a user model (``--model file.py:factory``) is rebuilt only when ``model_spec`` names
    the same SPEC again and its file's SHA-256 is the recorded one: a run directory alone never
    makes vaebench import code (:func:`vaebench.models.loading.check_same_model`).

    Returns
    -------
    model, train_config, config
        The model (in eval mode, on ``device``; in the run's dtype unless ``dtype`` is given), the
        training configuration, and the whole parsed ``config.json``.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        model_config = ModelConfig.from_dict(config["model"])
        train_config = TrainConfig.from_dict(config["train"])
    except (ConfigError, TypeError) as exc:
        raise RunDirError(f"corrupt {run_dir / CONFIG_FILE}: {exc}") from None
    check_same_model(model_config.model, model_config.model_sha256, model_spec, str(run_dir))
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir} is incomplete: {WEIGHTS_FILE} is missing")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise RunDirError(f"cannot load {weights}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    model = VAE(model_config)
    if isinstance(state, dict) and any(k.startswith("decoder.") for k in state) \
            and not any(k.startswith("generative.") for k in state):      # written before the model contract
        state = {("generative." + k if k.startswith("decoder.") else k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise RunDirError(f"{weights} does not match the model in {CONFIG_FILE}: "
                          f"{str(exc).splitlines()[0]}") from None
    from vaebench.provenance import resolve_dtype
    model = model.to(device=device, dtype=dtype or resolve_dtype(train_config.dtype)).eval()
    return model, train_config, config
