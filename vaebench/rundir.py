"""Run directories: config (JSON), weights, per-epoch log; written atomically, loaded safely.

A run directory holds

``config.json``
    ``{"model": ModelConfig, "train": TrainConfig, "dataset": metadata, "provenance": ...,
    "summary": ...}`` -- everything needed to rebuild and rerun the model.
``model.pt``
    The :class:`~vaebench.model.LatentModel` ``state_dict`` (loaded with ``weights_only=True``).
``log.jsonl``
    One JSON object per epoch.

The directory is assembled under a hidden staging name beside its destination and renamed into
place only when complete, so an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from vaebench.config import ModelConfig, TrainConfig
from vaebench.errors import ConfigError, RunDirError
from vaebench.model import LatentModel
from vaebench.models.loading import check_same_model

CONFIG_FILE, WEIGHTS_FILE, LOG_FILE = "config.json", "model.pt", "log.jsonl"
STAGING_MARK, OLD_MARK = ".partial-", ".old-"
"""Hidden names beside a destination: ``.NAME.partial-PID-HOST-XXXX`` (being assembled) and
``.NAME.old-XXXX`` (the replaced directory, while it is swapped out). Nothing reads them as results."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _os_reason(exc: OSError) -> str:
    return exc.strerror or first_line(exc)


def umask() -> int:
    """The process's current umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """chmod ``path`` to what ``open``/``mkdir`` would have given it: 0666 (0777) minus the umask.

    ``mkstemp`` and ``mkdtemp`` create 0600/0700 entries; results are meant to be shared.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file, fsync, chmod to the umask's
    mode and ``os.replace`` it into place: the file is never seen half-written.

    Raises
    ------
    RunDirError
        When the file cannot be created or written (permissions, a full disk...), naming it.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {_os_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        share_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise RunDirError(f"cannot write {path}: {_os_reason(exc)}") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def check_destination(out: str | os.PathLike, overwrite: bool) -> Path:
    """Validate that ``out`` may be written (before any work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"run directory {out} already exists and is not empty; choose another --out "
                          "or pass --overwrite")
    for ancestor in out.parents:            # the nearest existing ancestor must be a writable directory
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise RunDirError(f"cannot create {out}: {ancestor} is not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise RunDirError(f"cannot create {out}: {ancestor} is not writable")
            break
    return out


_STAGING_NAME = re.compile(r"^\..+\.partial-(\d+)-(.*)-[A-Za-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True                         # another user's live process (or not a pid we can check)
    return True


def remove_stale_staging(parent: str | os.PathLike) -> list[Path]:
    """Delete staging folders in ``parent`` whose creating process (on this host) is gone.

    A SIGKILL (or a power cut) skips every cleanup, leaving ``.NAME.partial-PID-HOST-XXXX``; the
    next write into the same parent removes it. Folders of live processes, of other hosts, and
    anything not named by :func:`staged_directory` are left alone. Returns what was removed.
    """
    removed = []
    host = _host()
    with contextlib.suppress(OSError):
        for entry in Path(parent).iterdir():
            match = _STAGING_NAME.match(entry.name)
            if match is None or match.group(2) != host or not entry.is_dir() or entry.is_symlink():
                continue
            if not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _make_parents(directory: Path, out: Path) -> list[Path]:
    """``mkdir -p directory``; returns the folders it created (deepest last)."""
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise RunDirError(f"cannot create {out}: {_os_reason(exc)} ({exc.filename or directory})") from None
    return created


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` on success and vanishes on any failure.

    Parents of ``out`` are created as needed (and removed again, if still empty, on failure);
    stale staging folders of killed processes beside ``out`` are removed first. Any ``OSError``
    creating or swapping the folders is a :class:`RunDirError` that names ``out``.
    """
    out = check_destination(out, overwrite)
    created = _make_parents(out.parent, out)
    remove_stale_staging(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-{_host()}-",
                                        dir=out.parent))
        share_mode(staging, directory=True)
    except OSError as exc:
        _remove_empty(created)
        raise RunDirError(f"cannot create {out}: {_os_reason(exc)}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}", dir=out.parent))
            os.replace(out, old / "run")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunDirError(f"cannot move the finished results into {out}: {_os_reason(exc)}") from None


def write_run(directory: Path, model: LatentModel, train_config: TrainConfig, dataset_metadata: dict[str, Any],
              provenance: dict[str, Any], history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the three files of a run directory into ``directory``."""
    config = {"model": model.config.to_dict(), "train": train_config.to_dict(),
              "dataset": dataset_metadata, "provenance": provenance, "summary": summary}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / LOG_FILE, "".join(json.dumps(row) + "\n" for row in history))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(directory / WEIGHTS_FILE, state)


def _checkpoint_problem(weights: Path, exc: BaseException) -> str:
    """One line saying why ``torch.load`` could not read ``weights``."""
    try:
        size = weights.stat().st_size
    except OSError:
        size = None
    if size == 0:
        return f"checkpoint {weights} is empty (0 bytes); retrain the run or restore the file"
    if not zipfile.is_zipfile(weights) or isinstance(exc, (EOFError, OSError)) or "zip archive" in str(exc):
        return (f"checkpoint {weights} is truncated or corrupt ({size} bytes, not a complete PyTorch "
                f"checkpoint; torch.load: {type(exc).__name__}); retrain the run or restore the file")
    return (f"cannot load checkpoint {weights}: {type(exc).__name__}: "
            f"{first_line(exc).split('. ')[0].rstrip('.')}")


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
             ) -> tuple[LatentModel, TrainConfig, dict[str, Any]]:
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
        raise RunDirError(_checkpoint_problem(weights, exc)) from None
    model = LatentModel(model_config)
    if isinstance(state, dict) and any(k.startswith("decoder.") for k in state) \
            and not any(k.startswith("generative.") for k in state):      # written before the model contract
        state = {("generative." + k if k.startswith("decoder.") else k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise RunDirError(f"{weights} does not match the model in {CONFIG_FILE}: "
                          f"{first_line(exc)}") from None
    from vaebench.provenance import resolve_dtype
    model = model.to(device=device, dtype=dtype or resolve_dtype(train_config.dtype)).eval()
    return model, train_config, config
