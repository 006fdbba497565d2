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
        # 0 = a pruned channel of the penultimate vector (fine-pruning). The features end with a global pool over
        # the last block's ReLU outputs, so this equals zeroing the channel after its BN and ReLU. A buffer, so it
        # travels in the state dict; a hook, so `model.features(x)` (embeddings, probes) is masked like forward.
        self.register_buffer("feature_mask", torch.ones(head.in_features))
        self.features.register_forward_hook(self._mask_features)

    def _mask_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.feature_mask.to(output.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a state dict saved before the mask existed: nothing was pruned
        state_dict.setdefault(prefix + "feature_mask", torch.ones_like(self.feature_mask))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


# factory(in_channels, num_classes) -> Classifier
MODELS: Registry[Callable[[int, int], Classifier]] = Registry("model")

from permanence.models import small_cnn, resnet9, resnet18, densenet121  # noqa: E402,F401


def build_model(name: str, in_channels: int, num_classes: int) -> Classifier:
    return MODELS.get(name, "model.name")(in_channels, num_classes)


__all__ = ["MODELS", "Classifier", "build_model"]
