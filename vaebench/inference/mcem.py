"""Learning θ without an encoder: Monte Carlo EM on persistent HMC chains (``--method hmc``).

Every training datapoint x_i keeps one latent z_i, a chain targeting p_θ(z_i | x_i) that persists
across epochs. For each minibatch B:

1. **E-step (sampling):** a few batched HMC transitions (:mod:`vaebench.inference.hmc`) from the
   stored z_i, targeting log p_θ(x_i, z_i) (:meth:`vaebench.model.LatentModel.log_joint`) at the current
   θ;
2. **M-step (one Adam step):** the gradient of Σ_{i∈B} log p_θ(x_i, z_i) with respect to θ at the
   new latents, an unbiased estimate of Σ_i ∇_θ log p_θ(x_i) when z_i ~ p_θ(z_i | x_i) (Fisher's
   identity);
3. the new z_i and step sizes are stored back.

This is the stochastic-approximation EM of Delyon, Lavielle & Moulines (1999) with HMC as the
sampler; Hoffman (2017) runs the same idea with chains started from an encoder, here they start
from the prior and persist (no encoder exists). Each datapoint keeps its own step size: found by
the step-size search on its first visit, then adapted after every transition with
log ε ← log ε + g(α − target). The target moves as θ learns, so the gain g does not decay (unlike
dual averaging, which freezes).

The per-batch "bound" the training loop logs is Σ log p_θ(x_i, z_i) at the new latents -- a
complete-data log-likelihood, not a bound on log p_θ(x); score the run with ``--estimator ais``.
"""

from __future__ import annotations

import math

import torch

from vaebench.inference import hmc
from vaebench.model import LatentModel

MIN_LOG_STEP, MAX_LOG_STEP = math.log(1e-4), math.log(10.0)


class HMCEMObjective:
    """Monte Carlo EM with persistent per-datapoint HMC chains; implements the ``Objective`` protocol.

    Parameters
    ----------
    num_data
        Training-set size N (one persistent latent per row); ``None`` grows the storage to the
        largest row index seen.
    transitions
        HMC transitions per minibatch.
    leapfrog
        Leapfrog steps per transition.
    seed
        Seeds the generator of the latents' initial prior draws and of every HMC transition.
    target_accept
        Acceptance probability the per-datapoint step sizes are adapted toward.
    adaptation_rate
        Gain g of the step-size update.

    Attributes
    ----------
    latents
        ``[N, D]`` current z_i (allocated when a row is first seen, from p(z) = N(0, I)).
    log_step_size
        ``[N]`` per-datapoint log ε.
    visited
        ``[N]`` whether a datapoint's step size has been initialised.
    """

    name = "hmc-em"

    def __init__(self, num_data: int | None = None, transitions: int = 3, leapfrog: int = 10, seed: int = 0,
                 target_accept: float = 0.8, adaptation_rate: float = 0.2) -> None:
        self.num_data = num_data
        self.transitions = transitions
        self.leapfrog = leapfrog
        self.target_accept = target_accept
        self.adaptation_rate = adaptation_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.latents: torch.Tensor | None = None
        self.log_step_size: torch.Tensor | None = None
        self.visited: torch.Tensor | None = None
        self.acceptance_rate = float("nan")
        self._spent = 0

    def _allocate(self, model: LatentModel, like: torch.Tensor, size: int) -> None:
        """Grow the per-datapoint storage to ``size`` rows (new rows: prior draws, unvisited)."""
        have = 0 if self.latents is None else self.latents.shape[0]
        if size <= have:
            return
        placeholder = like.new_zeros(size - have, model.data_dim)
        new = model.sample_prior(placeholder, 1, self.generator)[0]
        old = (self.latents, self.log_step_size, self.visited) if self.latents is not None else (
            new[:0], like.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=like.device))
        self.latents = torch.cat([old[0], new])
        self.log_step_size = torch.cat([old[1], like.new_zeros(size - have)])
        self.visited = torch.cat([old[2], torch.zeros(size - have, dtype=torch.bool, device=like.device)])

    def sample_latents(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """E-step: advance the stored chains of rows ``indices`` and store them back; returns the new z."""
        self._allocate(model, x, max(self.num_data or 0, int(indices.max()) + 1))
        rows = indices.to(self.latents.device)
        log_density = model.latent_density(x)
        state = hmc.init(self.latents[rows], log_density)
        calls = 1
        log_step = self.log_step_size[rows]
        fresh = ~self.visited[rows]
        if fresh.any():
            found, spent = hmc.find_reasonable_step_size(self.generator, state, log_density)
            calls += spent
            log_step = torch.where(fresh, found.log(), log_step)
        accept = torch.zeros_like(log_step)
        for _ in range(self.transitions):
            state, info = hmc.step(self.generator, state._replace(step_size=log_step.exp()), log_density,
                                   self.leapfrog)
            calls += self.leapfrog
            accept += info.acceptance_prob
            log_step = (log_step + self.adaptation_rate * (info.acceptance_prob - self.target_accept)
                        ).clamp(MIN_LOG_STEP, MAX_LOG_STEP)
        self.latents[rows] = state.position
        self.log_step_size[rows] = log_step
        self.visited[rows] = True
        self.acceptance_rate = float(accept.mean() / self.transitions)
        self._spent = calls
        return state.position

    def accumulate_gradients(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> float:
        """E-step, then write −∇_θ Σ_i log p_θ(x_i, z_i) into the decoder's ``.grad``; returns Σ log p_θ(x_i, z_i)."""
        z = self.sample_latents(model, x, indices)
        log_joint = model.latent_density(x)(z.detach()).sum()
        (-log_joint).backward()
        self._spent += 1
        return float(log_joint.detach())

    def gradient_evaluations(self, batch_size: int) -> int:
        """Gradient evaluations per datapoint the last call spent (search, L per transition, M-step), × batch."""
        return batch_size * self._spent
