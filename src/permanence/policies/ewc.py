"""Elastic weight consolidation (Kirkpatrick et al. 2017) against the previous version: fine-tune (finetune's recipe)
with CE + weight/2 * sum_i F_i (w_i - w*_i)^2, w* the version passed in, F the diagonal empirical Fisher of w*
(mean squared per-sample gradient of the log-likelihood of the given label, BatchNorm in eval mode) on
`update.ewc.samples` images of the training set w* was trained on (the one before this update's; D0 for update 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from permanence.models import Classifier
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.seeding import generator
from permanence.training import Runtime, sgd, train

Weights = dict[str, torch.Tensor]


def diagonal_fisher(model: Classifier, x: torch.Tensor, y: torch.Tensor, runtime: Runtime,
                    chunk: int = 64) -> Weights:
    """Per parameter: the mean over the images of the squared gradient of -log p(y | x) (float32, per-sample)."""
    was_training = model.training
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def nll(weights: Weights, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (weights, buffers), (image.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, len(y), chunk):
        grads = per_sample(params, runtime.prepare(x[start : start + chunk]), y[start : start + chunk])
        for name, g in grads.items():
            fisher[name] += g.pow(2).sum(0)
    model.train(was_training)
    return {name: f / max(1, len(y)) for name, f in fisher.items()}


def ewc_penalty(model: Classifier, anchor: Weights, fisher: Weights, weight: float) -> torch.Tensor:
    """weight/2 * sum_i F_i (w_i - anchor_i)^2 over the model's parameters."""
    terms = [(fisher[name] * (p - anchor[name]).pow(2)).sum() for name, p in model.named_parameters()]
    return weight / 2 * torch.stack(terms).sum()


@POLICIES.register("ewc", cost=1.9)
def ewc(model: Classifier, data: TrainingSet, ctx: UpdateContext) -> Classifier:
    cfg = ctx.config.update
    previous = ctx.history()[-2]
    pick = torch.randperm(len(previous.y), generator=generator(ctx.config.seed, "ewc", ctx.version))
    pick = pick[: cfg.ewc.samples].to(previous.y.device)
    fisher = diagonal_fisher(model, previous.x[pick], previous.y[pick], ctx.runtime)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    strength = cfg.ewc.weight

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target) + ewc_penalty(model, anchor, fisher, strength)

    optimizer = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    train(model, data.x, data.y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer,
          loss_fn=loss_fn, runtime=ctx.runtime, gen=ctx.gen, on_epoch=ctx.on_epoch, forward=ctx.forward)
    return model
