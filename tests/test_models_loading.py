"""``--model SPEC``: user files and modules load, bad models get one line before any training, and a
run directory never makes vaebench import code."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vaebench.models.loading import parse_model_args

from conftest import run_cli
from test_models_contract import EXAMPLE

HEADER = """
import pyro, pyro.distributions as dist, torch
from torch import nn
"""

BAD_MODELS = {
    "no data plate": ("""
        class M(nn.Module):
            def model(self, x):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=x.new_zeros(x.shape)).to_event(1), obs=x)
        def make(data_dim):
            return M()
        """, "has no pyro.plate.'data', n, dim=-1."),
    "two observed sites": ("""
        class M(nn.Module):
            def model(self, x):
                with pyro.plate("data", x.shape[0], dim=-1):
                    z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                    pyro.sample("x", dist.Bernoulli(logits=x.new_zeros(x.shape)).to_event(1), obs=x)
                    pyro.sample("y", dist.Bernoulli(logits=x.new_zeros(x.shape)).to_event(1), obs=x)
        def make(data_dim):
            return M()
        """, "observes 2 sites"),
    "no observed site": ("""
        class M(nn.Module):
            def model(self, x):
                with pyro.plate("data", x.shape[0], dim=-1):
                    pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        def make(data_dim):
            return M()
        """, "observes no site"),
    "latent outside the plate": ("""
        class M(nn.Module):
            def model(self, x):
                g = pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
                with pyro.plate("data", x.shape[0], dim=-1):
                    pyro.sample("x", dist.Normal(g.expand(x.shape), 1.0).to_event(1), obs=x)
        def make(data_dim):
            return M()
        """, "'g' of model.x. is outside pyro.plate"),
    "discrete latent": ("""
        class M(nn.Module):
            def model(self, x):
                with pyro.plate("data", x.shape[0], dim=-1):
                    c = pyro.sample("c", dist.Bernoulli(x.new_full((), 0.5)))
                    pyro.sample("x", dist.Bernoulli(logits=c[:, None].expand(x.shape)).to_event(1), obs=x)
        def make(data_dim):
            return M()
        """, "discrete .* HMC and AIS need continuous latents"),
    "factory raises": ("""
        def make(data_dim):
            raise RuntimeError("no GPU here")
        """, "the factory raised RuntimeError: no GPU here"),
    "factory returns no module": ("""
        def make(data_dim):
            return 42
        """, "returned int, not a torch.nn.Module with a model"),
    "guide over other sites": ("""
        class M(nn.Module):
            def model(self, x):
                with pyro.plate("data", x.shape[0], dim=-1):
                    z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                    pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True).expand(x.shape)).to_event(1), obs=x)
            def guide(self, x):
                with pyro.plate("data", x.shape[0], dim=-1):
                    pyro.sample("w", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        def make(data_dim):
            return M()
        """, "samples site\\(s\\) w but the model's latents are z"),
}


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "user_model.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return path


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_that_breaks_the_contract_gets_one_line_before_training(capsys, tmp_path, case):
    body, message = BAD_MODELS[case]
    path = _write(tmp_path, body)
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out, err = run_cli(capsys, "train", "--method", "vi", "--dataset", "digits", "--epochs", "1",
                               "--model", f"{path}:make", "--out", str(tmp_path / "runs" / "run"))
    assert status == 2, err
    assert err.startswith("vaebench: error: ") and err.count("\n") == 1, err
    import re
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before   # nothing left


@pytest.mark.parametrize("argv,message", [
    (["--model", "missing_file.py:make"], "file missing_file.py does not exist"),
    (["--model", "no_such_package_xyz.models:make"], "no module 'no_such_package_xyz.models'"),
    (["--model", "nonsense"], "neither a built-in"),
    (["--model", f"{EXAMPLE}:make_model", "--model-arg", "d1"], "--model-arg 'd1' is not KEY=VALUE"),
    (["--model", f"{EXAMPLE}:make_model", "--model-arg", "unknown=3"], "unexpected keyword argument 'unknown'"),
    (["--model", f"{EXAMPLE}:make_model", "--latent-dim", "3"], "--latent-dim configure the built-in models"),
    (["--model", f"{EXAMPLE}:no_factory"], "has no callable 'no_factory'"),
    (["--flows", "2"], "--flows applies to --guide iaf"),
    (["--guide", "model"], "has no guide"),
])
def test_bad_model_options_are_one_line(capsys, tmp_path, argv, message):
    status, _, err = run_cli(capsys, "train", "--method", "vi", "--dataset", "linear-gaussian", "--epochs", "1",
                             "--out", str(tmp_path / "run"), *argv)
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_model_args_are_json_or_strings():
    assert parse_model_args(["d1=3", "name=foo", "widths=[1, 2]", "flag=true"]) == {
        "d1": 3, "name": "foo", "widths": [1, 2], "flag": True}


@pytest.fixture
def user_run(capsys, tmp_path):
    spec = f"{EXAMPLE}:make_model"
    out = tmp_path / "run"
    status, _, err = run_cli(capsys, "train", "--method", "vi", "--dataset", "linear-gaussian", "--epochs", "1",
                             "--model", spec, "--model-arg", "d1=2", "--quiet", "--out", str(out))
    assert status == 0, err
    return spec, out


def test_a_user_model_run_records_its_spec_arguments_and_file_hash(user_run):
    import hashlib
    spec, out = user_run
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["model"] == spec and saved["model_args"] == {"d1": 2}
    assert saved["model_sha256"] == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()


def test_evaluating_a_user_model_run_needs_the_same_model_again(capsys, user_run, tmp_path):
    spec, out = user_run
    status, _, err = run_cli(capsys, "evaluate", str(out), "--estimator", "elbo")
    assert status == 2 and "pass --model" in err and err.count("\n") == 1, err
    status, res, err = run_cli(capsys, "evaluate", str(out), "--estimator", "iwae", "--k", "50", "--model", spec,
                               "--json")
    assert status == 0, err
    assert json.loads(res)["estimator"] == "iwae"
    copy = tmp_path / "changed.py"                       # the same code under another name: another SPEC
    copy.write_text(EXAMPLE.read_text())
    status, _, err = run_cli(capsys, "evaluate", str(out), "--estimator", "elbo", "--model", f"{copy}:make_model")
    assert status == 2 and "not" in err and err.count("\n") == 1, err


def test_a_changed_model_file_is_refused(capsys, tmp_path):
    path = tmp_path / "model.py"
    path.write_text(EXAMPLE.read_text())
    spec = f"{path}:make_model"
    out = tmp_path / "run"
    status, _, err = run_cli(capsys, "train", "--method", "vi", "--dataset", "linear-gaussian", "--epochs", "1",
                             "--model", spec, "--quiet", "--out", str(out))
    assert status == 0, err
    path.write_text(EXAMPLE.read_text() + "\n# edited\n")
    status, _, err = run_cli(capsys, "evaluate", str(out), "--estimator", "elbo", "--model", spec)
    assert status == 2 and "has changed since" in err and err.count("\n") == 1, err


def test_compare_runs_a_user_model_with_both_guides(capsys, tmp_path):
    """README's `compare --model examples/...` on the tiny preset: every row is the user model's."""
    from vaebench.results import read_records

    out = tmp_path / "results"
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--dataset", "linear-gaussian", "--quiet",
                             "--workers", "1", "--seeds", "0", "--methods", "vi", "--guides", "gaussian,iaf",
                             "--model", f"{EXAMPLE}:make_model", "--out", str(out))
    assert status == 0, err
    runs = [r for r in read_records(out) if r["kind"] == "run"]
    assert sorted(r["guide"] for r in runs) == ["gaussian", "iaf"]
    assert all(r["config"]["model"]["model"] == f"{EXAMPLE}:make_model" for r in runs)
    gaps = [r for r in read_records(out) if r["kind"] == "gaps"]
    assert sorted(r["diagnostics"]["local_vi"]["family"] for r in gaps) == ["gaussian", "iaf"]


def test_compare_refuses_a_bad_model_before_writing_anything(capsys, tmp_path):
    body, message = BAD_MODELS["discrete latent"]
    path = _write(tmp_path, body)
    out = tmp_path / "results"
    status, _, err = run_cli(capsys, "compare", "--preset", "tiny", "--quiet", "--workers", "1",
                             "--model", f"{path}:make", "--out", str(out))
    assert status == 2 and err.count("\n") == 1 and "continuous latents" in err, err
    assert not out.exists()
