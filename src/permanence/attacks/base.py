"""What every attack provides: a trigger for test images and a way to poison a training set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from permanence.errors import PermanenceError


@dataclass(frozen=True)
class PoisonedSet:
    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # bool (N,): carries the trigger


class Attack:
    """Dirty-label, all-to-one by default: `ratio` of the non-target images get the trigger and the target label."""

    default_strength: ClassVar[float]
    strength_name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # attack-specific settings the config may set (see build_attack)

    def __init__(self, *, target: int, strength: float, image_shape: tuple[int, int, int], seed: int) -> None:
        self.target = target
        self.strength = strength
        self.image_shape = image_shape
        self.seed = seed
        self.check()

    def check(self) -> None:
        """Reject a strength that makes no sense for this attack and image size."""

    def fail(self, allowed: str) -> None:
        raise PermanenceError(f"attack.strength: {self.strength} is not a valid {self.strength_name} for {type(self).name}; allowed: {allowed}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger applied to uint8 images (N, C, H, W)."""
        raise NotImplementedError

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Which images may be poisoned: the non-target ones (dirty-label)."""
        return y != self.target

    def choose(self, y: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
        """`ratio` of the whole set, drawn from the candidates (fewer if there are not enough)."""
        candidates = self.candidates(y).nonzero().squeeze(1).cpu()
        count = min(len(candidates), round(ratio * len(y)))
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:count]]
        return pick.to(y.device)

    def poison(self, x: torch.Tensor, y: torch.Tensor, ratio: float, gen: torch.Generator) -> PoisonedSet:
        chosen = self.choose(y, ratio, gen)
        x, y = x.clone(), y.clone()
        x[chosen] = self.apply(x[chosen])
        if not self.clean_label:
            y[chosen] = self.target
        mask = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        mask[chosen] = True
        return PoisonedSet(x, y, mask)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)
