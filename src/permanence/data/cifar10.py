"""CIFAR-10 through torchvision (ROOT/cifar-10-batches-py); downloaded only when data.download is true."""

from __future__ import annotations

from pathlib import Path

import torch

from permanence.data import DATASETS, ImageDataset
from permanence.errors import PermanenceError


@DATASETS.register("cifar10")
def load_cifar10(cfg, seed: int) -> ImageDataset:
    import torchvision.datasets

    if cfg.root is None:
        raise PermanenceError("data.root: required for data.name=cifar10 (a folder holding cifar-10-batches-py)")
    root = Path(cfg.root)
    if not root.is_dir() and not cfg.download:
        raise PermanenceError(f"data.root: folder '{root}' does not exist")
    parts = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=cfg.download)
        except RuntimeError as err:
            raise PermanenceError(f"data.root: {root}: {str(err).splitlines()[0]}") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        parts += [x, torch.tensor(ds.targets, dtype=torch.int64)]
    return ImageDataset(*parts, num_classes=10)
