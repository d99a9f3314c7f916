"""Learning the decoder without an encoder: Monte Carlo EM on persistent HMC chains (--method hmc)."""

import copy
import json

import pytest
import torch

from vaebench import cli
from vaebench.config import AISConfig, ModelConfig, TrainConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.estimators import mean_and_stderr
from vaebench.inference import ais
from vaebench.inference.mcem import HMCEMObjective
from vaebench.model import VAE
from vaebench.training import make_objective, train

from conftest import make_linear_gaussian_vae, simulate, run_cli


def test_train_hmc_on_digits_improves_ais_log_likelihood():
    """AIS log p̂(x) of 100 test digits rises over the initial decoder (paired, by more than 3 SE)."""
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = VAE(ModelConfig(data_dim=64, latent_dim=4, hidden=(32,), encoder=False))
    initial = copy.deepcopy(model)
    config = TrainConfig(method="hmc", dataset="digits", epochs=3, lr=1e-2, hmc_transitions=2, hmc_leapfrog=5)
    result = train(model, dataset, config, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert "test_elbo" not in result.history[-1]                 # no encoder, no ELBO
    x = evaluation_data(dataset, "test", "bernoulli")[:100]
    settings = AISConfig(steps=50, leapfrog=5, chains=4)
    with torch.no_grad():
        before = ais.ais(initial, x, settings, torch.Generator().manual_seed(0)).log_marginal
        after = ais.ais(result.model, x, settings, torch.Generator().manual_seed(0)).log_marginal
    gain, stderr = mean_and_stderr(after - before)
    assert gain > 3 * stderr, (gain, stderr)


def test_one_step_moves_only_the_batch_latents_and_reaches_only_the_decoder():
    model = make_linear_gaussian_vae()
    model.encoder = None
    x = simulate(model, 10)
    objective = HMCEMObjective(num_data=10, transitions=2, leapfrog=3, seed=0)
    rows = torch.tensor([1, 4, 7])
    objective.accumulate_gradients(model, x[rows], rows)
    before = objective.latents.clone()
    steps_before = objective.log_step_size.clone()
    assert objective.visited.tolist() == [i in (1, 4, 7) for i in range(10)]
    model.zero_grad()
    rows = torch.tensor([2, 4])
    bound = objective.accumulate_gradients(model, x[rows], rows)
    outside = torch.tensor([i not in (2, 4) for i in range(10)])
    assert torch.equal(objective.latents[outside], before[outside])   # (a batch row may stay put: rejection)
    assert (objective.log_step_size != steps_before).tolist() == (~outside).tolist()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.parameters())
    expected = float(model.log_joint(x[rows], objective.latents[rows]).sum().detach())
    assert bound == pytest.approx(expected, rel=1e-12)
    # 1 evaluation at the stored latents, L per transition, 1 for the M-step (row 2 adds its step-size search)
    assert objective.gradient_evaluations(2) >= 2 * (1 + 2 * 3 + 1)


def test_make_objective_builds_hmc_from_the_config():
    objective = make_objective(TrainConfig(method="hmc", hmc_transitions=4, hmc_leapfrog=7, seed=3))
    assert isinstance(objective, HMCEMObjective) and (objective.transitions, objective.leapfrog) == (4, 7)


# ------------------------------------------------------------------------------------------- CLI
run = run_cli


@pytest.fixture(scope="module")
def hmc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hmc"
    assert cli.main(["train", "--method", "hmc", "--dataset", "digits", "--epochs", "1", "--latent-dim", "2",
                     "--hidden", "8", "--transitions", "1", "--leapfrog", "3", "--quiet", "--out", str(out)]) == 0
    return out


def test_train_hmc_writes_a_run_without_encoder(hmc_run):
    config = json.loads((hmc_run / "config.json").read_text())
    assert config["model"]["encoder"] is False
    assert (config["train"]["method"], config["train"]["hmc_transitions"], config["train"]["hmc_leapfrog"]) == (
        "hmc", 1, 3)


@pytest.mark.parametrize("estimator", ["elbo", "iwae"])
def test_encoder_estimators_refuse_an_hmc_run(hmc_run, capsys, estimator):
    status, out, err = run(capsys, "evaluate", str(hmc_run), "--estimator", estimator)
    assert status == 2 and out == ""
    assert err.startswith("vaebench: error: ") and err.count("\n") == 1 and "no encoder" in err, err


def test_ais_scores_an_hmc_run(hmc_run, capsys):
    status, out, err = run(capsys, "evaluate", str(hmc_run), "--estimator", "ais", "--steps", "5", "--leapfrog", "2",
                           "--chains", "2", "--no-certify", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["method"] == "hmc" and result["n"] == 297 and result["log_likelihood"] < 0
    assert "active_units" not in result


@pytest.mark.parametrize("argv,message", [
    (["--method", "hmc", "--k", "5"], "--k applies to --method iwae"),
    (["--method", "hmc", "--encoder-hidden", "8"], "--encoder-hidden does not apply to --method hmc"),
    (["--method", "vi", "--leapfrog", "5"], "--transitions and --leapfrog apply to --method hmc"),
    (["--method", "hmc", "--transitions", "0"], "expected a positive integer"),
    (["--method", "hmc", "--leapfrog", "5000"], "leapfrog steps must be in 1..1000"),
])
def test_bad_hmc_training_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    status, stdout, err = run(capsys, "train", "--dataset", "digits", "--epochs", "0", "--quiet", "--out", str(out),
                              *argv)
    assert status == 2 and stdout == ""
    assert err.startswith("vaebench: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
