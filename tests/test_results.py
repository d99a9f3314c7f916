"""Result records: round trip, schema validation, strict reading, atomic and concurrent appends."""

import json
import multiprocessing
import os

import pytest

from vaebench import cli
from vaebench.results import (RECORDS_FILE, ResultsError, append_record, comparable, load_results, make_record,
                              read_records, records_path, validate_record)

PROVENANCE = {"versions": {"vaebench": "0.1.0", "torch": "2", "pyro": "1.9"}, "git_commit": "abc",
              "device": "cpu", "command": "vaebench compare", "time_utc": "2024-01-01T00:00:00+00:00"}
CONFIG = {"model": {"data_dim": 64, "latent_dim": 10, "hidden": [100, 100]},
          "train": {"method": "vi", "dataset": "digits", "seed": 0}, "compare": {"preset": "quick"}}


def record(key="run/vi/seed0", seed=0, **metrics):
    return make_record(key=key, kind="run", method="vi", k=1, seed=seed, config=CONFIG,
                       metrics=metrics or {"log_px_is": -24.1, "elbo": -24.5, "active_units": 7},
                       wall_time={"train": 3.5}, provenance=PROVENANCE, unavailable={"ais": "not registered"},
                       diagnostics={"is": {"ess_mean": 12.0}}, run_dir="runs/vi-seed0")


def test_round_trip(tmp_path):
    first, second = record(), record("run/vi/seed1", seed=1, log_px_is=-24.3, elbo=None)
    append_record(tmp_path, first)
    append_record(tmp_path, second)
    assert read_records(tmp_path) == [first, second]
    lines = records_path(tmp_path).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == first
    frame = load_results(tmp_path)
    assert list(frame["seed"]) == [0, 1]
    assert frame.loc[1, "log_px_is"] == -24.3 and frame.loc[0, "seconds_train"] == 3.5
    assert frame["dataset"].tolist() == ["digits", "digits"]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_comparable_drops_only_volatile_fields():
    a, b = record(), record()
    b["wall_time"]["train"] = 99.0
    b["provenance"]["time_utc"] = "later"
    assert a != b and comparable(a) == comparable(b)
    b["metrics"]["elbo"] = -1.0
    assert comparable(a) != comparable(b)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("seed"), "'seed' is a required property"),
    (lambda r: r.update(kind="nonsense"), "kind"),
    (lambda r: r["metrics"].update(elbo="high"), "metrics/elbo"),
    (lambda r: r["metrics"].update(elbo=float("nan")), "not a finite number"),
    (lambda r: r.update(k=0), "k"),
    (lambda r: r["provenance"].pop("git_commit"), "git_commit"),
    (lambda r: r.update(extra=1), "extra"),
    (lambda r: r["config"].pop("train"), "train"),
])
def test_schema_rejects(mutate, message):
    bad = record()
    mutate(bad)
    with pytest.raises(ResultsError, match=message):
        validate_record(bad)


def test_make_record_validates():
    with pytest.raises(ResultsError, match="not a finite number"):
        record(elbo=float("inf"))


def test_corrupt_line_is_reported_with_file_and_line(tmp_path):
    append_record(tmp_path, record())
    path = records_path(tmp_path)
    path.write_text(path.read_text() + '{"schema": 1, "key": "trunc\n')
    with pytest.raises(ResultsError, match=rf"{RECORDS_FILE}:2: corrupt record, not JSON"):
        read_records(tmp_path)
    with pytest.raises(ResultsError, match=":2: corrupt record"):
        append_record(tmp_path, record("run/vi/seed1", seed=1))


def test_invalid_and_repeated_records_are_reported(tmp_path):
    good = json.dumps(record())
    bad = record()
    del bad["metrics"]
    records_path(tmp_path).write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ResultsError, match=r":2: invalid record .*'metrics' is a required property"):
        read_records(tmp_path)
    records_path(tmp_path).write_text(good + "\n" + good + "\n")
    with pytest.raises(ResultsError, match=r":2: repeats key 'run/vi/seed0' of line 1"):
        read_records(tmp_path)
    records_path(tmp_path).write_text(good + "\n\n")
    with pytest.raises(ResultsError, match=":2: empty line"):
        read_records(tmp_path)


def test_append_refuses_duplicates_and_missing_directory(tmp_path):
    append_record(tmp_path, record())
    before = records_path(tmp_path).read_text()
    with pytest.raises(ResultsError, match="already holds a record with key"):
        append_record(tmp_path, record())
    assert records_path(tmp_path).read_text() == before
    with pytest.raises(ResultsError, match="does not exist"):
        append_record(tmp_path / "missing", record())


def test_missing_directory_or_file(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        read_records(tmp_path / "nope")
    with pytest.raises(ResultsError, match=f"holds no {RECORDS_FILE}"):
        read_records(tmp_path)


def _append_many(directory, worker, count):
    for i in range(count):
        append_record(directory, record(f"run/vi/w{worker}-{i}"))


def test_concurrent_appends_lose_nothing(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(tmp_path, w, 15)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers)
    keys = [r["key"] for r in read_records(tmp_path)]
    assert sorted(keys) == sorted(f"run/vi/w{w}-{i}" for w in range(3) for i in range(15))


def test_cli_reports_corrupt_line_and_exits_2(tmp_path, capsys):
    append_record(tmp_path, record())
    path = records_path(tmp_path)
    path.write_text(path.read_text() + "not json\n")
    assert cli.main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaebench: error: ") and f"{RECORDS_FILE}:2" in err and len(err.splitlines()) == 1
    assert cli.main(["table", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
