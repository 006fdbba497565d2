import gzip

import numpy as np
import pytest
import torch

from permanence import build_config
from permanence.data import load_splits
from permanence.errors import PermanenceError


def test_digits_is_embedded_and_split_reproducibly():
    cfg = build_config({}, [])
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.d0_x.dtype == torch.uint8 and a.d0_x.shape[1:] == (1, 16, 16)
    assert torch.equal(a.d0_y, b.d0_y) and torch.equal(a.pool_y, b.pool_y)
    assert abs(len(a.d0_y) - len(a.pool_y)) <= 1
    assert len(a.d0_y) + len(a.pool_y) + len(a.test_y) == 1797


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 255, (300, 12, 12), dtype=np.uint8), y_train=rng.integers(0, 4, 300),
        x_test=rng.integers(0, 255, (80, 12, 12), dtype=np.uint8), y_test=rng.integers(0, 4, 80),
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_dataset_loads(tmp_path):
    path = _write_npz(tmp_path / "mine.npz")
    splits = load_splits(build_config({}, ["data.name=npz", f"data.root={path}"]))
    assert splits.num_classes == 4 and splits.d0_x.shape[1:] == (1, 12, 12)


@pytest.mark.parametrize("overrides,pattern", [
    ({"y_test": None}, "missing arrays y_test"),
    ({"x_train": np.zeros((300, 12, 12), dtype=np.float32)}, "x_train must be uint8"),
    ({"y_train": np.zeros(10, dtype=np.int64)}, "y_train must be 300 non-negative integer labels"),
])
def test_bad_npz_is_named(tmp_path, overrides, pattern):
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(PermanenceError, match=pattern):
        load_splits(build_config({}, ["data.name=npz", f"data.root={path}"]))


def test_corrupt_npz_file(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(PermanenceError, match=r"corrupt\.npz: not a readable \.npz file"):
        load_splits(build_config({}, ["data.name=npz", f"data.root={path}"]))


def test_missing_data_root(tmp_path):
    with pytest.raises(PermanenceError, match="data.root: folder '.*nowhere' does not exist"):
        load_splits(build_config({}, ["data.name=mnist", f"data.root={tmp_path / 'nowhere'}"]))


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, n_train=400, n_test=100, truncate=False):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    if truncate:
        path = raw / "train-images-idx3-ubyte.gz"
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[:-100]))


def test_mnist_reads_gzipped_idx_in_place(tmp_path):
    _fake_mnist(tmp_path)
    splits = load_splits(build_config({}, ["data.name=mnist", f"data.root={tmp_path}"]))
    assert splits.d0_x.shape[1:] == (1, 28, 28) and len(splits.test_y) == 100


def test_truncated_mnist_file_is_named(tmp_path):
    _fake_mnist(tmp_path, truncate=True)
    with pytest.raises(PermanenceError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt IDX file"):
        load_splits(build_config({}, ["data.name=mnist", f"data.root={tmp_path}"]))
