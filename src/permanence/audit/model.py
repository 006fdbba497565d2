"""The audit's model interface: float images in [0, 1], (N, C, H, W) -> class scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InputNormalized(nn.Module):
    """A project `Classifier` (trained on `(x/255 - mean) / std`, channels_last) behind the audit interface.

    `mean` and `std` are per-channel statistics of D0 in [0, 1] (`Splits.mean`, `Splits.std`), kept as buffers so
    they travel with `state_dict()` and `.to(device)`.
    """

    def __init__(self, classifier: nn.Module, mean: Tensor | list[float], std: Tensor | list[float]) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        return self.classifier(x.contiguous(memory_format=torch.channels_last))
