"""torchvision's ResNet-18 adapted to small images: a 3x3 stride-1 stem and no max-pool."""

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from permanence.models import MODELS, Classifier


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int) -> Classifier:
    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    head, net.fc = net.fc, nn.Identity()
    features = nn.Sequential(net, nn.Flatten())
    return Classifier(features, head)
