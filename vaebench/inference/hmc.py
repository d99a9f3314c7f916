"""Batched Hamiltonian Monte Carlo: one independent chain per datapoint, all advanced as tensors.

Why written by hand
-------------------
Pyro's ``HMC``/``NUTS`` (``pyro/infer/mcmc/hmc.py``) run *one* joint chain over every latent
site: a single step size, a single mass matrix and a single accept/reject for the whole latent
vector. The N posteriors p_θ(z_i | x_i) of a LatentModel are independent, so a joint chain would couple
them (one bad datapoint shrinks everyone's step size and rejects everyone's move). This module
runs N × M independent chains with per-chain step size, per-chain (diagonal) mass matrix and
per-chain Metropolis test, vectorised over chains -- no Python loop over datapoints, on CPU or
CUDA. Pyro's ``NUTS`` is used only as a cross-check (tests) and as the benchmark reference.

The algorithm (Neal 2011)
-------------------------
With potential U(z) = −log π(z), momentum p ~ N(0, M), M = diag(1/m) (``inverse_mass`` m), and
Hamiltonian H(z, p) = U(z) + ½ pᵀ M⁻¹ p, one transition takes L leapfrog steps of size ε,

.. math::

    p_{1/2} = p + \\tfrac{ε}{2} ∇\\log π(z), \\quad z' = z + ε\\, m ⊙ p_{1/2}, \\quad
    p' = p_{1/2} + \\tfrac{ε}{2} ∇\\log π(z'),

and accepts the end point with probability min(1, exp(H(z, p) − H(z', p'))). A chain whose
trajectory leaves the finite numbers, or whose energy error exceeds ``divergence_threshold``, is
*divergent*: it is frozen at its last finite point for the rest of the trajectory, rejected, and
counted; no NaN reaches the outputs.

Warm-up (:func:`sample`) adapts each chain's step size by dual averaging toward a target
acceptance (Hoffman & Gelman 2014, Alg. 5) and, optionally, a diagonal inverse mass matrix equal
to the regularised variance of the chain's draws in the middle of warm-up (as Stan does); both
are frozen for sampling.

Shapes and randomness
---------------------
Positions are ``[..., n, D]``: the last dimension is the latent, the one before it indexes
datapoints, any leading dimensions are chains per datapoint. Every per-chain quantity has shape
``position.shape[:-1]``. The log density maps ``[..., n, D] -> [..., n]`` and must be separable
across chains (e.g. ``lambda z: model.log_joint(x, z)``). Each transition draws fixed-shape
tensors from one ``torch.Generator`` (momentum, step-size jitter, acceptance uniforms), so chain
i's draws depend on the generator and on chain i alone: changing another datapoint does not change
them.

The API mirrors BlackJAX (``blackjax/mcmc/hmc.py``): :func:`init` builds an :class:`HMCState` that
caches the log density and its gradient at the current position, :func:`step` returns the next
state and an :class:`HMCInfo`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from vaebench.config import HMCConfig
from vaebench.errors import VaebenchError
from vaebench.inference.latent_density import Evaluation
from vaebench.model import LatentModel

LogDensityFn = Callable[[torch.Tensor], torch.Tensor]
"""``z [..., n, D] -> log π(z) [..., n]``, one independent density per chain."""


def evaluate(log_density_fn: LogDensityFn | Any, position: torch.Tensor) -> Evaluation:
    """Log density and gradient at ``position`` (autograd; works inside ``torch.no_grad``).

    A target object with an ``evaluate(position) -> Evaluation`` method (the compiled
    :class:`~vaebench.inference.latent_density.LatentDensity`, AIS's annealed target) is used as
    is, which lets it take its own gradient path and cache per-chain extras in :attr:`HMCState.aux`.
    """
    custom = getattr(log_density_fn, "evaluate", None)
    if custom is not None:
        return custom(position)
    with torch.enable_grad():
        z = position.detach().requires_grad_(True)
        value = log_density_fn(z)
        (grad,) = torch.autograd.grad(value.sum(), z)
    return Evaluation(value.detach(), grad.detach())


class DualAveragingState(NamedTuple):
    """Per-chain dual-averaging state (Hoffman & Gelman 2014, eq. 6), each ``[chains]``.

    Attributes
    ----------
    iteration
        t, the number of updates so far.
    log_step_size
        log ε_t, the step size used next during warm-up.
    log_step_size_avg
        log ε̄_t, the averaged iterate used after warm-up.
    error_avg
        H̄_t, the running average of (target − acceptance).
    mu
        μ = log(10 ε_0), the point the iterates shrink toward.
    """

    iteration: torch.Tensor
    log_step_size: torch.Tensor
    log_step_size_avg: torch.Tensor
    error_avg: torch.Tensor
    mu: torch.Tensor


def dual_averaging_init(step_size: torch.Tensor) -> DualAveragingState:
    """Start dual averaging at ``step_size`` (per chain)."""
    log_eps = step_size.log()
    zeros = torch.zeros_like(log_eps)
    return DualAveragingState(zeros, log_eps, zeros.clone(), zeros.clone(), log_eps + math.log(10.0))


def dual_averaging_update(state: DualAveragingState, acceptance_prob: torch.Tensor, target_accept: float,
                          gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75) -> DualAveragingState:
    """One dual-averaging update of every chain's step size.

    .. math::

        \\bar H_t = (1 − \\tfrac1{t + t_0}) \\bar H_{t−1} + \\tfrac1{t + t_0}(δ − α_t), \\quad
        \\log ε_t = μ − \\tfrac{\\sqrt t}{γ} \\bar H_t, \\quad
        \\log \\bar ε_t = t^{−κ} \\log ε_t + (1 − t^{−κ}) \\log \\bar ε_{t−1}.
    """
    t = state.iteration + 1
    weight = 1.0 / (t + t0)
    error_avg = (1 - weight) * state.error_avg + weight * (target_accept - acceptance_prob)
    log_eps = state.mu - t.sqrt() / gamma * error_avg
    eta = t.pow(-kappa)
    log_eps_avg = eta * log_eps + (1 - eta) * state.log_step_size_avg
    return DualAveragingState(t, log_eps, log_eps_avg, error_avg, state.mu)


class HMCState(NamedTuple):
    """The state of every chain.

    Attributes
    ----------
    position
        z, ``[..., n, D]``.
    log_density
        log π(z), ``[..., n]`` (cached: never recomputed for a rejected proposal).
    grad
        ∇ log π(z), ``[..., n, D]``.
    step_size
        ε per chain, ``[..., n]``.
    inverse_mass
        Diagonal inverse mass m per chain ``[..., n, D]``, or ``None`` for the identity.
    adaptation
        Dual-averaging state during warm-up, else ``None``.
    aux
        Extras a target caches per chain (see :func:`evaluate`); empty for a plain log density.
    """

    position: torch.Tensor
    log_density: torch.Tensor
    grad: torch.Tensor
    step_size: torch.Tensor
    inverse_mass: torch.Tensor | None = None
    adaptation: DualAveragingState | None = None
    aux: tuple[torch.Tensor, ...] = ()


class HMCInfo(NamedTuple):
    """Per-chain diagnostics of one transition, each ``[..., n]``.

    Attributes
    ----------
    acceptance_prob
        min(1, exp(−ΔH)); 0 for a divergent trajectory.
    accepted
        Whether the proposal was accepted.
    divergent
        Whether the trajectory diverged (non-finite or energy error > threshold).
    energy_error
        ΔH = H(end) − H(start); ``+inf`` for a divergent trajectory (never NaN).
    """

    acceptance_prob: torch.Tensor
    accepted: torch.Tensor
    divergent: torch.Tensor
    energy_error: torch.Tensor


def init(position: torch.Tensor, log_density_fn: LogDensityFn | Any, step_size: float | torch.Tensor = 0.1,
         inverse_mass: torch.Tensor | None = None) -> HMCState:
    """Evaluate the target at ``position`` and build the state of every chain.

    Raises
    ------
    VaebenchError
        If the log density or its gradient is not finite at some starting point.
    """
    evaluation = evaluate(log_density_fn, position)
    bad = ~(torch.isfinite(evaluation.log_density) & torch.isfinite(evaluation.grad).all(-1))
    if bad.any():
        raise VaebenchError(f"the log density or its gradient is not finite at the starting point of "
                            f"{int(bad.sum())} chain(s)")
    eps = torch.as_tensor(step_size, dtype=position.dtype, device=position.device)
    eps = eps.expand(evaluation.log_density.shape).clone()
    return HMCState(position.detach(), evaluation.log_density, evaluation.grad, eps, inverse_mass, None,
                    evaluation.aux)


def _draw_normal(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                       device=generator.device).to(like.device)


def _draw_uniform(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, dtype=like.dtype,
                      device=generator.device).to(like.device)


def _kinetic(momentum: torch.Tensor, inverse_mass: torch.Tensor | None) -> torch.Tensor:
    squared = momentum.pow(2) if inverse_mass is None else momentum.pow(2) * inverse_mass
    return 0.5 * squared.sum(-1)


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-chain choice between two tensors whose leading dims are the chain dims."""
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim())), new, old)


def step(generator: torch.Generator, state: HMCState, log_density_fn: LogDensityFn | Any, num_leapfrog: int,
         divergence_threshold: float = 1000.0, step_size_jitter: float = 0.0) -> tuple[HMCState, HMCInfo]:
    """One HMC transition of every chain: momentum refresh, L leapfrog steps, Metropolis test.

    Parameters
    ----------
    generator
        Source of all randomness; each call draws the same number of values whatever the data.
    state
        Current state (:func:`init`); its ``step_size`` and ``inverse_mass`` are used as they are.
    log_density_fn
        The target log density (or a target with an ``evaluate`` method).
    num_leapfrog
        Leapfrog steps L (≥ 1); the call spends L gradient evaluations.
    divergence_threshold
        Energy error (nats) beyond which a trajectory is divergent.
    step_size_jitter
        Scale ε by U(1 − j, 1 + j) per chain for this transition.

    Returns
    -------
    (HMCState, HMCInfo)
        The next state (``adaptation`` passed through unchanged) and per-chain diagnostics.
    """
    z0, inverse_mass = state.position, state.inverse_mass
    momentum0 = _draw_normal(generator, z0)
    jitter = _draw_uniform(generator, state.log_density)
    uniform = _draw_uniform(generator, state.log_density)
    if inverse_mass is not None:
        momentum0 = momentum0 / inverse_mass.sqrt()
    eps = state.step_size * (1 + step_size_jitter * (2 * jitter - 1)) if step_size_jitter else state.step_size
    eps = eps.unsqueeze(-1)
    energy0 = -state.log_density + _kinetic(momentum0, inverse_mass)

    z, momentum, log_density, grad, aux = z0, momentum0, state.log_density, state.grad, state.aux
    alive = torch.ones_like(state.log_density, dtype=torch.bool)
    for _ in range(num_leapfrog):
        half = momentum + 0.5 * eps * grad
        z_new = z + eps * (half if inverse_mass is None else inverse_mass * half)
        alive = alive & torch.isfinite(z_new).all(-1)
        z_new = _select(alive, z_new, z)                  # frozen chains are evaluated where they stand
        new = evaluate(log_density_fn, z_new)
        momentum_new = half + 0.5 * eps * new.grad
        energy = -new.log_density + _kinetic(momentum_new, inverse_mass)
        alive = (alive & torch.isfinite(energy) & torch.isfinite(new.grad).all(-1)
                 & torch.isfinite(momentum_new).all(-1) & (energy - energy0 <= divergence_threshold))
        z = _select(alive, z_new, z)
        momentum = _select(alive, momentum_new, momentum)
        log_density = _select(alive, new.log_density, log_density)
        grad = _select(alive, new.grad, grad)
        aux = tuple(_select(alive, a_new, a_old) for a_new, a_old in zip(new.aux, aux))

    energy_error = -log_density + _kinetic(momentum, inverse_mass) - energy0
    energy_error = torch.where(alive, energy_error, torch.full_like(energy_error, math.inf))
    acceptance_prob = torch.where(alive, torch.exp(torch.clamp(-energy_error, max=0.0)),
                                  torch.zeros_like(energy_error))
    accepted = uniform < acceptance_prob
    next_state = HMCState(_select(accepted, z, z0), _select(accepted, log_density, state.log_density),
                          _select(accepted, grad, state.grad), state.step_size, inverse_mass, state.adaptation,
                          tuple(_select(accepted, a, a0) for a, a0 in zip(aux, state.aux)))
    return next_state, HMCInfo(acceptance_prob, accepted, ~alive, energy_error)


def find_reasonable_step_size(generator: torch.Generator, state: HMCState, log_density_fn: LogDensityFn | Any,
                              initial: float = 0.1, max_iterations: int = 20) -> tuple[torch.Tensor, int]:
    """A starting step size per chain (Hoffman & Gelman 2014, Alg. 4, vectorised).

    Each chain doubles (or halves) ε until the acceptance probability of one leapfrog step
    crosses 1/2, then stops; chains are searched together. Returns the step sizes and the number
    of batched gradient evaluations spent.
    """
    log_eps = torch.full_like(state.log_density, math.log(initial))
    probe = state._replace(step_size=log_eps.exp())
    _, info = step(generator, probe, log_density_fn, 1)
    direction = torch.where(info.acceptance_prob > 0.5, 1.0, -1.0).to(log_eps)
    searching = torch.ones_like(log_eps, dtype=torch.bool)
    spent = 1
    for _ in range(max_iterations):
        if not searching.any():
            break
        candidate = torch.where(searching, log_eps + direction * math.log(2.0), log_eps)
        _, info = step(generator, state._replace(step_size=candidate.exp()), log_density_fn, 1)
        spent += 1
        crossed = torch.where(direction > 0, info.acceptance_prob < 0.5, info.acceptance_prob > 0.5)
        log_eps = torch.where(searching & ~(crossed & (direction > 0)), candidate, log_eps)
        searching = searching & ~crossed
    return log_eps.exp(), spent


@dataclass(frozen=True)
class HMCDiagnostics:
    """Run-level diagnostics of :func:`sample`.

    Attributes
    ----------
    acceptance_rate
        Mean acceptance probability per chain over the kept iterations, ``[..., n]``.
    step_size
        Final (frozen) step size per chain, ``[..., n]``.
    divergences
        Divergent transitions per chain during sampling, ``[..., n]``.
    warmup_divergences
        Divergent transitions per chain during warm-up, ``[..., n]``.
    ess
        Effective sample size per datapoint and latent dimension over its chains, ``[n, D]``
        (``pyro.ops.stats.effective_sample_size``); ``None`` with fewer than 2 draws.
    rhat
        Split R-hat per datapoint and dimension, ``[n, D]`` (``pyro.ops.stats.split_gelman_rubin``);
        ``None`` with fewer than 4 draws.
    gradient_evaluations
        Gradient evaluations per chain, warm-up and step-size search included.
    seconds
        Wall-clock time of the sampling, warm-up and step-size search included (not the ESS and R-hat).
    """

    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    divergences: torch.Tensor
    warmup_divergences: torch.Tensor
    ess: torch.Tensor | None
    rhat: torch.Tensor | None
    gradient_evaluations: int
    seconds: float

    def summary(self) -> dict[str, float | int]:
        """Scalars for logs and JSON records."""
        out: dict[str, float | int] = {
            "acceptance_rate": float(self.acceptance_rate.double().mean()),
            "step_size_mean": float(self.step_size.double().mean()),
            "step_size_min": float(self.step_size.double().min()),
            "divergences": int(self.divergences.sum()),
            "warmup_divergences": int(self.warmup_divergences.sum()),
            "gradient_evaluations": self.gradient_evaluations, "seconds": self.seconds}
        if self.ess is not None:
            out["ess_mean"] = float(self.ess.double().mean())
            out["ess_min"] = float(self.ess.double().min())
        if self.rhat is not None:
            out["rhat_max"] = float(self.rhat.double().max())
        return out


@dataclass(frozen=True)
class HMCResult:
    """What :func:`sample` returns: draws ``[num_samples, ..., n, D]`` (or ``None``), final state, diagnostics."""

    samples: torch.Tensor | None
    state: HMCState
    diagnostics: HMCDiagnostics


class _Welford:
    """Running per-chain mean and variance of positions (for the diagonal mass matrix)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.count = 0
        self.mean = torch.zeros_like(like)
        self.m2 = torch.zeros_like(like)

    def update(self, value: torch.Tensor) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (value - self.mean)

    def regularized_variance(self) -> torch.Tensor:
        """Stan's shrinkage toward 10⁻³: (n/(n+5)) s² + 10⁻³ · 5/(n+5)."""
        n = self.count
        variance = self.m2 / max(n - 1, 1)
        return (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0))


def warmup_schedule(num_warmup: int, adapt_mass: bool) -> tuple[int, int]:
    """(start, end) of the mass-matrix window: iterations [15%, 60%) of warm-up.

    The first 15% only adapt the step size (the chains travel to the typical set); draws of the
    window estimate the variance; the last 40% re-adapt the step size to the new metric. (Stan
    uses doubling windows and a 10% final buffer; one window with a longer final buffer lets the
    averaged dual-averaging iterate settle in short warm-ups.) Returns ``(num_warmup, num_warmup)``
    (no window) without mass adaptation or with fewer than 20 warm-up iterations.
    """
    if not adapt_mass or num_warmup < 20:
        return num_warmup, num_warmup
    return int(0.15 * num_warmup), int(0.6 * num_warmup)


def per_datapoint_diagnostics(samples: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ESS and split R-hat per datapoint and dimension from draws ``[S, ..., n, D]``.

    Leading dimensions between the sample and datapoint dimensions are that datapoint's chains;
    both statistics come from ``pyro.ops.stats``, computed :data:`DIAGNOSTIC_CHUNK` datapoints at
    a time (the FFT behind the ESS needs several float64 copies of the draws).
    """
    num = samples.shape[0]
    chains = samples.reshape(num, -1, *samples.shape[-2:])                # [S, M, n, D]
    if num < 2:
        return None, None
    ess, rhat = [], []
    for i in range(0, chains.shape[-2], DIAGNOSTIC_CHUNK):
        part = chains[..., i:i + DIAGNOSTIC_CHUNK, :].double()
        ess.append(effective_sample_size(part, chain_dim=1, sample_dim=0))
        if num >= 4:
            rhat.append(split_gelman_rubin(part, chain_dim=1, sample_dim=0))
    return torch.cat(ess, dim=-2), (torch.cat(rhat, dim=-2) if rhat else None)


DIAGNOSTIC_CHUNK = 64
"""Datapoints whose ESS and R-hat :func:`per_datapoint_diagnostics` computes at once."""


def sample(log_density_fn: LogDensityFn | Any, initial_position: torch.Tensor, config: HMCConfig,
           generator: torch.Generator, keep_samples: bool = True) -> HMCResult:
    """Warm up and run every chain: the batched-HMC driver.

    Parameters
    ----------
    log_density_fn
        ``z [..., n, D] -> [..., n]``, separable across chains; in practice
        ``model.latent_density(x)`` (compiled, one backward pass per gradient).
    initial_position
        Starting points ``[..., n, D]`` (leading dims: chains per datapoint).
    config
        Warm-up and sampling settings (``config.chains`` is not used here: the chains are the
        leading dims of ``initial_position``).
    generator
        The one source of randomness.
    keep_samples
        Keep the ``num_samples`` draws (memory ``num_samples × chains × D``); ESS and R-hat need them.

    Returns
    -------
    HMCResult
    """
    start = time.perf_counter()
    state = init(initial_position, log_density_fn)
    calls = 1
    if config.initial_step_size is None:
        step_size, spent = find_reasonable_step_size(generator, state, log_density_fn)
        calls += spent
    else:
        step_size = torch.full_like(state.log_density, config.initial_step_size)
    state = state._replace(step_size=step_size, adaptation=dual_averaging_init(step_size))
    window_start, window_end = warmup_schedule(config.num_warmup, config.adapt_mass)
    welford = _Welford(state.position)
    warmup_divergences = torch.zeros_like(state.log_density, dtype=torch.long)

    for i in range(config.num_warmup):
        state, info = step(generator, state, log_density_fn, config.num_leapfrog, config.divergence_threshold,
                           config.step_size_jitter)
        calls += config.num_leapfrog
        warmup_divergences += info.divergent.long()
        adaptation = dual_averaging_update(state.adaptation, info.acceptance_prob, config.target_accept)
        state = state._replace(step_size=adaptation.log_step_size.exp(), adaptation=adaptation)
        if window_start <= i < window_end:
            welford.update(state.position)
            if i == window_end - 1:
                # New metric: restart dual averaging from the current step size (as Stan does).
                current = adaptation.log_step_size_avg.exp()
                state = state._replace(inverse_mass=welford.regularized_variance(), step_size=current,
                                       adaptation=dual_averaging_init(current))
    if config.num_warmup > 0:
        state = state._replace(step_size=state.adaptation.log_step_size_avg.exp())
    state = state._replace(adaptation=None)

    draws = [] if keep_samples else None
    accept_sum = torch.zeros_like(state.log_density)
    divergences = torch.zeros_like(state.log_density, dtype=torch.long)
    for _ in range(config.num_samples):
        state, info = step(generator, state, log_density_fn, config.num_leapfrog, config.divergence_threshold,
                           config.step_size_jitter)
        calls += config.num_leapfrog
        accept_sum += info.acceptance_prob
        divergences += info.divergent.long()
        if draws is not None:
            draws.append(state.position)
    if state.position.is_cuda:
        torch.cuda.synchronize(state.position.device)
    seconds = time.perf_counter() - start                  # sampling time (the diagnostics are not sampling)
    samples = torch.stack(draws) if draws else None
    ess, rhat = per_datapoint_diagnostics(samples) if samples is not None else (None, None)
    diagnostics = HMCDiagnostics(accept_sum / config.num_samples, state.step_size, divergences,
                                 warmup_divergences, ess, rhat, calls, seconds)
    return HMCResult(samples, state, diagnostics)


def sample_posterior(model: LatentModel, x: torch.Tensor, config: HMCConfig, generator: torch.Generator,
                     keep_samples: bool = True) -> HMCResult:
    """Sample p_θ(z_i | x_i) for every row of ``x`` with ``config.chains`` chains each.

    Chains start from exact prior draws u ~ p(u) (:meth:`~vaebench.model.LatentModel.sample_prior`)
    and target log p_θ(x, u) (:meth:`~vaebench.model.LatentModel.latent_density`, compiled).
    Draws are ``[num_samples, chains, n, D]``.
    """
    z0 = model.sample_prior(x, config.chains, generator)
    return sample(model.latent_density(x), z0, config, generator, keep_samples)
