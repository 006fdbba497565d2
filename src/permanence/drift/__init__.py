"""Drifts: batched transforms of uint8 (N, C, H, W) images parameterised by one number, identity at 0.

A schedule (`drift_parameter`) maps update k to that number. Each drift is one module that registers
a `Drift`; they wrap torchvision.transforms.v2.functional where it has the operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from permanence.registry import Registry


@dataclass(frozen=True)
class Drift:
    name: str
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    needs_color: bool = False  # hue and saturation do nothing to 1-channel images
    unit: str = ""

    def __call__(self, images: torch.Tensor, parameter: float, gen: torch.Generator) -> torch.Tensor:
        if parameter == 0:
            return images
        return self.apply(images, parameter, gen)


DRIFTS: Registry[Drift] = Registry("drift")

from permanence.drift import rotation, hue, brightness, saturation, contrast, noise  # noqa: E402,F401
from permanence.drift.schedule import drift_parameter  # noqa: E402

__all__ = ["DRIFTS", "Drift", "drift_parameter"]
