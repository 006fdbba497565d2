"""Blended (Chen et al. 2017): x' = (1 - a) x + a * pattern, with a fixed pattern drawn from the study's seed."""

from __future__ import annotations

import torch

from permanence.attacks import ATTACKS
from permanence.attacks.base import Attack, to_uint8
from permanence.seeding import generator


@ATTACKS.register("blended")
class Blended(Attack):
    name = "blended"
    default_strength = 0.2
    strength_name = "blend alpha"

    def check(self) -> None:
        if not 0 < self.strength <= 1:
            self.fail("a number in (0, 1]")
        self.pattern = torch.randint(0, 256, self.image_shape, generator=generator(self.seed, "blended-pattern"), dtype=torch.uint8)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(x.device).float()
        return to_uint8((1 - self.strength) * x.float() + self.strength * pattern)
