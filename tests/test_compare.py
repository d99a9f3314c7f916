"""``vaebench compare``: an interrupted and resumed compare writes the records of an uninterrupted one;
optional capabilities are looked up in the registries and disclosed when missing; bad input exits 2."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

from vaebench import cli, compare, evaluation
from vaebench import config as config_registry
from vaebench.compare import PRESETS, Comparison, CompareConfig, plan, run_compare, stage_seed
from vaebench.errors import ConfigError, RunDirError
from vaebench.estimators import importance_sampling, over_batches
from vaebench.results import ResultsError, comparable, read_records

TINY = PRESETS["tiny"]


@pytest.fixture
def without_optional(monkeypatch):
    """The registries as the foundation has them: no 'ais' estimator, no 'hmc' training method."""
    monkeypatch.delitem(evaluation.ESTIMATORS, "ais", raising=False)
    monkeypatch.setattr(config_registry, "METHODS", tuple(m for m in config_registry.METHODS if m != "hmc"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny compare (vi and iwae; no AIS)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(evaluation.ESTIMATORS, "ais", raising=False)
        out = tmp_path_factory.mktemp("reference") / "results"
        run_compare(TINY, out, progress=False)
    return out


class Interrupt:
    """Wraps ``fn`` so that its ``n``-th call raises KeyboardInterrupt (as a Ctrl-C would)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def test_interrupted_and_resumed_compare_equals_uninterrupted(reference, tmp_path, monkeypatch, without_optional):
    out = tmp_path / "results"
    total = len(plan(TINY, compare.unavailable_capabilities(TINY)))
    # first interruption: inside the third training (seed 1's vi), after seed 0 finished
    with monkeypatch.context() as mp:
        mp.setattr(compare, "train", Interrupt(compare.train, 3))
        with pytest.raises(KeyboardInterrupt):
            run_compare(TINY, out, progress=False)
    first = read_records(out)
    assert 0 < len(first) < total
    assert not any(".partial" in name for name in os.listdir(out / "runs")), "a half-trained run was left behind"
    # second interruption: inside the per-datapoint q* optimisation of seed 1
    with monkeypatch.context() as mp:
        mp.setattr(compare, "fit_local_gaussians", Interrupt(compare.fit_local_gaussians, 1))
        with pytest.raises(KeyboardInterrupt):
            run_compare(TINY, out, progress=False)
    second = read_records(out)
    assert len(first) < len(second) < total - 1
    assert second[:len(first)] == first, "finished records were rewritten"
    torch.manual_seed(12345)  # disturb global RNG state: stages must seed themselves
    threads = torch.get_num_threads()
    ran = Comparison(TINY, out, progress=False).run()
    assert torch.get_num_threads() == threads
    assert 0 < len(ran) < total
    resumed, uninterrupted = read_records(out), read_records(reference)
    assert [r["key"] for r in resumed] == [r["key"] for r in uninterrupted]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in uninterrupted]
    for name in sorted(os.listdir(reference / "runs")):
        a = torch.load(reference / "runs" / name / "model.pt", weights_only=True)
        b = torch.load(out / "runs" / name / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # a finished compare has nothing left to do
    assert Comparison(TINY, out, progress=False).run() == []


def test_records_content(reference):
    records = {r["key"]: r for r in read_records(reference)}
    kinds = sorted({r["kind"] for r in records.values()})
    assert kinds == ["aggregate", "bounds", "gaps", "run", "variance"]
    vi = records["run/vi/seed0"]
    assert vi["unavailable"]["ais"].startswith("estimator 'ais' is not registered")
    assert "log_px_ais" not in vi["metrics"]
    assert vi["config"]["compare"] == TINY.to_dict()
    assert vi["config"]["train"]["seed"] == 0 and vi["config"]["model"]["latent_dim"] == 3
    assert vi["metrics"]["gradient_evaluations"] == 2 * 200 * 1
    assert records["run/iwae-k3/seed1"]["metrics"]["gradient_evaluations"] == 2 * 200 * 3
    assert vi["wall_time"]["train"] > 0 and vi["provenance"]["git_commit"]
    # the gap is paired: it equals the mean difference, up to float rounding
    assert vi["metrics"]["gap"] == pytest.approx(vi["metrics"]["log_px_is"] - vi["metrics"]["elbo"], abs=1e-9)
    gaps = records["gaps/vi/seed0"]["metrics"]
    assert gaps["approximation_gap"] + gaps["amortisation_gap"] == pytest.approx(gaps["inference_gap"], abs=1e-9)
    bounds = records["bounds/vi/seed0"]["metrics"]
    assert {f"iwae_k{k}" for k in TINY.bound_ks} <= set(bounds)
    # IWAE_K rises with K (Burda et al. 2016, Thm. 1), here by far more than its paired noise
    assert bounds["iwae_k50"] > bounds["iwae_k1"]


def test_bounds_stage_reproduces_with_its_stage_seed(reference):
    """A record's numbers follow from its run directory and its stage seed alone."""
    import pyro

    comparison = Comparison(TINY, reference, progress=False)
    spec = compare.MethodSpec("vi", "vi", 1)
    model, _ = comparison.load(spec, 1)
    pyro.set_rng_seed(stage_seed(1, "bounds/k10"))
    with torch.no_grad():
        values = over_batches(lambda xb: importance_sampling(model.log_joint, model.encoder_proposal, xb, 10),
                              comparison.x_test, TINY.eval_batch_size).log_marginal
    record = next(r for r in read_records(reference) if r["key"] == "bounds/vi/seed1")
    assert record["metrics"]["iwae_k10"] == pytest.approx(float(values.double().mean()), rel=1e-12)


def test_stage_seeds_are_distinct_and_stable():
    seeds = {stage_seed(s, name) for s in range(5) for name in ("eval/ais", "eval/is", "eval/elbo", "gaps/local-vi")}
    assert len(seeds) == 20
    assert stage_seed(0, "eval/is") == stage_seed(0, "eval/is")


def test_missing_capabilities_are_disclosed_not_faked(tmp_path, without_optional):
    cfg = dataclasses.replace(TINY, methods=("vi", "hmc"), seeds=(0,), variance_ks=(1,))
    comparison = run_compare(cfg, tmp_path / "results", progress=False)
    assert set(comparison.unavailable) == {"ais", "hmc"}
    records = read_records(tmp_path / "results")
    assert {r["method"] for r in records} == {"vi"}
    for record in records:
        assert "not registered in vaebench.config.METHODS" in record["unavailable"]["method:hmc"]
        assert not any("ais" in name for name in record["metrics"])
    manifest = (tmp_path / "results" / "compare.json").read_text()
    assert '"hmc": "training method' in manifest and '"ais": "estimator' in manifest


def test_ais_stage_runs_when_registered(tmp_path, monkeypatch, without_optional):
    """Wiring only: a stand-in registered as 'ais' is called for every method and feeds the gaps."""
    calls = []

    def stand_in(model, x, settings):
        calls.append(model)
        values = over_batches(lambda xb: importance_sampling(model.log_joint, model.encoder_proposal, xb, 20), x, 100)
        return values.log_marginal, {"k": None, "stand_in": True}

    monkeypatch.setitem(evaluation.ESTIMATORS, "ais", stand_in)
    fields = {f.name for f in dataclasses.fields(evaluation.EstimatorSettings)}
    ais = {} if "ais" not in fields and not {"steps", "leapfrog", "chains"} <= fields else dict(TINY.ais)
    cfg = dataclasses.replace(TINY, seeds=(0,), ais=ais, variance_ks=(1,))
    run_compare(cfg, tmp_path / "results", progress=False)
    records = {r["key"]: r for r in read_records(tmp_path / "results")}
    assert len(calls) == 2
    vi = records["run/vi/seed0"]
    assert "ais" not in vi["unavailable"] and vi["diagnostics"]["ais"]["stand_in"] is True
    assert vi["metrics"]["gap"] == pytest.approx(vi["metrics"]["log_px_ais"] - vi["metrics"]["elbo"], abs=1e-9)
    assert records["gaps/vi/seed0"]["diagnostics"]["log_px"] == "ais"


def test_resume_refuses_other_settings(reference, without_optional):
    with pytest.raises(ResultsError, match=r"different settings \(config.epochs: stored 2, now 3\)"):
        Comparison(dataclasses.replace(TINY, epochs=3), reference, progress=False).run()


def test_resume_refuses_a_tampered_run_directory(reference, tmp_path, without_optional):
    copy = tmp_path / "results"
    shutil.copytree(reference, copy)
    path = copy / "runs" / "vi-seed0" / "config.json"
    saved = json.loads(path.read_text())
    saved["train"]["epochs"] = 99
    path.write_text(json.dumps(saved))
    with pytest.raises(RunDirError, match="trained with other settings"):
        Comparison(TINY, copy, progress=False).run()


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ResultsError, match="not empty and holds no compare.json"):
        Comparison(TINY, tmp_path, progress=False).run()


@pytest.mark.parametrize("changes,message", [
    ({"methods": ("vi", "nuts")}, "unknown method"),
    ({"seeds": (0, 0)}, "seeds must be distinct"),
    ({"iwae_ks": (0,)}, "iwae_ks must be"),
    ({"lr_schedule": "cosine"}, "learning-rate schedule"),
    ({"dataset": "cifar"}, "unknown dataset"),
])
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **changes)


def test_config_round_trip():
    for cfg in PRESETS.values():
        assert CompareConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_preset_is_burdas_protocol():
    paper = PRESETS["paper"]
    assert (paper.dataset, paper.hidden, paper.latent_dim, paper.activation) == ("mnist", (200, 200), 50, "tanh")
    assert (paper.batch_size, paper.epochs, paper.lr_schedule, paper.is_k) == (20, 3280, "burda", 5000)
    assert paper.iwae_ks == (5, 50) and PRESETS["quick"].iwae_ks == (5, 50)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "vi,nuts"], "unknown method(s) nuts"),
    (["--seeds", "0,x"], "expected comma-separated integers"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    try:
        status = cli.main(["compare", "--out", str(tmp_path / "r"), *argv])
    except SystemExit as exc:          # argparse exits for usage errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("vaebench: error: ") and message in err
    assert not (tmp_path / "r").exists()


def test_cli_missing_parent_exits_2(tmp_path, capsys):
    assert cli.main(["compare", "--out", str(tmp_path / "no" / "r"), "--preset", "tiny", "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_missing_data_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["compare", "--out", str(out), "--preset", "tiny", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "the four IDX files were not found" in capsys.readouterr().err
    assert not out.exists()


def test_cli_interrupt_then_resume(tmp_path, capsys, monkeypatch, without_optional):
    out = str(tmp_path / "r")
    args = ["compare", "--out", out, "--preset", "tiny", "--seeds", "0", "--quiet"]
    with monkeypatch.context() as mp:
        mp.setattr(compare, "train", Interrupt(compare.train, 2))
        assert cli.main(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "(2 already done, resumed)" in printed and "| vi " in printed and "| iwae " in printed
