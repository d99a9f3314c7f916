"""The comparison table, derived from result records (never typed in): Markdown, LaTeX or CSV.

One row per group of ``run`` records (by default one per method and K); every cell is the mean
over the group's records (one per seed) ± its standard error s/√n across seeds. Columns:

``ais``           test log p(x) by annealed importance sampling (nats per datapoint)
``is``            test log p(x) by importance sampling with the encoder, K = ``is_k`` (5000)
``elbo``          test ELBO
``gap``           log p(x) − ELBO, paired per datapoint (log p(x) by AIS, or IS where AIS is missing)
``active_units``  latent units whose encoder-mean variance over the test set exceeds 0.01
``time``          training wall-clock seconds
``grad_evals``    training gradient evaluations (datapoint × sample)
``published``     Burda et al. (2016), Table 1, as log p(x) = −NLL, shown only for dynamically
                  binarised MNIST with the 784-200-200-50 tanh architecture (:func:`published_log_px`)

LaTeX output uses booktabs rules (``pandas.DataFrame.to_latex``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from vaebench.results import ResultsError, record_label, records_frame

PUBLISHED_SOURCE = ("Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders, Table 1: "
                    "test NLL on dynamically binarised MNIST, 784-200-200-50 tanh, one stochastic layer, "
                    "3,280 epochs, K = 5000; shown as log p(x) = −NLL")
PUBLISHED_NLL: dict[tuple[str, int], float] = {("vi", 1): 86.76, ("iwae", 5): 85.54, ("iwae", 50): 84.78}
"""(method, K) → published test NLL (nats). Burda's "VAE k=1" is the single-sample ELBO, our ``vi``."""


@dataclass(frozen=True)
class Column:
    """A table column: its header and the per-record value it averages."""

    label: str
    source: str
    digits: int


COLUMNS: dict[str, Column] = {
    "ais": Column("log p(x) AIS", "log_px_ais", 2),
    "ais_steps": Column("AIS T", "ais_steps", 0),
    "bdmc_gap": Column("BDMC gap", "bdmc_gap", 3),
    "is": Column("log p(x) IS-{is_k}", "log_px_is", 2),
    "elbo": Column("ELBO", "elbo", 2),
    "gap": Column("gap", "gap", 2),
    "active_units": Column("active units", "active_units", 1),
    "time": Column("train time (s)", "seconds_train", 1),
    "grad_evals": Column("gradient evaluations", "gradient_evaluations", 0),
    "published": Column("published", "published", 2),
}
DEFAULT_COLUMNS = ("ais", "ais_steps", "bdmc_gap", "is", "elbo", "gap", "active_units", "time", "published")
UNCERTIFIED_MARK = "†"
"""Appended to an AIS cell when some decoder of the row was not certified by BDMC."""
DEFAULT_BY = ("method", "k")
FORMATS = ("markdown", "latex", "csv")


def published_log_px(record: Mapping[str, Any]) -> float | None:
    """Burda et al.'s Table 1 value (as log p(x)) for this record's setup, or ``None``.

    Only for ``dataset == "mnist"`` (real MNIST, dynamically binarised) with the paper's model:
    784 pixels, 50 latents, hidden (200, 200) tanh MLPs in decoder and encoder, Bernoulli
    likelihood; and only for the (method, K) pairs of :data:`PUBLISHED_NLL`. Never for other setups.
    """
    model, train = record["config"]["model"], record["config"]["train"]
    matches = (train.get("dataset") == "mnist" and model.get("data_dim") == 784 and model.get("latent_dim") == 50
               and list(model.get("hidden", [])) == [200, 200] and model.get("activation") == "tanh"
               and model.get("decoder") == "mlp" and model.get("likelihood") == "bernoulli"
               and model.get("encoder_hidden") in (None, [200, 200]))
    nll = PUBLISHED_NLL.get((record["method"], record["k"])) if matches else None
    return None if nll is None else -nll


def run_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """:func:`vaebench.results.records_frame` of the ``run`` records, plus a ``published`` column."""
    runs = [r for r in records if r["kind"] == "run"]
    if not runs:
        raise ResultsError("no run records to tabulate (records of kind 'run' come from `vaebench compare`)")
    frame = records_frame(runs)
    frame["published"] = [published_log_px(r) for r in runs]
    return frame


def comparison_table(records: Sequence[Mapping[str, Any]], by: Sequence[str] = DEFAULT_BY,
                     columns: Sequence[str] = DEFAULT_COLUMNS) -> pd.DataFrame:
    """Numbers of the comparison table: per group, ``<column>_mean``, ``<column>_se`` and ``seeds``.

    ``<column>_se`` is the sample standard deviation over the group's records divided by √n
    (NaN for a single record); a column with no value in a group is NaN there. ``published``
    has no standard error; it is the group's single published value, or NaN.

    Raises
    ------
    ResultsError
        ``by`` names a column the records do not have, or ``columns`` an unknown column.
    """
    frame = run_frame(records)
    if "method" in by:
        # a row is named by what its label says: without a k column, iwae K=5 and K=50 are two rows
        frame["method"] = [label if "k" not in by else method + ("" if pd.isna(guide) or guide == "gaussian"
                                                                  else f"+{guide}")
                           for label, method, guide in zip(frame["label"], frame["method"], frame["guide"])]
    unknown_by = [name for name in by if name not in frame.columns]
    if unknown_by:
        choices = ", ".join(c for c in frame.columns if c in ("method", "k", "seed", "dataset", "kind"))
        raise ResultsError(f"unknown --by column(s) {', '.join(unknown_by)}; choose from {choices}")
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        raise ResultsError(f"unknown column(s) {', '.join(unknown)}; choose from {', '.join(COLUMNS)}")
    if not by:
        raise ResultsError("--by needs at least one column")
    rows = []
    frame = canonical_order(frame)
    for group_key, group in frame.groupby(list(by), sort=False, dropna=False):
        keys = group_key if isinstance(group_key, tuple) else (group_key,)
        row: dict[str, Any] = dict(zip(by, keys))
        row["seeds"] = int(group["seed"].nunique())
        certified = pd.to_numeric(group["ais_certified"], errors="coerce") if "ais_certified" in group else None
        row["uncertified"] = int((certified == 0).sum()) if certified is not None else 0
        for name in columns:
            source = COLUMNS[name].source
            values = pd.to_numeric(group[source], errors="coerce") if source in group else pd.Series(dtype=float)
            values = values.dropna().astype(float)
            if name == "published":
                unique = values.unique()
                complete = len(values) == len(group)
                row["published_mean"] = float(unique[0]) if complete and len(unique) == 1 else math.nan
                continue
            row[f"{name}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{name}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if "k" in table:
        table["k"] = table["k"].astype("Int64")
    return table


def canonical_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in a fixed order -- method (vi, iwae, hmc, then others), guide (gaussian first), k, seed --
    so a table does not depend on the order in which parallel stages happened to finish."""
    from vaebench.config import METHODS

    keys = pd.DataFrame(index=frame.index)
    methods = frame["method"].astype(str).str.split("+").str[0] if "method" in frame else pd.Series("", frame.index)
    keys["method"] = [METHODS.index(m) if m in METHODS else len(METHODS) for m in methods]
    guides = frame["guide"] if "guide" in frame else pd.Series("gaussian", frame.index)
    keys["guide_rank"] = [0 if pd.isna(g) or g == "gaussian" else 1 for g in guides]
    keys["guide"] = [("" if pd.isna(g) else str(g)) for g in guides]
    keys["k"] = pd.to_numeric(frame["k"], errors="coerce") if "k" in frame else 0
    keys["seed"] = pd.to_numeric(frame["seed"], errors="coerce") if "seed" in frame else 0
    order = keys.sort_values(list(keys.columns), kind="stable", na_position="last").index
    return frame.loc[order]


def _cell(mean: float, se: float | None, digits: int, latex: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—" if not latex else "--"
    text = f"{mean:.{digits}f}"
    if se is not None and not math.isnan(se) and not (digits == 0 and se == 0):
        text += (r" $\pm$ " if latex else " ± ") + f"{se:.{digits}f}"
    if latex:
        text = text.replace("-", "$-$", 1) if text.startswith("-") else text
    return text


def _labels(records: Sequence[Mapping[str, Any]], columns: Sequence[str], gap_reference: str, latex: bool
            ) -> dict[str, str]:
    ks = sorted({r["metrics"].get("is_k") for r in records if r["kind"] == "run" and r["metrics"].get("is_k")})
    is_k = str(ks[0]) if len(ks) == 1 else "K"
    labels = {}
    for name in columns:
        label = COLUMNS[name].label.format(is_k=is_k)
        if name == "gap":
            label = f"gap ({gap_reference} − ELBO)"
        if latex:
            label = label.replace("log p(x)", r"$\log p(x)$").replace("−", "$-$")
        labels[name] = label
    return labels


def gap_reference(records: Sequence[Mapping[str, Any]]) -> str:
    """``AIS``, ``IS`` or ``AIS/IS``: which log p(x) estimate the gap column subtracts the ELBO from."""
    kinds = {"AIS" if "log_px_ais" in r["metrics"] else "IS" for r in records
             if r["kind"] == "run" and r["metrics"].get("gap") is not None}
    return "/".join(sorted(kinds)) if kinds else "log p(x)"


def notes(records: Sequence[Mapping[str, Any]], table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Footnotes: what ± means, what the gap is, where published values come from, what was unavailable."""
    seeds = sorted(set(int(s) for s in table["seeds"])) if "seeds" in table else []
    out = [f"Mean ± standard error across seeds (seeds per row: {', '.join(map(str, seeds))}); "
           "nats per test datapoint; a single seed has no standard error."]
    if "gap" in columns:
        out.append("gap = log p(x) − ELBO, paired per test datapoint; log p(x) by AIS where available, "
                   "else by importance sampling.")
    if "published" in columns:
        shown = "published_mean" in table and table["published_mean"].notna().any()
        out.append(f"published: {PUBLISHED_SOURCE}." if shown else
                   "published: — (Burda et al. 2016 values apply only to MNIST with the 784-200-200-50 tanh model).")
    if "ais" in columns or "bdmc_gap" in columns:
        tolerances = sorted({r["diagnostics"].get("ais", {}).get("certificate", {}).get("tolerance")
                             for r in records if r["kind"] == "run"} - {None})
        if tolerances:
            out.append("AIS T: the annealing length BDMC certified on data simulated from each decoder (Wu et al. "
                       "2017): T doubles until the BDMC gap (upper − lower bound, mean over the simulated points) "
                       f"plus its standard error is below {'/'.join(f'{t:g}' for t in tolerances)} nats; "
                       "BDMC gap: that gap at the chosen T.")
        if "uncertified" in table and table["uncertified"].sum():
            out.append(f"{UNCERTIFIED_MARK} uncertified: for {int(table['uncertified'].sum())} decoder(s) the BDMC gap "
                       "did not close within the largest T tried; their AIS numbers may understate log p(x).")
    posthoc = sorted({record_label(r) for r in records if r["kind"] == "run" and r["metrics"].get("posthoc_encoder")})
    if posthoc:
        budgets = {"{objective}, {epochs} epochs, lr {lr:g}".format(**r["diagnostics"]["posthoc_encoder"])
                   for r in records if r["kind"] == "run" and r["metrics"].get("posthoc_encoder")}
        budget = next(iter(budgets)) if len(budgets) == 1 else "see the records"
        out.append(f"{', '.join(posthoc)}: IS, ELBO, gap and active units use a post-hoc encoder, a Gaussian "
                   f"fitted to the frozen decoder after training ({budget}); the decoder was learned without one.")
    paired = [r for r in records if r["kind"] == "run" and r["metrics"].get("ais_minus_is") is not None
              and r["metrics"].get("ais_minus_is_se")]
    threshold = disagreement_threshold(len(paired))
    looser: dict[str, list[float]] = {}
    for record in paired:
        m = record["metrics"]
        if m["ais_minus_is"] < -threshold * m["ais_minus_is_se"]:
            looser.setdefault(record_label(record), []).append(m["ais_minus_is"])
    if looser:
        parts = [f"{label} ({len(v)} run(s), by {-max(v):.2f}" + ("" if len(v) == 1 else f"–{-min(v):.2f}") + " nats)"
                 for label, v in looser.items()]
        out.append(f"AIS came out looser than importance sampling (paired, by more than {threshold:.2f} SE, the "
                   f"two-sided 5% level over {len(paired)} decoders) for {', '.join(parts)}: AIS is too short for "
                   "these decoders, so AIS-based numbers (the gap) understate log p(x); more AIS steps or chains "
                   "tighten it.")
    out += [f"{line}." for line in unavailable_lines(records)]
    return out


def disagreement_threshold(comparisons: int, level: float = 0.05) -> float:
    """z beyond which two independent estimates of one decoder disagree, over ``comparisons`` decoders.

    The two-sided ``level`` with Bonferroni's correction, Φ⁻¹(1 − level / (2m)): with m decoders
    checked, a false warning anywhere in the table has probability at most ``level`` (a fixed 2 SE
    would flag one decoder in two tables of 20 by chance alone).
    """
    from statistics import NormalDist
    return NormalDist().inv_cdf(1 - level / (2 * max(comparisons, 1)))


def unavailable_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per distinct reason something could not run: ``unavailable: NAMES (RUNS): REASON``."""
    grouped: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for record in records:
        label = record_label(record)
        for name, reason in record["unavailable"].items():
            names, labels = grouped.setdefault(reason, ({}, {}))
            names[name] = None
            if not name.startswith("method:"):
                labels[label] = None
    lines = []
    for reason, (names, labels) in grouped.items():
        where = f" ({', '.join(labels)})" if labels else ""
        lines.append(f"unavailable: {', '.join(names)}{where}: {reason}")
    return lines


def format_table(records: Sequence[Mapping[str, Any]], fmt: str = "markdown", by: Sequence[str] = DEFAULT_BY,
                 columns: Sequence[str] = DEFAULT_COLUMNS, with_notes: bool = True) -> str:
    """The comparison table as Markdown (pipe table), LaTeX (booktabs ``tabular``) or CSV (numbers)."""
    if fmt not in FORMATS:
        raise ResultsError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    table = comparison_table(records, by, columns)
    if fmt == "csv":
        return table.drop(columns=["uncertified"]).to_csv(index=False, float_format="%.6g")
    latex = fmt == "latex"
    labels = _labels(records, columns, gap_reference(records), latex)
    shown = pd.DataFrame()
    for name in by:
        values = table[name]
        shown[name if not latex else name.replace("_", r"\_")] = [("--" if latex else "—") if pd.isna(v) else str(v)
                                                                  for v in values]
    shown["seeds"] = table["seeds"].astype(str)
    for name in columns:
        digits = COLUMNS[name].digits
        se = table[f"{name}_se"] if f"{name}_se" in table else [None] * len(table)
        cells = [_cell(m, s, digits, latex) for m, s in zip(table[f"{name}_mean"], se)]
        if name == "ais":
            cells = [cell + (f" {UNCERTIFIED_MARK}" if n else "") for cell, n in zip(cells, table["uncertified"])]
        shown[labels[name]] = cells
    footnotes = notes(records, table, columns) if with_notes else []
    if latex:
        body = shown.to_latex(index=False, column_format="l" * len(by) + "r" * (len(shown.columns) - len(by)),
                              escape=False)
        return body + "".join(f"% {line}\n" for line in footnotes)
    body = shown.to_markdown(index=False, disable_numparse=True, colalign=["left"] * len(by)
                             + ["right"] * (len(shown.columns) - len(by)))
    return body + "\n" + ("\n" + "\n".join(f"- {line}" for line in footnotes) + "\n" if footnotes else "")
