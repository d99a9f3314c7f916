"""Running a plan: executors, the whole-compare lock, resume, progress.

The driver (:func:`run_compare`) builds the plan (:mod:`vaebench.compare.plan`), skips what is
done, and hands ready stages to an executor; it alone appends records to ``records.jsonl``.
An executor only maps "run this stage" over ready stages with its library's own futures:

``local``  ``concurrent.futures.ProcessPoolExecutor`` with N worker processes (``--workers 1``:
           in this process, one stage after another);
``dask``   ``distributed.Client.submit`` on an existing cluster (``--scheduler`` /
           ``--scheduler-file``) or a ``LocalCluster``; GPU stages ask for ``resources={"GPU": 1}``;
``slurm``  ``submitit.AutoExecutor``: each wave of ready stages is one job array (``map_array``);
           GPU stages ask for ``gpus_per_node``.

Nothing is retried here: a stage that fails (or whose worker dies) is reported, its dependents
are not started, and the next run of the same command reruns it. Done means: a complete run
directory of matching settings (``train``), a record and, for ``run``, readable per-datapoint
values (a ``run`` stage whose values are missing or corrupt is rerun; its record is not
appended twice). Staging folders (``.NAME.partial-*``) left by a killed worker are removed and
never read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vaebench.compare.plan import Stage, cost, plan, ready
from vaebench.compare.settings import AXES, CompareConfig, fixed_settings, union
from vaebench.compare.stages import RUNS_DIR, VALUES_DIR, Context, execute, load_values, model_configs
from vaebench.errors import ConfigError, RunDirError, VaebenchError
from vaebench.results import ResultsError, append_record, read_records, records_path
from vaebench.rundir import CONFIG_FILE, WEIGHTS_FILE, atomic_write_text, read_config

MANIFEST_FILE = "compare.json"
LOCK_FILE = ".compare.lock"
EXECUTORS = ("local", "dask", "slurm")


class CompareError(VaebenchError):
    """Some stages of a compare failed; the finished ones are kept."""


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # not on Linux
        return os.cpu_count() or 1


def one_line(exc: BaseException) -> str:
    """A one-line account of ``exc`` (the last line of a remote traceback, if that is what it holds)."""
    if isinstance(exc, VaebenchError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


# ----------------------------------------------------------------------------------- executors
class InProcess:
    """Stages one after another in this process (``--workers 1``)."""

    capacity = 1

    def submit(self, ctx: Context, stages: Sequence[Stage]) -> dict[Any, Stage]:
        handles = {}
        for stage in stages:
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(execute(ctx, stage))
            except Exception as exc:                  # KeyboardInterrupt propagates
                future.set_exception(exc)
            handles[future] = stage
        return handles

    def wait(self, handles: Iterable[Any]) -> list[Any]:
        return list(handles)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def close(self) -> None:
        pass


class LocalPool(InProcess):
    """``concurrent.futures.ProcessPoolExecutor`` with ``workers`` processes (spawned: no forked torch state)."""

    def __init__(self, workers: int) -> None:
        self.capacity = workers
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers,
                                                           mp_context=multiprocessing.get_context("spawn"))

    def submit(self, ctx: Context, stages: Sequence[Stage]) -> dict[Any, Stage]:
        return {self.pool.submit(execute, ctx, stage): stage for stage in stages}

    def wait(self, handles: Iterable[Any]) -> list[Any]:
        done, _ = concurrent.futures.wait(list(handles), return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(InProcess):
    """Every stage a task on a ``distributed`` cluster (``client``, an address, a scheduler file or a LocalCluster)."""

    capacity = math.inf

    def __init__(self, scheduler: str | None = None, scheduler_file: str | None = None, workers: int | None = None,
                 client: Any = None) -> None:
        import distributed

        self._distributed = distributed
        self._own_cluster = None
        if client is not None:
            self.client = client
        elif scheduler_file is not None:
            self.client = distributed.Client(scheduler_file=scheduler_file)
        elif scheduler is not None:
            self.client = distributed.Client(scheduler)
        else:
            self._own_cluster = distributed.LocalCluster(n_workers=workers or usable_cores(), threads_per_worker=1,
                                                         processes=True, dashboard_address=None)
            self.client = distributed.Client(self._own_cluster)
        self._own_client = client is None

    def submit(self, ctx: Context, stages: Sequence[Stage]) -> dict[Any, Stage]:
        gpu = ctx.cfg.device.startswith("cuda")
        return {self.client.submit(execute, ctx, stage, key=f"vaebench-{stage.key}-{uuid.uuid4().hex[:8]}",
                                   pure=False, resources={"GPU": 1} if gpu else None): stage
                for stage in stages}

    def wait(self, handles: Iterable[Any]) -> list[Any]:
        return list(self._distributed.wait(list(handles), return_when="FIRST_COMPLETED").done)

    def close(self) -> None:
        if self._own_client:
            self.client.close()
        if self._own_cluster is not None:
            self._own_cluster.close()


def parse_slurm_time(text: str | int | None) -> int:
    """``--slurm-time``: minutes (``90``) or ``H:MM`` / ``H:MM:SS`` / ``D-H:MM:SS`` -> minutes (default 1 day)."""
    if text is None:
        return 24 * 60
    value = str(text).strip()
    try:
        days = 0
        if "-" in value:
            d, value = value.split("-", 1)
            days = int(d)
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 1 and days == 0:
            minutes = parts[0]
        else:
            parts += [0] * (3 - len(parts))
            minutes = days * 1440 + parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)
    except ValueError:
        raise ConfigError(f"--slurm-time must be minutes or H:MM:SS, got {text!r}") from None
    if minutes < 1:
        raise ConfigError(f"--slurm-time must be at least one minute, got {text!r}")
    return minutes


class SlurmExecutor(InProcess):
    """Every stage a submitit job; each wave of ready stages one job array (``map_array``)."""

    capacity = math.inf

    def __init__(self, folder: Path, partition: str | None = None, time_limit: str | None = None,
                 gpus_per_job: int | None = None, cluster: str | None = None, threads: int = 1,
                 device: str = "cpu") -> None:
        import submitit

        self._submitit = submitit
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": parse_slurm_time(time_limit), "cpus_per_task": threads,
                                  "name": "vaebench-compare"}
        if partition is not None:
            params["slurm_partition"] = partition
        if gpus_per_job is None and device.startswith("cuda"):
            gpus_per_job = 1
        if gpus_per_job:
            params["gpus_per_node"] = gpus_per_job
        self.executor.update_parameters(**params)
        self.poll = 0.2 if self.executor.cluster in ("local", "debug") else 5.0

    def submit(self, ctx: Context, stages: Sequence[Stage]) -> dict[Any, Stage]:
        jobs = self.executor.map_array(execute, [ctx] * len(stages), list(stages))
        return dict(zip(jobs, stages))

    def wait(self, handles: Iterable[Any]) -> list[Any]:
        jobs = list(handles)
        first = next(self._submitit.helpers.as_completed(jobs, poll_frequency=self.poll))
        return [first] + [job for job in jobs if job is not first and job.done()]

    def result(self, handle: Any) -> Any:
        return handle.result()


def make_executor(name: str, results_dir: Path, cfg: CompareConfig, workers: int | None = None,
                  **options: Any) -> InProcess:
    """The executor ``name`` of :data:`EXECUTORS` (``options``: scheduler, scheduler_file, slurm_*)."""
    if name == "local":
        n = workers or usable_cores()
        return InProcess() if n == 1 else LocalPool(n)
    if name == "dask":
        return DaskExecutor(options.get("scheduler"), options.get("scheduler_file"), workers)
    if name == "slurm":
        return SlurmExecutor(results_dir / ".submitit", options.get("slurm_partition"), options.get("slurm_time"),
                             options.get("slurm_gpus_per_job"), options.get("slurm_cluster"), cfg.threads or 1,
                             cfg.device)
    raise ConfigError(f"unknown --executor {name!r}; choose from {', '.join(EXECUTORS)}")


# ----------------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CompareLock:
    """``RESULTS_DIR/.compare.lock``: pid, host and start time of the one driver of a results directory."""

    def __init__(self, results_dir: Path) -> None:
        self.path = results_dir / LOCK_FILE
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def holder(self) -> dict[str, Any] | None:
        for _ in range(20):                       # a lock being written is complete within moments
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.05)
        return {"pid": -1, "host": "?", "started": "?"}

    def acquire(self) -> None:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                pid, host = holder.get("pid"), holder.get("host")
                if host == self.mine["host"] and isinstance(pid, int) and pid > 0 and not _alive(pid):
                    with contextlib.suppress(FileNotFoundError):     # stale: its driver is dead; take it over
                        os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
                        os.unlink(self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
                    continue
                raise ResultsError(
                    f"{self.path.parent} is in use by another compare (pid {pid} on {host}, started "
                    f"{holder.get('started')}); wait for it to finish, or delete {self.path} if that process is gone")
            except OSError as exc:
                raise ResultsError(f"cannot write to results directory {self.path.parent}: "
                                   f"{exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self.mine) + "\n")
            return
        raise ResultsError(f"could not take the lock {self.path}; try again")

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()) == self.mine:
                os.unlink(self.path)


# ----------------------------------------------------------------------------------- the directory
def _differences(stored: Mapping[str, Any], mine: Mapping[str, Any], prefix: str = "") -> str:
    parts = []
    for key in sorted(set(stored) | set(mine)):
        a, b = stored.get(key), mine.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return "; ".join(parts)


def _stored_config(path: Path) -> CompareConfig | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        return CompareConfig.from_dict(stored["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"corrupt {path}: {exc}") from None


def check_settings(stored: CompareConfig, cfg: CompareConfig, out: Path) -> None:
    """Refuse ``cfg`` on ``out`` unless all but the axes equal ``stored``'s."""
    a, b = fixed_settings(stored), fixed_settings(cfg)
    if a != b:
        diff = _differences({"config": a}, {"config": b})
        raise ResultsError(f"{out} holds a compare with different settings ({diff}); rerun it with the same "
                           f"settings to resume (only {', '.join(AXES)} may grow), or choose another --out")


def check_models(ctx: Context) -> None:
    """Build every model of the plan once (no training), so a bad model or guide fails before anything is written."""
    from vaebench.compare.plan import models
    from vaebench.compare.stages import build_model

    for model in models(ctx.cfg):
        build_model(ctx, model, 0)


def remove_partials(results_dir: Path) -> list[Path]:
    """Delete staging folders and files left by killed stages (``.NAME.partial-*``, ``.NAME.old-*``)."""
    removed = []
    for folder in (results_dir / RUNS_DIR, results_dir / VALUES_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and (".partial-" in path.name or ".old-" in path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def train_done(ctx: Context, stage: Stage) -> bool:
    out = ctx.run_dir(stage)
    if not out.exists():
        return False
    if not ((out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()):
        raise RunDirError(f"{out} is incomplete (no {CONFIG_FILE} or {WEIGHTS_FILE}); delete it and rerun")
    saved = read_config(out)
    model_config, train_config = model_configs(ctx, stage.model, stage.seed)
    expected = json.loads(json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict()}))
    if saved["model"] != expected["model"] or saved["train"] != expected["train"]:
        raise RunDirError(f"{out} was trained with other settings than this compare's; delete it and rerun")
    return True


# ----------------------------------------------------------------------------------- progress
class Progress:
    """Stages done/total, running, failed and an ETA: a tqdm bar on a terminal, else one line per finished stage."""

    def __init__(self, stages: Sequence[Stage], done: set[str], cfg: CompareConfig, enabled: bool,
                 stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.weights = {s.key: cost(cfg, s) for s in stages}
        self.total = len(stages)
        self.done = sum(1 for s in stages if s.key in done)
        self.remaining = sum(w for k, w in self.weights.items() if k not in done)
        self.spent = 0.0
        self.start = time.perf_counter()
        self.running = self.failed = 0
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.done, file=self.stream, dynamic_ncols=True,
                            bar_format="compare {n_fmt}/{total_fmt} |{bar}| {postfix}")

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.spent <= 0:
            return "?"
        seconds = int(elapsed / self.spent * self.remaining)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def update(self, running: int, finished: Stage | None = None, ok: bool = True, seconds: float = 0.0) -> None:
        self.running = running
        if finished is not None:
            weight = self.weights.get(finished.key, 0.0)
            self.remaining -= weight
            if ok:
                self.done += 1
                self.spent += weight
            else:
                self.failed += 1
        if not self.enabled:
            return
        status = f"running {self.running} · failed {self.failed} · ETA {self.eta()}"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.n = self.done
            self.bar.refresh()
        elif finished is not None:
            what = "done" if ok else "FAILED"
            print(f"compare {self.done}/{self.total} done · {status} · {what} {finished.key} ({seconds:.1f} s)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------- the driver
@dataclass
class Outcome:
    """What one call of :func:`run_compare` did."""

    stages: list[Stage]
    ran: list[Stage] = field(default_factory=list)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def prepare(cfg: CompareConfig, out: Path, ctx: Context) -> CompareLock:
    """Check ``out``, load the data, create ``out`` (and its parents), take the lock, merge ``compare.json``.

    Nothing is written before the settings and the data are known to be good.
    """
    if out.exists() and not out.is_dir():
        raise ResultsError(f"{out} exists and is not a directory")
    manifest = out / MANIFEST_FILE
    stored = _stored_config(manifest)
    if stored is None and out.is_dir() and any(out.iterdir()):
        raise ResultsError(f"{out} is not empty and holds no {MANIFEST_FILE}; choose another --out")
    if stored is not None:
        check_settings(stored, cfg, out)
    _ = ctx.x_test                                       # load and check the data before writing anything
    check_models(ctx)                                    # and a model that breaks the contract
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create results directory {out}: {exc.strerror or exc}") from None
    lock = CompareLock(out)
    lock.acquire()
    try:
        stored = _stored_config(manifest)                # again, now that no other driver can change it
        if stored is not None:
            check_settings(stored, cfg, out)
        merged = cfg if stored is None else union(stored, cfg)
        if stored is None or merged != stored:
            atomic_write_text(manifest, json.dumps({"config": merged.to_dict()}, indent=2) + "\n")
        remove_partials(out)
    except OSError as exc:
        lock.release()
        raise ResultsError(f"cannot write to results directory {out}: {exc.strerror or exc}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def run_compare(cfg: CompareConfig, results_dir: str | os.PathLike, progress: bool = True,
                executor: str | InProcess = "local", workers: int | None = None, **options: Any) -> Outcome:
    """Run (or resume, or extend) a compare into ``results_dir``.

    ``executor`` is a name of :data:`EXECUTORS` or an executor object (e.g. ``DaskExecutor(client=...)``);
    ``options``: ``scheduler``, ``scheduler_file`` (dask), ``slurm_partition``, ``slurm_time``,
    ``slurm_gpus_per_job``, ``slurm_cluster`` (slurm). Raises :class:`CompareError` after the run
    if some stages failed (the others are kept).
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(results_dir)
    ctx = Context(cfg, out, progress=False)
    stages = plan(cfg)
    outcome = Outcome(stages)
    lock = prepare(cfg, out, ctx)
    try:
        _drive(ctx, stages, outcome, executor, workers, progress, options)
    finally:
        lock.release()
    if outcome.failed:
        details = "; ".join(f"{key}: {why}" for key, why in outcome.failed.items())
        raise CompareError(f"{len(outcome.failed)} stage(s) failed ({details}); {len(outcome.ran)} ran and are "
                           f"kept in {out}; rerun the same command to resume")
    return outcome


def _drive(ctx: Context, stages: list[Stage], outcome: Outcome, executor: str | InProcess, workers: int | None,
           progress: bool, options: Mapping[str, Any]) -> None:
    out = ctx.results_dir
    recorded = {r["key"] for r in read_records(out)} if records_path(out).exists() else set()
    done: set[str] = set()
    for stage in stages:
        if stage.kind == "train":
            if train_done(ctx, stage):
                done.add(stage.key)
        elif stage.key in recorded and (stage.kind != "run" or load_values(ctx.values_path(stage)) is not None):
            done.add(stage.key)
    pending = [s for s in stages if s.key not in done]
    outcome.skipped = len(stages) - len(pending)
    if not pending:
        return
    bar = Progress(stages, done, ctx.cfg, progress)
    runner = make_executor(executor, out, ctx.cfg, workers, **options) if isinstance(executor, str) else executor
    running: dict[Any, Stage] = {}
    started: dict[str, float] = {}
    blocked: set[str] = set()
    try:
        while pending or running:
            for stage in [s for s in pending if any(d.key in blocked for d in s.dependencies())]:
                pending.remove(stage)
                blocked.add(stage.key)
                outcome.failed.setdefault(stage.key, "not started: a stage it needs failed")
            free = runner.capacity - len(running)
            batch = ready(pending, done)
            batch = batch if free == math.inf else batch[:max(int(free), 0)]
            if batch:
                for stage in batch:
                    pending.remove(stage)
                    started[stage.key] = time.perf_counter()
                try:
                    running.update(runner.submit(ctx, batch))
                except Exception as exc:
                    for stage in batch:
                        outcome.failed[stage.key] = one_line(exc)
                        blocked.add(stage.key)
                bar.update(len(running))
            if not running:
                continue
            for handle in runner.wait(list(running)):
                stage = running.pop(handle)
                try:
                    record = runner.result(handle)
                except Exception as exc:
                    outcome.failed[stage.key] = one_line(exc)
                    blocked.add(stage.key)
                    bar.update(len(running), stage, ok=False, seconds=time.perf_counter() - started[stage.key])
                    continue
                if record is not None and record["key"] not in recorded:     # the one writer of records.jsonl
                    append_record(out, record)
                    recorded.add(record["key"])
                done.add(stage.key)
                outcome.ran.append(stage)
                bar.update(len(running), stage, seconds=time.perf_counter() - started[stage.key])
    finally:
        bar.close()
        if runner is not executor:
            runner.close()
