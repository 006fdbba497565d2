"""WaNet (Nguyen & Tran 2021): an imperceptible warp; noise-mode samples get a random extra warp and keep labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from permanence.attacks import ATTACKS
from permanence.attacks.base import Attack, PoisonedSet, to_uint8
from permanence.seeding import generator

GRID_K = 4


@ATTACKS.register("wanet")
class WaNet(Attack):
    name = "wanet"
    default_strength = 0.5
    strength_name = "warp strength s"
    options = ("cross_ratio",)
    cross_ratio: float = 2.0  # noise-mode samples per poisoned sample (BackdoorBench's cross_ratio); 0: no noise mode

    def check(self) -> None:
        if not 0 < self.strength <= 10:
            self.fail("a number in (0, 10]")
        height, width = self.image_shape[1:]
        control = torch.rand(1, 2, GRID_K, GRID_K, generator=generator(self.seed, "wanet-grid")) * 2 - 1
        control = control / control.abs().mean()
        field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.identity = torch.stack((xs, ys), dim=2)[None]
        self.grid = (self.identity + self.strength * field / height).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        warped = F.grid_sample(x.float(), grid.to(x.device).expand(len(x), -1, -1, -1), align_corners=True)
        return to_uint8(warped)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x
        return self._warp(x, self.grid)

    def poison(self, x: torch.Tensor, y: torch.Tensor, ratio: float, gen: torch.Generator) -> PoisonedSet:
        poisoned = super().poison(x, y, ratio, gen)
        free = (~poisoned.poisoned).nonzero().squeeze(1).cpu()
        count = min(len(free), round(self.cross_ratio * int(poisoned.poisoned.sum())))
        noisy = free[torch.randperm(len(free), generator=gen)[:count]].to(x.device)
        if count:
            height = self.image_shape[1]
            jitter = (torch.rand(count, *self.grid.shape[1:], generator=gen) * 2 - 1) / height
            grid = (self.grid + jitter).clamp(-1, 1).to(x.device)
            images = poisoned.x.clone()
            warped = F.grid_sample(images[noisy].float(), grid, align_corners=True)
            images[noisy] = to_uint8(warped)
            poisoned = PoisonedSet(images, poisoned.y, poisoned.poisoned)
        return poisoned
