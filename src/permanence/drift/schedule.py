"""Drift schedules: the drift parameter of model version k (version 0 = M0 sees no drift)."""

from __future__ import annotations


def drift_parameter(schedule: str, k: int, delta: float, at_update: int = 5, period: int = 4) -> float:
    if k < 0:
        raise ValueError(f"update index must be >= 0, got {k}")
    if schedule == "linear":  # the paper's: k * delta
        return k * delta
    if schedule == "sudden":  # nothing, then a jump of delta that stays
        return delta if k >= at_update else 0.0
    if schedule == "recurring":  # up by delta for `period` updates, back down, and again
        phase = k % (2 * period)
        return delta * (phase if phase <= period else 2 * period - phase)
    raise ValueError(f"drift.schedule: unknown schedule {schedule!r}; allowed: linear, sudden, recurring")
