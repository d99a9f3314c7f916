"""Frozen configuration dataclasses.

Every run is fully described by a :class:`ModelConfig` and a :class:`TrainConfig`; both are
immutable, validated on construction, and round-trip through JSON (``to_dict`` /
``from_dict``) so that a run directory's ``config.json`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from vaebench.errors import ConfigError

ACTIVATIONS = ("tanh", "relu", "softplus", "elu")
DECODERS = ("mlp", "linear")
"""Built-in models configured by ModelConfig's architecture fields."""
GUIDE_CHOICES = ("auto", "model", "gaussian", "iaf")
LIKELIHOODS = ("bernoulli", "gaussian")
METHODS = ("vi", "iwae", "hmc")
AIS_SCHEDULES = ("sigmoid", "linear")
VI_OBJECTIVES = ("trace", "meanfield")
DTYPES = ("float32", "float64")
MAX_K = 100_000
"""Most importance samples per datapoint (``train --k``, ``evaluate --k``)."""
MAX_SEED = 2 ** 32 - 1
"""Largest seed: numpy's (and so ``pyro.set_rng_seed``'s) seeds are 32-bit unsigned integers."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               type(None): "null"}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, None, tuple[int, ...], unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value)
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build ``cls`` from a JSON mapping, checking names, presence and types of its fields first,
    so a hand-edited or foreign file gives one plain sentence instead of a Python error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected an object of {cls.__name__} fields, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"unknown {cls.__name__} field(s): {', '.join(map(str, unknown))}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check(not missing, f"missing {cls.__name__} field(s): {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = dict(data)
    for f in fields:
        if f.name not in kwargs:
            continue
        value = kwargs[f.name]
        _check(_conforms(value, hints[f.name]),
               f"field {f.name!r} must be {_describe(hints[f.name])}, got {value!r}")
        if isinstance(value, list):
            kwargs[f.name] = tuple(value)
    return cls(**kwargs)


class _JSONConfig:
    """The JSON round trip every config shares: ``to_dict`` for ``config.json``, ``from_dict`` back (validated)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelConfig(_JSONConfig):
    """The generative model p_θ(x|z)p(z) and the guide q_φ(z|x) of a run.

    The model is named by ``model``: a built-in (``mlp``, ``linear``, ``burda-2layer``) or a user
    SPEC (``path/to/file.py:factory``, ``package.module:factory``) whose factory is called as
    ``factory(data_dim=P, **model_args)`` (:mod:`vaebench.models.loading`). The architecture fields
    (``latent_dim`` ... ``gaussian_scale``) configure the built-ins ``mlp`` and ``linear`` only.

    Parameters
    ----------
    data_dim
        Number of observed dimensions P (pixels).
    model
        Built-in name or user SPEC.
    model_args
        Keyword arguments of a user factory (JSON values).
    model_sha256
        SHA-256 of a user model's file when the run was made (``None`` for built-ins).
    latent_dim
        Latent dimension D of ``mlp``/``linear``; the prior is p(z) = N(0, I_D).
    hidden
        Hidden-layer widths of the ``mlp`` decoder.
    activation
        Hidden non-linearity: one of ``tanh`` (Burda et al. 2016), ``relu``, ``softplus``, ``elu``
        (also used by the built guides).
    likelihood
        ``bernoulli`` (binary data; the decoder outputs logits) or ``gaussian`` (``mlp``/``linear``).
    gaussian_scale
        Fixed observation standard deviation for the Gaussian likelihood; ``None`` learns one
        scale per observed dimension.
    encoder
        Whether the run has an amortised guide (``False`` for HMC-trained decoders).
    guide
        ``gaussian`` (diagonal Gaussian over the flattened latent), ``iaf`` (the same followed by
        ``flows`` inverse autoregressive flows), ``model`` (the module's own ``guide(x)``) or
        ``auto`` (``model`` when the module has a guide, else ``gaussian``; resolved when the model
        is built).
    flows
        Number of IAF flows (``iaf`` only; 0 otherwise).
    encoder_hidden
        Hidden widths of a built guide; ``None`` mirrors ``hidden`` for ``mlp``/``linear`` and is
        (200, 200) for other models.
    """

    data_dim: int
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    model: str = "mlp"
    likelihood: str = "bernoulli"
    gaussian_scale: float | None = None
    encoder: bool = True
    encoder_hidden: tuple[int, ...] | None = None
    guide: str = "auto"
    flows: int = 0
    model_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_sha256: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.data_dim, int) and self.data_dim >= 1, f"data_dim must be >= 1, got {self.data_dim}")
        _check(isinstance(self.model, str) and bool(self.model), f"model must be a name or SPEC, got {self.model!r}")
        _check(1 <= self.latent_dim <= 4096, f"latent dimension must be in 1..4096, got {self.latent_dim}")
        _check(all(h >= 1 for h in self.hidden), f"hidden sizes must be positive, got {self.hidden}")
        _check(self.activation in ACTIVATIONS,
               f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        _check(self.likelihood in LIKELIHOODS,
               f"unknown likelihood {self.likelihood!r}; choose from {', '.join(LIKELIHOODS)}")
        _check(self.gaussian_scale is None or self.gaussian_scale > 0,
               f"gaussian scale must be positive, got {self.gaussian_scale}")
        if self.encoder_hidden is not None:
            _check(all(h >= 1 for h in self.encoder_hidden),
                   f"encoder hidden sizes must be positive, got {self.encoder_hidden}")
        _check(self.guide in GUIDE_CHOICES, f"unknown guide {self.guide!r}; choose from {', '.join(GUIDE_CHOICES)}")
        if self.guide == "iaf":
            _check(1 <= self.flows <= 64, f"--flows must be in 1..64 for --guide iaf, got {self.flows}")
        else:
            _check(self.flows == 0, f"--flows applies to --guide iaf, not {self.guide}")
        _check(isinstance(self.model_args, Mapping) and all(isinstance(k, str) for k in self.model_args),
               "model_args must map names to values")

    @property
    def is_builtin_architecture(self) -> bool:
        """Whether the architecture fields configure the model (``mlp`` and ``linear``)."""
        return self.model in DECODERS

    @property
    def resolved_encoder_hidden(self) -> tuple[int, ...]:
        """Built-guide widths: ``encoder_hidden``, else the mirror of ``hidden`` (``mlp``/``linear``) or (200, 200)."""
        if self.encoder_hidden is not None:
            return self.encoder_hidden
        return self.hidden if self.is_builtin_architecture else (200, 200)

    @property
    def is_linear_gaussian(self) -> bool:
        """True when log p_θ(x) and p_θ(z|x) are available in closed form."""
        return self.model == "linear" and self.likelihood == "gaussian"

    @property
    def label(self) -> str:
        """``mlp``, ``mlp + iaf`` ...: the model and, where it is not the default, the guide."""
        if not self.encoder or self.guide in ("gaussian", "model", "auto"):
            return self.model
        return f"{self.model} + {self.guide}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_args"] = dict(self.model_args)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        if "decoder" in data and "model" not in data:      # run directories written before the model contract
            data["model"] = data.pop("decoder")
            data.setdefault("guide", "gaussian")
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig(_JSONConfig):
    """How θ (and φ) are learned.

    Parameters
    ----------
    method
        ``vi`` (single-sample ELBO), ``iwae`` (importance-weighted bound with ``k`` particles) or
        ``hmc`` (Monte Carlo EM on persistent HMC chains; no encoder).
    dataset
        Dataset name understood by :func:`vaebench.data.load_dataset`.
    epochs, batch_size, lr, seed
        Adam optimisation settings and the one seed that reproduces the run.
    k
        Number of importance samples for ``iwae`` (ignored by ``vi``).
    vi_objective
        ``trace`` (Pyro ``Trace_ELBO``) or ``meanfield`` (``TraceMeanField_ELBO``, analytic KL).
    dreg
        Doubly-reparameterised encoder gradients for ``iwae`` (Tucker et al. 2019).
    lr_schedule
        ``constant`` or ``burda`` (lr·10^(-i/7) for 3^i epochs, i = 0..7; Burda et al. 2016).
    adam_eps
        Adam's ε (Burda et al. use 1e-4).
    data_dir
        Directory with IDX files for ``mnist``/``fashion-mnist`` (``None``: environment/default).
    dtype, device
        Floating-point precision and torch device (``auto`` picks CUDA when available).
    hmc_transitions, hmc_leapfrog
        For ``hmc``: HMC transitions per minibatch from the stored latents, and leapfrog steps
        per transition.
    """

    method: str = "vi"
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 100
    k: int = 1
    lr: float = 1e-3
    seed: int = 0
    vi_objective: str = "trace"
    dreg: bool = False
    lr_schedule: str = "constant"
    adam_eps: float = 1e-4
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    hmc_transitions: int = 3
    hmc_leapfrog: int = 10

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        _check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _check(1 <= self.k <= MAX_K, f"k must be in 1..{MAX_K}, got {self.k}")
        _check(self.lr > 0 and self.lr < 10, f"learning rate must be in (0, 10), got {self.lr}")
        _check(0 <= self.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        _check(self.vi_objective in VI_OBJECTIVES,
               f"unknown VI objective {self.vi_objective!r}; choose from {', '.join(VI_OBJECTIVES)}")
        _check(not (self.dreg and self.method != "iwae"), "--dreg applies to --method iwae only")
        _check(self.lr_schedule in ("constant", "burda"),
               f"unknown learning-rate schedule {self.lr_schedule!r}; choose constant or burda")
        _check(self.adam_eps > 0, f"adam eps must be positive, got {self.adam_eps}")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        _check(self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
               f"unknown device {self.device!r}; choose cpu, cuda, cuda:N or auto")
        _check(1 <= self.hmc_transitions <= 1000,
               f"HMC transitions per minibatch must be in 1..1000, got {self.hmc_transitions}")
        _check(1 <= self.hmc_leapfrog <= 1000, f"leapfrog steps must be in 1..1000, got {self.hmc_leapfrog}")


@dataclass(frozen=True)
class HMCConfig(_JSONConfig):
    """Batched HMC on p_θ(z|x) (:func:`vaebench.inference.hmc.sample`).

    Parameters
    ----------
    num_warmup
        Warm-up iterations per chain: the step size (and optionally the mass matrix) is adapted,
        then frozen; warm-up draws are discarded.
    num_samples
        Kept iterations per chain after warm-up.
    num_leapfrog
        Leapfrog steps L per transition.
    chains
        Independent chains M per datapoint.
    target_accept
        Dual-averaging target for the Metropolis acceptance probability (Hoffman & Gelman 2014).
    initial_step_size
        Starting step size; ``None`` searches one per chain (doubling/halving until the
        acceptance probability of one leapfrog step crosses 1/2).
    adapt_mass
        Estimate a diagonal inverse mass matrix per chain from the middle of warm-up.
    step_size_jitter
        Each transition uses ε·U(1 − j, 1 + j) to break periodic trajectories (Neal 2011, §5.4.2.2).
    divergence_threshold
        A trajectory whose energy error exceeds this (nats), or becomes non-finite, is divergent
        and rejected.
    """

    num_warmup: int = 500
    num_samples: int = 500
    num_leapfrog: int = 10
    chains: int = 1
    target_accept: float = 0.8
    initial_step_size: float | None = None
    adapt_mass: bool = True
    step_size_jitter: float = 0.5
    divergence_threshold: float = 1000.0

    def __post_init__(self) -> None:
        _check(self.num_warmup >= 0, f"warm-up iterations must be >= 0, got {self.num_warmup}")
        _check(self.num_samples >= 1, f"samples must be >= 1, got {self.num_samples}")
        _check(1 <= self.num_leapfrog <= 1000, f"leapfrog steps must be in 1..1000, got {self.num_leapfrog}")
        _check(1 <= self.chains <= 100_000, f"chains per datapoint must be in 1..100000, got {self.chains}")
        _check(0 < self.target_accept < 1, f"target acceptance must be in (0, 1), got {self.target_accept}")
        _check(self.initial_step_size is None or self.initial_step_size > 0,
               f"initial step size must be positive, got {self.initial_step_size}")
        _check(0 <= self.step_size_jitter < 1, f"step-size jitter must be in [0, 1), got {self.step_size_jitter}")
        _check(self.divergence_threshold > 0,
               f"divergence threshold must be positive, got {self.divergence_threshold}")


@dataclass(frozen=True)
class AISConfig(_JSONConfig):
    """Annealed importance sampling of log p_θ(x) (:func:`vaebench.inference.ais.ais`).

    Parameters
    ----------
    steps
        Annealing steps T: inverse temperatures 0 = β_0 < β_1 < ... < β_T = 1.
    leapfrog
        Leapfrog steps L per HMC transition (one transition per intermediate distribution).
    chains
        Independent AIS chains M per datapoint; log p̂(x) is the log-mean-exp of their weights.
    schedule
        ``sigmoid`` (Grosse et al. 2013; Wu et al. 2017) or ``linear`` spacing of β.
    sigmoid_delta
        Steepness δ of the sigmoidal schedule.
    target_accept
        Per-chain step sizes are adapted toward this acceptance probability.
    adaptation_rate
        Gain g of the per-transition update log ε ← log ε + g(ᾱ − target).
    tuning_chains
        Extra chains K per datapoint that only drive the step-size adaptation (their weights are
        discarded, so the M weighted chains stay exactly unbiased).
    divergence_threshold
        Energy error (nats) beyond which a trajectory is divergent and rejected.
    """

    steps: int = 500
    leapfrog: int = 10
    chains: int = 16
    schedule: str = "sigmoid"
    sigmoid_delta: float = 4.0
    target_accept: float = 0.65
    adaptation_rate: float = 0.2
    tuning_chains: int = 2
    divergence_threshold: float = 1000.0

    def __post_init__(self) -> None:
        _check(1 <= self.steps <= 1_000_000, f"AIS steps must be in 1..1000000, got {self.steps}")
        _check(1 <= self.leapfrog <= 1000, f"leapfrog steps must be in 1..1000, got {self.leapfrog}")
        _check(1 <= self.chains <= 100_000, f"chains per datapoint must be in 1..100000, got {self.chains}")
        _check(self.schedule in AIS_SCHEDULES,
               f"unknown AIS schedule {self.schedule!r}; choose from {', '.join(AIS_SCHEDULES)}")
        _check(self.sigmoid_delta > 0, f"sigmoid delta must be positive, got {self.sigmoid_delta}")
        _check(0 < self.target_accept < 1, f"target acceptance must be in (0, 1), got {self.target_accept}")
        _check(0 <= self.adaptation_rate <= 10, f"adaptation rate must be in [0, 10], got {self.adaptation_rate}")
        _check(1 <= self.tuning_chains <= 1000, f"tuning chains must be in 1..1000, got {self.tuning_chains}")
        _check(self.divergence_threshold > 0,
               f"divergence threshold must be positive, got {self.divergence_threshold}")


@dataclass(frozen=True)
class CertifyConfig(_JSONConfig):
    """Certification of AIS by BDMC on simulated data (:func:`vaebench.inference.certify.certify`).

    Parameters
    ----------
    points
        Datapoints simulated from the decoder for the BDMC runs (``--certify-points``).
    max_steps
        Largest annealing length T tried; T doubles from the AIS ``steps`` up to this
        (``--max-steps``).
    tolerance
        Largest acceptable mean BDMC gap, nats per datapoint (``--gap-tolerance``): certified when
        gap + its standard error < tolerance.
    """

    points: int = 100
    max_steps: int = 8000
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        _check(isinstance(self.points, int) and 2 <= self.points <= 1_000_000,
               f"--certify-points must be in 2..1000000 (a standard error needs two points), got {self.points}")
        _check(isinstance(self.max_steps, int) and 1 <= self.max_steps <= 1_000_000,
               f"--max-steps must be in 1..1000000, got {self.max_steps}")
        _check(isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < float("inf"),
               f"--gap-tolerance must be a positive number of nats, got {self.tolerance}")
