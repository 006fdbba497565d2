"""GTSRB through torchvision, resized to 32x32 (its images vary in size); 43 classes."""

from __future__ import annotations

from pathlib import Path

import torch

from permanence.data import DATASETS, ImageDataset
from permanence.errors import PermanenceError

SIZE = 32


@DATASETS.register("gtsrb")
def load_gtsrb(cfg, seed: int) -> ImageDataset:
    import torchvision.datasets
    from torchvision.transforms import v2

    if cfg.root is None:
        raise PermanenceError("data.root: required for data.name=gtsrb (a folder holding gtsrb/)")
    root = Path(cfg.root)
    if not root.is_dir() and not cfg.download:
        raise PermanenceError(f"data.root: folder '{root}' does not exist")
    to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize((SIZE, SIZE), antialias=True)])
    parts = []
    for split in ("train", "test"):
        try:
            ds = torchvision.datasets.GTSRB(str(root), split=split, download=cfg.download, transform=to_tensor)
        except RuntimeError as err:
            raise PermanenceError(f"data.root: {root}: {str(err).splitlines()[0]}") from None
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        parts += [torch.stack(images), torch.tensor(labels, dtype=torch.int64)]
    return ImageDataset(*parts, num_classes=43)
