"""A generative model p_θ(x|z)p(z) and its guide q_φ(z|x), seen only through the model contract.

:class:`LatentModel` wraps any module that follows :mod:`vaebench.models.contract` (a built-in or a
user's), and derives from traces of its Pyro programs everything the methods and estimators use:

* the flattened unconstrained latent ``u`` ``[..., n, D]`` (:class:`~vaebench.models.contract.LatentSpace`);
* :meth:`~LatentModel.site_log_probs`: (log p(u), log p_θ(x|u)) per datapoint, read off a trace of
  ``model(x)`` conditioned on the latents, with the log-det-Jacobian of constrained sites in log p(u);
* :meth:`~LatentModel.encoder_proposal`: draws from the guide and their log-density (IS, ELBO, IWAE);
* :meth:`~LatentModel.sample_prior` and :meth:`~LatentModel.simulate`: ancestral draws from p (AIS
  starts, BDMC's simulated data).

No method or estimator knows whether a model is built in. Shapes: ``x`` is ``[n, P]``; ``u`` is
``[..., n, D]``; per-datapoint densities are ``[..., n]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro import poutine
from torch import nn
from torch.func import functional_call

from vaebench.config import ModelConfig
from vaebench.errors import ConfigError
from vaebench.inference.latent_density import (BACKENDS, CompiledSiteLogProbs, InductorGradients, LatentDensity,
                                               default_backend)
from vaebench.models.builtin import ARCHITECTURE_MODELS
from vaebench.models.contract import (LatentSpace, ModelContractError, _sample_sites, check_guide,
                                      inspect_model, placeholder_batch)
from vaebench.models.guides import GaussianGuide, build_guide
from vaebench.models.loading import instantiate

Proposal = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``proposal(x, k) -> (u [k, n, D], log_q [k, n])``: draws and their log-density."""

MOMENT_SAMPLES = 64
"""Draws used for the mean and spread of a guide that has no closed-form moments (IAF, user guides)."""


def build_generative(config: ModelConfig) -> nn.Module:
    """The module of ``config.model``: a built-in with the architecture fields, or the user's factory."""
    if config.model in ARCHITECTURE_MODELS:
        args = {"latent_dim": config.latent_dim, "hidden": config.hidden, "activation": config.activation,
                "likelihood": config.likelihood, "gaussian_scale": config.gaussian_scale, **config.model_args}
    else:
        args = dict(config.model_args)
    return instantiate(config.model, config.data_dim, args)


class _MethodCall(nn.Module):
    """Calls ``inner.<method>`` as ``forward``, so :func:`torch.func.functional_call` can swap its parameters."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Any) -> Any:
        return getattr(self.inner, self.method)(*args)


def _with_detached_parameters(module: nn.Module, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` with every parameter cut from the graph (DReG's stop-gradient on φ)."""
    wrapper = _MethodCall(module, method)
    params = {name: p.detach() for name, p in wrapper.named_parameters()}
    return functional_call(wrapper, params, args, strict=False)


@contextlib.contextmanager
def _seeded_from(generator: torch.Generator | None, like: torch.Tensor) -> Iterator[None]:
    """Run a Pyro program with the global RNG seeded from ``generator`` (restored afterwards)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    devices = [like.device.index or 0] if like.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class LatentModel(nn.Module):
    """A contract model with its guide: the object every method and estimator works with.

    Parameters
    ----------
    config
        The model (built-in or user SPEC), guide and architecture; see :class:`~vaebench.config.ModelConfig`.
    generative
        An already-built module (the library's way to pass a user model directly); ``None`` builds
        it from ``config``.

    Raises
    ------
    ModelContractError
        If the module or its guide breaks the contract (checked here, before any training).
    """

    def __init__(self, config: ModelConfig, generative: nn.Module | None = None) -> None:
        super().__init__()
        self.generative = generative if generative is not None else build_generative(config)
        like = next(self.generative.parameters(), None)
        self.space: LatentSpace = inspect_model(self.generative.model, config.data_dim, like)
        has_own_guide = callable(getattr(self.generative, "guide", None))
        guide = config.guide
        if guide == "auto" and config.encoder:
            guide = "model" if has_own_guide else "gaussian"
        if guide == "model" and not has_own_guide:
            raise ModelContractError(f"model {config.model!r} has no guide(x); use --guide gaussian or iaf")
        self.config = dataclasses.replace(config, guide=guide)
        self.encoder: GaussianGuide | None = None
        self.own_guide = config.encoder and guide == "model"
        if self.own_guide:
            check_guide(self.generative.guide, self.space, like)
        elif config.encoder:
            self.encoder = build_guide(guide, self.space, config.resolved_encoder_hidden, config.activation,
                                       config.flows)
        self._encoder_names = self._guide_parameter_names()

    # ------------------------------------------------------------------ what the contract exposes
    @property
    def latent_dim(self) -> int:
        """D, the length of the flattened unconstrained latent."""
        return self.space.dim

    @property
    def data_dim(self) -> int:
        return self.space.data_dim

    @property
    def likelihood(self) -> str:
        """``bernoulli`` (binary data required) or ``continuous``, read off the observed site."""
        return self.space.likelihood

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None or self.own_guide

    @property
    def decoder(self) -> nn.Module:
        """The built-in one-latent models' decoder network (for tests and plots of built-ins)."""
        decoder = getattr(self.generative, "decoder", None)
        if decoder is None:
            raise AttributeError(f"model {self.config.model!r} has no attribute 'decoder'")
        return decoder

    def _guide_parameter_names(self) -> set[str]:
        """Names of the parameters the guide uses (found by differentiating one guide trace)."""
        if self.encoder is not None:
            return {f"encoder.{name}" for name, _ in self.encoder.named_parameters()}
        if not self.own_guide:
            return set()
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        like = next(self.generative.parameters())
        with torch.enable_grad():
            u, log_q = self.encoder_proposal(placeholder_batch(self.data_dim, like), 1)
            grads = torch.autograd.grad((log_q.sum() + u.sum()), [p for _, p in named], allow_unused=True)
        return {name for (name, _), grad in zip(named, grads) if grad is not None}

    def encoder_parameters(self) -> list[nn.Parameter]:
        """φ: the guide's parameters."""
        return [p for name, p in self.named_parameters() if name in self._encoder_names]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """θ: every parameter the guide does not use."""
        return [p for name, p in self.named_parameters() if name not in self._encoder_names]

    # ------------------------------------------------------------------ Pyro programs
    def model(self, x: torch.Tensor) -> None:
        """The Pyro model, registering the generative module's parameters (for SVI)."""
        pyro.module("generative", self.generative)
        self.generative.model(x)

    def guide(self, x: torch.Tensor) -> Any:
        """The Pyro guide (the built one, or the module's own), registering its parameters."""
        if self.own_guide:
            pyro.module("generative", self.generative)
            return self.generative.guide(x)
        encoder = self._require_encoder()
        pyro.module("encoder", encoder)
        return encoder.guide(x)

    # ------------------------------------------------------------------ densities from traces
    def _conditioned_trace(self, x: torch.Tensor, u: torch.Tensor) -> tuple[poutine.Trace, torch.Tensor]:
        values, log_det = self.space.unflatten(u)
        trace = poutine.trace(poutine.condition(self.generative.model, data=values)).get_trace(x)
        trace.compute_log_prob()
        return trace, log_det

    def site_log_probs(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(u), log p_θ(x|u)) per datapoint ``[..., n]``, from a trace of the conditioned model.

        log p(u) is the sum of the latent sites' log-densities plus log|det ∂z/∂u|.
        """
        trace, log_det = self._conditioned_trace(x, u)
        log_prior = log_det
        for site in self.space.sites:
            log_prior = log_prior + trace.nodes[site.name]["log_prob"]
        return log_prior, trace.nodes[self.space.observed]["log_prob"]

    def components(self, x: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``u -> (log p(u), log p_θ(x|u))``: the split AIS anneals (compiled, see :meth:`latent_density`)."""
        return self.latent_density(x).components

    def latent_density(self, x: torch.Tensor, compiled: bool = True, backend: str | None = None) -> LatentDensity:
        """log p_θ(x, u) of the batch ``x`` as a function of u, with its gradients: the target of HMC,
        AIS, BDMC and Monte Carlo EM.

        ``backend`` (default: the process's, :func:`~vaebench.inference.latent_density.default_backend`)
        is ``jit`` -- the conditioned Pyro trace replayed from a :func:`torch.jit.trace` recorded
        once per input signature (:class:`~vaebench.inference.latent_density.CompiledSiteLogProbs`)
        --, ``inductor`` -- the gradients from inductor-compiled forward+backward graphs, values and
        the differentiable call from the ``jit`` replay -- or ``eager`` (also ``compiled=False``):
        :meth:`site_log_probs` on every call. Every backend gives the values and gradients of
        :meth:`site_log_probs` (``inductor`` up to rounding); one that cannot compile a program
        falls back with a one-line warning.
        """
        backend = default_backend() if backend is None else backend
        if backend not in BACKENDS:
            raise ConfigError(f"unknown latent-density backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if not compiled or backend == "eager":
            return LatentDensity(self.site_log_probs, x)
        if "_compiled_site_log_probs" not in self.__dict__:          # built once per model, not per batch
            self.__dict__["_compiled_site_log_probs"] = CompiledSiteLogProbs(self)
        gradients = None
        if backend == "inductor":
            if "_inductor_gradients" not in self.__dict__:
                self.__dict__["_inductor_gradients"] = InductorGradients(self)
            gradients = self.__dict__["_inductor_gradients"]
        return LatentDensity(self.__dict__["_compiled_site_log_probs"], x, gradients)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_compiled_site_log_probs", None)       # compiled programs are rebuilt on demand
        state.pop("_inductor_gradients", None)
        return state

    def log_prior(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log p(u), ``[..., n]`` (``x`` only fixes the plate size)."""
        return self.site_log_probs(x, u)[0]

    def log_likelihood(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log p_θ(x|u), ``[..., n]``."""
        return self.site_log_probs(x, u)[1]

    def log_joint(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log p_θ(x, u) = log p(u) + log p_θ(x|u), ``[..., n]``: the unnormalised posterior."""
        log_pz, log_px_z = self.site_log_probs(x, u)
        return log_pz + log_px_z

    def observation_mean(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Mean of p_θ(x|u) (Bernoulli probabilities, Gaussian means), ``[..., n, P]``."""
        trace, _ = self._conditioned_trace(x, u)
        return trace.nodes[self.space.observed]["fn"].mean

    # ------------------------------------------------------------------ ancestral draws
    def sample_prior(self, x: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` exact draws from p(u) per datapoint, ``[num, n, D]`` (ancestral, from the model's trace)."""
        with _seeded_from(generator, x), torch.no_grad():
            with pyro.plate("particles", num, dim=-2):
                trace = poutine.trace(self.generative.model).get_trace(x)
        u, _ = self.space.flatten({site.name: trace.nodes[site.name]["value"] for site in self.space.sites})
        return u.expand(num, *u.shape[-2:]).detach()

    def simulate(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (x ``[n, P]``, u ``[n, D]``) from p(z)p_θ(x|z) by running the model unconditioned.

        u is an exact draw from p_θ(u | x) for its x (BDMC's reverse start).
        """
        like = next(self.parameters())
        placeholder = placeholder_batch(self.data_dim, like, rows=n)
        with _seeded_from(generator, like), torch.no_grad():
            trace = poutine.trace(poutine.uncondition(self.generative.model)).get_trace(placeholder)
        u, _ = self.space.flatten({site.name: trace.nodes[site.name]["value"] for site in self.space.sites})
        return trace.nodes[self.space.observed]["value"].detach(), u.detach()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples: u ~ p(u), then the mean of p_θ(x|u) (probabilities or Gaussian means)."""
        x, u = self.simulate(n, generator)
        return u, self.observation_mean(x, u)

    # ------------------------------------------------------------------ the guide as a proposal
    def encoder_proposal(self, x: torch.Tensor, k: int, detach_parameters: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``k`` reparameterised samples u ~ q_φ(u|x) and their log-density.

        With ``detach_parameters`` the samples stay reparameterised (gradients flow to φ through
        u) but their log-density is evaluated with φ cut from the graph, as DReG requires.

        Returns
        -------
        u : Tensor ``[k, n, D]``
        log_q : Tensor ``[k, n]``
        """
        if self.own_guide:
            with pyro.plate("particles", k, dim=-2):
                trace = poutine.trace(self.generative.guide).get_trace(x)
            values = {site.name: trace.nodes[site.name]["value"] for site in self.space.sites}
            u, log_det = self.space.flatten(values)
            u = u.expand(k, *u.shape[-2:])
            if detach_parameters:
                return u, self.log_q(x, u, detach_parameters=True)
            return u, log_det + _guide_log_prob(trace)
        q = self._require_encoder().distribution(x)
        u = q.rsample((k,))
        return u, (self.log_q(x, u, detach_parameters=True) if detach_parameters else q.log_prob(u))

    def log_q(self, x: torch.Tensor, u: torch.Tensor, detach_parameters: bool = False) -> torch.Tensor:
        """log q_φ(u|x), ``[..., n]`` (from a trace of the guide conditioned on u, for a module's own guide)."""
        if self.own_guide:
            values, log_det = self.space.unflatten(u)
            scorer = _TraceGuide(self.generative)
            trace = _with_detached_parameters(scorer, "forward", x, values) if detach_parameters else scorer(x, values)
            return log_det + _guide_log_prob(trace)
        n, dim = x.shape[-2], self.latent_dim
        u = u.expand(*torch.broadcast_shapes(u.shape[:-1], (n,)), dim)    # a value per (draw, datapoint) pair
        return self._require_encoder().distribution(x, detach_parameters).log_prob(u)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q_φ(u|x), ``[n, D]`` each (Monte Carlo where not closed-form)."""
        if self.encoder is not None and self.encoder.exact_moments:
            return self.encoder.moments(x)
        self._require_encoder()
        u, _ = self.encoder_proposal(x, MOMENT_SAMPLES)
        return u.mean(0), u.std(0, unbiased=True)

    def _require_encoder(self) -> nn.Module:
        if self.encoder is None and not self.own_guide:
            raise ConfigError("this model has no encoder (it was trained with --method hmc); use --estimator ais")
        return self.encoder if self.encoder is not None else self.generative


def _guide_log_prob(trace: poutine.Trace) -> torch.Tensor:
    """Σ log q over a guide trace's sample sites (conditioned sites included: they are the guide's latents)."""
    trace.compute_log_prob()
    return sum(site["log_prob"] for site in _sample_sites(trace))


class _TraceGuide(nn.Module):
    """``forward(x, values)`` = a trace of ``inner.guide`` conditioned on ``values`` (for detached scoring)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, values: dict[str, torch.Tensor]) -> poutine.Trace:
        return poutine.trace(poutine.condition(self.inner.guide, data=values)).get_trace(x)


VAE = LatentModel
"""The name this class had when vaebench had one built-in model; kept for the library API."""

__all__ = ["LatentModel", "Proposal", "VAE", "build_generative"]
