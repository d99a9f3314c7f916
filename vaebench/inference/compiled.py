"""Importance log-weights of the Pyro model, replayed from a compiled trace.

For a batch ``x`` and K particles the training objectives need

.. math::

    \\log w_k = \\log p_θ(x, z_k) - \\log q_φ(z_k \\mid x), \\qquad z_k \\sim q_φ(z \\mid x),

per datapoint. They come from two Pyro traces: the guide's, under a ``particles`` plate
(:meth:`vaebench.model.LatentModel.encoder_proposal`), and the model's, conditioned on the drawn z
(:meth:`vaebench.model.LatentModel.log_joint`). Interpreting those traces -- Pyro's messenger stack,
plates, distribution objects, ``compute_log_prob`` -- costs about as much Python per step as the
tensor work of a small network, so an eager step from the Pyro model ran 1.2-1.4× slower than
the same step written directly in PyTorch (``python bench/step_ratio.py``).

:class:`CompiledLogWeights` runs the two traces once per (model, batch shape, K, dtype, device)
under :func:`torch.jit.trace`, which records the tensor operations they perform -- the random
draw of z included -- and replays that graph on later calls. The densities are still the ones the
Pyro program in ``model.py`` defines; only the Python that interprets it is skipped. This is the
approach of Pyro's own ``JitTrace_ELBO`` (``pyro.ops.jit.trace``), which cannot be used here
directly: it captures parameters registered with ``pyro.module`` as constants (``torch.jit``
refuses tensors that require grad), and ``RenyiELBO`` has no JIT variant. Like ``JitTrace_ELBO``
it relies on the program having a static structure for a given input shape, which the LatentModel has.

Alternatives tried (CPU, batch 100, one IWAE_5 step of a 64-200-200-50 network, relative to the
hand-written step): ``torch.compile`` of the Pyro ELBO breaks its graph inside Pyro's handlers,
and compiling the captured graph with inductor took about 50 s; replaying an FX graph captured
with ``make_fx`` ran at 1.14×; the TorchScript replay at 1.05×. ``torch.jit.trace`` is deprecated
in recent PyTorch in favour of ``torch.compile``; its deprecation warning is silenced here, and
``compiled=False`` (or a PyTorch without ``torch.jit.trace``) falls back to the eager Pyro
traces, which give the same numbers.

Randomness: tracing runs the program once, inside :func:`torch.random.fork_rng`, so compiling
consumes no random numbers; every replay then draws z from the global RNG exactly as the eager
traces (and Pyro's ``Trace_ELBO``/``RenyiELBO`` with vectorised particles) would, so one seed gives
the same draws on either path.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from functools import partial
from typing import Hashable

import pyro
import torch
from torch import nn

from vaebench.errors import VaebenchError
from vaebench.estimators import log_weights
from vaebench.inference.latent_density import jit_available
from vaebench.model import LatentModel

DEFAULT_CACHE_SIZE = 8
"""Compiled programs kept per :class:`CompiledLogWeights` (one per batch shape, K, ...)."""


def eager_log_weights(model: LatentModel, x: torch.Tensor, k: int, detach_encoder: bool = False) -> torch.Tensor:
    """log p_θ(x, z_k) − log q_φ(z_k|x) for ``k`` draws z_k ~ q_φ(z|x), ``[k, n]``, from Pyro traces.

    With ``detach_encoder`` the draws stay reparameterised but log q is evaluated with the
    encoder's μ, σ cut from the graph, as DReG requires.
    """
    proposal = partial(model.encoder_proposal, detach_parameters=detach_encoder)
    return log_weights(model.log_joint, proposal, x, k)


class _LogWeightsProgram(nn.Module):
    """:func:`eager_log_weights` as a module, so tracing keeps the model's parameters as inputs."""

    def __init__(self, model: LatentModel, k: int, detach_encoder: bool) -> None:
        super().__init__()
        self.model = model
        self.k = k
        self.detach_encoder = detach_encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eager_log_weights(self.model, x, self.k, self.detach_encoder)


class CompiledLogWeights:
    """``(model, x, k, detach_encoder) -> log w [k, n]``, compiled once per input signature.

    Parameters
    ----------
    compiled
        Replay a :func:`torch.jit.trace` of the Pyro traces (default); ``False`` runs the Pyro
        traces eagerly on every call.
    cache_size
        Compiled programs kept, least recently used evicted first (a run usually needs two: the
        full batch and the last, smaller one).

    Notes
    -----
    A compiled program shares the model's parameters (it holds the module, not copies), so
    optimiser updates are seen by the next call. It is keyed on the model -- through a weak
    reference, which equals only a reference to the same live object, so a new model that Python
    happens to allocate at a freed model's address (the same ``id``) never replays the freed
    model's parameters -- and on the batch's shape, dtype and device, so moving the model or
    changing the batch size retraces. Programs of models that no longer exist are dropped.
    """

    def __init__(self, compiled: bool = True, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.compiled = compiled and jit_available()
        self.cache_size = cache_size
        self._programs: OrderedDict[Hashable, torch.jit.ScriptModule | None] = OrderedDict()
        self._warned = False

    def __call__(self, model: LatentModel, x: torch.Tensor, k: int, detach_encoder: bool = False) -> torch.Tensor:
        if not self.compiled:
            return eager_log_weights(model, x, k, detach_encoder)
        key = (weakref.ref(model), tuple(x.shape), x.dtype, x.device, k, detach_encoder, torch.is_grad_enabled())
        if key not in self._programs:
            for stale in [old for old in self._programs if old[0]() is None]:
                del self._programs[stale]
            try:
                self._programs[key] = self._compile(model, x, k, detach_encoder)
            except VaebenchError:
                raise
            except Exception as exc:          # a user program torch.jit.trace cannot record: run it eagerly
                self._programs[key] = None
                if not self._warned:
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    warnings.warn(f"vaebench: the log-weights of model {model.config.model!r} cannot be compiled "
                                  f"({message}); using the eager Pyro traces (same numbers, slower)", stacklevel=2)
                    self._warned = True
            while len(self._programs) > self.cache_size:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        program = self._programs[key]
        return eager_log_weights(model, x, k, detach_encoder) if program is None else program(x)

    @staticmethod
    def _compile(model: LatentModel, x: torch.Tensor, k: int, detach_encoder: bool) -> torch.jit.ScriptModule:
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
            if x.device.type == "cuda" else []
        with warnings.catch_warnings(), torch.random.fork_rng(devices=devices), \
                pyro.validation_enabled(False):
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.trace(_LogWeightsProgram(model, k, detach_encoder), (x,), check_trace=False)

    def clear(self) -> None:
        """Drop every compiled program."""
        self._programs.clear()
