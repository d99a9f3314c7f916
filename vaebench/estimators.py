"""Log-likelihood estimators as pure functions of a log-joint and a proposal.

Every estimator returns one value per datapoint, in nats. They take

* ``log_joint(x, z) -> [..., n]`` -- the unnormalised posterior log p_θ(x, z) (from the Pyro
  model, :meth:`vaebench.model.LatentModel.log_joint`), and
* ``proposal(x, k) -> (z [k, n, D], log_q [k, n])`` -- draws from an importance distribution
  and their log-density (the encoder, :meth:`vaebench.model.LatentModel.encoder_proposal`, or the exact
  posterior of a linear-Gaussian model).

With log-weights log w_k = log p_θ(x, z_k) − log q(z_k|x), z_k ~ q,

.. math::

    \\mathrm{ELBO}_K = \\frac1K \\sum_k \\log w_k, \\qquad
    \\mathcal L_K = \\log \\frac1K \\sum_k w_k \\;(\\text{IWAE}_K), \\qquad
    \\mathrm{ESS} = \\frac{(\\sum_k w_k)^2}{\\sum_k w_k^2}.

E[ELBO_K] ≤ E[L_K] ≤ log p_θ(x), and L_K → log p_θ(x) as K → ∞ (Burda et al. 2016, Thm. 1).
Large K is evaluated in bounded memory: samples are drawn in chunks, and the chunks' sums are
combined with ``logsumexp``, so memory is O(chunk · n), not O(K · n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from vaebench.model import Proposal

LogJoint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_MAX_ROWS = 32768
"""Default cap on k × n rows pushed through the decoder at once (bounds memory)."""


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σ_k exp(values_k) along ``dim``, computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean over datapoints and its standard error s / √n (0 for a single value)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("no values to summarise")
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), stderr


def log_weights(log_joint: LogJoint, proposal: Proposal, x: torch.Tensor, k: int) -> torch.Tensor:
    """Importance log-weights log p(x, z_k) − log q(z_k|x), ``[k, n]``."""
    z, log_q = proposal(x, k)
    return log_joint(x, z) - log_q


@dataclass(frozen=True)
class ImportanceSamplingResult:
    """Per-datapoint outputs of :func:`importance_sampling`, each ``[n]``.

    Attributes
    ----------
    log_marginal
        IWAE_K bound L_K, an estimate of log p_θ(x) that is low in expectation.
    elbo
        ELBO_K, the mean log-weight over the same K samples.
    ess
        Effective sample size of the K normalised weights, in [1, K].
    """

    log_marginal: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor


Progress = Callable[[int], object]
"""``progress(done)``: called after each chunk with the number of (sample, datapoint) pairs it scored."""


def importance_sampling(log_joint: LogJoint, proposal: Proposal, x: torch.Tensor, k: int,
                        max_rows: int = DEFAULT_MAX_ROWS, progress: Progress | None = None
                        ) -> ImportanceSamplingResult:
    """Importance-sampled log p_θ(x) with ``k`` proposals per datapoint, chunked over k.

    Parameters
    ----------
    log_joint, proposal
        See the module docstring.
    x
        Data ``[n, P]``; pass a batch, :func:`over_batches` splits a large set.
    k
        Number of importance samples (≥ 1).
    max_rows
        At most this many (sample, datapoint) rows are evaluated at once.
    progress
        Optional callback, see :data:`Progress`; it does not change the result.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chunk = max(1, min(k, max_rows // max(1, x.shape[0])))
    lse_w = lse_w2 = None
    sum_log_w = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    done = 0
    while done < k:
        size = min(chunk, k - done)
        lw = log_weights(log_joint, proposal, x, size)
        sum_log_w = sum_log_w + lw.sum(0)
        part_w, part_w2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
        lse_w = part_w if lse_w is None else torch.logaddexp(lse_w, part_w)
        lse_w2 = part_w2 if lse_w2 is None else torch.logaddexp(lse_w2, part_w2)
        done += size
        if progress is not None:
            progress(size * x.shape[0])
    return ImportanceSamplingResult(log_marginal=lse_w - math.log(k), elbo=sum_log_w / k,
                                    ess=torch.exp(2 * lse_w - lse_w2))


def elbo(log_joint: LogJoint, proposal: Proposal, x: torch.Tensor, k: int = 1,
         max_rows: int = DEFAULT_MAX_ROWS, progress: Progress | None = None) -> torch.Tensor:
    """ELBO_K: the mean over ``k`` draws of log p(x, z) − log q(z|x), per datapoint ``[n]``."""
    return importance_sampling(log_joint, proposal, x, k, max_rows, progress).elbo


def over_batches(fn: Callable[[torch.Tensor], torch.Tensor | ImportanceSamplingResult], x: torch.Tensor,
                 batch_size: int) -> torch.Tensor | ImportanceSamplingResult:
    """Apply a per-datapoint estimator to ``x`` in batches of rows and concatenate the results."""
    parts = [fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if isinstance(parts[0], ImportanceSamplingResult):
        return ImportanceSamplingResult(*(torch.cat([getattr(p, f) for p in parts])
                                          for f in ("log_marginal", "elbo", "ess")))
    return torch.cat(parts)
