"""The settings of a compare (:class:`CompareConfig`) and its presets.

A :class:`CompareConfig` is everything a compare does. It is stored in ``compare.json`` so a
rerun can check that it continues the same job. Its list-valued *axes* (:data:`AXES`: seeds,
methods, the K of the ``iwae`` runs, guides) are sets: they are kept sorted (a reordered list is
the same settings) and a results directory may grow along them: a rerun with more seeds, methods,
K or guides, every other setting equal, runs only the new stages.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from vaebench.config import CertifyConfig, ModelConfig, TrainConfig
from vaebench.data import DATASETS
from vaebench.errors import ConfigError

KNOWN_METHODS = ("vi", "iwae", "hmc")
KNOWN_GUIDES = ("gaussian", "iaf", "model")
"""Encoder families of the ``guides`` axis: built diagonal Gaussian, built IAF, the model's own guide."""
AXES = ("seeds", "methods", "iwae_ks", "guides")
"""List-valued settings that are sets a results directory can grow along."""
MAX_SEED = 2**32 - 1
"""Seeds are 0..2**32-1 (what NumPy and Pyro's ``set_rng_seed`` accept)."""


@dataclass(frozen=True)
class CompareConfig:
    """Everything a compare does; stored in ``compare.json`` so a rerun can check it resumes the same job.

    Parameters
    ----------
    preset
        Name of the preset these settings started from (``quick``, ``paper`` or ``custom``).
    dataset, data_dir
        Data set and, for ``mnist``/``fashion-mnist``, its IDX directory.
    methods, iwae_ks, seeds, guides
        Training methods, the K of each ``iwae`` run, the seeds (mean ± SE over seeds) and the
        encoder families of the encoder methods. Sets (:data:`AXES`): stored sorted.
    model, model_args
        The generative model every method shares: a built-in (``mlp``, ``linear``, ``burda-2layer``;
        ``None`` picks ``linear`` for ``linear-gaussian`` and ``mlp`` otherwise) or a user SPEC
        ``path/to/file.py:factory`` with its factory's keyword arguments.
    flows
        IAF flows of the ``iaf`` guide.
    latent_dim, hidden, activation
        The architecture of ``mlp``/``linear`` (``latent_dim`` and ``hidden``), and of every built guide
        (encoder widths mirror ``hidden``).
    epochs, batch_size, lr, lr_schedule, adam_eps, device, dtype
        Training settings shared by every method (:class:`~vaebench.config.TrainConfig`).
    train_subset, test_subset
        Use only the first n training / test points (``None``: all).
    eval_batch_size
        Datapoints per estimator batch.
    is_k, elbo_k
        Importance samples of the log-likelihood estimate; draws averaged in every ELBO estimate.
    bound_ks
        K of the IWAE_K-versus-K curve on the ``vi`` model.
    local_vi_steps, local_vi_lr, local_vi_k
        Adam steps, learning rate and draws per step of the per-datapoint q*.
    aggregate_samples
        Draws z ~ q(z|x) per datapoint for the aggregate-posterior estimates.
    variance_ks, variance_replicates, variance_batch
        K values, replicate draws and batch size of the bound-spread and gradient-SNR study.
    hmc_transitions, hmc_leapfrog
        HMC transitions per minibatch and leapfrog steps per transition of the ``hmc`` method.
    ais, ais_batch_size
        Settings of the ``ais`` estimator (fields of :class:`vaebench.config.AISConfig`) and the
        datapoints it anneals at once.
    certify
        Certified AIS (fields of :class:`vaebench.config.CertifyConfig`: ``points``, ``max_steps``,
        ``tolerance``): T doubles from ``ais["steps"]`` until BDMC on data simulated from each decoder
        closes its gap (:func:`vaebench.inference.certify.certify`); ``None`` runs AIS at the given T.
    posthoc_encoder
        A decoder without an encoder (``hmc``) gets a Gaussian encoder fitted afterwards with the
        decoder frozen: ``epochs`` of the IWAE-``k`` objective at learning rate ``lr``; it gives that
        decoder an IS and ELBO of its own (labelled post-hoc).
    report_hmc
        Settings (fields of :class:`vaebench.config.HMCConfig`) of the HMC chains ``report`` draws
        for its trace plot and, for decoders without an encoder, its posterior projection; part of
        the records so that every number of a report follows from them.
    threads
        CPU threads for torch in each stage (``None``: one). Stages run side by side, one thread
        each; small networks run fastest on one thread anyway.
    """

    preset: str = "custom"
    dataset: str = "digits"
    data_dir: str | None = None
    methods: tuple[str, ...] = KNOWN_METHODS
    iwae_ks: tuple[int, ...] = (5, 50)
    seeds: tuple[int, ...] = (0, 1, 2)
    guides: tuple[str, ...] = ("gaussian",)
    model: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    flows: int = 2
    latent_dim: int = 10
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "tanh"
    epochs: int = 15
    batch_size: int = 100
    lr: float = 3e-3
    lr_schedule: str = "constant"
    adam_eps: float = 1e-4
    device: str = "cpu"
    dtype: str = "float32"
    train_subset: int | None = None
    test_subset: int | None = None
    eval_batch_size: int = 100
    is_k: int = 5000
    elbo_k: int = 100
    bound_ks: tuple[int, ...] = (1, 5, 50, 500, 5000)
    local_vi_steps: int = 500
    local_vi_lr: float = 0.05
    local_vi_k: int = 4
    aggregate_samples: int = 10
    variance_ks: tuple[int, ...] = (1, 10, 100)
    variance_replicates: int = 40
    variance_batch: int = 20
    hmc_transitions: int = 1
    hmc_leapfrog: int = 5
    ais: Mapping[str, Any] = field(default_factory=lambda: {"steps": 100, "leapfrog": 2, "chains": 4})
    certify: Mapping[str, Any] | None = None
    posthoc_encoder: Mapping[str, Any] = field(default_factory=lambda: {"epochs": 10, "k": 5, "lr": 3e-3})
    ais_batch_size: int = 1000
    report_hmc: Mapping[str, Any] = field(
        default_factory=lambda: {"num_warmup": 100, "num_samples": 200, "num_leapfrog": 5})
    threads: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.model is None:
            object.__setattr__(self, "model", "linear" if self.dataset == "linear-gaussian" else "mlp")
        check(isinstance(self.model, str) and bool(self.model), f"--model must be a name or SPEC, got {self.model!r}")
        check(1 <= self.flows <= 64, f"--flows must be in 1..64, got {self.flows}")
        if self.certify is not None:
            CertifyConfig(**self.certify)
            check(int(self.certify.get("max_steps", 8000)) >= int(self.ais.get("steps", 500)),
                  "certify max_steps must be at least the AIS steps")
        check(set(self.posthoc_encoder) == {"epochs", "k", "lr"},
              "posthoc_encoder needs exactly the settings epochs, k and lr")
        check(len(self.methods) > 0 and len(set(self.methods)) == len(self.methods),
              f"--methods must be a non-empty list without repeats, got {','.join(self.methods)}")
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        check(not unknown, f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_METHODS)}")
        check(len(self.guides) > 0 and len(set(self.guides)) == len(self.guides),
              f"--guides must be a non-empty list without repeats, got {','.join(self.guides)}")
        unknown = [g for g in self.guides if g not in KNOWN_GUIDES]
        check(not unknown, f"unknown guide(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_GUIDES)}")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)
              and all(isinstance(s, int) and 0 <= s <= MAX_SEED for s in self.seeds),
              f"--seeds must be distinct integers in 0..{MAX_SEED}, got {','.join(map(str, self.seeds))}")
        for name, option in (("iwae_ks", "--k"), ("bound_ks", "bound_ks"), ("variance_ks", "variance_ks")):
            values = getattr(self, name)
            check(len(values) > 0 and all(isinstance(v, int) and 1 <= v <= 100_000 for v in values)
                  and len(set(values)) == len(values),
                  f"{option} must be distinct integers in 1..100000, got {','.join(map(str, values))}")
        check(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        for name in ("batch_size", "eval_batch_size", "is_k", "elbo_k", "local_vi_k", "aggregate_samples",
                     "variance_batch", "latent_dim", "hmc_transitions", "hmc_leapfrog", "ais_batch_size"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.local_vi_steps >= 0, f"local_vi_steps must be >= 0, got {self.local_vi_steps}")
        check(self.variance_replicates >= 2, f"variance_replicates must be >= 2, got {self.variance_replicates}")
        check(self.local_vi_lr > 0, f"local_vi_lr must be positive, got {self.local_vi_lr}")
        for name in ("train_subset", "test_subset", "threads"):
            value = getattr(self, name)
            low = 1 if name == "threads" else 2
            check(value is None or value >= low, f"{name} must be >= {low} or None, got {value}")
        # the shared training settings are validated by the dataclasses that use them
        ModelConfig(data_dim=1, latent_dim=self.latent_dim, hidden=self.hidden, activation=self.activation)
        TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, lr_schedule=self.lr_schedule,
                    adam_eps=self.adam_eps, dtype=self.dtype, device=self.device)
        # the axes are sets: one canonical order, so a reordered list is the same settings
        object.__setattr__(self, "seeds", tuple(sorted(self.seeds)))
        object.__setattr__(self, "iwae_ks", tuple(sorted(self.iwae_ks)))
        object.__setattr__(self, "methods", tuple(m for m in KNOWN_METHODS if m in self.methods))
        object.__setattr__(self, "guides", tuple(g for g in KNOWN_GUIDES if g in self.guides))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ais"] = dict(self.ais)
        out["report_hmc"] = dict(self.report_hmc)
        out["model_args"] = dict(self.model_args)
        out["certify"] = None if self.certify is None else dict(self.certify)
        out["posthoc_encoder"] = dict(self.posthoc_encoder)
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompareConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown compare setting(s): {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def fixed_settings(cfg: CompareConfig) -> dict[str, Any]:
    """The settings that must be equal for two compares to share a results directory (all but :data:`AXES`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in AXES and k != "preset"}


def union(a: CompareConfig, b: CompareConfig) -> CompareConfig:
    """``a`` with every axis the union of ``a``'s and ``b``'s (the other settings are ``a``'s)."""
    return dataclasses.replace(a, **{name: tuple(set(getattr(a, name)) | set(getattr(b, name))) for name in AXES})


PRESETS: dict[str, CompareConfig] = {
    "quick": CompareConfig(
        preset="quick", dataset="digits", seeds=(0, 1, 2), latent_dim=10, hidden=(100, 100), epochs=20,
        batch_size=100, lr=3e-3, guides=("gaussian", "iaf"), ais={"steps": 500, "leapfrog": 2, "chains": 8},
        certify={"points": 50, "max_steps": 8000, "tolerance": 0.1}, threads=1),
    "paper": CompareConfig(
        # Burda, Grosse & Salakhutdinov (2016), §5: 784-200-200-50 tanh, one stochastic layer, batch 20,
        # Adam(β=(0.9, 0.999), ε=1e-4), lr 1e-3·10^(-i/7) for 3^i epochs (i = 0..7, 3,280 epochs), K = 5000.
        preset="paper", dataset="mnist", seeds=(0, 1, 2), latent_dim=50, hidden=(200, 200), epochs=3280,
        batch_size=20, lr=1e-3, lr_schedule="burda", adam_eps=1e-4, device="auto", eval_batch_size=100,
        is_k=5000, elbo_k=1000, local_vi_steps=2000, local_vi_lr=0.02, local_vi_k=16, aggregate_samples=1,
        variance_ks=(1, 5, 50, 500), variance_replicates=100, hmc_transitions=3, hmc_leapfrog=10,
        guides=("gaussian", "iaf"), ais={"steps": 1000, "leapfrog": 10, "chains": 16},
        certify={"points": 100, "max_steps": 64000, "tolerance": 0.1}, posthoc_encoder={"epochs": 100, "k": 50, "lr": 1e-3}),
    "tiny": CompareConfig(
        preset="tiny", dataset="digits", methods=("vi", "iwae"), iwae_ks=(3,), seeds=(0, 1), latent_dim=3,
        hidden=(16,), epochs=2, train_subset=200, test_subset=30, is_k=50, elbo_k=10, bound_ks=(1, 10, 50),
        local_vi_steps=20, aggregate_samples=2, variance_ks=(2,), variance_replicates=5, variance_batch=10,
        ais={"steps": 20, "leapfrog": 2, "chains": 2}, certify={"points": 8, "max_steps": 40, "tolerance": 0.5},
        posthoc_encoder={"epochs": 1, "k": 2, "lr": 3e-3}, report_hmc={"num_warmup": 20, "num_samples": 30,
                                                                   "num_leapfrog": 3}, threads=1),
}
"""``quick``: the README's command, offline, a few minutes on a 2-core CPU. ``paper``: the IWAE
paper's protocol; for a GPU and a real MNIST (or Fashion-MNIST) IDX directory. ``tiny`` (not
advertised): seconds, for tests and smoke checks of the whole pipeline; its numbers mean nothing."""
PUBLIC_PRESETS = ("quick", "paper")


def preset(name: str, **overrides: Any) -> CompareConfig:
    """A preset with some settings replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PUBLIC_PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "dataset" in changes and "model" not in changes:
        changes["model"] = None                          # the data set's default built-in
    try:
        return dataclasses.replace(PRESETS[name], **changes)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
