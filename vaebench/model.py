"""The one generative model p_θ(x|z)p(z), written once in Pyro, and its encoder q_φ(z|x).

Every density the package uses is read off a Pyro trace of :meth:`VAE.model` (or of
:meth:`VAE.guide`), never written a second time: :meth:`VAE.log_joint` conditions the model on
``z``, traces it, and sums the per-site ``log_prob`` tensors, which keep the data-plate dimension,
so the result is per datapoint with any number of leading sample dimensions.

Shapes: ``x`` is ``[n, data_dim]``; ``z`` is ``[..., n, latent_dim]``; per-datapoint densities
are ``[..., n]``.
"""

from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from vaebench.config import ModelConfig

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU,
}

Proposal = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``proposal(x, k) -> (z [k, n, latent_dim], log_q [k, n])``: draws and their log-density."""


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Fully connected network with ``activation`` between layers and a linear output."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """z ↦ parameters of p_θ(x|z): Bernoulli logits, or a Gaussian mean and scale."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.decoder == "linear":
            self.net: nn.Module = nn.Linear(config.latent_dim, config.data_dim)
        else:
            self.net = mlp([config.latent_dim, *config.hidden, config.data_dim], config.activation)
        if config.likelihood == "gaussian" and config.gaussian_scale is None:
            self.log_scale = nn.Parameter(torch.zeros(config.data_dim))
        else:
            self.log_scale = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits or Gaussian means, ``[..., data_dim]``."""
        return self.net(z)

    def scale(self) -> torch.Tensor:
        """Observation standard deviation per dimension (Gaussian likelihood only)."""
        if self.log_scale is not None:
            return self.log_scale.exp()
        weight = next(self.parameters())
        return torch.full((self.config.data_dim,), float(self.config.gaussian_scale),
                          dtype=weight.dtype, device=weight.device)

    def distribution(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p_θ(x|z) with the pixels as one event: batch shape ``z.shape[:-1]``."""
        out = self(z)
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.scale()).to_event(1)


class Encoder(nn.Module):
    """x ↦ (mean, standard deviation) of the diagonal Gaussian q_φ(z|x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = list(config.resolved_encoder_hidden)
        self.body = mlp([config.data_dim, *hidden], config.activation) if hidden else nn.Identity()
        if hidden:
            self.body.append(_ACTIVATIONS[config.activation]())
        width = hidden[-1] if hidden else config.data_dim
        self.loc = nn.Linear(width, config.latent_dim)
        self.log_scale = nn.Linear(width, config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), self.log_scale(h).exp()


class VAE(nn.Module):
    """The generative model and (optionally) its amortised encoder.

    The Pyro program is

    .. math::

        z_i \\sim \\mathcal N(0, I_D), \\qquad x_i \\mid z_i \\sim p_θ(x \\mid z_i),
        \\qquad i = 1..n \\text{ in plate ``data``},

    and the guide is q_φ(z_i|x_i) = N(μ_φ(x_i), diag σ_φ(x_i)²) in the same plate.

    Parameters
    ----------
    config
        Architecture; see :class:`vaebench.config.ModelConfig`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.encoder = Encoder(config) if config.encoder else None

    # ------------------------------------------------------------------ Pyro programs
    def model(self, x: torch.Tensor) -> None:
        """The Pyro model, registering the decoder's parameters (for SVI)."""
        pyro.module("decoder", self.decoder)
        self.generative(x)

    def generative(self, x: torch.Tensor) -> None:
        """p(z) p_θ(x|z) over a ``data`` plate of size ``x.shape[-2]`` (plate dim -1)."""
        d = self.config.latent_dim
        with pyro.plate("data", x.shape[-2], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), x.new_ones(d)).to_event(1))
            pyro.sample("x", self.decoder.distribution(z), obs=x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The Pyro guide q_φ(z|x), registering the encoder's parameters (for SVI)."""
        pyro.module("encoder", self._require_encoder())
        return self.inference_network(x)

    def inference_network(self, x: torch.Tensor, detach_parameters: bool = False) -> torch.Tensor:
        """q_φ(z|x) in the ``data`` plate; ``detach_parameters`` cuts μ, σ from the graph."""
        loc, scale = self._require_encoder()(x)
        if detach_parameters:
            loc, scale = loc.detach(), scale.detach()
        with pyro.plate("data", x.shape[-2], dim=-1):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------ densities from traces
    def site_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z), log p_θ(x|z)) per datapoint, read from a trace of the conditioned model."""
        conditioned = poutine.condition(self.generative, data={"z": z})
        trace = poutine.trace(conditioned).get_trace(x)
        trace.compute_log_prob()
        return trace.nodes["z"]["log_prob"], trace.nodes["x"]["log_prob"]

    def log_prior(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(z), ``[..., n]`` (``x`` only fixes the plate size)."""
        return self.site_log_probs(x, z)[0]

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_θ(x|z), ``[..., n]``."""
        return self.site_log_probs(x, z)[1]

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_θ(x, z) = log p(z) + log p_θ(x|z), ``[..., n]``: the unnormalised posterior."""
        log_pz, log_px_z = self.site_log_probs(x, z)
        return log_pz + log_px_z

    def encoder_proposal(self, x: torch.Tensor, k: int, detach_parameters: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``k`` reparameterised samples from q_φ(z|x), traced from the guide.

        With ``detach_parameters`` the samples stay reparameterised (gradients flow to φ through
        z) but their log-density is evaluated with μ, σ cut from the graph, as DReG requires.

        Returns
        -------
        z : Tensor ``[k, n, latent_dim]``
        log_q : Tensor ``[k, n]``
        """
        with pyro.plate("particles", k, dim=-2):
            trace = poutine.trace(self.inference_network).get_trace(x)
        z = trace.nodes["z"]["value"]
        if detach_parameters:
            return z, self.log_q(x, z, detach_parameters=True)
        trace.compute_log_prob()
        return z, trace.nodes["z"]["log_prob"]

    def log_q(self, x: torch.Tensor, z: torch.Tensor, detach_parameters: bool = False) -> torch.Tensor:
        """log q_φ(z|x), ``[..., n]``, from a trace of the guide conditioned on ``z``."""
        conditioned = poutine.condition(self.inference_network, data={"z": z})
        trace = poutine.trace(conditioned).get_trace(x, detach_parameters)
        trace.compute_log_prob()
        return trace.nodes["z"]["log_prob"]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q_φ(z|x), ``[n, latent_dim]`` each."""
        return self._require_encoder()(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples: z ~ p(z), then the mean of p_θ(x|z) (probabilities or Gaussian means)."""
        weight = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, dtype=weight.dtype,
                        device="cpu").to(weight.device)
        out = self.decoder(z)
        return z, torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out

    def _require_encoder(self) -> "Encoder":
        if self.encoder is None:
            from vaebench.errors import ConfigError
            raise ConfigError("this model has no encoder (it was trained with --method hmc); "
                              "use --estimator ais")
        return self.encoder
