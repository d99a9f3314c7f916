"""``vaebench report``: non-empty PNG figures and a Markdown report from a tiny compare; bad input exits 2."""

import dataclasses
import os

import numpy as np
import pytest
from matplotlib.image import imread

from vaebench import cli
from vaebench.compare import PRESETS, run_compare
from vaebench.results import RECORDS_FILE

HAVE_HMC = True
FIGURES = ("loglik.png", "iwae_k.png", "loglik_vs_time.png", "gaps.png", "variance.png",
           "aggregate_posterior.png", "samples.png")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A tiny compare (one seed of vi, iwae and hmc)."""
    out = tmp_path_factory.mktemp("compare") / "results"
    run_compare(dataclasses.replace(PRESETS["tiny"], seeds=(0,), methods=("vi", "iwae", "hmc")), out,
                progress=False, workers=1)
    return out


def test_report_writes_pngs_and_markdown(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    figures = FIGURES + (("hmc.png",) if HAVE_HMC else ())
    if not HAVE_HMC:
        assert "not drawn: hmc.png: no batched HMC sampler" in captured.err
    for name in figures:
        path = out / "figures" / name
        assert path.stat().st_size > 5000, name
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, name
        assert float(np.std(image[..., :3])) > 0.01, f"{name} is blank"
    report = (out / "report.md").read_text()
    for name in figures:
        assert f"](figures/{name})" in report
    assert ("_Not drawn:" in report) != HAVE_HMC
    assert "post-hoc encoder" in report                  # the hmc decoder's IS and ELBO say where they come from
    assert "| vi " in report and "approximation gap" in report and "IWAE_50" in report
    assert r"\toprule" in (out / "table.tex").read_text()
    assert (out / "table.csv").read_text().startswith("method,k,seeds,")
    assert (out / "figures" / "hmc.png").exists() == HAVE_HMC


def test_existing_output_needs_overwrite(results, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["report", str(results), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(["report", str(results), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.md").is_file() and not (out / "keep.txt").exists()
    assert not [name for name in os.listdir(tmp_path) if ".partial" in name]


def test_bad_results_directory_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaebench: error: results directory") and "does not exist" in err
    (tmp_path / RECORDS_FILE).write_text("{broken\n")
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert f"{RECORDS_FILE}:1: corrupt record" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
