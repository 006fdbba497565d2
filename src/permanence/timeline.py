"""A Timeline: one record per model version, plus (optionally) each version's weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from permanence.metrics import survivability

PROBE_FIELDS = ("p_asr", "p_asr_clean", "reactivated_asr", "reactivated_asr_clean", "bec")


@dataclass(frozen=True)
class VersionRecord:
    version: int  # 0 = M0, k = after update k
    drift: float
    poisoned: bool
    clean_acc: float
    asr: float
    ra: float
    train_seconds: float
    eval_seconds: float
    n_train: int
    n_poisoned: int
    updated: bool = True  # False: a drift-triggered pipeline skipped this update and kept the previous weights
    # dormancy probes (permanence.dormancy), None where not run; each *_clean is the never-poisoned baseline's
    p_asr: float | None = None
    p_asr_clean: float | None = None
    reactivated_asr: float | None = None
    reactivated_asr_clean: float | None = None
    bec: float | None = None
    probe_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timeline:
    records: list[VersionRecord] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    alpha: float = 0.5

    @property
    def last_poisoned(self) -> int | None:
        poisoned = [r.version for r in self.records if r.poisoned]
        return max(poisoned) if poisoned else None

    def column(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.records]

    def survivability(self, alpha: float | None = None) -> int | None:
        last = self.last_poisoned
        if last is None:
            return None
        return survivability(self.column("asr"), last, self.alpha if alpha is None else alpha)

    @property
    def asr_injected(self) -> float | None:
        last = self.last_poisoned
        return None if last is None else self.records[last].asr

    def summary(self) -> dict[str, Any]:
        final = self.records[-1]
        probes = {f"{name}_final": getattr(final, name) for name in PROBE_FIELDS if getattr(final, name) is not None}
        return {
            "versions": len(self.records),
            "alpha": self.alpha,
            "survivability": self.survivability(),
            "last_poisoned_version": self.last_poisoned,
            "asr_injected": self.asr_injected,
            "clean_acc_initial": self.records[0].clean_acc,
            "clean_acc_final": final.clean_acc,
            "asr_final": final.asr,
            "train_seconds": sum(r.train_seconds for r in self.records),
            "eval_seconds": sum(r.eval_seconds for r in self.records),
            **probes,
        }

    def rows(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]
