"""Amortised guides that vaebench builds over a model's flattened latent ``u`` (``--guide gaussian|iaf``).

Both are distributions q_φ(u|x) on the unconstrained vector of :class:`~vaebench.models.contract.LatentSpace`,
batch shape ``[n]``, event shape ``[D]``:

``gaussian``  q_φ(u|x) = N(μ_φ(x), diag σ_φ(x)²), an MLP encoder with two linear heads (Kingma &
              Welling 2014); for the built-in one-latent models this is the classic VAE encoder.
``iaf``       the same Gaussian followed by N inverse autoregressive flows (Kingma et al. 2016),
              Pyro's ``ConditionalAffineAutoregressive`` conditioned on the encoder's last hidden
              layer h(x): u = f_N ∘ … ∘ f_1(ε), ε ~ N(μ_φ(x), σ_φ(x)²), and

              .. math:: \\log q(u \\mid x) = \\log \\mathcal N(ε; μ, σ^2) - \\sum_i \\log\\lvert\\det ∂f_i/∂ε_{i-1}\\rvert .

              Sampling and scoring one's own draws are one pass each; scoring a value not drawn from
              the flow inverts it (D passes), which only DReG and the aggregate posterior do.

No flow is written here: the transforms, their autoregressive networks and the log-det-Jacobians are
Pyro's (``pyro.distributions.transforms``). :meth:`BuiltGuide.guide` is the Pyro program (for SVI and
Pyro's ELBOs): where the model has one real-valued vector site the guide samples that site directly;
otherwise it samples ``u`` as an auxiliary site and emits each model site as a ``Delta`` carrying its
share of the log-det-Jacobian, the construction of Pyro's ``AutoContinuous``.
"""

from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import nn

from vaebench.errors import ConfigError
from vaebench.models.contract import DATA_PLATE, LatentSpace

GUIDES = ("gaussian", "iaf")
"""Guides vaebench builds; ``model`` (the module's own ``guide``) is the third choice of ``--guide``."""
AUXILIARY_SITE = "_vaebench_u"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU,
}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Fully connected network with ``activation`` between layers and a linear output."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianGuide(nn.Module):
    """x ↦ q_φ(u|x) = N(μ_φ(x), diag σ_φ(x)²) over the flattened latent.

    Parameters
    ----------
    space
        The model's latent space (its D and sites).
    hidden
        Encoder hidden widths (``()``: the heads read x directly).
    activation
        Hidden non-linearity.
    """

    def __init__(self, space: LatentSpace, hidden: tuple[int, ...], activation: str = "tanh") -> None:
        super().__init__()
        self.space = space
        hidden = list(hidden)
        self.body = mlp([space.data_dim, *hidden], activation) if hidden else nn.Identity()
        if hidden:
            self.body.append(ACTIVATIONS[activation]())
        self.context_dim = hidden[-1] if hidden else space.data_dim
        self.loc = nn.Linear(self.context_dim, space.dim)
        self.log_scale = nn.Linear(self.context_dim, space.dim)

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q_φ(u|x): batch shape ``[n]``, event shape ``[D]``."""
        return self.distribution(x)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the Gaussian, ``[n, D]`` each."""
        h = self.body(x)
        return self.loc(h), self.log_scale(h).exp()

    def distribution(self, x: torch.Tensor, detach_parameters: bool = False) -> dist.TorchDistribution:
        """q_φ(u|x); with ``detach_parameters`` its parameters are cut from the graph (DReG)."""
        loc, scale = self.moments(x)
        if detach_parameters:
            loc, scale = loc.detach(), scale.detach()
        return dist.Normal(loc, scale).to_event(1)

    @property
    def exact_moments(self) -> bool:
        """Whether :meth:`moments` are the mean and sd of q (not only of its base)."""
        return True

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The Pyro guide program; returns ``u`` ``[..., n, D]``."""
        q = self.distribution(x)
        with pyro.plate(DATA_PLATE, x.shape[-2], dim=-1):
            return emit_sites(self.space, q)


class IAFGuide(GaussianGuide):
    """A :class:`GaussianGuide` followed by ``flows`` conditional inverse autoregressive flows.

    Parameters
    ----------
    flows
        Number of ``ConditionalAffineAutoregressive`` transforms (≥ 1), each with its own random
        variable ordering (Pyro's default), conditioned on the encoder's last hidden layer.
    flow_hidden
        Hidden widths of each flow's autoregressive network (Pyro's default: ``[10 D]``).
    """

    def __init__(self, space: LatentSpace, hidden: tuple[int, ...], activation: str = "tanh", flows: int = 2,
                 flow_hidden: tuple[int, ...] | None = None) -> None:
        super().__init__(space, hidden, activation)
        if flows < 1:
            raise ValueError(f"an IAF guide needs at least one flow, got {flows}")
        dims = list(flow_hidden) if flow_hidden else None
        self.flows = nn.ModuleList(conditional_affine_autoregressive(space.dim, self.context_dim, hidden_dims=dims)
                                   for _ in range(flows))

    @property
    def exact_moments(self) -> bool:
        return False

    def distribution(self, x: torch.Tensor, detach_parameters: bool = False) -> dist.TorchDistribution:
        if detach_parameters:
            raise ConfigError("DReG needs the guide's density with its parameters stopped, which an IAF guide "
                              "cannot give without inverting its flows; use --guide gaussian with --dreg")
        h = self.body(x)
        base = dist.Normal(self.loc(h), self.log_scale(h).exp()).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(h)


def emit_sites(space: LatentSpace, q: dist.TorchDistribution) -> torch.Tensor:
    """Sample ``u ~ q`` inside the data plate and emit the model's sites from it (see the module docstring)."""
    single = len(space.sites) == 1 and space.sites[0].identity and len(space.sites[0].event_shape) == 1
    if single:
        return pyro.sample(space.sites[0].name, q)
    u = pyro.sample(AUXILIARY_SITE, q, infer={"is_auxiliary": True})
    values, log_det = space.unflatten(u)
    for i, site in enumerate(space.sites):
        log_density = -log_det if i == 0 else torch.zeros_like(log_det)
        pyro.sample(site.name, dist.Delta(values[site.name], log_density=log_density,
                                          event_dim=len(site.event_shape)))
    return u


def build_guide(kind: str, space: LatentSpace, hidden: tuple[int, ...], activation: str = "tanh",
                flows: int = 2) -> GaussianGuide:
    """The guide ``kind`` (``gaussian`` or ``iaf``) over ``space``."""
    if kind == "gaussian":
        return GaussianGuide(space, hidden, activation)
    if kind == "iaf":
        return IAFGuide(space, hidden, activation, flows)
    raise ValueError(f"unknown guide {kind!r}; choose from {', '.join(GUIDES)}")
