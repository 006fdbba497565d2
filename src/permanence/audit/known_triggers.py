"""Known triggers: every registered attack's published default trigger, tried against every class as target.

For each attack (permanence.attacks.ATTACKS, default strength) the clean images are triggered once and
classified once; for each class t the ASR is the share of the images not of class t that the trigger sends
to t. Flagged when the best (attack, target) ASR is >= `threshold`.

A trigger drawn from a seed (Blended's pattern, WaNet's warp grid) is only known when its seed is: pass
`seeds={"blended": 7, ...}`; without one such an attack is skipped (reported in `extras["skipped"]`), never
guessed. Which attacks are seeded is measured, not listed: an attack whose trigger changes with the seed it
is built with is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from permanence.attacks import ATTACKS, Attack, build_attack
from permanence.audit import CHECKS
from permanence.audit.base import AuditData, CheckResult, model_device, predict_labels
from permanence.errors import PermanenceError
from permanence.seeding import generator


def is_seeded(name: str, image_shape: tuple[int, int, int]) -> bool:
    """Does the attack's trigger depend on the seed it is built with? (Two seeds, one random probe image.)"""
    probe = torch.randint(0, 256, (2, *image_shape), generator=generator(0, "known-triggers-seed-probe"),
                          dtype=torch.uint8)
    a, b = (build_attack(name, target=0, strength=None, image_shape=image_shape, seed=s) for s in (0, 1))
    return not torch.equal(a.apply(probe), b.apply(probe))


def success_by_target(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      unless_predicted: torch.Tensor | None = None) -> list[float]:
    """ASR for each class t as the target: the share of the images not of class t that are predicted t. With
    `unless_predicted` (the model's predictions without the trigger), only among the images it does not already
    predict as t: what the trigger causes, not the model's own leaning to t (an undertrained model that predicts t
    for most clean images has a high ASR to t for any trigger, and none caused)."""
    out = []
    for t in range(num_classes):
        victims = labels != t
        if unless_predicted is not None:
            victims &= unless_predicted != t
        out.append((predictions[victims] == t).float().mean().item() if bool(victims.any()) else math.nan)
    return out


@CHECKS.register("known_triggers")
def known_triggers(model: nn.Module, data: AuditData, *, seeds: Mapping[str, int] | None = None,
                   threshold: float = 0.5, attacks: list[str] | None = None) -> CheckResult:
    """Flags when a known trigger sends at least `threshold` of the images the model gets right without it (or
    at least does not predict as the target) to one target class (`success_by_target` unless predicted). `numbers`: flagged, asr (the
    best trigger's plain ASR), caused (its caused share), clean_rate (the clean non-target images the model predicts
    as that target anyway), target, tried, skipped. `extras`: `table` [(attack, target, asr, caused)] for every attack
    tried and every class, `skipped` {attack: why}, `top` (attack, target, asr, caused) of the best or None."""
    if not 0 < threshold <= 1:
        raise PermanenceError(f"known_triggers: threshold is {threshold}; allowed: a number in (0, 1]")
    seeds = dict(seeds or {})
    for name in seeds:
        ATTACKS.get(name, "known_triggers.seeds")
    names = ATTACKS.names() if attacks is None else list(attacks)
    for name in names:
        ATTACKS.get(name, "known_triggers.attacks")
    data = data.to(model_device(model))
    table: list[tuple[str, int, float, float]] = []
    skipped: dict[str, str] = {}
    clean = predict_labels(model, data.images)
    clean_rate = success_by_target(clean, data.labels, data.num_classes)
    for name in names:
        seeded = is_seeded(name, data.image_shape)
        if seeded and name not in seeds:
            skipped[name] = "its trigger is drawn from a seed and none was given"
            continue
        try:
            attack: Attack = build_attack(name, target=0, strength=None, image_shape=data.image_shape,
                                          seed=seeds.get(name, 0))
        except PermanenceError as err:  # e.g. a default patch too big for tiny images
            skipped[name] = str(err)
            continue
        predictions = predict_labels(model, attack.apply(data.images))
        asrs = success_by_target(predictions, data.labels, data.num_classes)
        caused = success_by_target(predictions, data.labels, data.num_classes, unless_predicted=clean)
        table.extend((name, target, asr, share) for target, (asr, share) in enumerate(zip(asrs, caused)))
    valid = [row for row in table if not math.isnan(row[3])]
    top = max(valid, key=lambda row: (row[3], row[2])) if valid else None
    flagged = top is not None and top[3] >= threshold
    numbers = {
        "flagged": float(flagged), "asr": top[2] if top else math.nan, "caused": top[3] if top else math.nan,
        "clean_rate": clean_rate[top[1]] if top else math.nan, "target": float(top[1]) if top else -1.0,
        "tried": float(len(names) - len(skipped)), "skipped": float(len(skipped)),
    }
    if top is None:
        reason = "no known trigger could be tried (" + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")"
    else:
        verb = "flags" if flagged else "does not flag"
        reason = (f"best known trigger {top[0]} -> class {top[1]} reaches ASR {top[2]:.2f} (sends {top[3]:.2f} of the "
                  f"images not already predicted {top[1]}; clean images predicted {top[1]}: {clean_rate[top[1]]:.2f}); "
                  f"{verb} at threshold {threshold}")
    extras = {"table": table, "skipped": skipped, "top": top}
    if top is not None:
        extras["attack"] = top[0]
    return CheckResult("known_triggers", flagged, numbers, reason, extras)
