"""The paper's ResNet-9: FFCV's CIFAR example network (the KakaoBrain variant), logits scaled by 0.2."""

from torch import nn

from permanence.models import MODELS, Classifier
from permanence.models.layers import Residual, conv_bn


@MODELS.register("resnet9")
def resnet9(in_channels: int, num_classes: int) -> Classifier:
    features = nn.Sequential(
        conv_bn(in_channels, 64, kernel=3, padding=1),
        conv_bn(64, 128, kernel=5, stride=2, padding=2),
        Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
        conv_bn(128, 256, kernel=3, padding=1),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(conv_bn(256, 256), conv_bn(256, 256))),
        conv_bn(256, 128, kernel=3, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
    )
    return Classifier(features, nn.Linear(128, num_classes, bias=False), logit_scale=0.2)
