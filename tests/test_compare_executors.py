"""Executors, the lock, resume after a killed worker, extension: the records never depend on where stages ran."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaebench.compare import PRESETS, CompareError, DaskExecutor, plan, run_compare
from vaebench.compare import stages
from vaebench.compare.runner import LOCK_FILE, CompareLock
from vaebench.metrics import GradientSNR
from vaebench.results import ResultsError, comparable, read_records

VI = dataclasses.replace(PRESETS["tiny"], seeds=(0,), methods=("vi",))        # 6 stages, 3 waves
IWAE = dataclasses.replace(PRESETS["tiny"], seeds=(0,), methods=("iwae",))    # 3 stages, 2 waves
ROOT = Path(__file__).resolve().parents[1]


def by_key(out):
    return {r["key"]: comparable(r) for r in read_records(out)}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("inprocess")
    run_compare(VI, root / "vi", progress=False, workers=1)
    run_compare(IWAE, root / "iwae", progress=False, workers=1)
    return root


def test_local_pool_of_two_workers_writes_the_same_records(in_process, tmp_path):
    outcome = run_compare(VI, tmp_path / "r", progress=False, workers=2)
    assert len(outcome.ran) == len(plan(VI))
    assert by_key(tmp_path / "r") == by_key(in_process / "vi")


def test_dask_local_cluster_writes_the_same_records(in_process, tmp_path):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        run_compare(VI, tmp_path / "r", progress=False, executor=DaskExecutor(client=client))
    assert by_key(tmp_path / "r") == by_key(in_process / "vi")


def test_submitit_local_executor_writes_the_same_records(in_process, tmp_path):
    pytest.importorskip("submitit")
    run_compare(IWAE, tmp_path / "r", progress=False, executor="slurm", slurm_cluster="local")
    assert by_key(tmp_path / "r") == by_key(in_process / "iwae")
    assert (tmp_path / "r" / ".submitit").is_dir()


def _workers(driver_pid):
    """Pids of the spawned pool workers of ``driver_pid``."""
    out = []
    for pid in Path(f"/proc/{driver_pid}/task/{driver_pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except FileNotFoundError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_worker_killed_mid_stage_then_resume(tmp_path):
    out = tmp_path / "r"
    argv = [sys.executable, "-m", "vaebench.cli", "compare", "--out", str(out), "--preset", "tiny", "--seeds", "0",
            "--methods", "vi", "--epochs", "300", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None:
        partial = [p for p in (out / "runs").glob(".*.partial-*")] if (out / "runs").is_dir() else []
        if partial:
            for pid in _workers(driver.pid):
                os.kill(pid, signal.SIGKILL)
                killed = True
            break
        time.sleep(0.02)
    _, err = driver.communicate(timeout=120)
    assert killed, "never caught the training stage in flight"
    assert driver.returncode == 2 and err.strip().splitlines()[-1].startswith("vaebench: error: ")
    assert "rerun the same command to resume" in err
    assert list((out / "runs").glob(".*.partial-*")), "the killed stage's staging folder is the test's premise"
    assert not (out / LOCK_FILE).exists()
    resumed = subprocess.run(argv[:-2] + ["--workers", "1", "--quiet"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((out / "runs").glob(".*.partial-*")), "staging folders of killed stages are removed"
    records = read_records(out)                         # strict: a repeated key would raise
    expected = {s.key for s in plan(dataclasses.replace(VI, epochs=300)) if s.kind != "train"}
    assert {r["key"] for r in records} == expected


def test_second_driver_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "r"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"config": VI.to_dict()}))
    lock = CompareLock(out)
    lock.acquire()                                      # a live driver: this process
    try:
        with pytest.raises(ResultsError, match=rf"in use by another compare \(pid {os.getpid()} on "):
            run_compare(VI, out, progress=False, workers=1)
        status, _, err = run_cli(capsys, "compare", "--out", str(out), "--preset", "tiny", "--seeds", "0",
                                 "--methods", "vi", "--quiet")
        assert status == 2 and "in use by another compare" in err and err.count("\n") == 1
    finally:
        lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": lock.mine["host"], "started": "earlier"}))
    outcome = run_compare(VI, out, progress=False, workers=1)
    assert len(outcome.ran) == len(plan(VI)) and not (out / LOCK_FILE).exists()


def test_extending_runs_only_the_new_stages(in_process, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(in_process / "vi", out)
    before = by_key(out)
    outcome = run_compare(dataclasses.replace(VI, seeds=(1, 0)), out, progress=False, workers=1)
    assert sorted(s.key for s in outcome.ran) == sorted(s.key.replace("seed0", "seed1") for s in plan(VI))
    after = by_key(out)
    assert {k: v for k, v in after.items() if k in before} == before
    stored = json.loads((out / "compare.json").read_text())["config"]
    assert stored["seeds"] == [0, 1]
    # a seed alone, or the reordered union: nothing left to do
    assert run_compare(dataclasses.replace(VI, seeds=(1,)), out, progress=False, workers=1).ran == []
    # a real conflict is still refused
    with pytest.raises(ResultsError, match="different settings"):
        run_compare(dataclasses.replace(VI, seeds=(2,), epochs=3), out, progress=False, workers=1)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_values_rerun_the_run_stage(in_process, tmp_path, damage):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(in_process / "vi", out)
    path = out / "values" / "vi-seed0.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:50])
    before = by_key(out)
    outcome = run_compare(VI, out, progress=False, workers=1)
    assert [s.key for s in outcome.ran] == ["run/vi/seed0"]
    assert by_key(out) == before                         # not appended twice
    assert stages.load_values(path) is not None


def test_progress_without_a_terminal_is_one_plain_line_per_stage(tmp_path, capsys):
    run_compare(IWAE, tmp_path / "r", progress=True, workers=1)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("compare ")]
    assert len(lines) == len(plan(IWAE)) and "\r" not in err and "\x1b" not in err
    assert lines[-1].startswith("compare 3/3 done · running 0 · failed 0 · ETA ")


def test_nan_gradient_snr_is_recorded_as_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "gradient_snr", lambda *a, **k: GradientSNR(float("nan"), 1.0, 5))
    run_compare(VI, tmp_path / "r", progress=False, workers=1)
    record = next(r for r in read_records(tmp_path / "r") if r["kind"] == "variance")
    assert record["series"]["snr_encoder"][0]["value"] is None
    assert "not a finite number" in record["unavailable"]["snr_encoder_k2"]


def test_a_failing_stage_is_reported_and_its_dependents_not_started(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(stages, "fit_local_gaussians", broken)
    with pytest.raises(CompareError, match=r"1 stage\(s\) failed \(gaps/vi/seed0: RuntimeError: boom\)"):
        run_compare(VI, tmp_path / "r", progress=False, workers=1)
    assert {r["key"] for r in read_records(tmp_path / "r")} == {s.key for s in plan(VI)
                                                               if s.kind not in ("train", "gaps")}


def test_slurm_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    import shutil

    from conftest import run_cli
    monkeypatch.setattr(shutil, "which", lambda name: None)
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--executor", "slurm", "--out",
                             str(tmp_path / "results"))
    assert status == 2 and "sbatch not found" in err and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists()
