"""The model contract: what a Pyro program must be for vaebench, and what is derived from its traces.

The contract
------------
A model is a :class:`torch.nn.Module` with a method ``model(x)``: a Pyro program that

* observes ``x`` (``[n, P]``) at exactly **one** site, ``pyro.sample(name, d, obs=x)``;
* samples one or more **latent** sites; every site (latent and observed) sits inside
  ``pyro.plate("data", n, dim=-1)`` and in no other plate, so each has batch shape ``[n]``;
* gives every latent an event shape and a **continuous** support that
  :func:`torch.distributions.biject_to` maps to the reals (``real``, ``positive``, ``simplex``,
  ``interval`` ...). Hierarchical latents (z2 → z1 → x, all in the plate) are allowed;
* and, optionally, has a method ``guide(x)``: an amortised Pyro guide over the same latent sites.

The program must broadcast over leading sample dimensions of its latents (``z`` of shape
``[..., n, *event]`` gives densities ``[..., n]``), as any Pyro model written with event
dimensions (``.to_event``) does.

What is derived
---------------
From one trace of ``model(x)`` (:func:`inspect_model`) vaebench reads the latent sites, their event
shapes and supports, and builds a :class:`LatentSpace`: every latent mapped to the reals by
``biject_to(support)`` and concatenated into one unconstrained vector ``u`` of size D per datapoint,
``[..., n, D]``. With z = T(u),

.. math::

    \\log p(u) = \\log p(T(u)) + \\log\\lvert\\det \\partial T/\\partial u\\rvert,

so HMC, AIS, BDMC and Monte Carlo EM all work on ``u``, with the prior split from the likelihood
(:meth:`LatentSpace.unflatten` returns the log-det-Jacobian; the model object adds it to log p(z)).
Importance weights p(x, z)/q(z|x) are the same in either space because the Jacobian appears in both
densities. This is what Pyro's ``initialize_model`` and ``autoguide`` do for global latents, done here
per datapoint.

Bad models are refused with one :class:`ModelContractError` line before any training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import ComposeTransform, Transform

from vaebench.errors import ConfigError

DATA_PLATE = "data"
INSPECTION_ROWS = 3
"""Rows of the placeholder batch a model is traced on when it is inspected."""


class ModelContractError(ConfigError):
    """A user model or guide breaks the contract of :mod:`vaebench.models.contract`."""


@dataclass(frozen=True)
class LatentSite:
    """One latent sample site and its slice of the flattened unconstrained vector.

    Attributes
    ----------
    name
        The Pyro site name.
    event_shape
        Event shape of the constrained value (per datapoint).
    unconstrained_shape
        Event shape after ``biject_to(support).inv``.
    transform
        ``biject_to(support)``: unconstrained → constrained.
    offset, size
        Position and length of the site in the flattened vector.
    identity
        Whether the transform is the identity (a real-valued site: no Jacobian term).
    """

    name: str
    event_shape: torch.Size
    unconstrained_shape: torch.Size
    transform: Transform
    offset: int
    size: int
    identity: bool


def _sum_to_batch(log_det: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Sum a log-det-Jacobian over every dimension right of the first ``batch_dims``."""
    if log_det.dim() > batch_dims:
        return log_det.reshape(*log_det.shape[:batch_dims], -1).sum(-1)
    return log_det


@dataclass(frozen=True)
class LatentSpace:
    """The latent sites of a model, flattened into one unconstrained vector per datapoint.

    Attributes
    ----------
    sites
        The latent sites in the order the program samples them.
    observed
        Name of the one observed site.
    data_dim
        P, the width of ``x``.
    likelihood
        ``bernoulli`` when the observed site's support is boolean (the data must be binary),
        else ``continuous``.
    """

    sites: tuple[LatentSite, ...]
    observed: str
    data_dim: int
    likelihood: str

    @property
    def dim(self) -> int:
        """D, the length of the flattened unconstrained latent."""
        return sum(site.size for site in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(site.name for site in self.sites)

    def unflatten(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``u [..., n, D]`` → constrained site values ``{name: [..., n, *event]}`` and log|det ∂z/∂u| ``[..., n]``."""
        batch = u.shape[:-1]
        values: dict[str, torch.Tensor] = {}
        log_det = u.new_zeros(batch)
        for site in self.sites:
            part = u[..., site.offset:site.offset + site.size].reshape(*batch, *site.unconstrained_shape)
            value = site.transform(part)
            values[site.name] = value
            if not site.identity:
                log_det = log_det + _sum_to_batch(site.transform.log_abs_det_jacobian(part, value), len(batch))
        return values, log_det

    def flatten(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained values → ``u [..., n, D]`` and log|det ∂z/∂u| at ``u`` ``[..., n]``."""
        parts, log_det = [], None
        for site in self.sites:
            value = values[site.name]
            batch = value.shape[:value.dim() - len(site.event_shape)]
            part = site.transform.inv(value)
            parts.append(part.reshape(*batch, site.size))
            term = (value.new_zeros(batch) if site.identity
                    else _sum_to_batch(site.transform.log_abs_det_jacobian(part, value), len(batch)))
            log_det = term if log_det is None else log_det + term
        return torch.cat(parts, dim=-1), log_det


def _is_identity(transform: Transform) -> bool:
    """Whether ``transform`` is the identity (``biject_to(real)``, possibly reinterpreted as an event)."""
    base = getattr(transform, "base_transform", transform)
    return isinstance(base, ComposeTransform) and not base.parts


def _base_constraint(constraint: Any) -> Any:
    while hasattr(constraint, "base_constraint"):
        constraint = constraint.base_constraint
    return constraint


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])


def _other_plates(site: dict[str, Any]) -> list[str]:
    return [frame.name for frame in site["cond_indep_stack"] if frame.name != DATA_PLATE]


def _sample_sites(trace: poutine.Trace) -> list[dict[str, Any]]:
    """The sample sites of a trace, without the plates' own subsample sites."""
    return [site for site in trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site)]


def _run_program(program: Callable[..., Any], x: torch.Tensor, what: str) -> poutine.Trace:
    try:
        with pyro.validation_enabled(True):
            return poutine.trace(program).get_trace(x)
    except ModelContractError:
        raise
    except Exception as exc:  # the user's program may raise anything: one line, naming it
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelContractError(f"{what} raised {type(exc).__name__} on a batch of shape "
                                 f"{list(x.shape)}{': ' + message if message else ''}") from None


def placeholder_batch(data_dim: int, like: torch.Tensor | None = None, rows: int = INSPECTION_ROWS) -> torch.Tensor:
    """A batch of zeros ``[rows, data_dim]`` (valid under Bernoulli and Gaussian likelihoods)."""
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else "cpu"
    return torch.zeros(rows, data_dim, dtype=dtype, device=device)


def inspect_model(program: Callable[[torch.Tensor], Any], data_dim: int, like: torch.Tensor | None = None,
                  what: str = "model(x)") -> LatentSpace:
    """Trace ``program`` on a placeholder batch, check the contract, and return its :class:`LatentSpace`.

    Raises
    ------
    ModelContractError
        No ``data`` plate, no observed site or more than one, a latent outside the plate or in
        another plate, a discrete latent, a support with no bijection to the reals, or shapes that
        do not follow the plate.
    """
    x = placeholder_batch(data_dim, like)
    n = x.shape[0]
    trace = _run_program(program, x, what)
    sample_sites = _sample_sites(trace)
    if not any(_in_data_plate(site) for site in sample_sites):
        raise ModelContractError(f"{what} has no pyro.plate({DATA_PLATE!r}, n, dim=-1): the contract needs every "
                                 "site inside one data plate")
    observed = [site for site in sample_sites if site["is_observed"]]
    if not observed:
        raise ModelContractError(f"{what} observes no site: it must observe x once, pyro.sample(name, d, obs=x)")
    if len(observed) > 1:
        names = ", ".join(repr(site["name"]) for site in observed)
        raise ModelContractError(f"{what} observes {len(observed)} sites ({names}); the contract allows one, x")
    obs = observed[0]
    latent_sites = [site for site in sample_sites if not site["is_observed"]
                    and not site["infer"].get("is_auxiliary", False)]
    if not latent_sites:
        raise ModelContractError(f"{what} samples no latent site; there is nothing to infer")
    for site in [obs, *latent_sites]:
        kind = "observed site" if site is obs else "latent site"
        if not _in_data_plate(site):
            raise ModelContractError(f"{kind} {site['name']!r} of {what} is outside pyro.plate({DATA_PLATE!r}): every "
                                     "site must be per datapoint")
        frame = next(f for f in site["cond_indep_stack"] if f.name == DATA_PLATE)
        if frame.dim != -1:
            raise ModelContractError(f"pyro.plate({DATA_PLATE!r}) of {what} has dim={frame.dim}; the contract needs "
                                     "dim=-1 (declare the rest as event dimensions with .to_event)")
        others = _other_plates(site)
        if others:
            raise ModelContractError(f"{kind} {site['name']!r} of {what} sits in plate(s) {', '.join(others)} besides "
                                     f"{DATA_PLATE!r}; declare those dimensions as event dimensions with .to_event")
        if tuple(site["fn"].batch_shape) != (n,):
            raise ModelContractError(f"{kind} {site['name']!r} of {what} has batch shape {list(site['fn'].batch_shape)} "
                                     f"in a data plate of size {n}; declare per-datapoint dimensions with .to_event")
    if tuple(obs["value"].shape) != tuple(x.shape):
        raise ModelContractError(f"observed site {obs['name']!r} of {what} has value shape {list(obs['value'].shape)}, "
                                 f"not the data's {list(x.shape)}")
    sites, offset = [], 0
    for site in latent_sites:
        fn, name = site["fn"], site["name"]
        support = fn.support
        if getattr(support, "is_discrete", False):
            raise ModelContractError(f"latent site {name!r} of {what} is discrete ({type(fn).__name__}); HMC and AIS "
                                     "need continuous latents: marginalise it out of the model")
        try:
            transform = biject_to(support)
        except NotImplementedError:
            raise ModelContractError(f"latent site {name!r} of {what} has support {support} with no bijection to "
                                     "the reals (torch.distributions.biject_to)") from None
        event_shape = torch.Size(fn.event_shape)
        unconstrained = torch.Size(transform.inverse_shape(event_shape))
        size = int(math.prod(unconstrained))
        sites.append(LatentSite(name, event_shape, unconstrained, transform, offset, size, _is_identity(transform)))
        offset += size
    likelihood = "bernoulli" if _base_constraint(obs["fn"].support) is constraints.boolean else "continuous"
    return LatentSpace(tuple(sites), obs["name"], data_dim, likelihood)


def check_guide(program: Callable[[torch.Tensor], Any], space: LatentSpace, like: torch.Tensor | None = None,
                what: str = "guide(x)") -> None:
    """Check that a guide samples exactly the model's latent sites, with the same shapes, in the data plate."""
    x = placeholder_batch(space.data_dim, like)
    trace = _run_program(program, x, what)
    sampled = {site["name"]: site for site in _sample_sites(trace)
               if not site["is_observed"] and not site["infer"].get("is_auxiliary", False)}
    if set(sampled) != set(space.names):
        raise ModelContractError(f"{what} samples site(s) {', '.join(sorted(sampled)) or 'none'} but the model's "
                                 f"latents are {', '.join(space.names)}: a guide must sample the same sites")
    for site in space.sites:
        value = sampled[site.name]["value"]
        expected = (x.shape[0], *site.event_shape)
        if tuple(value.shape) != expected:
            raise ModelContractError(f"{what} samples {site.name!r} with shape {list(value.shape)}; the model's is "
                                     f"{list(expected)}")
        if not _in_data_plate(sampled[site.name]):
            raise ModelContractError(f"{what} samples {site.name!r} outside pyro.plate({DATA_PLATE!r})")
