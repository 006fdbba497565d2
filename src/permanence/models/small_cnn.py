"""A small CNN with BatchNorm (32-64-128, pooling early, global max-pool like ResNet-9): fast on the CPU."""

from torch import nn

from permanence.models import MODELS, Classifier
from permanence.models.layers import conv_bn


@MODELS.register("small_cnn")
def small_cnn(in_channels: int, num_classes: int) -> Classifier:
    features = nn.Sequential(
        conv_bn(in_channels, 32),
        nn.MaxPool2d(2),
        conv_bn(32, 64),
        nn.MaxPool2d(2),
        conv_bn(64, 128),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    return Classifier(features, nn.Linear(128, num_classes))
