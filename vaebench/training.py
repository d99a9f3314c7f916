"""One training loop for every method: Adam on the per-datapoint bound of an :class:`Objective`.

The loop is Pyro's ``SVI.step`` unrolled so its state is explicit: the objective
(:class:`~vaebench.inference.base.Objective`) writes gradients of the batch's summed negative
bound, the loop divides them
by the batch size (so the learning rate means the same at any batch size) and takes a
``torch.optim.Adam`` step. Image data are binarised afresh every epoch (dynamic binarisation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from vaebench.config import ModelConfig, TrainConfig
from vaebench.data import Dataset, binarize, check_compatible, evaluation_data
from vaebench.errors import TrainingDivergedError
from vaebench.estimators import elbo, mean_and_stderr
from vaebench.inference.base import Objective
from vaebench.inference.iwae import DReGObjective, iwae_objective
from vaebench.inference.vi import elbo_objective
from vaebench.model import LatentModel
from vaebench.provenance import resolve_device, resolve_dtype


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns: the trained model, per-epoch history and cost."""

    model: LatentModel
    history: list[dict[str, Any]]
    seconds: float
    gradient_evaluations: int


def initial_model(model_config: ModelConfig, seed: int) -> LatentModel:
    """A freshly initialised :class:`~vaebench.model.LatentModel` whose initial weights are fixed by ``seed``."""
    pyro.set_rng_seed(seed)
    return LatentModel(model_config)


def make_objective(config: TrainConfig) -> Objective:
    """The objective of ``config.method``."""
    if config.method == "vi":
        return elbo_objective(analytic_kl=config.vi_objective == "meanfield")
    if config.method == "iwae":
        return DReGObjective(config.k) if config.dreg else iwae_objective(config.k)
    if config.method == "hmc":
        from vaebench.inference.mcem import HMCEMObjective
        return HMCEMObjective(transitions=config.hmc_transitions, leapfrog=config.hmc_leapfrog, seed=config.seed)
    raise ValueError(f"no objective for method {config.method!r}")


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate at ``epoch`` (0-based): constant, or Burda et al.'s lr·10^(-i/7) for 3^i epochs."""
    if config.lr_schedule == "constant":
        return config.lr
    stage, start = 0, 0
    while start + 3 ** stage <= epoch:
        start += 3 ** stage
        stage += 1
    return config.lr * 10 ** (-stage / 7)


def training_data(dataset: Dataset, likelihood: str, generator: torch.Generator) -> torch.Tensor:
    """This epoch's training matrix: a fresh binarisation of image intensities under Bernoulli."""
    if likelihood == "bernoulli" and dataset.kind == "intensity":
        return binarize(dataset.train, generator)
    return dataset.train


def train_step(model: LatentModel, objective: Objective, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               indices: torch.Tensor) -> float:
    """One optimiser step on the batch's mean negative bound; returns the batch's summed bound (nats).

    The objective writes ∂(−Σ_i bound_i)/∂(parameters) into ``.grad``; dividing by the batch size
    makes the step follow the per-datapoint mean, so the learning rate means the same at any batch
    size. A non-finite bound leaves the parameters untouched (the caller reports the divergence).
    This is the step :func:`train` takes and the benchmarks time (``bench/benchmarks.py``).
    """
    optimizer.zero_grad(set_to_none=True)
    bound = objective.accumulate_gradients(model, x, indices)
    if math.isfinite(bound):
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        if grads:
            torch._foreach_div_(grads, x.shape[0])
        optimizer.step()
    return bound


def train(model: LatentModel, dataset: Dataset, config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fit ``model`` to ``dataset.train`` with the method of ``config``.

    Parameters
    ----------
    model
        A freshly built :class:`~vaebench.model.LatentModel` (it is moved to the configured device and dtype).
    dataset
        Training and test data; the test ELBO (K = 1, fixed binarisation) is logged per epoch.
    config
        Method, optimiser settings and seed; one seed reproduces the run exactly on one device.
    progress
        Show a tqdm bar with the running bound.

    Raises
    ------
    TrainingDivergedError
        If the bound becomes non-finite.
    """
    check_compatible(dataset, model.likelihood)
    pyro.set_rng_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    model.to(device=device, dtype=dtype).train()
    objective = make_objective(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps)
    x_test = evaluation_data(dataset, "test", model.likelihood).to(device=device, dtype=dtype)
    n = dataset.train.shape[0]
    batches_per_epoch = math.ceil(n / config.batch_size)
    history: list[dict[str, Any]] = []
    spent = 0
    start = time.perf_counter()
    bar = tqdm(total=config.epochs * batches_per_epoch, desc=f"train {objective.name}", unit="batch",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for epoch in range(config.epochs):
            lr = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_epoch = training_data(dataset, model.likelihood, generator).to(device=device, dtype=dtype)
            order = torch.randperm(n, generator=generator)
            bound_sum = 0.0
            for b in range(batches_per_epoch):
                indices = order[b * config.batch_size:(b + 1) * config.batch_size]
                x = x_epoch[indices.to(device)]
                batch_bound = train_step(model, objective, optimizer, x, indices)
                if not math.isfinite(batch_bound):
                    raise TrainingDivergedError(
                        f"training diverged: the {objective.name} bound is {batch_bound} at epoch {epoch + 1}, "
                        f"batch {b + 1}; try a smaller --lr (now {config.lr})")
                bound_sum += batch_bound
                spent += objective.gradient_evaluations(x.shape[0])
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, bound=f"{bound_sum / min(n, (b + 1) * config.batch_size):.3f}")
            row = {"epoch": epoch + 1, "lr": lr, "train_bound": bound_sum / n,
                   "seconds": time.perf_counter() - start, "gradient_evaluations": spent}
            if model.has_encoder:
                row["test_elbo"], row["test_elbo_stderr"] = test_elbo(model, x_test)
            history.append(row)
    finally:
        bar.close()
    model.eval()
    return TrainResult(model, history, time.perf_counter() - start, spent)


@torch.no_grad()
def test_elbo(model: LatentModel, x: torch.Tensor) -> tuple[float, float]:
    """Single-sample ELBO on ``x``: mean and standard error over datapoints."""
    return mean_and_stderr(elbo(model.log_joint, model.encoder_proposal, x, k=1))
