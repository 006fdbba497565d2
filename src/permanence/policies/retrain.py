"""Retrain from scratch, with the initial-training recipe, on all data seen so far (D0 and every update)."""

import torch

from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.training import fit_from_scratch


@POLICIES.register("retrain", cost=8.3)
def retrain(model, data: TrainingSet, ctx: UpdateContext):
    seen = ctx.history()
    x = torch.cat([s.x for s in seen])
    y = torch.cat([s.y for s in seen])
    fresh = ctx.fresh_model()
    fit_from_scratch(fresh, x, y, ctx.config.train, ctx.runtime, ctx.gen, ctx.on_epoch)
    return fresh
