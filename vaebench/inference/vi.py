"""Amortised VI: the single-sample ELBO of the Pyro model and guide (Kingma & Welling 2014).

The default objective is the ELBO as IWAE_1 (:class:`vaebench.inference.iwae.BoundObjective`):
log p_θ(x, z) − log q_φ(z|x) at one reparameterised draw, read off a compiled trace of the Pyro
model and guide, with the value and gradient of Pyro's ``Trace_ELBO`` on the same draw. The
analytic-KL variant uses Pyro's ``TraceMeanField_ELBO`` through ``loss_and_grads``, as
``SVI.step`` does.
"""

from __future__ import annotations

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from vaebench.inference.iwae import BoundObjective
from vaebench.model import LatentModel


class PyroELBOObjective:
    """Any Pyro :class:`~pyro.infer.ELBO` used through ``loss_and_grads`` (as ``SVI.step`` does).

    The loss Pyro returns is −bound summed over the ``data`` plate; its gradients land on the
    encoder's and decoder's parameters, which the model and guide register with ``pyro.module``.

    Parameters
    ----------
    elbo
        A Pyro ELBO instance (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``RenyiELBO``...).
    name
        Label for logs.
    particles
        Samples per datapoint the ELBO draws (for gradient-evaluation accounting).
    """

    def __init__(self, elbo: ELBO, name: str, particles: int = 1) -> None:
        self.elbo = elbo
        self.name = name
        self.particles = particles

    def accumulate_gradients(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> float:
        return -float(self.elbo.loss_and_grads(model.model, model.guide, x))

    def gradient_evaluations(self, batch_size: int) -> int:
        return batch_size * self.particles


def elbo_objective(analytic_kl: bool = False, compiled: bool = True) -> BoundObjective | PyroELBOObjective:
    """Single-sample ELBO (Pyro ``Trace_ELBO`` on the same draw), or ``TraceMeanField_ELBO`` (analytic KL).

    ``compiled=False`` evaluates the Pyro traces eagerly instead of replaying a compiled trace.
    """
    if analytic_kl:
        return PyroELBOObjective(TraceMeanField_ELBO(num_particles=1, max_plate_nesting=1), "elbo-meanfield")
    return BoundObjective(1, Trace_ELBO(num_particles=1, max_plate_nesting=1), "elbo", compiled)
