"""The seeded split into D0 (initial training), the update pool and the test set, resident on a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from permanence.data import DATASETS
from permanence.seeding import generator

if TYPE_CHECKING:  # config validates names against the registries, so the registries never import it
    from permanence.config import Config


@dataclass(frozen=True)
class Splits:
    d0_x: torch.Tensor
    d0_y: torch.Tensor
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per-channel, of D0 in [0, 1], shape (C,)
    std: torch.Tensor

    @property
    def channels(self) -> int:
        return self.d0_x.shape[1]

    @property
    def is_grayscale(self) -> bool:
        x = self.d0_x
        return x.shape[1] == 1 or bool((x == x[:, :1]).all())

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.d0_x.shape[2:])


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int, name: str):
    if limit is None or limit >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=generator(seed, name))[:limit]
    return x[keep], y[keep]


def _with_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or channels == x.shape[1]:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)


def load_splits(config: Config, device: torch.device | str = "cpu") -> Splits:
    cfg = config.data
    dataset = DATASETS.get(cfg.name, "data.name")(cfg, config.seed)
    x_train, y_train = _subset(dataset.x_train, dataset.y_train, cfg.limit, config.seed, "train-limit")
    x_test, y_test = _subset(dataset.x_test, dataset.y_test, cfg.test_limit, config.seed, "test-limit")
    x_train, x_test = _with_channels(x_train, cfg.channels), _with_channels(x_test, cfg.channels)
    order = torch.randperm(len(y_train), generator=generator(config.seed, "d0-split"))
    n_d0 = int(round(len(order) * cfg.d0_fraction))
    d0, pool = order[:n_d0], order[n_d0:]
    scaled = x_train[d0].float() / 255
    mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    to = lambda t: t.to(device)  # noqa: E731
    return Splits(
        to(x_train[d0]), to(y_train[d0]), to(x_train[pool]), to(y_train[pool]), to(x_test), to(y_test),
        dataset.num_classes, to(mean), to(std),
    )
