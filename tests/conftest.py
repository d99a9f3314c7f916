"""Shared fixtures: a small linear-Gaussian model in float64 whose exact answers are known."""

from __future__ import annotations

import pytest
import torch

from vaebench.config import ModelConfig
from vaebench.model import VAE


def make_linear_gaussian_vae(data_dim: int = 6, latent_dim: int = 2, seed: int = 0,
                             encoder_hidden: tuple[int, ...] = (16,)) -> VAE:
    """A float64 linear-Gaussian VAE with random W, b and per-dimension noise scales."""
    g = torch.Generator().manual_seed(seed)
    config = ModelConfig(data_dim=data_dim, latent_dim=latent_dim, hidden=(), model="linear",
                         likelihood="gaussian", encoder_hidden=encoder_hidden)
    model = VAE(config).double()
    with torch.no_grad():
        model.decoder.net.weight.copy_(torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64))
        model.decoder.net.bias.copy_(torch.randn(data_dim, generator=g, dtype=torch.float64))
        model.decoder.log_scale.copy_(torch.empty(data_dim, dtype=torch.float64).uniform_(-1.2, 0.0, generator=g))
    return model


def simulate(model: VAE, n: int, seed: int = 1) -> torch.Tensor:
    """Draw n datapoints from a linear-Gaussian model's generative process."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    z = torch.randn(n, model.config.latent_dim, generator=g, dtype=dtype)
    noise = torch.randn(n, model.config.data_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        return model.decoder(z) + model.decoder.scale() * noise


@pytest.fixture
def linear_gaussian() -> tuple[VAE, torch.Tensor]:
    model = make_linear_gaussian_vae()
    return model, simulate(model, 200)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' networks are tiny: one thread avoids OpenMP overhead on small shared machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    import pyro
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``vaebench ARGV`` in-process: (exit status, stdout, stderr)."""
    from vaebench import cli
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:          # argparse exits for usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def linear_gaussian_run(tmp_path_factory):
    """A float64 linear-Gaussian run directory trained for one epoch (shared by the CLI tests of AIS)."""
    from vaebench import cli
    out = tmp_path_factory.mktemp("runs") / "lg"
    assert cli.main(["train", "--method", "vi", "--dataset", "linear-gaussian", "--epochs", "1", "--hidden", "8",
                     "--quiet", "--dtype", "float64", "--out", str(out)]) == 0
    return out
