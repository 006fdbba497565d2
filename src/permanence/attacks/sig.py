"""SIG (Barni et al. 2019): clean-label; a horizontal sinusoid 40 sin(2 pi j f / m) on target-class images."""

from __future__ import annotations

import math

import torch

from permanence.attacks import ATTACKS
from permanence.attacks.base import Attack, to_uint8

FREQUENCY = 6


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"
    default_strength = 40.0
    strength_name = "sinusoid amplitude (0-255 scale)"
    clean_label = True

    def check(self) -> None:
        if not 0 < self.strength <= 255:
            self.fail("a number in (0, 255]")

    def signal(self, width: int, device: torch.device) -> torch.Tensor:
        j = torch.arange(width, device=device, dtype=torch.float32)
        return self.strength * torch.sin(2 * math.pi * j * FREQUENCY / width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x.float() + self.signal(x.shape[-1], x.device))

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        # the poisoned images are taken from the target class and keep their (correct) labels
        return y == self.target
