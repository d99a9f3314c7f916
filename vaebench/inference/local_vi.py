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

The density of the model is :meth:`vaebench.model.VAE.log_joint` (traced from the Pyro model);
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
        ``(x, z [k, n, D]) -> [k, n]``, e.g. :meth:`VAE.log_joint`; gradients are taken only with
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
    if steps < 0 or k < 1:
        raise ValueError(f"need steps >= 0 and k >= 1, got steps={steps}, k={k}")
    loc = init_loc.detach().clone().requires_grad_(True)
    log_scale = init_log_scale.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=lr / 100)
    history: list[float] = []
    for step in range(steps):
        eps = torch.randn((k, *loc.shape), generator=generator, dtype=loc.dtype).to(loc.device)
        scale = log_scale.exp()
        z = loc + scale * eps
        log_q = dist.Normal(loc, scale).to_event(1).log_prob(z)
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
    return LocalGaussian(loc.detach(), log_scale.detach(), history)
