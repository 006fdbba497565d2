"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the last convolutional block's channels that are least
active on the data at hand, then fine-tune (finetune's recipe).

A channel is pruned by a zero in `Classifier.feature_mask` (the penultimate vector is a global pool over the last
block's ReLU outputs, so this is the same as removing the channel). Activity is the mean pooled activation over the
update's images; channels go in increasing order of it, at most `ratio` of all channels per update, and pruning
stops before the accuracy on the update data falls more than `max_acc_drop` below its value at the start of this
update's pruning (Liu et al.'s stopping rule; BackdoorBench's defense/fp.py prunes the same penultimate vector with
the same rule, on clean data held out by the defender). The mask only gains zeros: a channel pruned stays pruned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from permanence.models import Classifier
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.policies.finetune import finetune
from permanence.training import Runtime, embed


def _accuracy(model: Classifier, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    weight = model.head.weight.detach().float().cpu()
    bias = None if model.head.bias is None else model.head.bias.detach().float().cpu()
    # the logit scale is positive, so it cannot change the arg-max
    return (F.linear(features * mask, weight, bias).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def prune_least_active(model: Classifier, data: TrainingSet, runtime: Runtime, ratio: float,
                       max_acc_drop: float, batch_size: int = 1024) -> torch.Tensor:
    """Zero the mask of the least active still-active channels; returns the indices pruned now."""
    mask = model.feature_mask.detach().float().cpu()
    features = embed(model, data.x, runtime, batch_size)  # masked, so pruned channels read as 0
    labels = data.y.cpu()
    active = mask.nonzero().flatten()
    activity = features[:, active].mean(0)
    order = active[torch.sort(activity, stable=True).indices]
    budget = min(round(ratio * mask.numel()), len(active) - 1)  # keep at least one channel
    start = _accuracy(model, features, mask, labels)
    pruned = 0
    for count in range(1, budget + 1):
        trial = mask.clone()
        trial[order[:count]] = 0
        if start - _accuracy(model, features, trial, labels) > max_acc_drop:
            break
        pruned = count
    chosen = order[:pruned]
    model.feature_mask[chosen.to(model.feature_mask.device)] = 0
    return chosen


@POLICIES.register("fine_pruning", cost=1.3)
def fine_pruning(model: Classifier, data: TrainingSet, ctx: UpdateContext) -> Classifier:
    cfg = ctx.config.update.fine_pruning
    prune_least_active(model, data, ctx.runtime, cfg.ratio, cfg.max_acc_drop)
    return finetune(model, data, ctx)
