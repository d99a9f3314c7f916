"""Summary metrics of a trained model that are not log-likelihoods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaebench.estimators import importance_sampling, log_mean_exp, mean_and_stderr
from vaebench.model import LatentModel

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al. (2016, §5.2) call unit u active when Cov_x(E_{q(u|x)}[u]) > 10⁻²."""


@torch.no_grad()
def encoder_mean_variance(model: LatentModel, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Variance over datapoints of the encoder mean, per latent dimension ``[D]``."""
    means = torch.cat([model.encode(x[i:i + batch_size])[0] for i in range(0, x.shape[0], batch_size)])
    return means.double().var(dim=0, unbiased=True)


def active_units(model: LatentModel, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dimensions whose encoder-mean variance over ``x`` exceeds ``threshold``."""
    return int((encoder_mean_variance(model, x) > threshold).sum())


# ------------------------------------------------------------------ aggregate posterior
@dataclass(frozen=True)
class AggregatePosterior:
    """The ELBO-surgery split of the average KL term, in nats per datapoint (each with its SE).

    Attributes
    ----------
    average_kl
        E_n KL(q(z|x_n) ‖ p(z)), the ELBO's rate term averaged over the data.
    mutual_information
        I_q(x; z) under q(x, z) = q(z|x) p̂(x), with p̂ the empirical distribution of the n points;
        at most log n.
    marginal_kl
        KL(q(z) ‖ p(z)) between the aggregate posterior q(z) = (1/n) Σ_m q(z|x_m) and the prior.
    n
        Number of datapoints (so ``log(n)`` bounds the mutual information).
    """

    average_kl: tuple[float, float]
    mutual_information: tuple[float, float]
    marginal_kl: tuple[float, float]
    n: int


@torch.no_grad()
def aggregate_posterior(model: LatentModel, x: torch.Tensor, samples: int = 1, chunk_rows: int = 2_000_000
                        ) -> AggregatePosterior:
    """ELBO surgery (Hoffman & Johnson 2016): E_n KL(q(z|x_n)‖p) = I_q(x; z) + KL(q(z)‖p(z)).

    Estimator. Draw ``samples`` z_{s,n} ~ q(z|x_n) for every datapoint and evaluate the
    aggregate posterior exactly as the full-data mixture over the same n points,

    .. math::

        \\log q(z) = \\log \\frac1n \\sum_{m=1}^n q(z \\mid x_m)
        \\quad(\\text{log-mean-exp over all } m, \\text{ not a minibatch}),

    then average over (s, n)

    .. math::

        \\mathrm{KL}(q(z)\\|p) ≈ \\overline{\\log q(z) - \\log p(z)}, \\qquad
        I_q(x; z) ≈ \\overline{\\log q(z \\mid x_n) - \\log q(z)}.

    Given the n points, the only Monte Carlo error is in the draws of z; the per-datapoint
    averages are independent across n, so the standard errors are taken over n. The two parts
    add up to the Monte Carlo estimate of the average KL draw by draw. Because q(z) is a mixture
    over n points, I_q ≤ log n: the figure describes this data set of n points (Hoffman & Johnson
    report it on the training set, where log n is larger). Cost O(samples · n² · D), evaluated in
    chunks of at most ``chunk_rows`` (draw × datapoint) pairs; densities are traced from the
    model's prior and guide (:meth:`LatentModel.log_prior`, :meth:`LatentModel.log_q`).
    """
    n = x.shape[0]
    z, log_q_own = model.encoder_proposal(x, samples)                 # [S, n, D], [S, n]
    log_prior = model.log_prior(x, z)                                  # [S, n]
    flat = z.reshape(-1, 1, z.shape[-1])                               # [S·n, 1, D]
    step = max(1, chunk_rows // n)
    log_aggregate = torch.cat([log_mean_exp(model.log_q(x, flat[i:i + step]), dim=-1)
                               for i in range(0, flat.shape[0], step)]).reshape(samples, n)
    average_kl = (log_q_own - log_prior).mean(0)
    information = (log_q_own - log_aggregate).mean(0)
    marginal = (log_aggregate - log_prior).mean(0)
    return AggregatePosterior(mean_and_stderr(average_kl), mean_and_stderr(information),
                              mean_and_stderr(marginal), n)


# ------------------------------------------------------------------ variance of bounds and gradients
@torch.no_grad()
def bound_spread(model: LatentModel, x: torch.Tensor, k: int, replicates: int) -> tuple[float, float]:
    """Monte Carlo standard deviation of the K-sample bound, averaged over datapoints.

    For each datapoint, ``replicates`` independent IWAE_K estimates log (1/K) Σ_k w_k are drawn
    (K = 1 is the single-sample ELBO, log w); their standard deviation across replicates is the
    noise of the estimator the training objective uses. Returns the mean over datapoints of that
    standard deviation and its standard error over datapoints.
    """
    if replicates < 2:
        raise ValueError(f"need at least 2 replicates, got {replicates}")
    draws = torch.stack([importance_sampling(model.log_joint, model.encoder_proposal, x, k).log_marginal
                         for _ in range(replicates)])
    return mean_and_stderr(draws.double().std(dim=0, unbiased=True))


@dataclass(frozen=True)
class GradientSNR:
    """Signal-to-noise ratio of a stochastic gradient, per parameter group.

    ``encoder`` and ``decoder`` are the mean over parameter components of
    |E[g]| / std[g] (Rainforth et al. 2018, eq. 3); components whose gradient has zero variance
    (unused parameters) are left out. ``replicates`` gradient draws were used.
    """

    encoder: float
    decoder: float
    replicates: int


def gradient_snr(model: LatentModel, x: torch.Tensor, k: int, replicates: int, dreg: bool = False) -> GradientSNR:
    """Gradient SNR of the IWAE_K objective (K = 1: the ELBO) on a fixed batch ``x``.

    Each replicate calls the training objective's ``accumulate_gradients`` (Pyro's
    ``RenyiELBO(alpha=0)`` with K particles, or DReG encoder gradients with ``dreg``) on the same
    batch, so the only randomness is the draws of z; the batch-mean gradient is recorded. The
    SNR of Rainforth et al. (2018, "Tighter variational bounds are not necessarily better"),
    |mean| / std over replicates, is computed per component and averaged within the encoder and
    within the decoder. Their result, which this measures: as K grows the decoder SNR rises like
    √K while the IWAE encoder SNR falls like 1/√K; DReG removes the fall (Tucker et al. 2019).
    """
    from vaebench.inference.iwae import DReGObjective, iwae_objective

    if replicates < 2:
        raise ValueError(f"need at least 2 replicates, got {replicates}")
    objective = DReGObjective(k) if dreg else iwae_objective(k)
    model._require_encoder()
    groups = {"encoder": model.encoder_parameters(), "decoder": model.decoder_parameters()}
    params = groups["encoder"] + groups["decoder"]
    indices = torch.arange(x.shape[0])
    draws = []
    for _ in range(replicates):
        for p in params:
            p.grad = None
        objective.accumulate_gradients(model, x, indices)
        draws.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in params]).double() / x.shape[0])
    for p in params:
        p.grad = None
    stacked = torch.stack(draws)
    mean, std = stacked.mean(0), stacked.std(0, unbiased=True)
    sizes = [sum(p.numel() for p in groups[name]) for name in ("encoder", "decoder")]
    out = {}
    for name, part_mean, part_std in zip(("encoder", "decoder"), mean.split(sizes), std.split(sizes)):
        used = part_std > 0
        out[name] = float((part_mean[used].abs() / part_std[used]).mean()) if used.any() else float("nan")
    return GradientSNR(out["encoder"], out["decoder"], replicates)
