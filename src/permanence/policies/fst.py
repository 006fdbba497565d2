"""Feature shift tuning (Min et al., NeurIPS 2023): re-initialise the linear head, then fine-tune everything with
CE + alpha * <W, W_previous>, projecting W back to the norm of W_previous after every optimiser step.

Following the authors' code (AISafety-HKUST/stable_backdoor_purification, fine_tune/fst.py): weight and bias are
re-drawn from nn.Linear's default range U(-1/sqrt(in), 1/sqrt(in)); the bias takes no part in the inner product or
the projection; every parameter shares one lr with a cosine decay (here per step, over `update.fst.epochs` epochs,
by default `update.epochs`). As in BackdoorBench's port (defense/fst.py), W is also projected right after the
re-initialisation, so the norm constraint holds from the first step. Momentum and weight decay are the pipeline's
(`update.momentum`, `update.weight_decay`), as in finetune; the authors' SGD has momentum 0.9 and no weight decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from permanence.models import Classifier
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.seeding import generator
from permanence.training import batches_per_epoch, sgd, train


@torch.no_grad()
def reinitialise_head(head: nn.Linear, gen: torch.Generator) -> None:
    """Re-draw weight and bias from U(-1/sqrt(in_features), 1/sqrt(in_features)) with a CPU generator."""
    bound = 1 / math.sqrt(head.in_features)
    for param in (head.weight, head.bias):
        if param is not None:
            param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


@torch.no_grad()
def project_to_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    weight.mul_(norm / weight.norm())


@POLICIES.register("fst", cost=1.1)
def fst(model: Classifier, data: TrainingSet, ctx: UpdateContext) -> Classifier:
    cfg = ctx.config.update
    head = model.head
    previous = head.weight.detach().clone()
    norm = previous.norm()
    reinitialise_head(head, generator(ctx.config.seed, "fst-head", ctx.version))
    project_to_norm(head.weight, norm)

    optimizer = sgd(model, cfg.fst.lr, cfg.momentum, cfg.weight_decay)
    optimizer.register_step_post_hook(lambda *_: project_to_norm(head.weight, norm))
    epochs = cfg.fst.epochs or cfg.epochs
    total = epochs * batches_per_epoch(len(data.y), cfg.batch_size, ctx.runtime)
    scheduler = CosineAnnealingLR(optimizer, T_max=total)
    # the inner product of the classifiers that make the logits, s*W and s*W_previous (s = the model's logit scale),
    # so alpha weighs it against CE as in Min et al.'s unscaled models
    alpha = cfg.fst.alpha * model.logit_scale**2

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target) + alpha * (head.weight * previous).sum()

    train(model, data.x, data.y, epochs=epochs, batch_size=cfg.batch_size, optimizer=optimizer,
          scheduler=scheduler, loss_fn=loss_fn, runtime=ctx.runtime, gen=ctx.gen, on_epoch=ctx.on_epoch,
          forward=ctx.forward)
    return model
