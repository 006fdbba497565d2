"""A user's own images: one .npz with x_train, y_train, x_test, y_test; images uint8 (N,H,W) or (N,H,W,C)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from permanence.data import DATASETS, ImageDataset
from permanence.errors import PermanenceError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _images(path: Path, key: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise PermanenceError(f"{path}: {key} must be uint8 images, got {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise PermanenceError(f"{path}: {key} must have shape (N,H,W) or (N,H,W,C) with C 1 or 3, got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def _labels(path: Path, key: str, array: np.ndarray, n: int) -> torch.Tensor:
    if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
        raise PermanenceError(f"{path}: {key} must be {n} non-negative integer labels, got shape {array.shape} {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


@DATASETS.register("npz")
def load_npz(cfg, seed: int) -> ImageDataset:
    if cfg.root is None:
        raise PermanenceError("data.root: required for data.name=npz (the path of the .npz file)")
    path = Path(cfg.root)
    if not path.is_file():
        raise PermanenceError(f"data.root: file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in KEYS if k not in archive.files]
            if missing:
                raise PermanenceError(f"{path}: missing arrays {', '.join(missing)}; needs {', '.join(KEYS)}")
            arrays = {k: archive[k] for k in KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PermanenceError(f"{path}: not a readable .npz file ({err.__class__.__name__})") from None
    x_train = _images(path, "x_train", arrays["x_train"])
    x_test = _images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise PermanenceError(f"{path}: x_train and x_test image shapes differ ({tuple(x_train.shape[1:])} vs {tuple(x_test.shape[1:])})")
    y_train = _labels(path, "y_train", arrays["y_train"], len(x_train))
    y_test = _labels(path, "y_test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ImageDataset(x_train, y_train, x_test, y_test, num_classes=num_classes)
