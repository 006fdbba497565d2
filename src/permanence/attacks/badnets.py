"""BadNets (Gu et al. 2017): a white square in the bottom-right corner, 0 px margin."""

from __future__ import annotations

import torch

from permanence.attacks import ATTACKS
from permanence.attacks.base import Attack


@ATTACKS.register("badnets")
class BadNets(Attack):
    name = "badnets"
    default_strength = 3
    strength_name = "patch size in pixels"

    def check(self) -> None:
        size = min(self.image_shape[1:])
        if self.strength != int(self.strength) or not 1 <= self.strength <= size // 2:
            self.fail(f"a whole number from 1 to {size // 2} for {size}-pixel images")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        patch = int(self.strength)
        x = x.clone()
        x[..., -patch:, -patch:] = 255
        return x
