"""Blind backdoor audit: checks that scan a model for a backdoor without knowing its trigger. One module each.

A check is `run(model, data, **options) -> CheckResult`. `model` is any torch module mapping float images
in [0, 1], shape (N, C, H, W), to class scores (wrap a project `Classifier` in `InputNormalized`); `data`
holds clean images and labels only. A check never sees the simulator's attack, target or seed: what it
knows of a trigger is what it recovers itself, or what it is explicitly told (`known_triggers`' `seeds`).
`verdict.decide` turns the checks' numbers (plus, optionally, dormancy-probe numbers) into one verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from permanence.audit.base import AuditData, Check, CheckResult, model_device, predict_labels
from permanence.audit.model import InputNormalized
from permanence.registry import Registry

CHECKS: Registry[Check] = Registry("check")

from permanence.audit import neural_cleanse, known_triggers, strip, dormancy  # noqa: E402,F401
from permanence.audit.verdict import VERDICTS, Verdict, decide  # noqa: E402


def run_checks(model: nn.Module, data: AuditData, checks: Mapping[str, Mapping[str, Any]]) -> dict[str, CheckResult]:
    """Run each named check with its options ({"neural_cleanse": {"seed": 0}, "known_triggers": {}}), in order."""
    return {name: CHECKS.get(name, "audit check")(model, data, **dict(options)) for name, options in checks.items()}


__all__ = [
    "CHECKS", "VERDICTS", "AuditData", "Check", "CheckResult", "InputNormalized", "Verdict", "decide",
    "model_device", "predict_labels", "run_checks",
]
