"""The latent log-density of a model and its gradient, replayed from a compiled trace.

HMC, AIS, BDMC and Monte Carlo EM spend nearly all their time evaluating, for a batch ``x`` and
positions ``u [..., n, D]`` (one chain per row),

.. math::

    \\log p_θ(x, u) = \\underbrace{\\log p(u)}_{\\text{prior}} + \\underbrace{\\log p_θ(x \\mid u)}_{\\text{likelihood}},
    \\qquad ∇_u \\log p(u), \\quad ∇_u \\log p_θ(x \\mid u),

read off a trace of the Pyro model conditioned on the latents
(:meth:`vaebench.model.LatentModel.site_log_probs`). Interpreting that trace -- Pyro's messenger
stack, ``poutine.condition``, distribution objects, ``compute_log_prob`` -- costs Python time on
every call, about a third of the tensor work of a 784-200-200-50 decoder at 100 rows.

:class:`LatentDensity` runs the trace once per (model, batch shape, chain shape, dtype, device)
under :func:`torch.jit.trace`, which records its tensor operations, and replays that graph on
later calls; the backward pass is PyTorch's autograd through the replayed graph. The densities
are still the ones the Pyro program defines: the replay runs the same operations, so its values
and gradients equal the traced path's (``tests/test_latent_density.py``, float32 and
float64). Alternatives measured by ``python bench/latent_gradient.py --variants ...``:
``torch.func.grad`` over the eager trace keeps all of the Python (2.6× the analytic gradient at
1,600 rows), and replaying the forward and backward captured by ``make_fx`` in Python runs one
call per ATen operation of a decomposed graph (1.8×); compiling that captured graph with
inductor is the fastest of all (the ``inductor`` backend below), at seconds of compilation per
input signature.

Backward passes
    :meth:`LatentDensity.evaluate` (HMC, Monte Carlo EM) takes **one** backward pass, of
    Σ log p_θ(x, u). :meth:`LatentDensity.evaluate_components` (AIS and BDMC, which need both
    gradients to move a chain from β_{t-1} to β_t without evaluating the model again) takes the
    likelihood's backward, which crosses the decoder, and the prior's, which crosses only the
    prior's few element-wise operations; the prior's is taken first with the graph kept.

A program the tracer cannot record, or whose replay does not reproduce the eager values on a
second, different input (a trace that baked in data-dependent control flow), falls back to the
eager trace with a one-line warning; nothing else changes.

Backends
    ``jit`` (default): the replay above, ready in milliseconds. ``inductor``: the forward *and*
    backward pass captured once per input signature as one ATen graph (``make_fx`` of
    :func:`torch.func.grad_and_value`, with θ as inputs so updates are seen) and compiled by
    :func:`torch.compile`'s inductor, which fuses the element-wise work around the matrix products:
    about 15-25 % faster than ``jit`` on the 784-200-200-50 decoder (``bench/latent_gradient.py
    --variants compiled inductor``), for 4-12 s of compilation per signature and a C++ compiler at
    run time; worth it for long HMC and AIS runs. Its values equal the traced path's up to
    floating-point rounding (the fused kernels sum in another order). A graph inductor cannot
    compile falls back to ``jit`` with a one-line warning. ``eager``: the Pyro trace on every call.
    The process default comes from ``VAEBENCH_COMPILE`` (``vaebench ... --compile``) and is
    recorded in every record's provenance.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Hashable, NamedTuple

import pyro
import torch
from torch import nn

from vaebench.errors import ConfigError, VaebenchError

CACHE_SIZE = 8
"""Compiled programs kept per model (one per input signature; a run usually needs two or three)."""

BACKENDS = ("jit", "inductor", "eager")
"""How :class:`LatentDensity` computes values and gradients (see the module docstring)."""

BACKEND_VARIABLE = "VAEBENCH_COMPILE"


def default_backend() -> str:
    """The process's backend: ``$VAEBENCH_COMPILE`` if set, else ``jit``.

    Raises
    ------
    ConfigError
        If the variable names no backend.
    """
    name = os.environ.get(BACKEND_VARIABLE, "") or "jit"
    if name not in BACKENDS:
        raise ConfigError(f"{BACKEND_VARIABLE}={name!r} is not a backend; choose from {', '.join(BACKENDS)}")
    return name


class Evaluation(NamedTuple):
    """A target evaluated at a position: log density, its gradient, and cached extras per chain."""

    log_density: torch.Tensor
    grad: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()


class ComponentEvaluation(NamedTuple):
    """log p(u), log p_θ(x|u) ``[..., n]`` and their gradients ``[..., n, D]``, all detached."""

    log_prior: torch.Tensor
    log_likelihood: torch.Tensor
    grad_prior: torch.Tensor
    grad_likelihood: torch.Tensor


class _SiteLogProbs(nn.Module):
    """``forward(x, u) = model.site_log_probs(x, u)`` as a module, so tracing keeps θ as parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.site_log_probs(x, u)


def _signature(x: torch.Tensor, u: torch.Tensor, model: nn.Module) -> Hashable:
    return (tuple(x.shape), tuple(u.shape), x.dtype, u.dtype, x.device, torch.is_grad_enabled(),
            u.requires_grad, model.training)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model", type(model).__name__)


def jit_available() -> bool:
    """Whether this PyTorch still provides :func:`torch.jit.trace`."""
    return callable(getattr(getattr(torch, "jit", None), "trace", None))


class CompiledSiteLogProbs:
    """``(x, u) -> (log p(u), log p_θ(x|u))`` of one model, compiled once per input signature.

    Parameters
    ----------
    model
        A :class:`vaebench.model.LatentModel` (anything with ``site_log_probs(x, u)``).
    compiled
        Replay a :func:`torch.jit.trace` (default); ``False`` runs the Pyro trace on every call.
    cache_size
        Compiled programs kept, least recently used evicted first.

    Notes
    -----
    The program holds the model, not copies of its parameters, so a training step's update is
    seen by the next call (:meth:`vaebench.model.LatentModel.latent_density` keeps one per model,
    dropped when the model is pickled or copied). It is keyed on the shapes, dtype and device of ``x`` and ``u`` and on whether autograd is recording,
    so moving the model, changing the batch or the number of chains retraces.
    """

    def __init__(self, model: nn.Module, compiled: bool = True, cache_size: int = CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.model = model
        self.compiled = compiled and jit_available()
        self.cache_size = cache_size
        self._programs: OrderedDict[Hashable, Callable[..., Any] | None] = OrderedDict()
        self.fallback_reason: str | None = None

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if not self.compiled or self.fallback_reason is not None:
            return model.site_log_probs(x, u)
        key = _signature(x, u, model)
        program = self._programs.get(key)
        if program is None:
            program = self._compile(model, x, u)
            if program is None:
                return model.site_log_probs(x, u)
            self._programs[key] = program
            while len(self._programs) > self.cache_size:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        return program(x, u)

    def _compile(self, model: nn.Module, x: torch.Tensor, u: torch.Tensor) -> Callable[..., Any] | None:
        """Trace the program at this signature, check it on a second input; ``None`` (and a warning) if it fails."""
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
            if x.device.type == "cuda" else []
        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=devices), \
                    pyro.validation_enabled(False):
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                program = torch.jit.trace(_SiteLogProbs(model), (x, u), check_trace=False)
                probe = (u.detach() * 0.5 + 0.25).requires_grad_(u.requires_grad)
                with torch.no_grad():
                    expected = model.site_log_probs(x, probe)
                    replayed = program(x, probe)
                for want, got in zip(expected, replayed):
                    if not torch.allclose(want, got, rtol=1e-5, atol=1e-5, equal_nan=True):
                        raise VaebenchError("the replayed trace does not reproduce the eager log-density "
                                            "(data-dependent control flow?)")
            return program
        except Exception as exc:        # a user program the tracer cannot record: run it eagerly
            message = _first_line(exc)
            self.fallback_reason = message
            warnings.warn(f"vaebench: the latent log-density of model {_model_name(model)!r} cannot be compiled "
                          f"({message}); "
                          "using the eager Pyro trace (same numbers, slower)", stacklevel=4)
            return None

    def clear(self) -> None:
        """Drop every compiled program."""
        self._programs.clear()


class InductorGradients:
    """Values and gradients of one model's latent density from inductor-compiled forward+backward graphs.

    ``joint(x, u) -> (log p(x, u), ∇_u)`` and ``components(x, u) -> (log p(u), log p(x|u), ∇_u log p(u),
    ∇_u log p(x|u))``, each graph captured by ``make_fx`` once per input signature and compiled by
    :func:`torch.compile`. The model's parameters and buffers are graph inputs, read at every call.
    Where capture or compilation fails, :attr:`fallback_reason` is set (one warning) and the
    caller uses the ``jit`` path.
    """

    def __init__(self, model: nn.Module, cache_size: int = CACHE_SIZE) -> None:
        self.module = _SiteLogProbs(model)
        self.cache_size = cache_size
        self._programs: OrderedDict[Hashable, Callable[..., Any]] = OrderedDict()
        self.fallback_reason: str | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**{name: p.detach() for name, p in self.module.named_parameters()},
                **dict(self.module.named_buffers())}

    def _function(self, which: str) -> Callable[..., Any]:
        from torch.func import functional_call, grad_and_value

        module = self.module

        def joint(tensors: dict[str, torch.Tensor], x: torch.Tensor, u: torch.Tensor):
            def total(v: torch.Tensor):
                log_prior, log_lik = functional_call(module, tensors, (x, v))
                value = log_prior + log_lik
                return value.sum(), value
            grad, (_, value) = grad_and_value(total, has_aux=True)(u)
            return value, grad

        def components(tensors: dict[str, torch.Tensor], x: torch.Tensor, u: torch.Tensor):
            def part(index: int):
                def total(v: torch.Tensor):
                    value = functional_call(module, tensors, (x, v))[index]
                    return value.sum(), value
                return grad_and_value(total, has_aux=True)(u)
            grad_prior, (_, log_prior) = part(0)
            grad_lik, (_, log_lik) = part(1)
            return log_prior, log_lik, grad_prior, grad_lik
        return joint if which == "joint" else components

    def __call__(self, which: str, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The ``which`` (``joint`` or ``components``) outputs at ``u``; ``None`` where inductor is unavailable."""
        if self.fallback_reason is not None:
            return None
        key = (which, _signature(x, u, self.module.model))
        tensors = self._tensors()
        u = u.detach()
        program = self._programs.get(key)
        if program is None:
            try:
                from torch.fx.experimental.proxy_tensor import make_fx

                with pyro.validation_enabled(False), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = make_fx(self._function(which))(tensors, x, u)
                    program = torch.compile(graph, backend="inductor", dynamic=False, fullgraph=True)
                    outputs = program(tensors, x, u)
            except Exception as exc:     # no C++ compiler, an operation inductor lacks, a user program make_fx refuses
                self.fallback_reason = _first_line(exc)
                warnings.warn(f"vaebench: inductor cannot compile the latent density of model "
                              f"{_model_name(self.module.model)!r} ({self.fallback_reason}); using the jit "
                              "replay", stacklevel=4)
                return None
            self._programs[key] = program
            while len(self._programs) > self.cache_size:
                self._programs.popitem(last=False)
            return tuple(t.detach() for t in outputs)
        self._programs.move_to_end(key)
        return tuple(t.detach() for t in program(tensors, x, u))


class LatentDensity:
    """The latent log-density of one batch ``x``: values and gradients with respect to u.

    Parameters
    ----------
    site_log_probs
        ``(x, u) -> (log p(u), log p_θ(x|u))``, compiled (:class:`CompiledSiteLogProbs`) or eager.
    x
        The batch ``[n, P]`` the density conditions on.

    Calling the object gives log p_θ(x, u) ``[..., n]`` (differentiable, also in θ: Monte Carlo EM's
    M-step uses it); it is a log-density function for :mod:`vaebench.inference.hmc` (which uses
    :meth:`evaluate`) and, through :meth:`components`, the prior/likelihood split for
    :mod:`vaebench.inference.ais` (which uses :meth:`evaluate_components`).
    """

    def __init__(self, site_log_probs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 x: torch.Tensor, gradients: InductorGradients | None = None) -> None:
        self.site_log_probs = site_log_probs
        self.x = x
        self.gradients = gradients

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        log_prior, log_lik = self.site_log_probs(self.x, u)
        return log_prior + log_lik

    def components(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(u), log p_θ(x|u)), each ``[..., n]``."""
        return self.site_log_probs(self.x, u)

    def evaluate(self, position: torch.Tensor) -> Evaluation:
        """log p_θ(x, u) and ∇_u of it at ``position``, one backward pass (works inside ``no_grad``)."""
        if self.gradients is not None:
            outputs = self.gradients("joint", self.x, position)
            if outputs is not None:
                return Evaluation(*outputs)
        with torch.enable_grad():
            u = position.detach().requires_grad_(True)
            value = self(u)
            (grad,) = torch.autograd.grad(value.sum(), u)
        return Evaluation(value.detach(), grad)

    def evaluate_components(self, position: torch.Tensor) -> ComponentEvaluation:
        """Both terms and both gradients at ``position`` (the prior's backward is the cheap one)."""
        if self.gradients is not None:
            outputs = self.gradients("components", self.x, position)
            if outputs is not None:
                return ComponentEvaluation(*outputs)
        with torch.enable_grad():
            u = position.detach().requires_grad_(True)
            log_prior, log_lik = self.site_log_probs(self.x, u)
            (grad_prior,) = torch.autograd.grad(log_prior.sum(), u, retain_graph=True)
            (grad_lik,) = torch.autograd.grad(log_lik.sum(), u)
        return ComponentEvaluation(log_prior.detach(), log_lik.detach(), grad_prior, grad_lik)


__all__ = ["BACKENDS", "CompiledSiteLogProbs", "InductorGradients", "default_backend", "ComponentEvaluation", "Evaluation", "LatentDensity", "jit_available"]
