"""Backdoor metrics: clean accuracy, ASR, RA, alpha-survivability and DER."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predictions == labels).float().mean().item()


def attack_success_rate(triggered_predictions: torch.Tensor, target: int) -> float:
    """Share of triggered non-target test images classified as the target."""
    if len(triggered_predictions) == 0:
        return float("nan")
    return (triggered_predictions == target).float().mean().item()


def survivability(asr: Sequence[float], last_poisoned: int, alpha: float = 0.5) -> int:
    """Consecutive versions after `last_poisoned` (an index into `asr`) whose ASR stays >= alpha."""
    count = 0
    for value in asr[last_poisoned + 1 :]:
        if not value >= alpha:
            break
        count += 1
    return count


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1]; 0.5 means no net effect."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2
