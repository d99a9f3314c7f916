"""``vaebench compare``: an interrupted and resumed compare writes the records of an uninterrupted one;
settings are validated before anything is written; bad input exits 2."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

from vaebench import cli
from vaebench.compare import PRESETS, CompareConfig, plan, run_compare, stage_seed
from vaebench.compare import stages
from vaebench.compare.plan import Model, Stage
from vaebench.errors import ConfigError, RunDirError
from vaebench.estimators import importance_sampling, over_batches
from vaebench.results import ResultsError, comparable, read_records

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny compare (vi and iwae, two seeds), in this process."""
    out = tmp_path_factory.mktemp("reference") / "results"
    run_compare(TINY, out, progress=False, workers=1)
    return out


def by_key(records):
    return {r["key"]: comparable(r) for r in records}


class Interrupt:
    """Wraps ``fn`` so that its ``n``-th call raises KeyboardInterrupt (as a Ctrl-C would)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def test_interrupted_and_resumed_compare_equals_uninterrupted(reference, tmp_path, monkeypatch):
    out = tmp_path / "results"
    total = len(plan(TINY))
    with monkeypatch.context() as mp:
        mp.setattr(stages, "train", Interrupt(stages.train, 3))
        with pytest.raises(KeyboardInterrupt):
            run_compare(TINY, out, progress=False, workers=1)
    first = read_records(out)
    assert 0 < len(first) < total
    assert not any(".partial" in name for name in os.listdir(out / "runs")), "a half-trained run was left behind"
    assert not (out / ".compare.lock").exists()
    with monkeypatch.context() as mp:
        mp.setattr(stages, "fit_local_gaussians", Interrupt(stages.fit_local_gaussians, 1))
        with pytest.raises(KeyboardInterrupt):
            run_compare(TINY, out, progress=False, workers=1)
    second = read_records(out)
    assert len(first) < len(second)
    assert second[:len(first)] == first, "finished records were rewritten"
    torch.manual_seed(12345)  # disturb global RNG state: stages must seed themselves
    threads = torch.get_num_threads()
    outcome = run_compare(TINY, out, progress=False, workers=1)
    assert torch.get_num_threads() == threads
    assert 0 < len(outcome.ran) < total and outcome.skipped > 0
    assert by_key(read_records(out)) == by_key(read_records(reference))
    for name in sorted(os.listdir(reference / "runs")):
        a = torch.load(reference / "runs" / name / "model.pt", weights_only=True)
        b = torch.load(out / "runs" / name / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert run_compare(TINY, out, progress=False, workers=1).ran == []


def test_records_content(reference):
    records = {r["key"]: r for r in read_records(reference)}
    assert sorted({r["kind"] for r in records.values()}) == ["aggregate", "bounds", "gaps", "run", "variance"]
    vi = records["run/vi/seed0"]
    assert vi["guide"] == "gaussian" and vi["k"] == 1
    assert vi["unavailable"] == {} and vi["metrics"]["log_px_ais"] < 0
    assert vi["config"]["compare"] == TINY.to_dict()
    assert vi["config"]["train"]["seed"] == 0 and vi["config"]["model"]["latent_dim"] == 3
    assert vi["metrics"]["gradient_evaluations"] == 2 * 200 * 1
    assert records["run/iwae-k3/seed1"]["metrics"]["gradient_evaluations"] == 2 * 200 * 3
    assert vi["wall_time"]["train"] > 0 and vi["provenance"]["git_commit"]
    assert vi["metrics"]["gap"] == pytest.approx(vi["metrics"]["log_px_ais"] - vi["metrics"]["elbo"], abs=1e-9)
    gaps = records["gaps/vi/seed0"]["metrics"]
    assert gaps["approximation_gap"] + gaps["amortisation_gap"] == pytest.approx(gaps["inference_gap"], abs=1e-9)
    bounds = records["bounds/vi/seed0"]
    curve = {p["k"]: p["value"] for p in bounds["series"]["iwae"]}
    assert sorted(curve) == sorted(TINY.bound_ks)
    assert not any(name.startswith("iwae_k") for name in bounds["metrics"]), "K is a field, not part of a name"
    assert curve[50] > curve[1]          # IWAE_K rises with K (Burda et al. 2016, Thm. 1)
    variance = records["variance/vi/seed0"]
    assert {p["k"] for p in variance["series"]["snr_encoder"]} == set(TINY.variance_ks)


def test_bounds_stage_reproduces_with_its_stage_seed(reference):
    """A record's numbers follow from its run directory and its stage seed alone."""
    import pyro

    ctx = stages.Context(TINY, reference)
    model, _ = stages.load_model(ctx, Stage("bounds", Model("vi", 1, "gaussian"), 1))
    pyro.set_rng_seed(stage_seed(1, "bounds/k10"))
    with torch.no_grad():
        values = over_batches(lambda xb: importance_sampling(model.log_joint, model.encoder_proposal, xb, 10),
                              ctx.x_test, TINY.eval_batch_size).log_marginal
    record = next(r for r in read_records(reference) if r["key"] == "bounds/vi/seed1")
    value = next(p["value"] for p in record["series"]["iwae"] if p["k"] == 10)
    assert value == pytest.approx(float(values.double().mean()), rel=1e-12)


def test_stage_seeds_are_distinct_and_stable():
    seeds = {stage_seed(s, name) for s in range(5) for name in ("eval/ais", "eval/is", "eval/elbo", "gaps/local-vi")}
    assert len(seeds) == 20
    assert stage_seed(0, "eval/is") == stage_seed(0, "eval/is")


def test_plan_keys_and_guides():
    keys = [s.key for s in plan(TINY) if s.seed == 0]
    assert keys == ["train/vi/seed0", "run/vi/seed0", "bounds/vi/seed0", "gaps/vi/seed0", "variance/vi/seed0",
                    "aggregate/vi/seed0", "train/iwae-k3/seed0", "run/iwae-k3/seed0", "aggregate/iwae-k3/seed0"]
    assert Model("iwae", 5, "iaf").label == "iwae-k5+iaf" and Model("hmc", None, None).label == "hmc"
    assert Model("iwae", 1, "gaussian").label == "iwae-k1"
    for stage in plan(TINY):
        assert all(d.key in {s.key for s in plan(TINY)} for d in stage.dependencies())


def test_resume_refuses_other_settings(reference):
    with pytest.raises(ResultsError, match=r"different settings \(config.epochs: stored 2, now 3\)"):
        run_compare(dataclasses.replace(TINY, epochs=3), reference, progress=False, workers=1)


def test_resume_refuses_a_tampered_run_directory(reference, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(reference, copy)
    path = copy / "runs" / "vi-seed0" / "config.json"
    saved = json.loads(path.read_text())
    saved["train"]["epochs"] = 99
    path.write_text(json.dumps(saved))
    with pytest.raises(RunDirError, match="trained with other settings"):
        run_compare(TINY, copy, progress=False, workers=1)


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ResultsError, match="not empty and holds no compare.json"):
        run_compare(TINY, tmp_path, progress=False, workers=1)


@pytest.mark.parametrize("changes,message", [
    ({"methods": ("vi", "nuts")}, "unknown method"),
    ({"seeds": (0, 0)}, "--seeds must be distinct"),
    ({"seeds": (2**32,)}, r"--seeds must be distinct integers in 0\.\.4294967295"),
    ({"iwae_ks": (0,)}, "--k must be"),
    ({"guides": ("flow",)}, "unknown guide"),
    ({"lr_schedule": "cosine"}, "learning-rate schedule"),
    ({"dataset": "cifar"}, "unknown dataset"),
])
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **changes)


def test_config_round_trip_and_axes_are_sets():
    for cfg in PRESETS.values():
        assert CompareConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(TINY, seeds=(1, 0), methods=("iwae", "vi")) == dataclasses.replace(TINY, seeds=(0, 1))


def test_paper_preset_is_burdas_protocol():
    paper = PRESETS["paper"]
    assert (paper.dataset, paper.hidden, paper.latent_dim, paper.activation) == ("mnist", (200, 200), 50, "tanh")
    assert (paper.batch_size, paper.epochs, paper.lr_schedule, paper.is_k) == (20, 3280, "burda", 5000)
    assert paper.iwae_ks == (5, 50) and PRESETS["quick"].iwae_ks == (5, 50)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "vi,nuts"], "unknown method(s) nuts"),
    (["--seeds", "0,x"], "expected comma-separated integers"),
    (["--seeds", "4294967296"], "argument --seeds: expected integers in 0..4294967295"),
    (["--seeds", str(2**70)], "argument --seeds: expected integers in 0..4294967295"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--executor", "slurm", "--slurm-time", "soon"], "--slurm-time must be minutes"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    from conftest import run_cli

    status, _, err = run_cli(capsys, "compare", "--out", str(tmp_path / "r"), *argv)
    assert status == 2
    assert err.startswith("vaebench: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_cli_unwritable_out_exits_2(tmp_path, capsys):
    from conftest import run_cli

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked / "r", locked / "a" / "b"):
            status, _, err = run_cli(capsys, "compare", "--out", str(out), "--preset", "tiny", "--quiet")
            assert status == 2 and err.startswith("vaebench: error: cannot create results directory")
            assert err.count("\n") == 1
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


def test_unwritable_existing_out_is_one_line(tmp_path, monkeypatch):
    """An existing results directory we cannot write to is refused before any work (also as root)."""
    out = tmp_path / "r"
    out.mkdir()

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ResultsError, match="cannot write to results directory .*Permission denied"):
        run_compare(dataclasses.replace(TINY, seeds=(0,)), out, progress=False, workers=1)
    monkeypatch.undo()
    assert os.listdir(out) == []


def test_cli_missing_data_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "a" / "r"
    argv = ["compare", "--out", str(out), "--preset", "tiny", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "the four IDX files were not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_creates_parents_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "a" / "b" / "r")                 # missing parents are created, as `train` does
    args = ["compare", "--out", out, "--preset", "tiny", "--seeds", "0", "--workers", "1", "--quiet"]
    with monkeypatch.context() as mp:
        mp.setattr(stages, "train", Interrupt(stages.train, 2))
        assert cli.main(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "(6 already done, resumed)" in printed and "| vi " in printed and "| iwae " in printed
