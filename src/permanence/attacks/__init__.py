"""Backdoor attacks, one module each, behind one registry (BackdoorBench v2 trigger conventions)."""

from __future__ import annotations

from permanence.attacks.base import Attack, PoisonedSet
from permanence.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")

from permanence.attacks import badnets, blended, wanet, sig  # noqa: E402,F401


def build_attack(name: str, *, target: int, strength: float | None, image_shape: tuple[int, int, int], seed: int,
                 **options: float) -> Attack:
    """`options`: attack-specific settings (e.g. WaNet's `cross_ratio`); each attack takes the ones it declares."""
    cls = ATTACKS.get(name, "attack.name")
    attack = cls(target=target, strength=cls.default_strength if strength is None else strength, image_shape=image_shape,
                 seed=seed)
    for key in cls.options:
        if options.get(key) is not None:
            setattr(attack, key, options[key])
    return attack


__all__ = ["ATTACKS", "Attack", "PoisonedSet", "build_attack"]
