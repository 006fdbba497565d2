"""What every audit check shares: the clean data it gets, the result it returns, batched predictions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from permanence.errors import PermanenceError


@dataclass(frozen=True)
class AuditData:
    """Clean images (uint8, (N, C, H, W)) and labels (int64, (N,)): all a check knows of the data."""

    images: Tensor
    labels: Tensor
    num_classes: int

    @classmethod
    def from_images(cls, images: Tensor, labels: Tensor, num_classes: int | None = None) -> AuditData:
        """Accepts uint8 images or float images in [0, 1]; `num_classes` defaults to max(label) + 1."""
        if images.dim() != 4:
            raise PermanenceError(f"audit data: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise PermanenceError(f"audit data: {len(images)} images but {len(labels)} labels")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise PermanenceError(f"audit data: images must be uint8 or float in [0, 1], got {images.dtype}")
            images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        labels = labels.long()
        classes = int(labels.max()) + 1 if num_classes is None else num_classes
        return cls(images, labels, classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> AuditData:
        return AuditData(self.images.to(device), self.labels.to(device), self.num_classes)

    def split(self, held_out: float, gen: torch.Generator) -> tuple[AuditData, AuditData]:
        """A seeded split into (work, held-out): what a check optimises on and what it measures on."""
        order = torch.randperm(len(self.labels), generator=gen).to(self.labels.device)
        n_held = int(round(len(order) * held_out))
        pick = lambda idx: AuditData(self.images[idx], self.labels[idx], self.num_classes)  # noqa: E731
        return pick(order[n_held:]), pick(order[:n_held])


@dataclass(frozen=True)
class CheckResult:
    """A check's verdict on one model: `flagged`, the scalars that decided it and the check's own extras.

    `numbers` always holds `flagged` (0/1), `asr` (the success rate of the trigger the check found, NaN when it
    found none) and `target` (its target class, -1 when none): what `verdict.decide` reads.
    """

    check: str
    flagged: bool
    numbers: dict[str, float]
    reason: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def asr(self) -> float:
        return self.numbers["asr"]

    @property
    def target(self) -> int | None:
        target = int(self.numbers["target"])
        return None if target < 0 else target


Check = Callable[..., CheckResult]  # (model, data: AuditData, **options) -> CheckResult


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def as_float(images: Tensor) -> Tensor:
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


# oneDNN is fastest per image at small batches on this project's CPUs (bench/cpu_step.py)
EVAL_BATCH = 128


@torch.no_grad()
def predict_labels(model: nn.Module, images: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """Predicted classes of uint8 or [0, 1] float images, in eval mode (the model's own mode restored)."""
    was_training = model.training
    model.eval()
    try:
        out = [model(as_float(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=images.device)


def success_rate(predictions: Tensor, labels: Tensor, target: int) -> float:
    """Share of the images not of class `target` that are classified as `target` (NaN when there are none)."""
    victims = labels != target
    if not bool(victims.any()):
        return float("nan")
    return (predictions[victims] == target).float().mean().item()


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the convolution before it (torch.fx), ~30% faster
    forward + backward on the CPU; the model itself when it cannot be traced (a foreign model may not be)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception:  # noqa: BLE001: any tracing failure just means no speed-up
        return model
