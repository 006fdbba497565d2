"""Update policies: how a deployed model is refreshed on each update's data. One module each.

A policy is a callable (model, data, ctx) -> model. `static` returns the model untouched. Its registration may give
its `cost`: the seconds of one update relative to `finetune`'s (1, the default), as `bench/policies.py` measured
them on digits (bench/results/policies_cost_digits.log); a sweep starts its costliest timelines first by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from permanence.models import Classifier
from permanence.registry import Registry
from permanence.training import EpochCallback, Runtime

if TYPE_CHECKING:  # config validates names against the registries, so the registries never import it
    from permanence.config import Config


@dataclass(frozen=True)
class TrainingSet:
    """One version's training data: drifted and, where the schedule says, poisoned."""

    version: int
    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # bool mask
    drift: float

    @property
    def is_poisoned(self) -> bool:
        return bool(self.poisoned.any())


@dataclass(frozen=True)
class UpdateContext:
    version: int
    config: Config
    runtime: Runtime
    gen: torch.Generator
    fresh_model: Callable[[], Classifier]
    history: Callable[[], list[TrainingSet]]  # every training set up to and including this version's
    on_epoch: EpochCallback | None = None
    forward: Callable | None = None


Policy = Callable[[Classifier, TrainingSet, UpdateContext], Classifier]

POLICIES: Registry[Policy] = Registry("policy")

from permanence.policies import (  # noqa: E402,F401
    finetune, stlr, retrain, static, fst, ft_sam, fine_pruning, replay, ewc,
)

__all__ = ["POLICIES", "Policy", "TrainingSet", "UpdateContext"]
