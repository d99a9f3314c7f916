"""Data loaders, the IDX reader and binarisation, including every way a data file can be bad."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vaebench.data import (DATA_DIR_ENV, IDX_FILES, binarize, check_binary, check_compatible,
                           evaluation_data, fixed_binarization, load_dataset, read_idx)
from vaebench.errors import DataError


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dir(directory: Path, compress: bool, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 4, 3)), "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 4, 3)), "test_labels": rng.integers(0, 10, n_test)}
    for key, stem in IDX_FILES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[key], compress)
    return arrays


def test_digits_split_and_range():
    d = load_dataset("digits")
    assert d.train.shape == (1500, 64) and d.test.shape == (297, 64)
    assert d.kind == "intensity" and 0 <= float(d.train.min()) and float(d.train.max()) <= 1
    assert torch.bincount(d.test_labels).min() >= 25


def test_mnist_5k_split_is_stratified():
    d = load_dataset("mnist-5k")
    assert d.train.shape == (4000, 784) and d.test.shape == (1000, 784)
    assert torch.equal(torch.bincount(d.train_labels), torch.full((10,), 400))
    assert torch.equal(torch.bincount(d.test_labels), torch.full((10,), 100))


def test_linear_gaussian_records_its_generating_parameters():
    d = load_dataset("linear-gaussian")
    assert d.kind == "real" and d.train.shape == (2000, 20) and d.test.shape == (500, 20)
    assert len(d.metadata["weight"]) == 20 and len(d.metadata["weight"][0]) == 4
    assert torch.equal(d.test, load_dataset("linear-gaussian").test)      # fixed seed


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory_round_trip(tmp_path, compress):
    arrays = make_idx_dir(tmp_path, compress)
    d = load_dataset("mnist", data_dir=tmp_path)
    assert d.train.shape == (12, 12) and d.test.shape == (5, 12)
    np.testing.assert_allclose(d.train.numpy() * 255, arrays["train_images"].reshape(12, 12), atol=1e-4)
    assert torch.equal(d.test_labels, torch.as_tensor(arrays["test_labels"]))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    make_idx_dir(tmp_path, compress=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_dataset("fashion-mnist").train.shape == (12, 12)


def test_missing_files_name_dataset_paths_and_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "fashion-mnist" in message and str(tmp_path) in message and "apt-get install" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")


def test_corrupt_idx_files(tmp_path):
    bad_magic = tmp_path / "a-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "b-idx3-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataError, match="header promises"):
        read_idx(truncated)
    not_gzip = tmp_path / "c-idx3-ubyte.gz"
    not_gzip.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(not_gzip)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_binarisation_is_dynamic_for_training_and_fixed_for_evaluation():
    x = torch.full((50, 30), 0.5)
    g = torch.Generator().manual_seed(0)
    first, second = binarize(x, g), binarize(x, g)
    assert not torch.equal(first, second)
    assert torch.equal(fixed_binarization(x), fixed_binarization(x))
    check_binary(first)


def test_bernoulli_refuses_real_valued_data_and_non_binary_values():
    d = load_dataset("linear-gaussian")
    with pytest.raises(DataError, match="Bernoulli"):
        check_compatible(d, "bernoulli")
    with pytest.raises(DataError, match="not binary"):
        check_binary(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(DataError, match="NaN"):
        check_binary(torch.tensor([[0.0, float("nan")]]))
    digits = load_dataset("digits")
    assert set(evaluation_data(digits, "test", "bernoulli").unique().tolist()) == {0.0, 1.0}


def test_real_fashion_mnist_if_installed():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    d = load_dataset("fashion-mnist")
    assert d.train.shape == (60000, 784) and d.test.shape == (10000, 784)
