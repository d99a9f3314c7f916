"""The interface every training objective implements."""

from __future__ import annotations

from typing import Protocol

import torch

from vaebench.model import LatentModel


class Objective(Protocol):
    """One gradient computation of a training method.

    ``accumulate_gradients`` writes ∂(−bound)/∂(parameters), summed over the batch, into the
    parameters' ``.grad`` and returns the batch's bound (summed over datapoints, nats), so that
    one training loop serves every method.
    """

    name: str

    def accumulate_gradients(self, model: LatentModel, x: torch.Tensor, indices: torch.Tensor) -> float:
        """Gradients of the negative bound for batch ``x`` (rows ``indices`` of the training set)."""
        ...

    def gradient_evaluations(self, batch_size: int) -> int:
        """Decoder gradient evaluations (datapoint × sample) one call spends, for cost accounting."""
        ...
