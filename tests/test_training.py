"""The one training loop: reproducibility, improvement, schedule, divergence."""

import pytest
import torch

from vaebench import training
from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import evaluation_data, load_dataset
from vaebench.errors import TrainingDivergedError
from vaebench.estimators import importance_sampling, mean_and_stderr
from vaebench.model import VAE

SMALL = dict(latent_dim=8, hidden=(64,))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def fit(dataset, seed=0, epochs=2, method="vi", **kwargs):
    torch.manual_seed(seed)
    model = VAE(ModelConfig(data_dim=dataset.data_dim, **SMALL))
    config = TrainConfig(method=method, dataset="digits", epochs=epochs, batch_size=100, seed=seed, **kwargs)
    return training.train(model, dataset, config, progress=False)


def test_same_seed_same_numbers(digits):
    a, b = fit(digits, seed=3), fit(digits, seed=3)
    assert [row["train_bound"] for row in a.history] == [row["train_bound"] for row in b.history]
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    c = fit(digits, seed=4)
    assert a.history[-1]["train_bound"] != c.history[-1]["train_bound"]


@pytest.mark.parametrize("method,extra", [("vi", {}), ("iwae", {"k": 5}), ("iwae", {"k": 5, "dreg": True})])
def test_training_improves_test_log_likelihood(digits, method, extra):
    """IWAE_50 on the fixed test binarisation rises after 5 epochs (paired over datapoints)."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(data_dim=digits.data_dim, **SMALL))
    x = evaluation_data(digits, "test", "bernoulli")
    with torch.no_grad():
        before = importance_sampling(model.log_joint, model.encoder_proposal, x, 50).log_marginal
    config = TrainConfig(method=method, dataset="digits", epochs=5, batch_size=100, seed=0, **extra)
    result = training.train(model, digits, config, progress=False)
    with torch.no_grad():
        after = importance_sampling(model.log_joint, model.encoder_proposal, x, 50).log_marginal
    mean, se = mean_and_stderr(after - before)
    assert mean > 3 * se
    assert result.history[-1]["test_elbo"] > result.history[0]["test_elbo"]
    assert result.gradient_evaluations == 5 * 1500 * config.k


def test_burda_schedule():
    config = TrainConfig(lr=1e-3, lr_schedule="burda")
    # stage i lasts 3**i epochs: epochs 0 | 1-3 | 4-12 | ...; 3280 = sum of 3**i for i < 8
    assert training.learning_rate(config, 0) == pytest.approx(1e-3)
    assert training.learning_rate(config, 1) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert training.learning_rate(config, 3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert training.learning_rate(config, 4) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert training.learning_rate(config, 3279) == pytest.approx(1e-3 * 10 ** (-7 / 7))
    assert sum(3 ** i for i in range(8)) == 3280


def test_divergence_is_an_error_not_nan(digits, monkeypatch):
    class Exploding:
        name = "exploding"

        def accumulate_gradients(self, model, x, indices):
            return float("nan")

        def gradient_evaluations(self, batch_size):
            return batch_size

    monkeypatch.setattr(training, "make_objective", lambda config: Exploding())
    with pytest.raises(TrainingDivergedError, match="epoch 1, batch 1"):
        fit(digits, epochs=1)
