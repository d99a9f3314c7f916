"""asv's result files as a pandas table: one row per (machine, commit, benchmark, parameters).

asv 0.6 writes, under its results directory (``.asv/results`` in this repository),

* ``benchmarks.json`` -- every benchmark of the suite: ``unit``, ``param_names``, ``params``;
* ``<machine>/machine.json`` -- the machine's description;
* ``<machine>/<commit[:8]>-<environment>.json`` -- one run: ``commit_hash``, ``date`` (the
  *commit's* date, ms since the epoch), ``env_name``, ``python``, ``requirements`` (the
  environment), ``params`` (machine and environment), ``result_columns`` and ``results``, which
  maps a benchmark name to a list aligned with ``result_columns``. Its ``started_at`` entry is
  when that benchmark ran (ms since the epoch). Its ``result`` entry is a list with
  one value per combination of the benchmark's parameters, in :func:`itertools.product` order
  (``NaN`` where the combination was skipped, ``null`` where it failed), or ``null`` when the
  whole benchmark failed; its ``params`` entry lists each parameter's values as Python reprs.

:func:`load_asv_results` flattens that into the columns of :data:`COLUMNS`.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from vaebench.errors import DataError

COLUMNS = ("benchmark", "params", "value", "unit", "status", "commit", "machine", "environment", "python",
           "requirements", "run_date", "commit_date")
"""Columns of the table: ``status`` is ``ok``, ``skipped`` or ``failed`` (``value`` NaN unless ok);
``environment`` is asv's environment name, ``python`` and ``requirements`` (``name==version``,
comma-separated; empty for ``--python=same``) what it holds, so two environments of one commit
are told apart; ``run_date`` is when the benchmark ran, ``commit_date`` the commit's date (both UTC)."""

RESULTS_FORMAT_VERSION = 2
"""The ``version`` of asv 0.6's per-run result files."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read asv result file {path}: {exc}") from None


def _param_value(text: Any) -> str:
    """``"'cpu'"`` -> ``cpu``: asv stores parameter values as Python reprs."""
    try:
        return str(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError):
        return str(text)


def _timestamp(ms: Any) -> pd.Timestamp:
    """asv's JavaScript timestamps (ms since the epoch) as UTC times; NaT when absent or not a number."""
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms):
        return pd.NaT
    return pd.to_datetime(ms, unit="ms", utc=True)


def _status(value: Any) -> str:
    if value is None:
        return "failed"
    if isinstance(value, float) and math.isnan(value):
        return "skipped"
    return "ok"


def _rows(path: Path, run: Any, benchmarks: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(run, dict) or not {"commit_hash", "results", "result_columns"} <= set(run):
        raise DataError(f"{path} is not an asv result file (no commit_hash/results/result_columns)")
    if run.get("version") != RESULTS_FORMAT_VERSION:
        raise DataError(f"{path} has asv result format version {run.get('version')!r}; "
                        f"this reader understands version {RESULTS_FORMAT_VERSION} (asv 0.6)")
    columns = run["result_columns"]
    if "result" not in columns or "params" not in columns:
        raise DataError(f"{path}: result_columns lacks 'result' or 'params'")
    result_at, params_at = columns.index("result"), columns.index("params")
    machine = (run.get("params") or {}).get("machine", path.parent.name)
    commit_date = _timestamp(run.get("date"))
    environment = str(run.get("env_name") or path.stem.split("-", 1)[-1])
    python = str(run.get("python") or (run.get("params") or {}).get("python") or "")
    requirements = run.get("requirements") or {}
    requirements = ", ".join(f"{name}=={version}" if version else str(name)
                             for name, version in sorted(requirements.items())) \
        if isinstance(requirements, dict) else str(requirements)
    started_at = columns.index("started_at") if "started_at" in columns else None
    rows = []
    for name, entry in run["results"].items():
        if not isinstance(entry, list) or len(entry) <= max(result_at, params_at):
            raise DataError(f"{path}: malformed entry for benchmark {name!r}")
        info = benchmarks.get(name, {})
        params = entry[params_at] or []
        names = info.get("param_names") or [f"p{i}" for i in range(len(params))]
        combos = [tuple(c) for c in itertools.product(*params)] if params else [()]
        values = entry[result_at]
        if values is None:
            values = [None] * len(combos)
        if not isinstance(values, list) or len(values) != len(combos):
            raise DataError(f"{path}: benchmark {name!r} has {len(values) if isinstance(values, list) else 0} "
                            f"values for {len(combos)} parameter combinations")
        for combo, value in zip(combos, values):
            status = _status(value)
            rows.append({
                "benchmark": name,
                "params": ", ".join(f"{n}={_param_value(v)}" for n, v in zip(names, combo)),
                "value": float(value) if status == "ok" else math.nan,
                "unit": info.get("unit", ""),
                "status": status,
                "commit": run["commit_hash"],
                "machine": machine,
                "environment": environment,
                "python": python,
                "requirements": requirements,
                "run_date": _timestamp(entry[started_at] if started_at is not None and len(entry) > started_at
                                       else None),
                "commit_date": commit_date,
            })
    return rows


def load_asv_results(results_dir: str | Path) -> pd.DataFrame:
    """Every value in an asv results directory, as a table with the columns :data:`COLUMNS`.

    Raises
    ------
    DataError
        If the directory or its ``benchmarks.json`` is missing, a file is not valid JSON or not in
        asv 0.6's format, or there are no result files.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"asv results directory {root} does not exist (run `asv run` first, or pass RESULTS_DIR)")
    index = root / "benchmarks.json"
    if not index.is_file():
        raise DataError(f"{root} has no benchmarks.json: not an asv results directory")
    benchmarks = _read_json(index)
    if not isinstance(benchmarks, dict):
        raise DataError(f"{index} is not an asv benchmarks.json")
    rows: list[dict[str, Any]] = []
    files = sorted(p for p in root.glob("*/*.json") if p.name != "machine.json")
    for path in files:
        rows.extend(_rows(path, _read_json(path), benchmarks))
    if not rows:
        raise DataError(f"no asv results under {root}")
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("run_date", "commit_date"):
        table[column] = pd.to_datetime(table[column], utc=True)
    return table.sort_values(["machine", "benchmark", "commit_date", "commit", "environment", "run_date"],
                             kind="stable").reset_index(drop=True)


def format_table(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as GitHub Markdown (commits shortened to 8 characters) or CSV."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}; choose markdown or csv")
    shown = table.assign(commit=table["commit"].str[:8],
                         **{column: table[column].dt.strftime("%Y-%m-%d %H:%M").fillna("")
                            for column in ("run_date", "commit_date")})
    return shown.to_markdown(index=False, floatfmt=".6g")
