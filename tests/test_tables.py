"""The comparison table equals a hand computation from the records; formats; published column; errors."""

import io
import math
import statistics

import pandas as pd
import pytest

from vaebench import cli
from vaebench.results import ResultsError, append_record, make_record
from vaebench.tables import comparison_table, format_table, published_log_px

PROVENANCE = {"versions": {"vaebench": "0.1.0", "torch": "2", "pyro": "1.9"}, "git_commit": "abc",
              "device": "cpu", "command": "test", "time_utc": "2024-01-01T00:00:00+00:00"}
DIGITS = {"data_dim": 64, "latent_dim": 10, "hidden": [100, 100], "activation": "tanh", "decoder": "mlp",
          "likelihood": "bernoulli", "encoder_hidden": None}
BURDA = {"data_dim": 784, "latent_dim": 50, "hidden": [200, 200], "activation": "tanh", "decoder": "mlp",
         "likelihood": "bernoulli", "encoder_hidden": None}

# (method, k, seed) -> (log_px_ais, log_px_is, elbo, gap, active_units, train seconds)
NUMBERS = {
    ("vi", 1, 0): (-24.0, -24.1, -24.5, 0.5, 6, 10.0),
    ("vi", 1, 1): (-24.2, -24.3, -24.9, 0.7, 7, 12.0),
    ("vi", 1, 2): (-23.9, -24.0, -24.3, 0.4, 7, 11.0),
    ("iwae", 5, 0): (-23.4, -23.5, -25.0, 1.6, 10, 20.0),
    ("iwae", 5, 1): (-23.3, -23.3, -25.2, 1.9, 10, 24.0),
    ("iwae", 5, 2): (-23.6, -23.6, -24.8, 1.2, 9, 21.0),
}


def make(method, k, seed, model=DIGITS, dataset="digits", values=None, unavailable=None):
    ais, is_, elbo, gap, units, seconds = values or NUMBERS[(method, k, seed)]
    metrics = {"log_px_ais": ais, "log_px_is": is_, "is_k": 5000, "elbo": elbo, "gap": gap, "active_units": units,
               "gradient_evaluations": 1000 * k}
    return make_record(key=f"run/{method}-k{k}/seed{seed}", kind="run", method=method, k=k, seed=seed,
                       config={"model": model, "train": {"method": method, "dataset": dataset, "seed": seed},
                               "compare": {}},
                       metrics=metrics, wall_time={"train": seconds}, provenance=PROVENANCE,
                       unavailable=unavailable or {}, diagnostics={}, run_dir=None)


@pytest.fixture
def records():
    return [make(*key) for key in NUMBERS]


def hand(method, k, column):
    index = ["ais", "is", "elbo", "gap", "active_units", "time"].index(column)
    values = [v[index] for (m, kk, _), v in NUMBERS.items() if (m, kk) == (method, k)]
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_table_numbers_equal_hand_computation(records):
    table = comparison_table(records)
    assert list(zip(table["method"], table["k"])) == [("vi", 1), ("iwae", 5)]
    for _, row in table.iterrows():
        assert row["seeds"] == 3
        for column in ("ais", "is", "elbo", "gap", "active_units", "time"):
            mean, se = hand(row["method"], row["k"], column)
            assert row[f"{column}_mean"] == pytest.approx(mean, rel=1e-12)
            assert row[f"{column}_se"] == pytest.approx(se, rel=1e-12)
        assert math.isnan(row["published_mean"])


def test_csv_and_markdown_carry_the_same_numbers(records):
    csv = pd.read_csv(io.StringIO(format_table(records, "csv")))
    mean, se = hand("iwae", 5, "elbo")
    row = csv[csv["method"] == "iwae"].iloc[0]
    assert row["elbo_mean"] == pytest.approx(mean, rel=1e-5) and row["elbo_se"] == pytest.approx(se, rel=1e-5)
    markdown = format_table(records, "markdown")
    assert f"{mean:.2f} ± {se:.2f}" in markdown
    assert "log p(x) IS-5000" in markdown and "gap (AIS − ELBO)" in markdown


def test_grouping_by_method_groups_by_the_row_label(records):
    """``--by method`` never pools iwae K=5 with K=50: a row is what its label (iwae-k5, iwae-k50) says."""
    records = records + [make("iwae", 50, 0, values=(-23.0, -23.1, -27.0, 4.0, 10, 40.0))]
    table = comparison_table(records, by=("method",), columns=("elbo",))
    assert table["method"].tolist() == ["vi", "iwae-k5", "iwae-k50"]
    iwae = table[table["method"] == "iwae-k5"].iloc[0]
    assert (iwae["elbo_mean"], iwae["elbo_se"]) == pytest.approx(hand("iwae", 5, "elbo"))
    assert table[table["method"] == "iwae-k50"].iloc[0]["elbo_mean"] == pytest.approx(-27.0)


def test_single_seed_has_no_standard_error(records):
    table = comparison_table([r for r in records if r["seed"] == 0])
    assert table["seeds"].tolist() == [1, 1]
    assert table["elbo_se"].isna().all()
    assert "±" not in format_table([r for r in records if r["seed"] == 0], "markdown", with_notes=False)


def test_latex_uses_booktabs(records):
    latex = format_table(records, "latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert rule in latex
    assert r"$\pm$" in latex and r"$\log p(x)$" in latex


def test_published_column_only_for_burda_setup():
    burda = [make("vi", 1, s, model=BURDA, dataset="mnist") for s in range(3)]
    burda += [make("iwae", 5, s, model=BURDA, dataset="mnist") for s in range(3)]
    table = comparison_table(burda)
    assert table["published_mean"].tolist() == [-86.76, -85.54]
    assert "Burda" in format_table(burda, "markdown")
    # same architecture on another data set, or another architecture on MNIST: no published value
    assert published_log_px(make("vi", 1, 0, model=BURDA, dataset="fashion-mnist")) is None
    assert published_log_px(make("vi", 1, 0, model={**BURDA, "hidden": [100, 100]}, dataset="mnist")) is None
    assert published_log_px(make("vi", 1, 0, model={**BURDA, "activation": "relu"}, dataset="mnist")) is None
    assert published_log_px(make("iwae", 5, 0, model=BURDA, dataset="mnist")) == -85.54
    assert published_log_px(make("iwae", 7, 0, model=BURDA, dataset="mnist", values=NUMBERS[("iwae", 5, 0)])) is None


def test_unavailable_stages_are_disclosed(records):
    records = [make("vi", 1, 0, unavailable={"ais": "estimator 'ais' is not registered"})] + records[1:]
    assert "unavailable: ais (vi): estimator 'ais' is not registered." in format_table(records, "markdown")


def test_unknown_columns_are_errors(records):
    with pytest.raises(ResultsError, match="unknown --by column.*nonsense"):
        comparison_table(records, by=("nonsense",))
    with pytest.raises(ResultsError, match="unknown column.*nonsense"):
        comparison_table(records, columns=("elbo", "nonsense"))
    with pytest.raises(ResultsError, match="no run records"):
        comparison_table([])


def test_cli_table(tmp_path, records, capsys):
    for record in records:
        append_record(tmp_path, record)
    assert cli.main(["table", str(tmp_path), "--format", "csv", "--by", "method", "--columns", "elbo,gap"]) == 0
    out = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(out.columns) == ["method", "seeds", "elbo_mean", "elbo_se", "gap_mean", "gap_se"]
    assert cli.main(["table", str(tmp_path), "--by", "methd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaebench: error: unknown --by column(s) methd") and err.count("\n") == 1
    assert cli.main(["table", str(tmp_path), "--columns", "elbo,bogus"]) == 2
    assert "unknown column(s) bogus" in capsys.readouterr().err


def test_row_order_does_not_depend_on_the_order_stages_finished(records):
    """Parallel workers append records in any order; the table's rows are fixed: method, guide, k."""
    finished = list(reversed(records))
    hmc = make("hmc", 1, 0, values=next(iter(NUMBERS.values())))
    table = comparison_table([hmc, *finished])
    assert list(zip(table["method"], table["k"])) == [("vi", 1), ("iwae", 5), ("hmc", 1)]
    pd.testing.assert_frame_equal(comparison_table(records + [hmc]), table)
