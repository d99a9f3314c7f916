"""Run directories are written atomically and loaded safely."""

import json

import pytest
import torch

from vaebench.config import ModelConfig, TrainConfig
from vaebench.errors import RunDirError
from vaebench.model import VAE
from vaebench.rundir import atomic_write_text, load_run, staged_directory, write_run


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_stage_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_round_trip_and_overwrite(tmp_path):
    out = tmp_path / "run"
    model = VAE(ModelConfig(data_dim=5, latent_dim=2, hidden=(3,)))
    for _ in range(2):                                        # second pass overwrites
        with staged_directory(out, overwrite=True) as staging:
            write_run(staging, model, TrainConfig(), {"source": "test"}, {"git_commit": "x"}, [{"epoch": 1}], {})
    loaded, train_config, config = load_run(out)
    assert train_config == TrainConfig() and config["dataset"] == {"source": "test"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(RunDirError, match="already exists"):
        with staged_directory(out):
            pass


def test_corrupt_or_incomplete_run_directories(tmp_path):
    out = tmp_path / "run"
    with staged_directory(out) as staging:
        write_run(staging, VAE(ModelConfig(data_dim=5, latent_dim=2, hidden=(3,))), TrainConfig(), {}, {}, [], {})
    (out / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match="truncated or corrupt"):
        load_run(out)
    config = json.loads((out / "config.json").read_text())
    config["model"]["latent_dim"] = 3
    torch.save(VAE(ModelConfig(data_dim=5, latent_dim=2, hidden=(3,))).state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="does not match"):
        load_run(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        load_run(out)
    (out / "config.json").unlink()
    with pytest.raises(RunDirError, match="not a run directory"):
        load_run(out)


def test_missing_parent_directories_are_created(tmp_path):
    out = tmp_path / "runs" / "deep" / "run"
    with staged_directory(out) as staging:
        (staging / "x").write_text("1")
    assert (out / "x").read_text() == "1"
