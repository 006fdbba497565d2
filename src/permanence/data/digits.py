"""scikit-learn's 8x8 digits (1,797 real images shipped inside the package): the offline default.

Upsampled to 16x16 so that rotations and 3x3 triggers act on an image rather than on a few pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from permanence.data import DATASETS, ImageDataset
from permanence.seeding import generator

SIZE = 16
TEST_SHARE = 0.25


@DATASETS.register("digits")
def load_digits(cfg, seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = images.round().clamp(0, 255).to(torch.uint8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # digits has no official test split: hold out a fixed, seed-independent quarter
    order = torch.randperm(len(y), generator=generator(0, "digits-test-split"))
    n_test = int(len(y) * TEST_SHARE)
    test, train = order[:n_test], order[n_test:]
    return ImageDataset(x[train], y[train], x[test], y[test], num_classes=10)
