"""The command line: the train → evaluate round trip, and one clear line + exit 2 for bad input."""

import json
import subprocess
import sys

import pytest

from vaebench import cli

from conftest import run_cli

TINY = ["--epochs", "1", "--hidden", "16", "--latent-dim", "4", "--quiet"]


run = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vi"
    assert cli.main(["train", "--method", "vi", "--dataset", "digits", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_a_complete_run_directory(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["config.json", "log.jsonl", "model.pt"]
    config = json.loads((trained / "config.json").read_text())
    assert config["train"]["seed"] == 0 and config["model"]["latent_dim"] == 4
    assert {"versions", "git_commit", "device", "command"} <= set(config["provenance"])
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1]


@pytest.mark.parametrize("estimator,k", [("elbo", "3"), ("iwae", "20")])
def test_evaluate_json(trained, capsys, estimator, k):
    status, out, err = run(capsys, "evaluate", str(trained), "--estimator", estimator, "--k", k, "--json")
    assert status == 0, err
    result = json.loads(out)
    for key in ("estimator", "k", "dataset", "split", "n", "log_likelihood", "stderr", "seconds"):
        assert key in result
    assert result["k"] == int(k) and result["n"] == 297 and result["dataset"] == "digits"
    assert result["log_likelihood"] < 0 and result["stderr"] > 0
    again = json.loads(run(capsys, "evaluate", str(trained), "--estimator", estimator, "--k", k, "--json")[1])
    assert again["log_likelihood"] == result["log_likelihood"]          # same seed, same number


def test_exact_on_linear_gaussian(tmp_path, capsys):
    out = tmp_path / "lg"
    status, _, err = run(capsys, "train", "--method", "iwae", "--k", "3", "--dataset", "linear-gaussian",
                         "--epochs", "2", "--hidden", "16", "--quiet", "--out", str(out))
    assert status == 0, err
    exact = json.loads(run(capsys, "evaluate", str(out), "--estimator", "exact", "--json")[1])
    iwae = json.loads(run(capsys, "evaluate", str(out), "--estimator", "iwae", "--k", "1000", "--json")[1])
    assert exact["k"] is None and exact["n"] == 500
    # IWAE_K is a lower bound in expectation: not above exact by more than 3 standard errors
    assert iwae["log_likelihood"] <= exact["log_likelihood"] + 3 * iwae["stderr"]


BAD = [
    (["train", "--method", "bogus", "--dataset", "digits", "--out", "{tmp}/r"], "invalid choice"),
    (["train", "--method", "vi", "--dataset", "cifar", "--out", "{tmp}/r"], "invalid choice"),
    (["train", "--method", "vi", "--dataset", "digits", "--epochs", "-1", "--out", "{tmp}/r"], "non-negative"),
    (["train", "--method", "iwae", "--k", "0", "--dataset", "digits", "--out", "{tmp}/r"], "in 1..100000"),
    (["train", "--method", "vi", "--dataset", "digits", "--lr", "nan", "--out", "{tmp}/r"], "positive"),
    (["train", "--method", "vi", "--dataset", "digits", "--hidden", "20,x", "--out", "{tmp}/r"], "widths"),
    (["train", "--method", "vi", "--dataset", "linear-gaussian", "--likelihood", "bernoulli", "--out", "{tmp}/r"],
     "Bernoulli"),
    (["train", "--method", "vi", "--dataset", "fashion-mnist", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/r"],
     "IDX files were not found"),
    (["train", "--method", "vi", "--dataset", "digits", "--device", "tpu", "--out", "{tmp}/r"], "device"),
    (["evaluate", "{tmp}/missing", "--estimator", "elbo"], "does not exist"),
    (["evaluate", "{tmp}", "--estimator", "elbo"], "not a run directory"),
    (["evaluate", "{tmp}", "--estimator", "magic"], "invalid choice"),
    (["evaluate", "{tmp}", "--estimator", "iwae", "--k", "0"], "in 1..100000"),
]


@pytest.mark.parametrize("argv,phrase", BAD)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, argv, phrase):
    before = sorted(tmp_path.rglob("*"))
    status, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("vaebench: error:") and phrase in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_existing_run_directory_is_not_overwritten(trained, capsys):
    status, _, err = run(capsys, "train", "--method", "vi", "--dataset", "digits", "--out", str(trained), *TINY)
    assert status == 2 and "already exists" in err


def test_exact_refuses_nonlinear_models(trained, capsys):
    status, _, err = run(capsys, "evaluate", str(trained), "--estimator", "exact")
    assert status == 2 and "linear decoder" in err


def test_interrupted_training_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    import vaebench.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaebench.training, "train", interrupted)
    status, _, err = run(capsys, "train", "--method", "vi", "--dataset", "digits", "--out", str(tmp_path / "r"), *TINY)
    assert status == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_status():
    result = subprocess.run([sys.executable, "-m", "vaebench.cli", "evaluate", "/nonexistent/run", "--estimator",
                             "elbo"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "vaebench: error: run directory /nonexistent/run does not exist"


def test_same_seed_reproduces_the_trained_weights(tmp_path):
    import torch
    for name in ("a", "b"):
        assert cli.main(["train", "--method", "vi", "--dataset", "digits", "--seed", "7",
                         "--out", str(tmp_path / name), *TINY]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
