"""The training loop: data stays on the device as uint8, batches are sliced from a seeded permutation,
normalised on the fly, in channels_last (faster on CUDA and with oneDNN on the CPU), with bf16 autocast where the
runtime says so."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EpochCallback = Callable[[int, int, float], None]  # (epoch, epochs, mean loss)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    bf16: bool
    drop_ragged: bool = False  # fixed batch shapes, for torch.compile

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255).sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))
        return x.contiguous(memory_format=self.memory_format)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)


def batches_per_epoch(n: int, batch_size: int, runtime: Runtime) -> int:
    full, ragged = divmod(n, batch_size)
    return full + (1 if ragged >= 2 and not runtime.drop_ragged else 0) or 1


BatchStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prepared inputs, labels) -> the batch's loss


def optimizer_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], runtime: Runtime) -> BatchStep:
    """The plain step: one forward and backward pass, then the optimizer."""

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            loss = loss_fn(forward(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    runtime: Runtime,
    gen: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_epoch: EpochCallback | None = None,
    step: BatchStep | None = None,
) -> float:
    """Train in place for `epochs`; returns the last epoch's mean loss. The scheduler steps per batch. `step` replaces
    the plain optimizer step (e.g. SAM's two passes); by default it is `optimizer_step` with `optimizer`."""
    forward = model if forward is None else forward
    step = step or optimizer_step(forward, optimizer, loss_fn, runtime)
    model.train()
    n = len(y)
    steps = batches_per_epoch(n, batch_size, runtime)
    loss_value = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        total = torch.zeros((), device=x.device)
        for batch in range(steps):
            idx = order[batch * batch_size : (batch + 1) * batch_size]
            loss = step(runtime.prepare(x[idx]), y[idx])
            if scheduler is not None:
                scheduler.step()
            total += loss.detach()
        loss_value = (total / steps).item()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, loss_value)
    return loss_value


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        with runtime.autocast():
            out.append(model(runtime.prepare(images[start : start + batch_size])).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=images.device)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features (float32, on the CPU), e.g. for drift detection."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        with runtime.autocast():
            out.append(model.features(runtime.prepare(images[start : start + batch_size])).float().cpu())
    return torch.cat(out)


def warmup_fraction(total_steps: int) -> float:
    """The one-cycle schedule's warm-up: a quarter of the steps. torch's OneCycleLR divides by zero when the warm-up
    ends exactly at step 0 (a quarter of 4 steps: tiny data), so 4 steps warm up over 2."""
    return 0.5 if 0.25 * total_steps == 1 else 0.25


def fit_from_scratch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, runtime: Runtime,
                     gen: torch.Generator, on_epoch: EpochCallback | None = None, forward=None) -> float:
    """The initial-training recipe (config section `train`): SGD with a constant or one-cycle lr."""
    optimizer = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = None
    if cfg.schedule == "onecycle":
        total = cfg.epochs * batches_per_epoch(len(y), cfg.batch_size, runtime)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                        pct_start=warmup_fraction(total))
    loss_fn = F.cross_entropy
    if cfg.label_smoothing:
        loss_fn = lambda logits, target: F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)  # noqa: E731
    return train(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer, runtime=runtime,
                 gen=gen, scheduler=scheduler, loss_fn=loss_fn, forward=forward, on_epoch=on_epoch)
