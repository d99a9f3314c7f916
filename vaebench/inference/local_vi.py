"""Per-datapoint ("local", non-amortised) Gaussian variational inference: the q* of Cremer et al.

For a fixed decoder, each datapoint x_n gets its own diagonal Gaussian
q*_n(z) = N(μ_n, diag exp(2 s_n)), with (μ_n, s_n) chosen to maximise that datapoint's ELBO

.. math::

    \\mathrm{ELBO}[q_n] = \\mathbb E_{q_n}\\big[\\log p_θ(x_n, z) - \\log q_n(z)\\big],

estimated with K reparameterised draws per step. Because the N problems share no parameters,
one Adam optimiser over the ``[N, D]`` tensors μ and s solves all of them at once (Adam's
per-element step sizes make this the same as N separate optimisers); the learning rate decays
along a cosine schedule (``torch.optim.lr_scheduler.CosineAnnealingLR``) so the final iterate
is not dominated by gradient noise. Initialising at the encoder's output makes ELBO[q*] ≥
ELBO[q_φ] up to optimisation noise.

This gives the decomposition of Cremer, Li & Duvenaud (2018, "Inference suboptimality in
variational autoencoders"):

.. math::

    \\log p_θ(x) - \\mathrm{ELBO}[q_φ]
      = \\underbrace{\\log p_θ(x) - \\mathrm{ELBO}[q^*]}_{\\text{approximation gap}}
      + \\underbrace{\\mathrm{ELBO}[q^*] - \\mathrm{ELBO}[q_φ]}_{\\text{amortisation gap}}.

The density of the model is :meth:`vaebench.model.LatentModel.log_joint` (traced from the Pyro model);
q* is a ``pyro.distributions.Normal``. Pyro's SVI could fit the same q* with a local guide, but it
keeps one parameter set in its global store and its ``Trace_ELBO`` sums the datapoints' ELBOs,
which is what is done here; the explicit loop keeps the state (μ, s, the generator) visible.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import pyro.distributions as dist
import torch
from torch import nn

from vaebench.errors import TrainingDivergedError

LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalGaussian:
    """Optimised per-datapoint Gaussians and the optimisation trace.

    Attributes
    ----------
    loc, log_scale
        ``[n, D]`` means and log standard deviations of q*_n.
    history
        Mean (over datapoints) K-sample ELBO estimate at every ``record_every``-th step.
    """

    loc: torch.Tensor
    log_scale: torch.Tensor
    history: list[float]

    def distribution(self) -> dist.TorchDistribution:
        """q* as a distribution with batch shape ``[n]`` and event shape ``[D]``."""
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)

    def proposal(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` draws from q* and their log-density, for :mod:`vaebench.estimators`.

        ``x`` must be the same ``n`` rows q* was fitted to (it only fixes the shape), so pass the
        whole set rather than going through :func:`vaebench.estimators.over_batches`.
        """
        if x.shape[0] != self.loc.shape[0]:
            raise ValueError(f"q* was fitted to {self.loc.shape[0]} datapoints, got {x.shape[0]}")
        q = self.distribution()
        z = q.sample((k,))
        return z, q.log_prob(z)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients to ``module``'s parameters (restoring each flag afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fit_local_gaussians(log_joint: LogJoint, x: torch.Tensor, init_loc: torch.Tensor,
                        init_log_scale: torch.Tensor, steps: int = 500, lr: float = 1e-2, k: int = 8,
                        generator: torch.Generator | None = None, record_every: int = 10) -> LocalGaussian:
    """Maximise every datapoint's ELBO over its own diagonal Gaussian, all at once.

    Parameters
    ----------
    log_joint
        ``(x, z [k, n, D]) -> [k, n]``, e.g. :meth:`LatentModel.log_joint`; gradients are taken only with
        respect to μ and s (wrap the call in :func:`frozen` to skip decoder gradients).
    x
        Data ``[n, P]``.
    init_loc, init_log_scale
        Starting point ``[n, D]`` (the encoder's output, or zeros for the prior).
    steps, lr, k
        Adam steps, initial learning rate (cosine-decayed to lr/100), draws per step.
    generator
        Source of the reparameterisation noise (on the CPU); one seed, one result.
    """
    loc = init_loc.detach().clone().requires_grad_(True)
    log_scale = init_log_scale.detach().clone().requires_grad_(True)

    def draw(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = log_scale.exp()
        z = loc + scale * eps
        return z, dist.Normal(loc, scale).to_event(1).log_prob(z)

    history = _maximise_elbo(draw, [loc, log_scale], log_joint, x, steps, lr, k, generator, record_every)
    return LocalGaussian(loc.detach(), log_scale.detach(), history)


def _maximise_elbo(draw: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], params: list[torch.Tensor],
                   log_joint: LogJoint, x: torch.Tensor, steps: int, lr: float, k: int,
                   generator: torch.Generator | None, record_every: int = 10) -> list[float]:
    """Adam with a cosine-decayed learning rate on Σ_n ELBO_n; ``draw(ε) -> (z, log q(z))`` reparameterises q."""
    if steps < 0 or k < 1:
        raise ValueError(f"need steps >= 0 and k >= 1, got steps={steps}, k={k}")
    like = params[0]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=lr / 100)
    history: list[float] = []
    for step in range(steps):
        eps = torch.randn((k, *like.shape), generator=generator, dtype=like.dtype).to(like.device)
        z, log_q = draw(eps)
        elbo = (log_joint(x, z) - log_q).mean(0)
        optimizer.zero_grad(set_to_none=True)
        (-elbo.sum()).backward()
        optimizer.step()
        scheduler.step()
        if step % record_every == 0 or step == steps - 1:
            value = float(elbo.detach().mean())
            if not math.isfinite(value):
                raise TrainingDivergedError(f"local VI (q*) diverged at step {step + 1}: ELBO {value}; "
                                             f"try a smaller learning rate (now {lr})")
            history.append(value)
    return history


@dataclass(frozen=True)
class LocalFlow:
    """Per-datapoint members of an IAF guide's family: q*_n = flows(· | c_n) applied to N(μ_n, σ_n²).

    Attributes
    ----------
    loc, log_scale, context
        ``[n, D]``, ``[n, D]`` and ``[n, C]``: each datapoint's base Gaussian and flow context.
    flows
        The trained guide's ``ConditionalAffineAutoregressive`` transforms (shared, held fixed).
    history
        Mean ELBO estimate every ``record_every`` steps.
    """

    loc: torch.Tensor
    log_scale: torch.Tensor
    context: torch.Tensor
    flows: tuple[nn.Module, ...]
    history: list[float]

    def distribution(self) -> dist.TorchDistribution:
        base = dist.Normal(self.loc, self.log_scale.exp()).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(self.context)

    def proposal(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` draws from q* and their log-density (the flows' cached inverses: no inversion)."""
        if x.shape[0] != self.loc.shape[0]:
            raise ValueError(f"q* was fitted to {self.loc.shape[0]} datapoints, got {x.shape[0]}")
        q = self.distribution()
        z = q.rsample((k,))
        return z, q.log_prob(z)


def _flow_through(flows: tuple[nn.Module, ...], context: torch.Tensor, u: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Push ``u`` through the conditioned flows; returns the output and Σ log|det|."""
    log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
    for flow in flows:
        transform = flow.condition(context)
        out = transform(u)
        log_det = log_det + transform.log_abs_det_jacobian(u, out)
        u = out
    return u, log_det


def fit_local_iaf(log_joint: LogJoint, x: torch.Tensor, guide: nn.Module, steps: int = 500, lr: float = 1e-2,
                  k: int = 8, generator: torch.Generator | None = None) -> LocalFlow:
    """The q* of the IAF family: each datapoint's base Gaussian and flow context optimised on its own.

    Cremer et al. (2018) give each guide family its own q*. For an IAF guide
    (:class:`vaebench.models.guides.IAFGuide`) the per-datapoint member keeps the guide's flows and
    frees what the encoder network amortises -- the base mean and scale and the context the flows
    are conditioned on -- starting from the encoder's output, so ELBO[q*] ≥ ELBO[q_φ] up to
    optimisation noise; the gap between them is the amortisation gap of that family. The flows'
    weights are held fixed (a fully per-datapoint flow would need one autoregressive network per
    datapoint).
    """
    with torch.no_grad():
        h = guide.body(x)
        init = (guide.loc(h), guide.log_scale(h), h)
    loc, log_scale, context = (t.detach().clone().requires_grad_(True) for t in init)
    flows = tuple(guide.flows)

    def draw(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = log_scale.exp()
        base = loc + scale * eps
        z, log_det = _flow_through(flows, context, base)
        return z, dist.Normal(loc, scale).to_event(1).log_prob(base) - log_det

    with frozen(guide):
        history = _maximise_elbo(draw, [loc, log_scale, context], log_joint, x, steps, lr, k, generator)
    return LocalFlow(loc.detach(), log_scale.detach(), context.detach(), flows, history)
