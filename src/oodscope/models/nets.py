"""Reference networks. Every network ends in an ``nn.Linear`` attribute ``fc`` so that
`oodscope.extract` takes the head's input as the penultimate features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18Cifar", "SmallCNN"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv blocks (BatchNorm, ReLU, max-pool) and a two-layer head; 28x28 inputs by
    default (``image_size`` sets the square input side).

    Small enough to train on Fashion-MNIST on two CPU cores in a few minutes (see
    `oodscope.train.reference` for the recipe and its accuracy). The features are the
    ``feature_dim``-wide ReLU output that feeds ``fc``.

    ``feature_norm=True`` puts a BatchNorm between the penultimate linear layer and its
    ReLU. Without it about half of the penultimate units die early in Adam training (never
    active on any training image), which caps the rank of the features that KNN, ViM and
    the Gaussian detectors work on; the reference recipes turn it on. The default stays
    ``False`` so checkpoints written before the option existed still load.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 feature_dim: int = 128, dropout: float = 0.0, image_size: int = 28,
                 feature_norm: bool = False):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), nn.MaxPool2d(2),          # 28 -> 14
            _conv_bn(w, 2 * w), nn.MaxPool2d(2),                # 14 -> 7
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),            # 7 -> 3
        )
        side = image_size // 8  # three 2x2 max-pools (28 -> 14 -> 7 -> 3)
        if side < 1:
            raise ValueError(f"SmallCNN needs images of at least 8x8 pixels, got image_size={image_size}.")
        linear = nn.Linear(4 * w * side * side, feature_dim, bias=not feature_norm)  # BN has the bias
        norm = [nn.BatchNorm1d(feature_dim)] if feature_norm else []
        self.embed = nn.Sequential(nn.Flatten(), linear, *norm, nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al., 2016, CIFAR variant): a 3x3 stride-1 stem and
    no initial max-pool, four stages of two basic blocks, global average pooling, ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
