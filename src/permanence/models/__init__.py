"""Models, one module each. Every model is a `Classifier`: `features` (images -> penultimate vector)
followed by a linear `head`, so embeddings, head re-initialisation (FST) and pruning have one shape."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from permanence.registry import Registry


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Linear, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


# factory(in_channels, num_classes) -> Classifier
MODELS: Registry[Callable[[int, int], Classifier]] = Registry("model")

from permanence.models import small_cnn, resnet9, resnet18, densenet121  # noqa: E402,F401


def build_model(name: str, in_channels: int, num_classes: int) -> Classifier:
    return MODELS.get(name, "model.name")(in_channels, num_classes)


__all__ = ["MODELS", "Classifier", "build_model"]
