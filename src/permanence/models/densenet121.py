"""torchvision's DenseNet-121 adapted to small images: a 3x3 stride-1 stem and no initial pooling."""

from torch import nn
from torchvision.models import densenet121 as tv_densenet121

from permanence.models import MODELS, Classifier


@MODELS.register("densenet121")
def densenet121(in_channels: int, num_classes: int) -> Classifier:
    net = tv_densenet121(weights=None, num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    features = nn.Sequential(net.features, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(features, net.classifier)
