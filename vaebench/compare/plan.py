"""The plan of a compare as data: stages, their keys, dependencies and rough costs.

For every seed and every trained model (method × K × guide, :func:`models`):

``train``     trains the model into ``RESULTS_DIR/runs/<label>-seed<s>/`` (its run directory).
``run``       scores the trained decoder on the test set: AIS (every method), importance sampling
              with K = ``is_k`` and the ELBO (encoder methods), active units; keeps the
              per-datapoint values in ``RESULTS_DIR/values/<label>-seed<s>.pt``.
``bounds``    (``vi``) IWAE_K for K in ``bound_ks``; needs ``run``'s values.
``gaps``      (``vi``) approximation and amortisation gaps with a per-datapoint q*; needs ``run``'s values.
``variance``  (``vi``) spread of the K-sample bound and gradient SNR as K grows; needs ``train``.
``aggregate`` (encoder methods) E KL(q(z|x)‖p(z)) = I_q(x; z) + KL(q(z)‖p(z)); needs ``train``.
              Not for IAF guides: the aggregate density scores every draw under every datapoint's
              q, and an IAF scores a value it did not draw only by inverting its flows (D network
              passes per pair), which costs more than the rest of a quick compare.

A stage's key is ``<kind>/<label>/seed<s>`` (:attr:`Stage.key`); the label names the model in
one way everywhere (:func:`vaebench.results.model_label`): ``vi``, ``iwae-k5``, ``hmc``, and
``+<guide>`` appended for a guide other than ``gaussian`` (``iwae-k5+iaf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from vaebench.compare.settings import CompareConfig
from vaebench.results import model_label

KINDS = ("train", "run", "bounds", "gaps", "variance", "aggregate")
DEPENDS_ON = {"train": (), "run": ("train",), "bounds": ("run",), "gaps": ("run",), "variance": ("train",),
              "aggregate": ("train",)}
"""Stage kind -> the kinds (of the same model and seed) it reads the outputs of."""
VI_ONLY = ("bounds", "gaps", "variance")


@dataclass(frozen=True)
class Model:
    """One trained model of the comparison: its training method, K (``None`` for hmc) and guide."""

    method: str
    k: int | None
    guide: str | None           # the encoder family; None for a method without an encoder

    @property
    def label(self) -> str:
        return model_label(self.method, self.k, self.guide)

    @property
    def has_encoder(self) -> bool:
        return self.method != "hmc"


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``kind`` of :data:`KINDS` for ``model`` and ``seed``."""

    kind: str
    model: Model
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.model.label}/seed{self.seed}"

    @property
    def name(self) -> str:
        """The name of the model's run directory and values file: ``<label>-seed<s>``."""
        return f"{self.model.label}-seed{self.seed}"

    def dependencies(self) -> tuple["Stage", ...]:
        return tuple(Stage(kind, self.model, self.seed) for kind in DEPENDS_ON[self.kind])


def models(cfg: CompareConfig) -> list[Model]:
    """The models to train, in order: every method, every K of ``iwae``, every guide of an encoder method."""
    out = []
    for method in cfg.methods:
        if method == "hmc":
            out.append(Model("hmc", None, None))
            continue
        for guide in cfg.guides:
            ks = cfg.iwae_ks if method == "iwae" else (1,)
            out.extend(Model(method, k, guide) for k in ks)
    return out


def plan(cfg: CompareConfig) -> list[Stage]:
    """Every stage of the compare, seed by seed, each after the stages it depends on."""
    stages: list[Stage] = []
    for seed in cfg.seeds:
        for model in models(cfg):
            stages += [Stage("train", model, seed), Stage("run", model, seed)]
            if model.method == "vi":
                stages += [Stage(kind, model, seed) for kind in VI_ONLY]
            if model.has_encoder and model.guide != "iaf":
                stages.append(Stage("aggregate", model, seed))
    return stages


def ready(pending: Iterable[Stage], done: set[str]) -> list[Stage]:
    """The stages of ``pending`` whose dependencies' keys are all in ``done``."""
    return [s for s in pending if all(d.key in done for d in s.dependencies())]


def cost(cfg: CompareConfig, stage: Stage) -> float:
    """Rough work of a stage in units of one batched network call (for the ETA only)."""
    n_train = cfg.train_subset or 1500
    n_test = cfg.test_subset or 300
    batches = cfg.epochs * -(-n_train // cfg.batch_size)
    rows_per_call = 30_000
    if stage.kind == "train":
        if stage.model.method == "hmc":
            return batches * (cfg.hmc_transitions * cfg.hmc_leapfrog * 1.5 + 2)
        return batches * (2 + 2 * (stage.model.k or 1) * cfg.batch_size / rows_per_call)
    if stage.kind == "run":
        ais = cfg.ais.get("steps", 500) * cfg.ais.get("leapfrog", 10) * 1.5 * -(-n_test // cfg.ais_batch_size)
        encoder = n_test * (cfg.is_k + cfg.elbo_k) / rows_per_call + 4 * -(-n_test // cfg.eval_batch_size)
        return ais + (encoder if stage.model.has_encoder else 0)
    if stage.kind == "bounds":
        return n_test * sum(cfg.bound_ks) / rows_per_call + len(cfg.bound_ks) * -(-n_test // cfg.eval_batch_size)
    if stage.kind == "gaps":
        return cfg.local_vi_steps * 1.5
    if stage.kind == "variance":
        return cfg.variance_replicates * len(cfg.variance_ks) * 5
    return 2.0


def stage_seed(seed: int, stage: str) -> int:
    """A seed for ``stage`` of the run with ``seed``: 31 bits of SHA-256("seed:stage")."""
    import hashlib
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
