"""Shared set-up of the benchmarks: the timed network, the training steps, devices, ratios.

Timing runs use the architecture of Burda et al. (2016): 784-200-200-50 with tanh, Bernoulli
likelihood, float32, on synthetic binary images (a training step costs the same on any binary
data). Log-likelihood runs use the small seeded configuration in ``benchmarks.py``.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pyro
import torch

from vaebench.config import METHODS, ModelConfig, TrainConfig
from vaebench.model import VAE
from vaebench.training import make_objective, train_step

from .reference import ReferenceStep

try:  # torch.optim imports torch._dynamo on first use (seconds); import it once here so every
    import torch._dynamo  # noqa: F401  benchmark process asv forks from the suite inherits it
except ImportError:  # pragma: no cover - older or stripped-down PyTorch
    pass

QUICK = os.environ.get("VAEBENCH_ASV_QUICK", "") not in ("", "0")
"""``VAEBENCH_ASV_QUICK=1`` shrinks every configuration so a smoke run of the suite (CI,
``bench/check.sh``) takes a minute or two; the numbers it gives are not meaningful."""

THREADS = int(os.environ.get("VAEBENCH_BENCH_THREADS", "1"))
"""CPU threads every benchmark runs with (``VAEBENCH_BENCH_THREADS``, default 1; 0 leaves torch's
default). One thread keeps
the tracked log-likelihoods independent of the machine's core count and the timings comparable
across machines; on a 2-core machine shared with other jobs, torch's default of two threads made
one log-joint evaluation 30× slower (94 ms instead of 2.9 ms) and one ``asv run`` take 14 minutes."""
if THREADS > 0:
    torch.set_num_threads(THREADS)

STEP_MODEL = ModelConfig(data_dim=784, latent_dim=50, hidden=(200, 200), activation="tanh")
"""The network every timing benchmark trains (Burda et al. 2016, one stochastic layer)."""

STEP_METHODS: dict[str, dict] = {
    "vi": {"method": "vi"},
    "iwae-5": {"method": "iwae", "k": 5},
    "iwae-50": {"method": "iwae", "k": 50},
    "hmc": {"method": "hmc"},
}
"""Training methods timed, as :class:`vaebench.config.TrainConfig` fields."""

DEVICES = ["cpu", "cuda"]


def torch_device(name: str) -> torch.device:
    """The device ``name``; raises ``NotImplementedError`` (asv: skipped) where it is absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_available(method: str) -> bool:
    """Whether this vaebench has training method ``method`` (``hmc`` arrives with its own issue)."""
    return STEP_METHODS[method]["method"] in METHODS


def binary_batch(batch: int, data_dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A fixed batch of synthetic binary images ``[batch, data_dim]`` (pixels on with probability 0.2)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, data_dim, generator=g) < 0.2).float().to(device)


@dataclass
class TrainingStep:
    """One call = one :func:`vaebench.training.train_step` of ``method`` on a fixed batch."""

    model: VAE
    objective: object
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    indices: torch.Tensor

    def __call__(self) -> float:
        return train_step(self.model, self.objective, self.optimizer, self.x, self.indices)


def training_step(method: str, device: torch.device, batch: int, model_config: ModelConfig = STEP_MODEL,
                  seed: int = 0, pyro_elbo: bool = False) -> TrainingStep:
    """The step ``vaebench train --method ...`` takes, on a freshly initialised model.

    ``pyro_elbo`` swaps the objective for Pyro's own ``Trace_ELBO``/``RenyiELBO`` through
    ``loss_and_grads`` (the eager path, for comparison; ``vi`` and ``iwae`` only).
    """
    if not method_available(method):
        raise NotImplementedError(f"this vaebench has no training method {STEP_METHODS[method]['method']!r}")
    config = TrainConfig(dataset="digits", batch_size=batch, seed=seed, **STEP_METHODS[method])
    torch.manual_seed(seed)
    encoder = config.method != "hmc"
    model = VAE(ModelConfig(**{**model_config.to_dict(), "encoder": encoder})).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps)
    x = binary_batch(batch, model.config.data_dim, device, seed)
    objective = make_objective(config)
    if pyro_elbo:
        from vaebench.inference.vi import PyroELBOObjective

        objective = PyroELBOObjective(objective.elbo, f"{objective.name}-pyro-elbo", config.k)
    return TrainingStep(model, objective, optimizer, x, torch.arange(batch))


def reference_step(method: str, device: torch.device, batch: int, model_config: ModelConfig = STEP_MODEL,
                   seed: int = 0) -> Callable[[], float]:
    """The hand-written PyTorch step of ``method`` (``vi`` or ``iwae-K``) on the same model and batch."""
    k = STEP_METHODS[method].get("k", 1)
    torch.manual_seed(seed)
    model = VAE(model_config).to(device)
    step = ReferenceStep(model, k, lr=TrainConfig.lr, eps=TrainConfig.adam_eps)
    x = binary_batch(batch, model.config.data_dim, device, seed)
    return lambda: step(x)


def _block(step: Callable[[], float], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


@dataclass(frozen=True)
class StepRatio:
    """Seconds per step of the vaebench step and of the reference, from interleaved blocks.

    ``ratio`` is the median over repetitions of the paired ratio (each repetition times one block
    of each, in alternating order, so slow drifts of machine load cancel); ``ratio_of_minima``
    compares the fastest block of each.
    """

    method: str
    batch: int
    device: str
    seconds: tuple[float, ...]
    reference_seconds: tuple[float, ...]

    @property
    def ratio(self) -> float:
        return statistics.median(a / b for a, b in zip(self.seconds, self.reference_seconds))

    @property
    def ratio_of_minima(self) -> float:
        return min(self.seconds) / min(self.reference_seconds)


def measure_step_ratio(method: str, batch: int = 100, device: str = "cpu", repeats: int = 15,
                       block_seconds: float = 0.2, warmup: int = 5,
                       model_config: ModelConfig = STEP_MODEL, pyro_elbo: bool = False) -> StepRatio:
    """Time the vaebench training step of ``method`` against :class:`ReferenceStep` in this process.

    ``pyro_elbo`` times Pyro's eager ``loss_and_grads`` path instead (see :func:`training_step`).
    """
    dev = torch_device(device)
    ours = training_step(method, dev, batch, model_config, pyro_elbo=pyro_elbo)
    reference = reference_step(method, dev, batch, model_config)
    for _ in range(warmup):
        ours()
        reference()
    probe = _block(reference, 1, dev)
    calls = max(1, round(block_seconds / max(probe, 1e-6)))
    seconds, reference_seconds = [], []
    for r in range(repeats):
        if r % 2 == 0:
            seconds.append(_block(ours, calls, dev))
            reference_seconds.append(_block(reference, calls, dev))
        else:
            reference_seconds.append(_block(reference, calls, dev))
            seconds.append(_block(ours, calls, dev))
    return StepRatio(method, batch, device, tuple(seconds), tuple(reference_seconds))


# ------------------------------------------------------------------------------ latent gradients
GRADIENT_VARIANTS = ("traced", "traced-one-pass", "compiled", "compiled-components", "inductor",
                     "inductor-components", "func-grad", "make-fx")
"""Ways of computing ∇_u log p_θ(x, u) from the Pyro model that ``bench/latent_gradient.py`` times.

``traced``: the eager Pyro trace with one autograd pass per component (the path before the
compiled density); ``traced-one-pass``: the eager trace, one pass of the sum; ``compiled``: the
compiled density's one-pass gradient (HMC, Monte Carlo EM); ``compiled-components``: its two
gradients (AIS, BDMC); ``inductor`` and ``inductor-components``: the same from the inductor
backend (``VAEBENCH_COMPILE=inductor``); ``func-grad``: :func:`torch.func.grad_and_value` over the eager trace;
``make-fx``: the forward and backward of ``func-grad`` captured by ``make_fx`` and replayed."""


def gradient_model(device: torch.device, seed: int = 0, model_config: ModelConfig = STEP_MODEL) -> VAE:
    """A freshly initialised 784-200-200-50 model with its parameters frozen (constants, as for HMC)."""
    torch.manual_seed(seed)
    model = VAE(ModelConfig(**{**model_config.to_dict(), "encoder": False})).to(device)
    model.requires_grad_(False)
    return model


def latent_gradient(variant: str, model: VAE, x: torch.Tensor) -> Callable[[torch.Tensor], tuple]:
    """``u -> (value, gradient...)`` computed the ``variant`` way (see :data:`GRADIENT_VARIANTS`)."""
    if variant == "traced":
        return model.latent_density(x, compiled=False).evaluate_components
    if variant == "traced-one-pass":
        return model.latent_density(x, compiled=False).evaluate
    if variant == "compiled":
        return model.latent_density(x, backend="jit").evaluate
    if variant == "compiled-components":
        return model.latent_density(x, backend="jit").evaluate_components
    if variant == "inductor":
        return model.latent_density(x, backend="inductor").evaluate
    if variant == "inductor-components":
        return model.latent_density(x, backend="inductor").evaluate_components
    grad_and_value = torch.func.grad_and_value(lambda u: model.log_joint(x, u).sum())
    if variant == "func-grad":
        return grad_and_value
    if variant == "make-fx":
        from torch.fx.experimental.proxy_tensor import make_fx

        graphs: dict[tuple, Callable] = {}

        def replay(u: torch.Tensor) -> tuple:
            key = tuple(u.shape)
            if key not in graphs:
                with pyro.validation_enabled(False):       # argument checks read tensor values
                    graphs[key] = make_fx(grad_and_value)(u)
            return graphs[key](u)
        return replay
    raise ValueError(f"unknown gradient variant {variant!r}; choose from {', '.join(GRADIENT_VARIANTS)}")


def gradient_flops(model_config: ModelConfig, rows: int) -> int:
    """Floating-point operations of the matrix products in one ∇_u log p(x, u) of an MLP decoder, ``rows`` rows.

    Forward and backward each multiply by every weight matrix once (no weight gradients):
    4 · rows · Σ_layers fan_in · fan_out.
    """
    widths = [model_config.latent_dim, *model_config.hidden, model_config.data_dim]
    return 4 * rows * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def apply_script_options(parser, args, script: str) -> None:
    """The ``--threads`` and ``--device`` options every benchmark script takes: set the threads, refuse
    a missing GPU (exit 2), and turn TF32 off so GPU timings are of fp32 arithmetic."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"{script}: error: no CUDA device\n")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def paired_blocks(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int = 15,
                  block_seconds: float = 0.2, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in interleaved blocks (the order rotates each repetition).

    Each repetition times one block of every function back to back, so slow drifts of machine load
    hit all of them alike; compare functions by the median of their per-repetition ratios.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    sizes = {name: max(1, round(block_seconds / max(_block(fn, 1, device), 1e-6))) for name, fn in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(_block(calls[name], sizes[name], device))
    return seconds


def median_ratio(seconds: list[float], reference: list[float]) -> float:
    """Median over repetitions of the paired ratio seconds / reference."""
    return statistics.median(a / b for a, b in zip(seconds, reference))
