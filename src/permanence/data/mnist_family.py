"""MNIST and Fashion-MNIST from their IDX files in torchvision's layout (ROOT/MNIST/raw/...).

The files are read in place, gzipped or not, so a read-only copy (like ../shared/data) works without
torchvision first extracting it; torchvision downloads them only when `data.download` is true.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from permanence.data import DATASETS, ImageDataset
from permanence.errors import PermanenceError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise PermanenceError(f"{path}: unreadable IDX file ({err.__class__.__name__})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PermanenceError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise PermanenceError(f"{path}: truncated or corrupt IDX file ({len(payload)} bytes, expected {expected})")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def _find(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise PermanenceError(f"{raw / stem}: missing (and no .gz beside it); set data.download=true to fetch it")


def _load(folder: str, torchvision_cls: str, cfg) -> ImageDataset:
    if cfg.root is None:
        raise PermanenceError(f"data.root: required for data.name={cfg.name} (a folder holding {folder}/raw)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise PermanenceError(f"data.root: folder '{root}' does not exist")
    raw = root / folder / "raw"
    if cfg.download and not raw.is_dir():
        import torchvision.datasets

        for train in (True, False):
            getattr(torchvision.datasets, torchvision_cls)(str(root), train=train, download=True)
    if not raw.is_dir():
        raise PermanenceError(f"data.root: '{root}' has no {folder}/raw folder; set data.download=true to fetch it")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(raw, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(raw, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PermanenceError(f"{raw}: {split} images and labels do not match")
        arrays[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ImageDataset(*arrays["train"], *arrays["test"], num_classes=10)


@DATASETS.register("mnist")
def load_mnist(cfg, seed: int) -> ImageDataset:
    return _load("MNIST", "MNIST", cfg)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(cfg, seed: int) -> ImageDataset:
    return _load("FashionMNIST", "FashionMNIST", cfg)
