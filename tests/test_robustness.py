"""Issue 11: every bad input is one line and exit 2 with nothing new on disk; every catchable
signal cleans up; shared files respect the umask; BDMC results say their data are simulated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vaebench import cli
from vaebench.config import MAX_SEED, ModelConfig, TrainConfig
from vaebench.errors import ConfigError
from vaebench.rundir import atomic_write_text, first_line, remove_stale_staging, staged_directory

from conftest import run_cli

TINY = ["--dataset", "digits", "--epochs", "0", "--hidden", "8", "--latent-dim", "2", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mode) for p in root.rglob("*"))


def assert_one_line_error(capsys, root: Path, *argv: str, phrase: str, status: int = 2) -> str:
    before = snapshot(root)
    code, out, err = run_cli(capsys, *argv)
    assert code == status, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vaebench: error:"), err
    assert phrase in err, err
    assert snapshot(root) == before
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vi"
    assert cli.main(["train", "--method", "vi", "--out", str(out), *TINY]) == 0
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


# ------------------------------------------------------------------------------------ 1. seeds
@pytest.mark.parametrize("argv", [
    ["train", "--method", "vi", "--seed", "8589934592", "--out", "{tmp}/r"],
    ["train", "--method", "vi", "--seed", str(2 ** 70), "--out", "{tmp}/r"],
    ["train", "--method", "vi", "--seed", "2**70", "--out", "{tmp}/r"],
    ["train", "--method", "vi", "--seed", "4294967296", "--out", "{tmp}/r"],
    ["evaluate", "{tmp}", "--estimator", "elbo", "--seed", "4294967296"],
    ["compare", "--out", "{tmp}/c", "--seeds", "4294967296"],
    ["compare", "--out", "{tmp}/c", "--seeds", "0,1," + str(2 ** 70)],
])
def test_out_of_range_seeds_are_refused_before_anything_is_written(tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] == "train":
        argv += TINY
    assert_one_line_error(capsys, tmp_path, *argv, phrase=f"0..{MAX_SEED}")


def test_largest_seed_is_accepted_and_train_config_checks_the_range(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--method", "vi", "--seed", str(MAX_SEED), "--out",
                           str(tmp_path / "r"), *TINY)
    assert code == 0, err
    with pytest.raises(ConfigError, match="seed must be in"):
        TrainConfig(seed=MAX_SEED + 1)


# ---------------------------------------------------------------------------- 2. checkpoints
def test_empty_and_truncated_checkpoints(run_dir, tmp_path, capsys):
    copy = copy_run(run_dir, tmp_path)
    weights = copy / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(b"")
    assert_one_line_error(capsys, tmp_path, "evaluate", str(copy), "--estimator", "elbo",
                          phrase=f"checkpoint {weights} is empty")
    for size in (1, 64, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:size])
        assert_one_line_error(capsys, tmp_path, "evaluate", str(copy), "--estimator", "elbo",
                              phrase="is truncated or corrupt")


def test_first_line_never_fails_on_an_empty_message():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(RuntimeError("\n\n  second\nthird")) == "second"


def test_error_messages_are_always_one_line(tmp_path, capsys, monkeypatch):
    import vaebench.data

    def fails(*args, **kwargs):
        raise ConfigError("first\nsecond")

    monkeypatch.setattr(vaebench.data, "load_dataset", fails)
    err = assert_one_line_error(capsys, tmp_path, "train", "--method", "vi", "--out", str(tmp_path / "r"), *TINY,
                                phrase="first second")
    assert err.strip() == "vaebench: error: first second"


# -------------------------------------------------------------------------------- 3. IDX data
def _idx_case(directory: Path, case: str) -> None:
    from test_data import make_idx_dir, write_idx

    import numpy as np

    from vaebench.data import IDX_FILES
    if case == "no images":
        make_idx_dir(directory, compress=False, n_train=0)
    elif case == "no test images":
        make_idx_dir(directory, compress=True, n_test=0)
    elif case == "zero-width images":
        make_idx_dir(directory, compress=False)
        write_idx(directory / IDX_FILES["train_images"], np.zeros((12, 4, 0)), compress=False)
    elif case == "pixels differ":
        make_idx_dir(directory, compress=False)
        write_idx(directory / IDX_FILES["test_images"], np.zeros((5, 5, 3)), compress=False)
    elif case == "labels differ":
        make_idx_dir(directory, compress=False)
        write_idx(directory / IDX_FILES["train_labels"], np.zeros(11), compress=False)
    elif case == "labels are images":
        make_idx_dir(directory, compress=False)
        write_idx(directory / IDX_FILES["train_labels"], np.zeros((12, 4, 3)), compress=False)
    elif case == "bad magic":
        make_idx_dir(directory, compress=False)
        (directory / IDX_FILES["test_labels"]).write_bytes(b"\x01\x02\x03\x04rest")
    elif case == "truncated":
        make_idx_dir(directory, compress=False)
        path = directory / IDX_FILES["train_images"]
        path.write_bytes(path.read_bytes()[:-7])
    elif case == "truncated gzip":
        make_idx_dir(directory, compress=True)
        path = directory / (IDX_FILES["train_images"] + ".gz")
        path.write_bytes(path.read_bytes()[:-9])
    elif case == "empty file":
        make_idx_dir(directory, compress=False)
        (directory / IDX_FILES["test_images"]).write_bytes(b"")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case,phrase", [
    ("no images", "holds no data"), ("no test images", "holds no data"), ("zero-width images", "holds no data"),
    ("pixels differ", "pixels but test images are"), ("labels differ", "do not match"),
    ("labels are images", "do not match"), ("bad magic", "bad magic"), ("truncated", "header promises"),
    ("truncated gzip", "cannot read IDX file"), ("empty file", "bad magic"),
])
def test_malformed_idx_data_sets_are_one_line(tmp_path, capsys, case, phrase):
    data = tmp_path / "idx"
    data.mkdir()
    _idx_case(data, case)
    assert_one_line_error(capsys, tmp_path, "train", "--method", "vi", "--dataset", "mnist", "--data-dir", str(data),
                          "--epochs", "0", "--hidden", "8", "--latent-dim", "2", "--quiet",
                          "--out", str(tmp_path / "r"), phrase=phrase)


# ------------------------------------------------------------------------- 4. unwritable --out
@pytest.mark.parametrize("out", ["afile/run", "afile/a/b/run"])
def test_out_below_a_file(tmp_path, capsys, out):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(capsys, tmp_path, "train", "--method", "vi", "--out", str(tmp_path / out), *TINY,
                          phrase="is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
@pytest.mark.parametrize("out", ["ro/run", "ro/a/b/run"])
def test_out_in_a_read_only_directory(tmp_path, capsys, out):
    (tmp_path / "ro").mkdir(mode=0o500)
    try:
        assert_one_line_error(capsys, tmp_path, "train", "--method", "vi", "--out", str(tmp_path / out), *TINY,
                              phrase="cannot create")
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.parametrize("fails", ["mkdir", "mkdtemp", "mkstemp"])
def test_os_errors_creating_a_run_directory_name_it_and_leave_nothing(tmp_path, capsys, monkeypatch, fails):
    """Whatever the OS refuses (permissions, a full disk), as root too: monkeypatched."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    if fails == "mkdir":
        original = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: refuse() if self.name == "b" else original(self, *a, **k))
    else:
        monkeypatch.setattr(tempfile, fails, refuse)
    out = tmp_path / "a" / "b" / "run"
    err = assert_one_line_error(capsys, tmp_path, "train", "--method", "vi", "--out", str(out), *TINY,
                                phrase="Permission denied")
    assert str(tmp_path / "a") in err


# --------------------------------------------------------------------------- 6. K and progress
@pytest.mark.parametrize("k", ["1000000000", "100001", "0"])
def test_evaluate_refuses_out_of_range_k(run_dir, capsys, k):
    assert_one_line_error(capsys, run_dir.parent, "evaluate", str(run_dir), "--estimator", "iwae", "--k", k,
                          phrase="--k")


def test_progress_only_when_asked_or_on_a_terminal(run_dir, capsys):
    code, out, err = run_cli(capsys, "evaluate", str(run_dir), "--estimator", "iwae", "--k", "30", "--json")
    assert code == 0 and err == ""                                   # stderr is not a terminal here
    quiet = json.loads(out)
    code, out, err = run_cli(capsys, "evaluate", str(run_dir), "--estimator", "iwae", "--k", "30", "--json",
                             "--progress")
    assert code == 0 and "iwae" in err and "sample" in err           # tqdm's bar
    loud = json.loads(out)
    assert loud["log_likelihood"] == quiet["log_likelihood"] and loud["ess_mean"] == quiet["ess_mean"]


def test_progress_callback_counts_every_sample_and_changes_nothing(linear_gaussian):
    from vaebench.estimators import importance_sampling

    model, x = linear_gaussian
    done = []
    torch.manual_seed(0)
    plain = importance_sampling(model.log_joint, model.encoder_proposal, x, 50, max_rows=1000)
    torch.manual_seed(0)
    counted = importance_sampling(model.log_joint, model.encoder_proposal, x, 50, 1000, done.append)
    assert torch.equal(plain.log_marginal, counted.log_marginal)
    assert sum(done) == 50 * x.shape[0] and len(done) == 10          # 1000 rows of 200 datapoints: 5 samples a chunk


def test_ais_and_bdmc_progress_counts_every_annealing_step_and_changes_nothing(linear_gaussian):
    from vaebench.config import AISConfig
    from vaebench.inference import ais

    model, x = linear_gaussian
    x = x[:30]
    config = AISConfig(steps=12, leapfrog=2, chains=2)
    plain = ais.ais(model, x, config, torch.Generator().manual_seed(0), batch_size=20)
    done = []
    counted = ais.ais(model, x, config, torch.Generator().manual_seed(0), batch_size=20, progress=done.append)
    assert torch.equal(plain.log_marginal, counted.log_marginal)
    assert sum(done) == 12 * 30                                      # every step of every chunk's datapoints
    x_sim, u_sim = model.simulate(10, torch.Generator().manual_seed(1))
    done.clear()
    ais.bdmc(model, x_sim, u_sim, config, torch.Generator().manual_seed(2), progress=done.append)
    assert sum(done) == 2 * 12 * 10                                  # forward and reverse


def test_evaluate_ais_shows_a_progress_bar_when_asked(run_dir, capsys):
    code, out, err = run_cli(capsys, "evaluate", str(run_dir), "--estimator", "ais", "--steps", "5", "--chains", "2",
                             "--no-certify", "--json", "--progress")
    assert code == 0 and "ais" in err and "step" in err, err


# ------------------------------------------------------------------------------------ 7. signals
def test_sigterm_in_process_cleans_up_like_ctrl_c(tmp_path, capsys, monkeypatch):
    import vaebench.training

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(vaebench.training, "train", killed)
    previous = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(capsys, "train", "--method", "vi", "--out", str(tmp_path / "a" / "r"), *TINY)
    assert code == 128 + signal.SIGTERM
    assert err.strip() == "vaebench: interrupted by SIGTERM; no partial results were written"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous                # handlers restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_to_a_training_process_leave_nothing(tmp_path, signum):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "vaebench.cli", "train", "--method", "vi", "--dataset", "digits",
                             "--epochs", "100000", "--hidden", "8", "--latent-dim", "2", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".run.partial-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)                                     # inside training
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert len(err.strip().splitlines()) == 1 and "no partial results were written" in err, err
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path, capsys):
    from vaebench.rundir import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".old.partial-{dead.pid}-{_host()}-abc123"
    live = tmp_path / f".other.partial-{os.getpid()}-{_host()}-def456"
    elsewhere = tmp_path / f".other.partial-{dead.pid}-some_other_host-ghi789"
    unrelated = tmp_path / ".notes"
    for folder in (stale, live, elsewhere, unrelated):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "train", "--method", "vi", "--out", str(tmp_path / "new"), *TINY)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, unrelated.name, "new"])
    assert remove_stale_staging(tmp_path) == []


def test_staging_folder_names_carry_pid_and_host(tmp_path):
    from vaebench.rundir import _STAGING_NAME, _host

    with staged_directory(tmp_path / "r") as staging:
        match = _STAGING_NAME.match(staging.name)
        assert match and int(match.group(1)) == os.getpid() and match.group(2) == _host()


# -------------------------------------------------------------------------------------- 10. umask
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_run_directories_respect_the_umask(tmp_path, capsys, mask):
    old = os.umask(mask)
    try:
        code, _, err = run_cli(capsys, "train", "--method", "vi", "--out", str(tmp_path / "a" / "run"), *TINY)
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    assert code == 0, err
    run = tmp_path / "a" / "run"
    assert (run.stat().st_mode & 0o777) == 0o777 & ~mask
    for name in ("config.json", "model.pt", "log.jsonl"):
        assert ((run / name).stat().st_mode & 0o777) == 0o666 & ~mask, name
    assert ((tmp_path / "note.txt").stat().st_mode & 0o777) == 0o666 & ~mask


# ---------------------------------------------------------------------------- 11. config types
@pytest.mark.parametrize("section,field,value,phrase", [
    ("model", "latent_dim", "x", "field 'latent_dim' must be an integer, got 'x'"),
    ("model", "hidden", [8, "a"], "field 'hidden' must be a list of integers"),
    ("model", "encoder", "yes", "field 'encoder' must be true or false"),
    ("train", "lr", "fast", "field 'lr' must be a number, got 'fast'"),
    ("train", "epochs", 1.5, "field 'epochs' must be an integer, got 1.5"),
    ("train", "seed", 2 ** 40, "seed must be in 0.."),
    ("model", "data_dim", None, "field 'data_dim' must be an integer, got None"),
    ("model", None, None, "missing ModelConfig field(s): data_dim"),
    ("train", None, [], "expected an object of TrainConfig fields"),
])
def test_wrong_types_in_config_json_name_the_file_and_field(run_dir, tmp_path, capsys, section, field, value, phrase):
    copy = copy_run(run_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    if field is not None:
        config[section][field] = value
    elif value is None:
        del config[section]["data_dim"]
    else:
        config[section] = value
    (copy / "config.json").write_text(json.dumps(config))
    err = assert_one_line_error(capsys, tmp_path, "evaluate", str(copy), "--estimator", "elbo", phrase=phrase)
    assert f"corrupt {copy / 'config.json'}:" in err and "not supported" not in err


def test_config_round_trip_still_works():
    config = ModelConfig(data_dim=5, hidden=(3, 2), encoder_hidden=(4,), gaussian_scale=0.5)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    train = TrainConfig(method="iwae", k=5, data_dir="/x")
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train


# ----------------------------------------------------------------------------------- 13. BDMC
def test_bdmc_results_say_their_data_are_simulated(run_dir, capsys):
    argv = ["evaluate", str(run_dir), "--estimator", "bdmc", "--steps", "3", "--chains", "1", "--leapfrog", "1"]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["dataset"] == f"simulated from the model (n={result['n']})" and result["split"] is None
    assert "active_units" not in result
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "simulated from the model" in out and "digits" not in out and "active units" not in out
