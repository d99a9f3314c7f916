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


class ReferenceLatentGradient:
    """``(x, z) -> (log p(x, z) [n], ∇_z log p(x, z) [n, D])`` of the MLP decoder, written by hand.

    For h_1 = tanh(W_1 z + b_1), h_2 = tanh(W_2 h_1 + b_2), logits a = W_3 h_2 + b_3 and z ~ N(0, I):

    .. math::

        \\log p(x, z) = \\sum_p \\big(x_p a_p − \\mathrm{softplus}(a_p)\\big) − \\tfrac12 \\lVert z\\rVert^2
                        − \\tfrac D2 \\log 2π,

        ∇_z = W_1^⊤\\big[(1 − h_1^2) ⊙ W_2^⊤\\big((1 − h_2^2) ⊙ W_3^⊤ (x − σ(a))\\big)\\big] − z.

    Parameters
    ----------
    model
        A model with the built-in MLP (two tanh layers) and a Bernoulli likelihood.
    analytic
        ``False`` (default): the idiomatic hand-written PyTorch gradient -- the log joint written
        directly in PyTorch (``binary_cross_entropy_with_logits``, as ``ReferenceStep``) and one
        ``torch.autograd.grad``. ``True``: the formula above evaluated without autograd, three
        matrix products forward and three back: the least work any implementation does.
    """

    def __init__(self, model: VAE, analytic: bool = False) -> None:
        layers = [m for m in model.decoder.net if isinstance(m, torch.nn.Linear)]
        if model.config.model != "mlp" or model.config.likelihood != "bernoulli" or model.config.activation != "tanh" \
                or len(layers) != 3:
            raise ValueError("the reference gradient needs the built-in MLP with two tanh layers and a Bernoulli "
                             "likelihood")
        self.weights = [(layer.weight.detach(), layer.bias.detach()) for layer in layers]
        self.analytic = analytic

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) ``[n]``, differentiable in z."""
        (w1, b1), (w2, b2), (w3, b3) = self.weights
        logits = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(z, w1, b1)), w2, b2)), w3, b3)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return log_lik - 0.5 * z.pow(2).sum(-1) - z.shape[-1] * HALF_LOG_2PI

    def __call__(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.analytic:
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                value = self.log_joint(x, z)
                (grad,) = torch.autograd.grad(value.sum(), z)
            return value.detach(), grad
        with torch.no_grad():
            (w1, b1), (w2, b2), (w3, b3) = self.weights
            h1 = torch.tanh(torch.addmm(b1, z, w1.t()))
            h2 = torch.tanh(torch.addmm(b2, h1, w2.t()))
            logits = torch.addmm(b3, h2, w3.t())
            log_lik = (x * logits - F.softplus(logits)).sum(-1)
            log_joint = log_lik - 0.5 * z.pow(2).sum(-1) - z.shape[-1] * HALF_LOG_2PI
            g = (x - torch.sigmoid(logits)) @ w3
            g = (g * (1 - h2 * h2)) @ w2
            g = (g * (1 - h1 * h1)) @ w1
            return log_joint, g - z
