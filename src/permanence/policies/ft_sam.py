"""FT-SAM (Zhu et al., ICCV 2023): fine-tuning with sharpness-aware minimisation.

Each step takes two forward/backward passes: the gradient g at w gives the ascent e(w), the gradient at w + e(w)
drives the base optimiser's step from w. Plain SAM: e = rho * g / ||g||. Adaptive SAM (ASAM, Kwon et al. 2021):
e = rho * |w|^2 * g / || |w| * g ||, the step that makes || e / |w| || = rho. Norms run over all parameters at once.
Defaults follow BackdoorBench's ft-sam (defense/ft-sam.py, config/defense/ft-sam/config.yaml): adaptive, rho 2,
SGD lr 0.01 with a cosine decay, momentum 0.9, weight decay 5e-4, label smoothing 0.1. The second pass leaves the
BatchNorm running statistics alone, so they follow the real weights w only (as davda54/sam recommends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from permanence.models import Classifier
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.training import BatchStep, Runtime, batches_per_epoch, sgd, train


@torch.no_grad()
def sam_perturbation(params: list[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """The ascent step e(w) for parameters whose .grad is set (plain SAM or ASAM)."""
    scaled = [(p.abs() * p.grad if adaptive else p.grad) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + 1e-12)
    return [(p.abs() * s if adaptive else s) * scale for p, s in zip(params, scaled, strict=True)]


class SAM:
    """Wraps a base optimiser: `ascend()` after the first backward, `step()` after the second."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool) -> None:
        self.base = base
        self.rho = rho
        self.adaptive = adaptive
        self._applied: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def ascend(self) -> None:
        params = self._params()
        self._applied = list(zip(params, sam_perturbation(params, self.rho, self.adaptive), strict=True))
        for p, e in self._applied:
            p.add_(e)
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        for p, e in self._applied:
            p.sub_(e)
        self._applied = []
        self.base.step()

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch as usual but leave their running statistics unchanged."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def sam_step(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], sam: SAM,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], runtime: Runtime) -> BatchStep:
    """SAM's step for `training.train`: a forward/backward pass, the ascent to w + e(w), a second pass there (BatchNorm's
    running statistics left alone), then the base optimizer's step from w with the perturbed gradient."""

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            loss = loss_fn(forward(inputs), labels)
        sam.zero_grad()
        loss.backward()
        sam.ascend()
        with frozen_batchnorm_statistics(model):
            with runtime.autocast():
                perturbed_loss = loss_fn(forward(inputs), labels)
            perturbed_loss.backward()
        sam.step()
        return loss

    return step


@POLICIES.register("ft_sam", cost=2.3)
def ft_sam(model: Classifier, data: TrainingSet, ctx: UpdateContext) -> Classifier:
    cfg = ctx.config.update
    base = sgd(model, cfg.ft_sam.lr, cfg.momentum, cfg.weight_decay)
    total = cfg.epochs * batches_per_epoch(len(data.y), cfg.batch_size, ctx.runtime)
    scheduler = CosineAnnealingLR(base, T_max=total)
    smoothing = cfg.ft_sam.label_smoothing

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    forward = model if ctx.forward is None else ctx.forward
    step = sam_step(model, forward, SAM(base, cfg.ft_sam.rho, cfg.ft_sam.adaptive), loss_fn, ctx.runtime)
    train(model, data.x, data.y, epochs=cfg.epochs, batch_size=cfg.batch_size, runtime=ctx.runtime, gen=ctx.gen,
          scheduler=scheduler, forward=ctx.forward, on_epoch=ctx.on_epoch, step=step)
    return model
