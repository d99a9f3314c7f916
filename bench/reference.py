"""The yardstick: one IWAE_K (K = 1: ELBO) training step written directly in PyTorch.

Same network (it drives the encoder and decoder modules of a :class:`vaebench.model.VAE`), same
objective and same optimiser as :func:`vaebench.training.train_step` with the ``vi``/``iwae``
objectives, but with the densities written out by hand instead of read off the Pyro model:

.. math::

    z_k = μ_φ(x) + σ_φ(x) ⊙ ε_k,\\quad ε_k \\sim \\mathcal N(0, I),\\qquad
    \\log w_k = \\log \\mathcal N(z_k; 0, I) + \\log \\mathrm{Bern}(x; \\mathrm{sigmoid}(f_θ(z_k)))
              - \\log \\mathcal N(z_k; μ_φ, σ_φ^2),

and an Adam step on −mean_i log (1/K) Σ_k w_{k,i}. This is the idiomatic hand-written step (one
backward of the batch-mean loss); it draws ε with the global RNG exactly as Pyro's ``rsample`` does,
so on the same seed it sees the same z (``tests/test_bench.py`` checks that the bound agrees).
Bernoulli likelihood and MLP decoder only -- the configuration the benchmarks use.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from vaebench.model import VAE

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ReferenceStep:
    """``step(x) -> float``: one Adam step on the IWAE_K bound; returns the batch's summed bound.

    Parameters
    ----------
    model
        A VAE with an encoder, a Bernoulli likelihood and an MLP decoder.
    k
        Importance samples per datapoint (1: the ELBO).
    lr, eps
        Adam's learning rate and ε, as in :class:`vaebench.config.TrainConfig`.
    """

    def __init__(self, model: VAE, k: int, lr: float = 1e-3, eps: float = 1e-4) -> None:
        if model.encoder is None or model.config.likelihood != "bernoulli" or model.config.model != "mlp":
            raise ValueError("the reference step needs an encoder, a Bernoulli likelihood and an MLP decoder")
        self.encoder = model.encoder
        self.decoder = model.decoder.net
        self.k = k
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """IWAE_K per datapoint ``[n]``, differentiable in the encoder and decoder parameters."""
        loc, scale = self.encoder.moments(x)
        eps = torch.randn((self.k, *loc.shape), dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        latent_dim = loc.shape[-1]
        log_q = (-0.5 * eps.pow(2) - scale.log()).sum(-1) - latent_dim * HALF_LOG_2PI
        log_prior = -0.5 * z.pow(2).sum(-1) - latent_dim * HALF_LOG_2PI
        logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_w = log_prior + log_lik - log_q
        return log_w[0] if self.k == 1 else torch.logsumexp(log_w, dim=0) - math.log(self.k)

    def __call__(self, x: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        bound = self.bound(x)
        (-bound.mean()).backward()
        self.optimizer.step()
        return float(bound.detach().sum())
