"""The built-in models are ordinary contract models; burda-2layer trains and every estimator scores it."""

from __future__ import annotations

import math

import pyro
import torch

from vaebench.config import AISConfig, ModelConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.evaluation import EstimatorSettings, evaluate
from vaebench.model import LatentModel
from vaebench.rundir import load_run

from conftest import run_cli


def test_burda_2layer_is_the_papers_architecture():
    model = LatentModel(ModelConfig(data_dim=784, model="burda-2layer"))
    assert model.space.names == ("h2", "h1") and [s.size for s in model.space.sites] == [50, 100]
    assert model.own_guide and model.config.guide == "model"
    widths = [m.out_features for m in model.generative.decoder if isinstance(m, torch.nn.Linear)]
    assert widths == [200, 200, 784]
    prior = [m.out_features for m in model.generative.prior_h1.body if isinstance(m, torch.nn.Linear)]
    assert prior == [100, 100]
    encoder_h1 = [m.out_features for m in model.generative.encoder_h1.body if isinstance(m, torch.nn.Linear)]
    encoder_h2 = [m.out_features for m in model.generative.encoder_h2.body if isinstance(m, torch.nn.Linear)]
    assert encoder_h1 == [200, 200] and encoder_h2 == [100, 100]
    assert {p.data_ptr() for p in model.encoder_parameters()}.isdisjoint(
        {p.data_ptr() for p in model.decoder_parameters()})


def test_burda_2layer_trains_on_mnist_5k_and_every_estimator_scores_it(capsys, tmp_path):
    out = tmp_path / "burda"
    status, _, err = run_cli(capsys, "train", "--method", "iwae", "--k", "2", "--model", "burda-2layer",
                             "--dataset", "mnist-5k", "--epochs", "1", "--batch-size", "200", "--quiet",
                             "--out", str(out))
    assert status == 0, err
    model, _, _ = load_run(out)
    x = evaluation_data(load_dataset("mnist-5k"), "test", model.likelihood)[:12]
    results = {}
    for name, settings in (("elbo", EstimatorSettings(k=4)), ("iwae", EstimatorSettings(k=64)),
                           ("ais", EstimatorSettings(ais=AISConfig(steps=30, leapfrog=2, chains=2))),
                           ("bdmc", EstimatorSettings(ais=AISConfig(steps=30, leapfrog=2, chains=2)))):
        pyro.set_rng_seed(0)
        results[name] = evaluate(model, x, name, settings)
    for name, result in results.items():
        assert math.isfinite(result["log_likelihood"]) and result["n"] == 12, name
    assert results["elbo"]["log_likelihood"] < results["iwae"]["log_likelihood"] + 3 * results["iwae"]["stderr"]
    assert -784 * math.log(2) - 50 < results["iwae"]["log_likelihood"] < 0
    assert results["bdmc"]["upper"] >= results["bdmc"]["lower"] - 3 * results["bdmc"]["gap_stderr"]
