"""The evaluate back end refuses data the likelihood cannot score."""

import pytest
import torch

from vaebench.config import ModelConfig
from vaebench.errors import ConfigError, DataError
from vaebench.evaluation import EstimatorSettings, evaluate
from vaebench.model import VAE

from conftest import make_linear_gaussian_vae, simulate


def test_bernoulli_model_refuses_non_binary_data():
    model = VAE(ModelConfig(data_dim=4, latent_dim=2, hidden=(3,)))
    with pytest.raises(DataError, match="not binary"):
        evaluate(model, torch.full((3, 4), 0.5), "elbo")


def test_nan_data_refused():
    model = make_linear_gaussian_vae()
    x = simulate(model, 3)
    x[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        evaluate(model, x, "exact")


def test_unknown_estimator_and_bad_k():
    model = make_linear_gaussian_vae()
    x = simulate(model, 3)
    with pytest.raises(ConfigError, match="unknown estimator"):
        evaluate(model, x, "nope")
    with pytest.raises(ConfigError, match="k must be"):
        evaluate(model, x, "iwae", EstimatorSettings(k=0))


def test_exact_and_iwae_fields_agree_on_linear_gaussian():
    model = make_linear_gaussian_vae()
    x = simulate(model, 100)
    exact = evaluate(model, x, "exact")
    iwae = evaluate(model, x, "iwae", EstimatorSettings(k=2000))
    assert exact["k"] is None and iwae["k"] == 2000 and 1 <= iwae["ess_min"] <= 2000
    assert iwae["log_likelihood"] <= exact["log_likelihood"] + 3 * iwae["stderr"]
