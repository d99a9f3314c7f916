"""Result records: one JSON object per finished run or stage, one line each in ``records.jsonl``.

Every number a table or report shows is derived from these records, never typed in by hand
(the shape of disentanglement_lib's ``utils/results.py``). A record carries everything needed
to defend and regenerate its numbers:

``schema``      version of this layout (:data:`SCHEMA_VERSION`)
``key``         unique name of the stage inside its results directory, e.g. ``run/iwae-k5/seed0``
``kind``        ``run`` (one trained model scored by the estimators) or one of the inference
                stages on a fixed decoder (``bounds``, ``gaps``, ``aggregate``, ``variance``)
``method``, ``k``, ``seed``
                training method, its number of importance samples (``None`` where it has none),
                and the seed that reproduces the record
``guide``       (optional) the encoder family of an encoder method (``gaussian``, ...), ``None`` without one
``series``      (optional) metrics that vary along K, typed: ``name -> [{"k": K, "value": v, "se": s}, ...]``
``config``      the full ``model`` (:class:`~vaebench.config.ModelConfig`), ``train``
                (:class:`~vaebench.config.TrainConfig`) and ``compare`` settings
``metrics``     flat ``name -> number`` (nats, counts or seconds; ``None`` for not computed)
``wall_time``   ``name -> seconds`` (training, each evaluation stage)
``unavailable`` ``stage -> reason`` for every stage that could not run (never a fake number)
``diagnostics`` free-form estimator and sampler diagnostics
``run_dir``     the run directory (relative to the results directory) or ``None``
``provenance``  versions, git commit, device, command line, UTC time
                (:func:`vaebench.provenance.provenance`)

Appending atomically
--------------------
:func:`append_record` rewrites the whole file (old lines + the new one) through
:func:`vaebench.rundir.atomic_write_text`, i.e. a temporary file, ``fsync`` and ``os.replace``,
under an exclusive ``fcntl.flock`` on a lock file beside it. This was chosen over ``O_APPEND``
of one line: an append can be cut short by a crash or a full disk, leaving a partial last
line, whereas a rename is all-or-nothing, so a reader only ever sees the old file or the new
one. The lock serialises concurrent writers (two ``compare`` processes on one directory) so no
record is lost in a read-modify-write race. Rewriting is O(file size) per record, which is
negligible at the scale of a benchmark (tens to hundreds of records).

Reading is strict: a line that is not JSON, or a record that breaks the schema, or a repeated
key, raises :class:`ResultsError` naming the file and line number; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema
import pandas as pd

from vaebench.errors import VaebenchError
from vaebench.rundir import atomic_write_text

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".records.lock"
KINDS = ("run", "bounds", "gaps", "aggregate", "variance")
VOLATILE_FIELDS = ("wall_time", "provenance")
"""Fields that legitimately differ between two runs of the same stage with the same seed."""

_NUMBER_OR_NULL = {"type": ["number", "null"]}
RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "key", "kind", "method", "k", "seed", "config", "metrics", "wall_time",
                 "unavailable", "diagnostics", "run_dir", "provenance"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "key": {"type": "string", "minLength": 1},
        "kind": {"enum": list(KINDS)},
        "method": {"type": "string", "minLength": 1},
        "k": {"type": ["integer", "null"], "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "guide": {"type": ["string", "null"]},
        "series": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": "object", "required": ["k", "value"],
                                       "properties": {"k": {"type": "integer", "minimum": 1},
                                                      "value": _NUMBER_OR_NULL, "se": _NUMBER_OR_NULL}}}},
        "config": {
            "type": "object",
            "required": ["model", "train", "compare"],
            "properties": {"model": {"type": "object", "required": ["data_dim", "latent_dim"]},
                           "train": {"type": "object", "required": ["method", "dataset", "seed"]},
                           "compare": {"type": "object"}},
        },
        "metrics": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "wall_time": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "unavailable": {"type": "object", "additionalProperties": {"type": "string"}},
        "diagnostics": {"type": "object"},
        "run_dir": {"type": ["string", "null"]},
        "provenance": {
            "type": "object",
            "required": ["versions", "git_commit", "device", "command", "time_utc"],
            "properties": {"versions": {"type": "object", "required": ["vaebench", "torch", "pyro"]},
                           "git_commit": {"type": "string"}, "device": {"type": "string"},
                           "command": {"type": "string"}, "time_utc": {"type": "string"}},
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(RECORD_SCHEMA)


class ResultsError(VaebenchError):
    """A results directory is missing, or a record in it is corrupt or breaks the schema."""


def model_label(method: str, k: int | None, guide: str | None = None) -> str:
    """The one name of a trained model, in run directories, stage keys, tables and reports.

    ``vi``, ``hmc``, ``iwae-k<K>`` (also for K = 1), and ``+<guide>`` for a guide other than ``gaussian``.
    """
    label = f"iwae-k{k}" if method == "iwae" else method
    return label if guide in (None, "gaussian") else f"{label}+{guide}"


def record_label(record: Mapping[str, Any]) -> str:
    """:func:`model_label` of a record."""
    return model_label(record["method"], record["k"], record.get("guide"))


def records_path(results_dir: str | os.PathLike) -> Path:
    """``RESULTS_DIR/records.jsonl``."""
    return Path(results_dir) / RECORDS_FILE


def make_record(*, key: str, kind: str, method: str, k: int | None, seed: int, config: Mapping[str, Any],
                metrics: Mapping[str, float | int | None], wall_time: Mapping[str, float],
                provenance: Mapping[str, Any], unavailable: Mapping[str, str] | None = None,
                diagnostics: Mapping[str, Any] | None = None, run_dir: str | None = None,
                guide: str | None = None, series: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble and validate one record (see the module docstring for the fields)."""
    record = {"schema": SCHEMA_VERSION, "key": key, "kind": kind, "method": method, "k": k, "seed": seed,
              "config": _plain(dict(config)), "metrics": {name: _number(value) for name, value in metrics.items()},
              "wall_time": {name: float(value) for name, value in wall_time.items()},
              "unavailable": dict(unavailable or {}), "diagnostics": _plain(dict(diagnostics or {})),
              "run_dir": run_dir, "provenance": _plain(dict(provenance))}
    if guide is not None:
        record["guide"] = guide
    if series:
        record["series"] = _plain({name: [{"k": int(p["k"]), "value": _number(p.get("value")),
                                           "se": _number(p.get("se"))} for p in points]
                                   for name, points in series.items()})
    validate_record(record)
    return record


def validate_record(record: Any, where: str = "record") -> dict[str, Any]:
    """Check ``record`` against :data:`RECORD_SCHEMA`; raise :class:`ResultsError` naming ``where``.

    Beyond the JSON schema, metric values must be finite (JSON has no NaN; ``None`` marks a
    value that was not computed).
    """
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(record))
    if error is not None:
        path = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ResultsError(f"{where}: invalid record at {path}: {error.message}")
    for name, value in record["metrics"].items():
        if value is not None and not math.isfinite(value):
            raise ResultsError(f"{where}: invalid record: metric {name!r} is {value}, not a finite number")
    return record


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


def _plain(value: Any) -> Any:
    """A JSON-safe deep copy (tuples become lists, as after a round trip)."""
    return json.loads(json.dumps(value, allow_nan=False))


@contextlib.contextmanager
def _locked(results_dir: Path) -> Iterator[None]:
    with open(results_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def append_record(results_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` to ``RESULTS_DIR/records.jsonl`` atomically (see the module docstring).

    Raises
    ------
    ResultsError
        The directory does not exist, the existing file is corrupt, the record is invalid, or a
        record with the same key is already there.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"results directory {results_dir} does not exist")
    validate_record(record, where=f"new record {record.get('key')!r}")
    line = json.dumps(record, allow_nan=False, sort_keys=True)
    path = records_path(results_dir)
    with _locked(results_dir):
        existing = path.read_text() if path.exists() else ""
        keys = {r["key"] for r in _parse(existing, path)}
        if record["key"] in keys:
            raise ResultsError(f"{path} already holds a record with key {record['key']!r}")
        if existing and not existing.endswith("\n"):
            raise ResultsError(f"{path}:{existing.count(chr(10)) + 1}: last line is incomplete")
        atomic_write_text(path, existing + line + "\n")


def _parse(text: str, path: Path) -> list[dict[str, Any]]:
    records, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise ResultsError(f"{where}: empty line (a corrupt or hand-edited records file)")
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ResultsError(f"{where}: corrupt record, not JSON ({exc})") from None
        validate_record(record, where)
        if record["key"] in seen:
            raise ResultsError(f"{where}: repeats key {record['key']!r} of line {seen[record['key']]}")
        seen[record["key"]] = number
        records.append(record)
    return records


def read_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a results directory, validated, in file order.

    Raises
    ------
    ResultsError
        Missing directory or records file, or a corrupt line (reported as ``FILE:LINE``).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"results directory {results_dir} does not exist")
    path = records_path(results_dir)
    if not path.is_file():
        raise ResultsError(f"{results_dir} holds no {RECORDS_FILE}; create one with "
                           f"`vaebench compare --out {results_dir}`")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"cannot read {path}: {exc}") from None
    return _parse(text, path)


def comparable(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` without the fields that differ between reruns (:data:`VOLATILE_FIELDS`)."""
    kept = {key: copy.deepcopy(value) for key, value in record.items() if key not in VOLATILE_FIELDS}
    return kept


def records_frame(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: identity columns, ``dataset``, then one column per metric and wall time.

    Columns: ``key, kind, method, k, guide, label, seed, dataset, run_dir`` (``label``:
    :func:`model_label`), every metric under its own name,
    and ``seconds_<stage>`` for each wall-time entry. ``k`` is a nullable integer.
    """
    rows = []
    for record in records:
        row: dict[str, Any] = {"key": record["key"], "kind": record["kind"], "method": record["method"],
                               "k": record["k"], "guide": record.get("guide"), "label": record_label(record),
                               "seed": record["seed"],
                               "dataset": record["config"]["train"]["dataset"], "run_dir": record["run_dir"]}
        row.update(record["metrics"])
        row.update({f"seconds_{name}": value for name, value in record["wall_time"].items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["k"] = frame["k"].astype("Int64")
        frame["seed"] = frame["seed"].astype("int64")
    return frame


def load_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """:func:`records_frame` of :func:`read_records`."""
    return records_frame(read_records(results_dir))
