"""Importance-weighted VI (Burda et al. 2016) and its doubly-reparameterised gradient.

The IWAE bound for one datapoint with K reparameterised samples z_k ~ q_φ(z|x) is

.. math::

    \\mathcal L_K = \\log \\frac1K \\sum_{k=1}^K w_k, \\qquad w_k = \\frac{p_θ(x, z_k)}{q_φ(z_k \\mid x)},

and K = 1 gives the ELBO. Pyro computes it as ``RenyiELBO(alpha=0)`` with vectorised particles
(``Trace_ELBO`` for K = 1); it keeps one term per datapoint because every sample site sits inside
the ``data`` plate. :class:`BoundObjective` takes the same log-weights from a compiled trace of
the Pyro model and guide (:mod:`vaebench.inference.compiled`) and lets autograd differentiate
L_K; for a reparameterised guide that is the gradient Pyro's surrogate loss produces,
Σ_k w̃_k ∇ log w_k with w̃_k = w_k / Σ_j w_j, on the same draws, at the cost of a hand-written
PyTorch step (``python bench/step_ratio.py``).

DReG (Tucker, Lawson, Gu & Maddison 2019, eq. 8) replaces the encoder gradient by

.. math::

    \\nabla_φ \\mathcal L_K \\approx \\sum_k \\tilde w_k^2 \\,
        \\frac{\\partial \\log w_k}{\\partial z_k} \\frac{\\partial z_k}{\\partial φ},
    \\qquad \\tilde w_k = w_k / \\textstyle\\sum_j w_j,

which has the same expectation and a signal-to-noise ratio that does not vanish as K grows; the
decoder keeps the ordinary IWAE gradient Σ_k w̃_k ∇_θ log p_θ(x, z_k). Pyro has no DReG
estimator, so this one is written here.
"""

from __future__ import annotations

import torch
from pyro.infer import ELBO, RenyiELBO

from vaebench.estimators import log_mean_exp
from vaebench.inference.compiled import CompiledLogWeights
from vaebench.model import LatentModel


class BoundObjective:
    """Gradients of −L_K (K = 1: the ELBO) from compiled traces of the Pyro model and guide.

    Parameters
    ----------
    k
        Importance samples per datapoint.
    elbo
        The Pyro ELBO this objective reproduces on the same draws (``Trace_ELBO`` for K = 1,
        ``RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)`` otherwise); kept as
        the reference the tests compare against.
    name
        Label for logs.
    compiled
        Replay a compiled trace (default) or run the Pyro traces eagerly; same numbers.
    """

    def __init__(self, k: int, elbo: ELBO, name: str, compiled: bool = True) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.elbo = elbo
        self.name = name
        self.log_weights = CompiledLogWeights(compiled)

    def accumulate_gradients(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> float:
        log_w = self.log_weights(model, x, self.k)
        bound = (log_w[0] if self.k == 1 else log_mean_exp(log_w, dim=0)).sum()
        (-bound).backward()
        return float(bound.detach())

    def gradient_evaluations(self, batch_size: int) -> int:
        return batch_size * self.k


def iwae_objective(k: int, compiled: bool = True) -> BoundObjective:
    """The IWAE_K bound, equal on the same draws to Pyro's ``RenyiELBO(alpha=0)`` with ``k`` particles."""
    reference = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    return BoundObjective(k, reference, f"iwae-{k}", compiled)


def iwae_bound(model: LatentModel, x: torch.Tensor, k: int, detach_encoder: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """IWAE_K bound per datapoint ``[n]`` and its log-weights ``[k, n]``, from eager Pyro traces.

    With ``detach_encoder`` the encoder's μ, σ are cut from the graph inside log q (but not inside
    the reparameterised z), as DReG requires.
    """
    z, log_q = model.encoder_proposal(x, k, detach_parameters=detach_encoder)
    log_w = model.log_joint(x, z) - log_q
    return log_mean_exp(log_w, dim=0), log_w


class DReGObjective:
    """IWAE_K with doubly-reparameterised encoder gradients (Tucker et al. 2019)."""

    def __init__(self, k: int, compiled: bool = True) -> None:
        self.k = k
        self.name = f"iwae-dreg-{k}"
        self.log_weights = CompiledLogWeights(compiled)

    def accumulate_gradients(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> float:
        encoder_params = [p for p in model.encoder_parameters() if p.requires_grad]
        decoder_params = [p for p in model.decoder_parameters() if p.requires_grad]
        log_w = self.log_weights(model, x, self.k, detach_encoder=True)
        bound = log_mean_exp(log_w, dim=0)
        with torch.no_grad():
            normalized = torch.softmax(log_w, dim=0)
        encoder_surrogate = -(normalized.pow(2) * log_w).sum()
        decoder_loss = -bound.sum()
        encoder_grads = torch.autograd.grad(encoder_surrogate, encoder_params, retain_graph=True)
        decoder_grads = torch.autograd.grad(decoder_loss, decoder_params)
        for param, grad in zip(encoder_params + decoder_params, encoder_grads + decoder_grads):
            param.grad = grad if param.grad is None else param.grad + grad
        return float(bound.detach().sum())

    def gradient_evaluations(self, batch_size: int) -> int:
        return batch_size * self.k
