"""Amortised VI: the single-sample ELBO through Pyro's SVI machinery (Kingma & Welling 2014)."""

from __future__ import annotations

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from vaebench.model import VAE


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

    def accumulate_gradients(self, model: VAE, x: torch.Tensor, indices: torch.Tensor) -> float:
        return -float(self.elbo.loss_and_grads(model.model, model.guide, x))

    def gradient_evaluations(self, batch_size: int) -> int:
        return batch_size * self.particles


def elbo_objective(analytic_kl: bool = False) -> PyroELBOObjective:
    """Single-sample ELBO: ``Trace_ELBO``, or ``TraceMeanField_ELBO`` for the analytic KL term."""
    if analytic_kl:
        return PyroELBOObjective(TraceMeanField_ELBO(num_particles=1, max_plate_nesting=1), "elbo-meanfield")
    return PyroELBOObjective(Trace_ELBO(num_particles=1, max_plate_nesting=1), "elbo")
