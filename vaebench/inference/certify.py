"""Certified AIS: BDMC on data simulated from the decoder chooses the annealing length T.

The protocol (Wu et al. 2017, made automatic)
---------------------------------------------
AIS at a fixed T is a stochastic lower bound whose bias is unknown on real data. On data simulated
from the model itself, (u*, x) ~ p(u) p_θ(x|u), BDMC (Grosse, Ghahramani & Adams 2015) also gives
a stochastic *upper* bound, and the sandwich

.. math::

    E[\\log \\hat p_{\\text{fwd}}(x)] \\le \\log p_θ(x) \\le E[-\\log \\bar w_{\\text{rev}}(x)]

with w̄_rev the mean reverse weight (an unbiased estimate of 1/p_θ(x)), bounds the bias of
forward AIS at that T by the BDMC gap g(T) = upper − lower. Wu et al. (2017)
validate their AIS numbers this way by hand; :func:`certify` does it for every decoder:

1. simulate ``points`` datapoints (x_i, u*_i) from the decoder being evaluated (once);
2. for T = T_0, 2T_0, 4T_0, ..., capped at ``max_steps`` (the last T is ``max_steps`` itself),
   run BDMC at T on those points and compute the mean gap ḡ(T) over the points and its standard
   error se(T) = sd_i(g_i) / √points;
3. stop at the first T with **ḡ(T) + se(T) < tolerance** ("below tolerance by more than its
   standard error"): certified at T. If T = ``max_steps`` fails the test, the certificate says
   ``certified = False`` and T = ``max_steps``.

:func:`certified_ais` then runs forward AIS on the real data at the chosen T. The certificate
transfers to real data only as far as the real data resemble the model's own samples (Wu et al.
2017, §4); on a well-fitted decoder that is the claim papers make.

The BDMC sandwich is exact because both directions use the same per-datapoint transitions,
fixed before the reverse chains start (:func:`vaebench.inference.ais.bdmc`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vaebench.config import AISConfig, CertifyConfig
from vaebench.errors import ConfigError
from vaebench.estimators import mean_and_stderr
from vaebench.inference.ais import AISResult, as_target, bdmc


@dataclass(frozen=True)
class Certificate:
    """The outcome of :func:`certify`.

    Attributes
    ----------
    steps
        The chosen annealing length T (``max_steps`` when not certified).
    bdmc_gap
        Mean BDMC gap ḡ(T) over the simulated points, nats per datapoint.
    bdmc_gap_stderr
        Its standard error se(T) over the points.
    tolerance
        The tolerance the gap was held to.
    certified
        Whether ḡ(T) + se(T) < tolerance.
    seconds
        Wall-clock time of the simulation and all BDMC runs.
    points
        Simulated datapoints.
    history
        ``(T, ḡ(T), se(T))`` for every T tried, in order.
    bounds
        ``(mean lower bound, mean upper bound)`` over the simulated points at each T of ``history``
        (what the report plots against T).
    """

    steps: int
    bdmc_gap: float
    bdmc_gap_stderr: float
    tolerance: float
    certified: bool
    seconds: float
    points: int
    history: tuple[tuple[int, float, float], ...]
    bounds: tuple[tuple[float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the scalars plus ``history`` as a list of ``[T, gap, stderr]``."""
        out = dataclasses.asdict(self)
        out["history"] = [list(entry) for entry in self.history]
        out["bounds"] = [list(entry) for entry in self.bounds]
        return out

    def describe(self) -> str:
        """One phrase for the CLI, e.g. ``certified at T=2000: BDMC gap 0.041 ± 0.006 < 0.1 nats``."""
        gap = f"BDMC gap {self.bdmc_gap:.3f} ± {self.bdmc_gap_stderr:.3f}"
        on = f"on {self.points} simulated points, {self.seconds:.1f} s"
        if self.certified:
            return f"certified at T={self.steps}: {gap} < {self.tolerance:g} nats ({on})"
        return (f"UNCERTIFIED: {gap} nats at T={self.steps} (--max-steps) is not below {self.tolerance:g} "
                f"by its standard error ({on})")


def step_ladder(start: int, max_steps: int) -> list[int]:
    """T_0, 2T_0, 4T_0, ... below ``max_steps``, then ``max_steps`` itself."""
    if start > max_steps:
        raise ConfigError(f"--max-steps ({max_steps}) must be at least --steps ({start})")
    ladder = [start]
    while ladder[-1] < max_steps:
        ladder.append(min(2 * ladder[-1], max_steps))
    return ladder


def certify(model: Any, config: AISConfig, generator: torch.Generator,
            settings: CertifyConfig = CertifyConfig(), batch_size: int = 100,
            progress: Callable[[int], Any] | None = None) -> Certificate:
    """Choose T by BDMC on ``settings.points`` datapoints simulated from ``model`` (see :func:`_certify`)."""
    return _certify(model, config, generator, settings, batch_size, progress=progress)[0]


def _certify(model: Any, config: AISConfig, generator: torch.Generator, settings: CertifyConfig,
             batch_size: int, alongside: torch.Tensor | None = None, progress: Callable[[int], Any] | None = None
             ) -> tuple[Certificate, AISResult | None]:
    """Choose T by BDMC on ``settings.points`` datapoints simulated from ``model``.

    Parameters
    ----------
    model
        An :class:`vaebench.inference.ais.AISTarget` or a LatentModel.
    config
        AIS settings; ``config.steps`` is the first T tried (T_0). Leapfrog steps, chains,
        schedule and step-size adaptation are those of the final AIS run.
    generator
        The one source of randomness (simulation and every BDMC run).
    settings
        ``points``, ``max_steps`` and ``tolerance``.
    batch_size
        Datapoints per AIS chunk.

    Returns
    -------
    Certificate
        The first T of the ladder T_0, 2T_0, ..., ``max_steps`` with mean gap + standard error
        < ``tolerance`` (``certified=True``), or ``max_steps`` with ``certified=False``.

    Raises
    ------
    ConfigError
        If ``config.steps > settings.max_steps``.
    """
    target = as_target(model)
    ladder = step_ladder(config.steps, settings.max_steps)
    start = time.perf_counter()
    x_sim, u_sim = target.simulate(settings.points, generator)
    history: list[tuple[int, float, float]] = []
    bounds: list[tuple[float, float]] = []
    certified = False
    for steps in ladder:
        result = bdmc(target, x_sim, u_sim, dataclasses.replace(config, steps=steps), generator, batch_size,
                      alongside, progress)
        gap, stderr = mean_and_stderr(result.gap)
        history.append((steps, gap, stderr))
        bounds.append((float(result.lower.log_marginal.double().mean()), float(result.upper.log_marginal.double().mean())))
        if gap + stderr < settings.tolerance:
            certified = True
            break
    steps, gap, stderr = history[-1]
    certificate = Certificate(steps, gap, stderr, float(settings.tolerance), certified, time.perf_counter() - start,
                              settings.points, tuple(history), tuple(bounds))
    return certificate, result.alongside


def certified_ais(model: Any, x: torch.Tensor, config: AISConfig, generator: torch.Generator,
                  settings: CertifyConfig = CertifyConfig(), batch_size: int = 100,
                  progress: Callable[[int], Any] | None = None) -> tuple[AISResult, Certificate]:
    """:func:`certify`, with forward AIS on ``x`` at the certified T (at ``max_steps`` if uncertified).

    ``x`` is annealed in the same batched forward runs as the simulated points (``bdmc(...,
    alongside=x)``), so the real-data AIS at the chosen T costs no run of its own. Its chains are
    independent of the simulated points' chains, on which alone the choice of T depends, so the
    estimate at the chosen T is an ordinary AIS estimate at that T.
    """
    certificate, result = _certify(model, config, generator, settings, batch_size, alongside=x, progress=progress)
    return result, certificate
