"""The built-in models, each an ordinary instance of the model contract (:mod:`vaebench.models.contract`).

``mlp``           z ~ N(0, I_D), x | z ~ p_θ(x|z) with an MLP decoder (Bernoulli logits or Gaussian
                  means); the one-stochastic-layer architecture of Burda et al. (2016).
``linear``        the same with x-parameters W z + b; with ``likelihood="gaussian"`` this is factor
                  analysis, whose log p(x) and posterior are known exactly (:mod:`vaebench.targets`).
``burda-2layer``  Burda et al. (2016)'s second architecture (the 2-layer rows of their Table 1):
                  h2 ~ N(0, I_50), h1 | h2 ~ N(μ(h2), diag σ(h2)²) with two tanh layers of 100
                  units, x | h1 ~ Bernoulli with two tanh layers of 200 units; its own guide
                  q(h1|x) q(h2|h1) mirrors it.

Each factory is called as ``factory(data_dim=P, **args)`` and returns a module with ``model(x)``
(and, for ``burda-2layer``, ``guide(x)``) -- exactly what a user's factory returns.
"""

from __future__ import annotations

from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vaebench.models.contract import DATA_PLATE
from vaebench.models.guides import mlp


class Decoder(nn.Module):
    """z ↦ parameters of p_θ(x|z): Bernoulli logits, or a Gaussian mean and scale."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: tuple[int, ...], activation: str, linear: bool,
                 likelihood: str, gaussian_scale: float | None) -> None:
        super().__init__()
        self.data_dim, self.likelihood, self.gaussian_scale = data_dim, likelihood, gaussian_scale
        self.net: nn.Module = nn.Linear(latent_dim, data_dim) if linear else mlp([latent_dim, *hidden, data_dim],
                                                                                  activation)
        self.log_scale = (nn.Parameter(torch.zeros(data_dim))
                          if likelihood == "gaussian" and gaussian_scale is None else None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits or Gaussian means, ``[..., data_dim]``."""
        return self.net(z)

    def scale(self) -> torch.Tensor:
        """Observation standard deviation per dimension (Gaussian likelihood only)."""
        if self.log_scale is not None:
            return self.log_scale.exp()
        weight = next(self.parameters())
        return torch.full((self.data_dim,), float(self.gaussian_scale), dtype=weight.dtype, device=weight.device)

    def distribution(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p_θ(x|z) with the pixels as one event: batch shape ``z.shape[:-1]``."""
        out = self(z)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.scale()).to_event(1)


class OneLatentModel(nn.Module):
    """z_i ~ N(0, I_D), x_i | z_i ~ p_θ(x | z_i) in plate ``data`` (``mlp`` and ``linear``)."""

    def __init__(self, data_dim: int, latent_dim: int = 50, hidden: tuple[int, ...] = (200, 200),
                 activation: str = "tanh", linear: bool = False, likelihood: str = "bernoulli",
                 gaussian_scale: float | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = Decoder(data_dim, latent_dim, tuple(hidden), activation, linear, likelihood, gaussian_scale)

    def model(self, x: torch.Tensor) -> None:
        d = self.latent_dim
        with pyro.plate(DATA_PLATE, x.shape[-2], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), x.new_ones(d)).to_event(1))
            pyro.sample("x", self.decoder.distribution(z), obs=x)


class _GaussianLayer(nn.Module):
    """input ↦ N(μ, diag σ²) through two tanh layers of ``width`` (one stochastic layer of Burda et al.)."""

    def __init__(self, fan_in: int, width: int, fan_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(fan_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.loc = nn.Linear(width, fan_out)
        self.log_scale = nn.Linear(width, fan_out)

    def forward(self, inputs: torch.Tensor) -> dist.TorchDistribution:
        h = self.body(inputs)
        return dist.Normal(self.loc(h), self.log_scale(h).exp()).to_event(1)


class Burda2Layer(nn.Module):
    """Burda et al. (2016)'s two-stochastic-layer model and its mirrored guide.

    Generative: h2 ~ N(0, I_{h2}); h1 | h2 ~ N(μ(h2), σ(h2)²) (two tanh layers of ``width2``);
    x | h1 ~ Bernoulli(logits(h1)) (two tanh layers of ``width1``). Guide: q(h1|x) (two tanh layers
    of ``width1``), q(h2|h1) (two tanh layers of ``width2``), both diagonal Gaussians.
    """

    def __init__(self, data_dim: int, h1: int = 100, h2: int = 50, width1: int = 200, width2: int = 100) -> None:
        super().__init__()
        self.h2_dim = h2
        self.prior_h1 = _GaussianLayer(h2, width2, h1)
        self.decoder = nn.Sequential(nn.Linear(h1, width1), nn.Tanh(), nn.Linear(width1, width1), nn.Tanh(),
                                     nn.Linear(width1, data_dim))
        self.encoder_h1 = _GaussianLayer(data_dim, width1, h1)
        self.encoder_h2 = _GaussianLayer(h1, width2, h2)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[-2], dim=-1):
            h2 = pyro.sample("h2", dist.Normal(x.new_zeros(self.h2_dim), x.new_ones(self.h2_dim)).to_event(1))
            h1 = pyro.sample("h1", self.prior_h1(h2))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h1), validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[-2], dim=-1):
            h1 = pyro.sample("h1", self.encoder_h1(x))
            pyro.sample("h2", self.encoder_h2(h1))


def _mlp(data_dim: int, **args: Any) -> OneLatentModel:
    return OneLatentModel(data_dim, linear=False, **args)


def _linear(data_dim: int, **args: Any) -> OneLatentModel:
    args.pop("hidden", None)
    args.pop("activation", None)
    return OneLatentModel(data_dim, hidden=(), linear=True, **args)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "linear": _linear, "burda-2layer": Burda2Layer}
"""Built-in model name → factory ``(data_dim, **args) -> module``."""
ARCHITECTURE_MODELS = ("mlp", "linear")
"""Built-ins configured by :class:`~vaebench.config.ModelConfig`'s architecture fields
(``latent_dim``, ``hidden``, ``activation``, ``likelihood``, ``gaussian_scale``)."""
__all__ = ["BUILTIN_MODELS", "Burda2Layer", "Decoder", "OneLatentModel"]
