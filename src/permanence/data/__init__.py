"""Datasets: each loader turns a DataConfig into uint8 NCHW tensors; `split` makes D0, pool and test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from permanence.registry import Registry


@dataclass(frozen=True)
class ImageDataset:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset")

# Importing the modules registers their loaders.
from permanence.data import digits, mnist_family, cifar10, gtsrb, npz  # noqa: E402,F401
from permanence.data.split import Splits, load_splits  # noqa: E402

__all__ = ["DATASETS", "ImageDataset", "Splits", "load_splits"]
