"""Annealed importance sampling of log p_θ(x), and BDMC upper bounds on simulated data.

Why written by hand
-------------------
Pyro has no AIS. This module anneals N × M chains at once (M per datapoint) with the batched HMC
transitions of :mod:`vaebench.inference.hmc`. It sees a model only through a *target* (see
:class:`AISTarget`): ``components(x)`` maps unconstrained latents ``u [..., n, D]`` to
(log prior incl. any log-det-Jacobian, log-likelihood), ``sample_prior`` draws exact prior
samples, ``simulate`` draws (x, u) ancestrally. :class:`vaebench.model.LatentModel` is one
(densities read off one Pyro trace of the model, :meth:`~vaebench.model.LatentModel.site_log_probs`),
so AIS and BDMC serve any model of the contract.

AIS (Neal 2001; Wu et al. 2017)
-------------------------------
Intermediate targets f_t(z) = p(z) p_θ(x|z)^{β_t}, 0 = β_0 < β_1 < ... < β_T = 1. Start from
z_0 ~ p(z) (exact), and for t = 1..T

.. math::

    \\log w \\mathrel{+}= \\log f_t(z_{t−1}) − \\log f_{t−1}(z_{t−1})
                   = (β_t − β_{t−1}) \\log p_θ(x \\mid z_{t−1}),

then (for t < T) move z_{t−1} → z_t with one HMC transition (L leapfrog steps) that leaves f_t
invariant. E[w] = Z_T / Z_0 = p_θ(x), so log p̂(x) = log (1/M) Σ_m w_m is a stochastic lower
bound (E log p̂ ≤ log p). Its Monte Carlo standard error is the delta-method value
se(log p̂) = sd(w)/(√M · mean(w)) = √((M/ESS − 1)/(M − 1)), with ESS = (Σw)²/Σw².

Step sizes are adapted toward ~0.65 acceptance after every transition, log ε ← log ε + g(ᾱ − 0.65),
one step size per datapoint, driven by K extra *tuning* chains per datapoint whose weights are
discarded (:func:`anneal`). Adapting a chain to its own acceptance history (as Wu et al. 2017 do)
makes its transitions depend on its past, which breaks the unbiasedness of w; with tuning chains
the weighted chains see a step-size schedule independent of themselves, so E[w] = p_θ(x) holds
exactly.

The log-likelihood and its gradient at the current point are cached (:class:`AnnealedTarget`
keeps log p(z), log p(x|z) and both gradients per chain), so moving from β_{t−1} to β_t costs no
extra model evaluation: T steps cost (T − 1)·L + 1 gradient evaluations plus the initial step-size
search.

BDMC (Grosse, Ghahramani & Adams 2015)
--------------------------------------
For data simulated from the model, (z*, x) ~ p(z)p_θ(x|z), z* is an exact posterior sample.
Running the same chain in reverse (β from 1 to 0) from z* gives weights with E[w_rev] = 1/p_θ(x),
so −log (1/M) Σ w_rev is a stochastic *upper* bound; together with forward AIS it sandwiches
log p_θ(x), and the gap bounds the error of both.

E[w_rev] = 1/p_θ(x) needs every reverse transition to be fixed before the reverse chains start.
:func:`bdmc` therefore runs no adaptation in reverse: the forward run records its per-datapoint
step sizes log ε_t (t = 1..T−1, the transition leaving f_{β_t} invariant), and reverse transition
s, which leaves f_{β_{T−s}} invariant, uses log ε_{T−s}: the forward schedule reversed. The
schedule is a function of x and of the forward run's randomness only, hence independent of z*
given x. (Tuning chains started at z*, as before, would make the schedule depend on z*.)

Choosing T by BDMC on simulated data (Wu et al. 2017) is :mod:`vaebench.inference.certify`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from vaebench.config import AISConfig
from vaebench.errors import VaebenchError
from vaebench.estimators import log_mean_exp
from vaebench.inference import hmc
from vaebench.inference.latent_density import LatentDensity

Components = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``u [..., n, D] -> (log p(u) [..., n], log p_θ(x|u) [..., n])``; log p(u) includes any log-det-Jacobian."""

MIN_LOG_STEP, MAX_LOG_STEP = math.log(1e-5), math.log(10.0)


@runtime_checkable
class AISTarget(Protocol):
    """What AIS, BDMC and certification need of a model: the seam to the model layer.

    Latents are one unconstrained vector u ∈ R^D per datapoint; the model layer's contract object
    (a user's Pyro model, flattened) provides exactly these members.
    """

    latent_dim: int

    def components(self, x: torch.Tensor) -> Components:
        """``u [..., n, D] -> (log p(u), log p_θ(x|u))``, each ``[..., n]``."""

    def sample_prior(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` exact draws from the prior for every row of ``x``: ``u [num, n, D]``."""

    def simulate(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral draws (u, x) ~ p(u) p_θ(x|u): ``(x [n, P], u [n, D])``."""


def as_target(model: Any) -> AISTarget:
    """``model`` as an :class:`AISTarget`: a :class:`vaebench.model.LatentModel` (or any object with the
    target's methods) is one already."""
    if all(hasattr(model, name) for name in ("components", "sample_prior", "simulate", "latent_dim")):
        return model
    raise VaebenchError(f"{type(model).__name__} is not an AIS target (components, sample_prior, simulate, "
                        "latent_dim)")


def density_of(target: AISTarget, x: torch.Tensor) -> LatentDensity:
    """The annealed density of batch ``x``: the target's compiled
    :meth:`~vaebench.model.LatentModel.latent_density` where it has one, else its ``components``."""
    make = getattr(target, "latent_density", None)
    if make is not None:
        return make(x)
    components = target.components(x)
    return LatentDensity(lambda _x, u: components(u), x)


def beta_schedule(steps: int, schedule: str = "sigmoid", delta: float = 4.0) -> torch.Tensor:
    """Inverse temperatures β_0 = 0 < ... < β_T = 1, float64 ``[steps + 1]``.

    ``linear``: β_t = t/T. ``sigmoid`` (Grosse et al. 2013, Wu et al. 2017):
    β̃_t = σ(δ(2t/T − 1)), rescaled so that β_0 = 0 and β_T = 1 (denser near both ends).
    """
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if schedule == "linear":
        return t
    if schedule == "sigmoid":
        s = torch.sigmoid(delta * (2 * t - 1))
        return (s - s[0]) / (s[-1] - s[0])
    raise ValueError(f"unknown schedule {schedule!r}")


class AnnealedTarget:
    """log f_β(z) = log p(z) + β log p_θ(x|z) with both terms and gradients cached per chain.

    :func:`vaebench.inference.hmc.evaluate` calls :meth:`evaluate`; the cached terms in
    ``HMCState.aux`` = (log p(z), log p(x|z), ∇ log p(z), ∇ log p(x|z)) let :meth:`rebase` move a
    state to another β without evaluating the model again.
    """

    def __init__(self, components: Components | LatentDensity, beta: float) -> None:
        self.density = components if isinstance(components, LatentDensity) else \
            LatentDensity(lambda _x, u: components(u), None)
        self.beta = float(beta)

    def evaluate(self, position: torch.Tensor) -> hmc.Evaluation:
        log_prior, log_lik, grad_prior, grad_lik = self.density.evaluate_components(position)
        return hmc.Evaluation(log_prior + self.beta * log_lik, grad_prior + self.beta * grad_lik,
                              (log_prior, log_lik, grad_prior, grad_lik))

    def rebase(self, state: hmc.HMCState) -> hmc.HMCState:
        """The same chains, with log density and gradient at this target's β (no evaluation)."""
        log_prior, log_lik, grad_prior, grad_lik = state.aux
        return state._replace(log_density=log_prior + self.beta * log_lik,
                              grad=grad_prior + self.beta * grad_lik)


@dataclass(frozen=True)
class AnnealingRun:
    """Raw output of :func:`anneal`, per chain ``[..., n]``.

    Attributes
    ----------
    log_weights
        Σ_t log f_t(z_{t−1}) − log f_{t−1}(z_{t−1}).
    position
        Final points ``[..., n, D]``.
    acceptance_rate
        Mean acceptance probability over the T − 1 transitions (NaN-free; 0 when T = 1).
    step_size
        Final adapted step size.
    divergences
        Divergent transitions.
    gradient_evaluations
        Gradient evaluations per chain (step-size search included).
    log_step_schedule
        log ε used by each transition, ``[T − 1, n]`` (row t − 1: the transition that leaves
        f_{β_t} invariant), shared by a datapoint's chains. :func:`bdmc` reverses it.
    """

    log_weights: torch.Tensor
    position: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    divergences: torch.Tensor
    gradient_evaluations: int
    log_step_schedule: torch.Tensor


def anneal(components: Components | LatentDensity, initial_position: torch.Tensor, betas: torch.Tensor, config: AISConfig,
           generator: torch.Generator, log_step_schedule: torch.Tensor | None = None,
           progress: Callable[[int], Any] | None = None) -> AnnealingRun:
    """Run AIS along ``betas`` from exact draws of f_{β_0}; the core of :func:`ais` and :func:`bdmc`.

    Parameters
    ----------
    components
        ``u -> (log p(u), log p(x|u))`` per chain, or a (compiled)
        :class:`~vaebench.inference.latent_density.LatentDensity`, whose gradients are used.
    initial_position
        Exact draws from f_{β_0}: the prior for β_0 = 0 (forward AIS), the posterior for β_0 = 1
        (reverse chain of BDMC). ``[M + K, n, D]`` when the step sizes are adapted: the last
        K = ``config.tuning_chains`` chains only tune the step size and their weights are dropped;
        ``[M, n, D]`` (every chain weighted) when ``log_step_schedule`` is given.
    betas
        The schedule, increasing (forward) or decreasing (reverse), ``[T + 1]``.
    config
        Leapfrog steps, acceptance target, adaptation rate, tuning chains, divergence threshold.
    generator
        The one source of randomness.
    log_step_schedule
        A fixed per-datapoint schedule ``[T − 1, n]``: transition t (leaving f_{β_t} invariant)
        uses step size exp(row t − 1). No tuning chains, no step-size search and no adaptation:
        every transition is fixed before the chains start.

    Returns
    -------
    AnnealingRun
        For the weighted chains only.

    Raises
    ------
    VaebenchError
        If ``log_step_schedule`` does not have T − 1 rows of n finite values.

    Notes
    -----
    Step sizes are shared by the chains of a datapoint and adapted from the tuning chains alone,
    log ε ← log ε + g(ᾱ_tuning − target). The M weighted chains therefore run with a step-size
    schedule that does not depend on their own history, so E[w] is exactly the ratio of
    normalisers. (Adapting each chain to its own acceptance, as Wu et al. 2017 do, biased log p̂
    *upward* by about 0.1 nats on the linear-Gaussian test model.)
    """
    betas = betas.tolist()
    transitions = max(len(betas) - 2, 0)
    fixed = log_step_schedule is not None
    num_tuning = 0 if fixed else config.tuning_chains
    num_chains = initial_position.shape[0] - num_tuning
    target = AnnealedTarget(components, betas[0])
    state = hmc.init(initial_position, target)
    calls = 1
    accept_sum = torch.zeros_like(state.log_density)
    divergences = torch.zeros_like(state.log_density, dtype=torch.long)
    log_weights = torch.zeros_like(state.log_density)
    log_step = torch.zeros_like(state.log_density[0])
    if fixed:
        expected = (transitions, *log_step.shape)
        if tuple(log_step_schedule.shape) != expected or not torch.isfinite(log_step_schedule).all():
            raise VaebenchError(f"a fixed step-size schedule must be {transitions} rows of {log_step.numel()} "
                                f"finite log step sizes, got shape {tuple(log_step_schedule.shape)}")
        log_step_schedule = log_step_schedule.to(log_step)
    elif transitions > 0:
        step_size, spent = hmc.find_reasonable_step_size(generator, state, target)
        calls += spent
        log_step = step_size[num_chains:].log().mean(0)
    used = []
    datapoints = initial_position.shape[-2]
    for t in range(1, len(betas)):
        if progress is not None:
            progress(datapoints)                   # one annealing step of this chunk's datapoints
        log_weights = log_weights + (betas[t] - betas[t - 1]) * state.aux[1]
        if t == len(betas) - 1:
            break
        if fixed:
            log_step = log_step_schedule[t - 1]
        used.append(log_step)
        target = AnnealedTarget(components, betas[t])
        state = target.rebase(state)._replace(step_size=log_step.exp().expand_as(state.log_density))
        state, info = hmc.step(generator, state, target, config.leapfrog, config.divergence_threshold)
        calls += config.leapfrog
        accept_sum += info.acceptance_prob
        divergences += info.divergent.long()
        if not fixed:
            tuning_accept = info.acceptance_prob[num_chains:].mean(0)
            log_step = (log_step + config.adaptation_rate * (tuning_accept - config.target_accept)
                        ).clamp(MIN_LOG_STEP, MAX_LOG_STEP)
    schedule = torch.stack(used) if used else log_step.new_zeros((0, *log_step.shape))
    main = slice(0, num_chains)
    return AnnealingRun(log_weights[main], state.position[main], accept_sum[main] / max(transitions, 1),
                        log_step.exp().expand_as(log_weights[main]), divergences[main], calls, schedule)


def summarize_log_weights(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """log-mean-exp over chains (dim 0), its delta-method standard error, and the weights' ESS.

    Returns ``(log_mean [n], stderr [n] or None when M = 1, ess [n])``.
    """
    m = log_weights.shape[0]
    log_mean = log_mean_exp(log_weights, 0)
    ess = torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))
    if m < 2:
        return log_mean, None, ess
    stderr = ((m / ess - 1).clamp(min=0) / (m - 1)).sqrt()
    return log_mean, stderr, ess


@dataclass(frozen=True)
class AISResult:
    """Per-datapoint AIS estimates ``[n]`` (from :func:`ais`, or one side of :func:`bdmc`).

    Attributes
    ----------
    log_marginal
        log p̂(x): log-mean-exp of the M chains' weights (for a reverse run, −log-mean-exp: an
        upper bound).
    stderr
        Delta-method Monte Carlo standard error of ``log_marginal``; ``None`` for M = 1.
    ess
        Effective sample size of the M final weights, in [1, M].
    log_weights
        Per-chain log-weights ``[M, n]``.
    acceptance_rate, step_size, divergences
        Means over a datapoint's chains (divergences: total).
    gradient_evaluations
        Gradient evaluations per chain.
    seconds
        Wall-clock time.
    log_step_schedule
        log ε of every transition, ``[T − 1, n]`` (see :class:`AnnealingRun`).
    """

    log_marginal: torch.Tensor
    stderr: torch.Tensor | None
    ess: torch.Tensor
    log_weights: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    divergences: torch.Tensor
    gradient_evaluations: int
    seconds: float
    log_step_schedule: torch.Tensor | None = None

    def subset(self, rows: slice) -> "AISResult":
        """The same run restricted to the datapoints ``rows`` (every per-datapoint field sliced)."""
        def cut(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[..., rows]
        return AISResult(self.log_marginal[rows], cut(self.stderr), self.ess[rows], self.log_weights[:, rows],
                         self.acceptance_rate[rows], self.step_size[rows], self.divergences[rows],
                         self.gradient_evaluations, self.seconds, cut(self.log_step_schedule))

    def summary(self) -> dict[str, float | int | None]:
        """Scalars for JSON records."""
        n = self.log_marginal.numel()
        mc = None if self.stderr is None else float(self.stderr.double().pow(2).sum().sqrt() / n)
        return {"ess_mean": float(self.ess.double().mean()), "ess_min": float(self.ess.double().min()),
                "mc_stderr": mc, "acceptance_rate": float(self.acceptance_rate.double().mean()),
                "step_size_mean": float(self.step_size.double().mean()),
                "divergences": int(self.divergences.sum()), "gradient_evaluations": self.gradient_evaluations}


def _combine(runs: list[AnnealingRun], sign: float, seconds: float) -> AISResult:
    log_weights = torch.cat([r.log_weights.reshape(r.log_weights.shape[0], -1) for r in runs], dim=-1)
    log_mean, stderr, ess = summarize_log_weights(log_weights)

    def per_datapoint(name: str, reduce: str) -> torch.Tensor:
        parts = [getattr(r, name).reshape(r.log_weights.shape[0], -1) for r in runs]
        values = torch.cat(parts, dim=-1)
        return values.sum(0) if reduce == "sum" else values.double().mean(0)

    schedule = torch.cat([r.log_step_schedule for r in runs], dim=-1)
    return AISResult(sign * log_mean, stderr, ess, log_weights, per_datapoint("acceptance_rate", "mean"),
                     per_datapoint("step_size", "mean"), per_datapoint("divergences", "sum"),
                     max(r.gradient_evaluations for r in runs), seconds, schedule)


def model_components(model: Any, x: torch.Tensor) -> Components:
    """``u -> (log p(u), log p_θ(x|u))`` of a model or target (:meth:`AISTarget.components`)."""
    return as_target(model).components(x)


def ais(model: Any, x: torch.Tensor, config: AISConfig, generator: torch.Generator, batch_size: int = 100,
        progress: Callable[[int], Any] | None = None) -> AISResult:
    """AIS estimate of log p_θ(x_i) for every row of ``x``, in chunks of ``batch_size`` datapoints.

    Parameters
    ----------
    model
        An :class:`AISTarget` or a :class:`vaebench.model.LatentModel` (see :func:`as_target`).
    x
        Data ``[n, P]``.
    config
        T, L, M, schedule and the step-size adaptation (K tuning chains per datapoint).
    generator
        The one source of randomness.
    batch_size
        Datapoints per chunk. Memory is O(batch_size × chains × model width); chunks are
        independent and their results concatenated.
    progress
        Called with the number of datapoints of a chunk after each of its annealing steps (for a
        progress bar; it changes no result).

    Returns
    -------
    AISResult
        Including the per-datapoint step-size schedule that :func:`bdmc` reverses.
    """
    target = as_target(model)
    start = time.perf_counter()
    betas = beta_schedule(config.steps, config.schedule, config.sigmoid_delta)
    runs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        u0 = target.sample_prior(xb, config.chains + config.tuning_chains, generator)
        runs.append(anneal(density_of(target, xb), u0, betas, config, generator, progress=progress))
    return _combine(runs, 1.0, time.perf_counter() - start)


@dataclass(frozen=True)
class BDMCResult:
    """Sandwich of log p_θ(x) on simulated data: forward AIS (lower) and reverse AIS (upper)."""

    lower: AISResult
    upper: AISResult
    alongside: AISResult | None = None
    """Forward AIS, in the same run as ``lower``, of the ``alongside`` data passed to :func:`bdmc`."""

    @property
    def gap(self) -> torch.Tensor:
        """Upper minus lower bound per datapoint ``[n]``; bounds the error of either estimate."""
        return self.upper.log_marginal - self.lower.log_marginal


def simulate(model: Any, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (x ``[n, P]``, u ``[n, D]``) from p(u)p_θ(x|u) (:meth:`AISTarget.simulate`).

    u is an exact draw from p_θ(u | x) for its x. Without ``generator``, one is seeded from
    torch's global RNG (so ``pyro.set_rng_seed`` fixes the draws).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
    return as_target(model).simulate(n, generator)


def bdmc(model: Any, x: torch.Tensor, z_posterior: torch.Tensor, config: AISConfig, generator: torch.Generator,
         batch_size: int = 100, alongside: torch.Tensor | None = None,
         progress: Callable[[int], Any] | None = None) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015): forward AIS on ``x``, reverse AIS from exact posterior draws.

    Parameters
    ----------
    model
        An :class:`AISTarget` or a LatentModel.
    x
        Data ``[n, P]``.
    z_posterior
        Exact draws from p_θ(u | x): ``[n, D]`` (all M reverse chains of a datapoint start there)
        or ``[M, n, D]``; for simulated data, the u that generated x (:func:`simulate`).
    config, generator, batch_size
        As for :func:`ais`.
    progress
        As for :func:`ais` (both directions report).
    alongside
        Other data ``[m, P]`` (the real data certified AIS is for) annealed forward in the same
        batched run as ``x``: its chains are independent of the simulated points', and it costs
        little extra where a step's cost is mostly per call rather than per row.

    Returns
    -------
    BDMCResult
        ``lower`` (forward, E log p̂ ≤ log p(x)) and ``upper`` (reverse, E[−log p̂_rev] ≥ log p(x)).

    Notes
    -----
    The reverse run has no tuning chains and no adaptation: reverse transition s (leaving
    f_{β_{T−s}} invariant) uses the forward run's step size of the same intermediate
    distribution, ``upper.log_step_schedule == lower.log_step_schedule.flip(0)``. The schedule is
    fixed before the reverse chains start and does not depend on ``z_posterior``, so
    E[1/p̂_rev] = 1/p_θ(x) holds exactly (Grosse et al. 2015, §3).
    """
    target = as_target(model)
    start = time.perf_counter()
    n = x.shape[0]
    forward = ais(target, x if alongside is None else torch.cat([x, alongside.to(x)]), config, generator,
                  batch_size, progress)
    lower = forward if alongside is None else forward.subset(slice(0, n))
    betas = beta_schedule(config.steps, config.schedule, config.sigmoid_delta).flip(0)
    reverse_schedule = lower.log_step_schedule.flip(0)
    runs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        zb = z_posterior[..., i:i + batch_size, :]
        z0 = zb.expand(config.chains, *zb.shape[-2:]).clone()
        runs.append(anneal(density_of(target, xb), z0, betas, config, generator,
                           log_step_schedule=reverse_schedule[:, i:i + batch_size], progress=progress))
    upper = _combine(runs, -1.0, time.perf_counter() - start - lower.seconds)
    return BDMCResult(lower, upper, None if alongside is None else forward.subset(slice(n, None)))
