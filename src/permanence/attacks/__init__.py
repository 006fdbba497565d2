"""Backdoor attacks, one module each, behind one registry (BackdoorBench v2 trigger conventions)."""

from __future__ import annotations

from permanence.attacks.base import Attack, PoisonedSet
from permanence.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")

from permanence.attacks import badnets, blended, wanet, sig  # noqa: E402,F401


def build_attack(name: str, *, target: int, strength: float | None, image_shape: tuple[int, int, int], seed: int) -> Attack:
    cls = ATTACKS.get(name, "attack.name")
    return cls(target=target, strength=cls.default_strength if strength is None else strength, image_shape=image_shape, seed=seed)


__all__ = ["ATTACKS", "Attack", "PoisonedSet", "build_attack"]
