"""`vaebench asv-table`: asv 0.6 result files -> one row per (machine, commit, benchmark, params)."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vaebench import cli
from vaebench.asv_results import COLUMNS, format_table, load_asv_results
from vaebench.errors import DataError

RESULT_COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
                  "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]

BENCHMARKS = {
    "benchmarks.TrainStep.time_train_step": {
        "name": "benchmarks.TrainStep.time_train_step", "type": "time", "unit": "seconds",
        "param_names": ["method", "device"], "params": [["'vi'", "'iwae-5'"], ["'cpu'", "'cuda'"]]},
    "benchmarks.LogLikelihood.track_test_nll_is": {
        "name": "benchmarks.LogLikelihood.track_test_nll_is", "type": "track", "unit": "nats",
        "param_names": ["method"], "params": [["'vi'", "'iwae-5'"]]},
    "benchmarks.track_broken": {"name": "benchmarks.track_broken", "type": "track", "unit": "nats",
                                "param_names": [], "params": []},
    "version": 2,
}


def run_file(commit, date_ms, machine, results):
    return {"commit_hash": commit, "env_name": "existing-py", "date": date_ms,
            "params": {"machine": machine, "python": "3.11"}, "python": "3.11", "requirements": {},
            "env_vars": {}, "result_columns": RESULT_COLUMNS, "results": results, "durations": {}, "version": 2}


def write_results(root: Path) -> Path:
    """Two commits on machine `box`, one on machine `gpu`, in asv 0.6's layout and JSON (NaN literals)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "benchmarks.json").write_text(json.dumps(BENCHMARKS))
    step_params = [["'vi'", "'iwae-5'"], ["'cpu'", "'cuda'"]]
    runs = {
        ("box", "a" * 40, 1_700_000_000_000): {
            # product order: (vi,cpu) (vi,cuda) (iwae-5,cpu) (iwae-5,cuda); NaN = skipped, null = failed
            "benchmarks.TrainStep.time_train_step": [[0.01, math.nan, 0.03, math.nan], step_params, "v1", 1, 0.5,
                                                     [0.009, None, 0.02, None]],
            "benchmarks.LogLikelihood.track_test_nll_is": [[30.5, None], [["'vi'", "'iwae-5'"]], "v2", 1, 9.0],
            "benchmarks.track_broken": [None, [], "v3", 1, 0.1],
        },
        ("box", "b" * 40, 1_700_000_100_000): {
            "benchmarks.LogLikelihood.track_test_nll_is": [[30.25, 29.75], [["'vi'", "'iwae-5'"]], "v2", 1, 9.0],
        },
        ("gpu", "b" * 40, 1_700_000_100_000): {
            "benchmarks.TrainStep.time_train_step": [[0.01, 0.002, 0.03, 0.004], step_params, "v1", 1, 0.5],
        },
    }
    for (machine, commit, date), results in runs.items():
        folder = root / machine
        folder.mkdir(exist_ok=True)
        (folder / "machine.json").write_text(json.dumps({"machine": machine, "version": 1}))
        (folder / f"{commit[:8]}-existing-py.json").write_text(json.dumps(run_file(commit, date, machine, results)))
    return root


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "results")


def row(table, benchmark, params, commit, machine="box"):
    hit = table[(table.benchmark == benchmark) & (table.params == params) & (table.commit == commit)
                & (table.machine == machine)]
    assert len(hit) == 1, (benchmark, params, commit, machine)
    return hit.iloc[0]


def test_every_value_becomes_one_row_with_its_parameters_unit_and_status(results):
    table = load_asv_results(results)
    assert tuple(table.columns) == COLUMNS
    assert len(table) == 4 + 2 + 1 + 2 + 4
    step = "benchmarks.TrainStep.time_train_step"
    first = row(table, step, "method=iwae-5, device=cpu", "a" * 40)
    assert (first.value, first.unit, first.status) == (0.03, "seconds", "ok")
    skipped = row(table, step, "method=vi, device=cuda", "a" * 40)
    assert skipped.status == "skipped" and math.isnan(skipped.value)
    assert row(table, step, "method=iwae-5, device=cuda", "b" * 40, "gpu").value == 0.004
    failed = row(table, "benchmarks.LogLikelihood.track_test_nll_is", "method=iwae-5", "a" * 40)
    assert failed.status == "failed" and math.isnan(failed.value) and failed.unit == "nats"
    broken = row(table, "benchmarks.track_broken", "", "a" * 40)
    assert broken.status == "failed"
    later = row(table, "benchmarks.LogLikelihood.track_test_nll_is", "method=vi", "b" * 40)
    assert later.value == 30.25 and later.commit_date == pd.Timestamp(1_700_000_100_000, unit="ms", tz="UTC")
    assert later.run_date == pd.Timestamp(1, unit="ms", tz="UTC")             # started_at, not the commit date
    assert (later.environment, later.python, later.requirements) == ("existing-py", "3.11", "")


def test_two_environments_of_one_commit_are_told_apart(results, capsys):
    path = results / "box" / ("b" * 8 + "-existing-py.json")
    run = json.loads(path.read_text())
    run.update(env_name="virtualenv-py3.11-torch2.13.0", requirements={"torch": "2.13.0", "pyro-ppl": ""})
    nll = run["results"]["benchmarks.LogLikelihood.track_test_nll_is"]
    nll[0], nll[3] = [31.0, 30.0], 1_800_000_000_000
    (results / "box" / ("b" * 8 + "-virtualenv-py3.11-torch2.13.0.json")).write_text(json.dumps(run))
    table = load_asv_results(results)
    both = table[(table.benchmark == "benchmarks.LogLikelihood.track_test_nll_is") & (table.params == "method=vi")
                 & (table.commit == "b" * 40)]
    assert list(both.environment) == ["existing-py", "virtualenv-py3.11-torch2.13.0"]
    assert list(both.value) == [30.25, 31.0] and list(both.requirements) == ["", "pyro-ppl, torch==2.13.0"]
    assert both.iloc[1].run_date == pd.Timestamp(1_800_000_000_000, unit="ms", tz="UTC")
    status, out, _ = run_cli(["asv-table", str(results), "--benchmark", "track_test_nll"], capsys)
    assert status == 0 and "virtualenv-py3.11-torch2.13.0" in out and "2027-01-15" in out


def test_rows_are_ordered_by_machine_benchmark_and_commit_date(results):
    table = load_asv_results(results)
    assert list(table.machine) == sorted(table.machine)
    nll = table[(table.benchmark == "benchmarks.LogLikelihood.track_test_nll_is") & (table.params == "method=vi")]
    assert list(nll.commit) == ["a" * 40, "b" * 40]


def test_a_benchmark_missing_from_benchmarks_json_keeps_positional_parameter_names(results):
    index = json.loads((results / "benchmarks.json").read_text())
    del index["benchmarks.TrainStep.time_train_step"]
    (results / "benchmarks.json").write_text(json.dumps(index))
    table = load_asv_results(results)
    old = table[table.benchmark == "benchmarks.TrainStep.time_train_step"]
    assert "p0=vi, p1=cpu" in set(old.params) and set(old.unit) == {""}


def run_cli(argv, capsys):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_csv_round_trips_and_skipped_rows_are_left_out_by_default(results, capsys):
    status, out, err = run_cli(["asv-table", str(results), "--format", "csv"], capsys)
    assert status == 0 and err == ""
    table = pd.read_csv(io.StringIO(out))
    assert list(table.columns) == list(COLUMNS)
    assert "skipped" not in set(table.status) and len(table) == 13 - 2
    status, out, _ = run_cli(["asv-table", str(results), "--format", "csv", "--include-skipped"], capsys)
    assert len(pd.read_csv(io.StringIO(out))) == 13


def test_cli_markdown_filters_by_benchmark_name(results, capsys):
    status, out, _ = run_cli(["asv-table", str(results), "--benchmark", "track_test_nll"], capsys)
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("| benchmark") and len(lines) == 2 + 4
    assert all("track_test_nll_is" in line for line in lines[2:])
    assert "aaaaaaaa " in out and "a" * 9 not in out        # commits shortened to 8 characters


def test_format_table_rejects_unknown_format(results):
    with pytest.raises(ValueError, match="unknown format"):
        format_table(load_asv_results(results), "html")


def corrupt_result_file(root):
    next((root / "box").glob("aaaaaaaa-*.json")).write_text('{"commit_hash": "aaa", "results": {')


def wrong_version(root):
    path = next((root / "box").glob("aaaaaaaa-*.json"))
    data = json.loads(path.read_text())
    data["version"] = 1
    path.write_text(json.dumps(data))


def value_count_mismatch(root):
    path = next((root / "box").glob("bbbbbbbb-*.json"))
    data = json.loads(path.read_text())
    data["results"]["benchmarks.LogLikelihood.track_test_nll_is"][0] = [1.0]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage,message", [
    (lambda root: shutil.rmtree(root), "does not exist"),
    (lambda root: (root / "benchmarks.json").unlink(), "no benchmarks.json"),
    (lambda root: (root / "benchmarks.json").write_text("not json"), "cannot read"),
    (corrupt_result_file, "cannot read asv result file"),
    (wrong_version, "format version 1"),
    (value_count_mismatch, "1 values for 2 parameter combinations"),
    (lambda root: [p.unlink() for p in root.glob("*/*-existing-py.json")], "no asv results"),
])
def test_bad_results_directory_is_one_line_and_exit_status_2(results, capsys, damage, message):
    damage(results)
    with pytest.raises(DataError, match=message):
        load_asv_results(results)
    status, out, err = run_cli(["asv-table", str(results)], capsys)
    assert status == 2 and out == ""
    assert err.startswith("vaebench: error: ") and message in err and err.count("\n") == 1


def test_selection_matching_nothing_is_an_error(results, capsys):
    status, out, err = run_cli(["asv-table", str(results), "--benchmark", "no-such-benchmark"], capsys)
    assert status == 2 and out == "" and "match the selection" in err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_reads_what_asv_itself_writes(tmp_path):
    """Run asv 0.6 on a two-benchmark suite and load its results: the reader's format is asv's."""
    pytest.importorskip("asv")
    repo = tmp_path / "repo"
    (repo / "suite").mkdir(parents=True)
    (repo / "suite" / "__init__.py").write_text("")
    (repo / "suite" / "b.py").write_text(
        "class P:\n    params = ([1, 2], ['a', 'b'])\n    param_names = ['n', 's']\n    unit = 'nats'\n"
        "    def setup(self, n, s):\n        if (n, s) == (2, 'b'):\n            raise NotImplementedError\n"
        "    def track_x(self, n, s):\n        return n + (0.5 if s == 'b' else 0.0)\n"
        "def track_fails():\n    raise RuntimeError('boom')\n")
    (repo / "asv.conf.json").write_text(json.dumps({
        "version": 1, "project": "t", "repo": ".", "environment_type": "virtualenv", "benchmark_dir": "suite",
        "env_dir": ".asv/env", "results_dir": ".asv/results", "html_dir": ".asv/html"}))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "."], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "suite"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                            text=True).stdout.strip()
    asv = [sys.executable, "-m", "asv"]
    subprocess.run(asv + ["machine", "--yes", "--machine", "testbox", "--config", "asv.conf.json"], cwd=repo,
                   check=True, capture_output=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    done = subprocess.run(asv + ["run", "--python=same", "--quick", "--set-commit-hash", commit, "--machine",
                                 "testbox"], cwd=repo, capture_output=True, text=True,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stdout + done.stderr     # track_fails fails, the rest runs
    table = load_asv_results(repo / ".asv" / "results")
    track = table[table.benchmark == "b.P.track_x"].set_index("params")
    assert track.loc["n=1, s=b", "value"] == 1.5 and track.loc["n=2, s=a", "value"] == 2.0
    assert track.loc["n=2, s=b", "status"] == "skipped"
    assert set(track.unit) == {"nats"} and set(table.commit) == {commit} and set(table.machine) == {"testbox"}
    assert table[table.benchmark == "b.track_fails"].status.tolist() == ["failed"]
