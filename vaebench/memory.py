"""Batch sizes from the free memory of the device: how many rows an estimator evaluates at once.

Importance sampling with K up to 5000 and AIS with many chains evaluate the model on
(sample or chain) × datapoint rows. A fixed batch leaves a GPU mostly idle, or does not fit a
small one. :func:`rows_that_fit` measures what one row costs -- the bytes a probe evaluation
allocates, at two sizes, so that fixed costs (the model's weights) cancel -- and divides a share
of the device's free memory by it:

.. math::

    R = \\min\\Big(R_{\\text{pref}},\\; \\Big\\lfloor \\frac{f \\cdot \\text{free}}{b_{\\text{row}}} \\Big\\rfloor\\Big),

where f = :data:`MEMORY_FRACTION` and R_pref is the device's preferred size
(:data:`PREFERRED_ROWS`): on a CPU, larger calls run no faster once the operands leave the cache,
and the preferred sizes equal the fixed defaults vaebench had before, so a CPU with enough memory
gets the same batches -- and the same numbers -- as before.

Bytes per row: on CUDA, the peak of PyTorch's caching allocator during the probe; elsewhere, the
bytes of every tensor the probe's operations create (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
sees each one), an upper bound on the peak because it ignores frees. Free memory: CUDA's
``mem_get_info``; ``MemAvailable`` of ``/proc/meminfo`` (Linux) or the free physical pages.

The sizes chosen change the random draws an estimator makes, so every record carries them; pass
them back (``--batch-size``, ``--max-rows``) to reproduce a run on another machine bit for bit.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vaebench.estimators import DEFAULT_MAX_ROWS

MEMORY_FRACTION = 0.5
"""Share of the free device memory one estimator call may use."""

PREFERRED_ROWS = {"cpu": DEFAULT_MAX_ROWS, "cuda": 1 << 20}
"""Largest (sample × datapoint) rows per model call worth using on each device type."""

PROBE_ROWS = 64
"""Rows of the smaller probe evaluation (the larger has twice as many)."""


def free_bytes(device: torch.device | str) -> int:
    """Free memory of ``device`` in bytes (CUDA: the driver's count; CPU: available RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30          # unknown platform: assume 8 GiB


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _AllocationCounter(TorchDispatchMode):
    """Sums the bytes of every tensor the operations inside it create (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf._is_view() and _storage(leaf) not in inputs:
                self.bytes += leaf.numel() * leaf.element_size()       # a new tensor (in-place results are not)
        return out


def allocated_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn()`` needs beyond what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    counter = _AllocationCounter()
    with counter:
        fn()
    return counter.bytes


def bytes_per_row(probe: Callable[[int], object], device: torch.device, rows: int = PROBE_ROWS) -> float:
    """Marginal bytes of one row: ``probe(r)`` evaluates r rows; measured at r and 2r so fixed costs cancel."""
    small = allocated_bytes(lambda: probe(rows), device)
    large = allocated_bytes(lambda: probe(2 * rows), device)
    return max(1.0, (large - small) / rows)


def rows_that_fit(probe: Callable[[int], object], device: torch.device | str, preferred: int | None = None,
                  fraction: float = MEMORY_FRACTION, free: int | None = None) -> int:
    """Rows per call: the device's preferred size, or fewer where its free memory is short (≥ 1).

    Parameters
    ----------
    probe
        ``probe(r)`` runs one evaluation of ``r`` rows the way the estimator will.
    preferred
        Upper bound; defaults to :data:`PREFERRED_ROWS` of the device type.
    fraction, free
        Share of the free memory to use, and the free bytes (measured when ``None``).
    """
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    preferred = preferred if preferred is not None else PREFERRED_ROWS.get(device.type, PREFERRED_ROWS["cpu"])
    free = free_bytes(device) if free is None else free
    with torch.random.fork_rng(devices=devices):       # the probe's draws must not shift the estimator's
        per_row = bytes_per_row(probe, device)
    return int(max(1, min(preferred, fraction * free // per_row)))


__all__ = ["MEMORY_FRACTION", "PREFERRED_ROWS", "allocated_bytes", "bytes_per_row", "free_bytes", "rows_that_fit"]
