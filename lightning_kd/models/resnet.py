"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition"), in the widths of the
CRD benchmark: ``resnet8 .. resnet110`` (16-16-32-64 channels) and ``resnet8x4``/``resnet32x4``
(32-64-128-256 channels). Depth ``6n + 2`` with ``n`` basic blocks per stage; 32x32 input, three stages at
strides 1, 2, 2, global average pooling, a linear classifier.

Shapes for resnet8x4 / resnet32x4 at 32x32: stem 32x32x32, stages 64x32x32, 128x16x16, 256x8x8,
embedding 256. ``preactN`` is the last block's residual sum before its final ReLU; ``preactN_norm`` names
that block's ``bn2``, whose output the sum adds to the shortcut. ``feature_modules``: the stem (conv1, bn1,
relu) and the three stages, as the benchmark's ``get_feat_modules``; the classifier is outside.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import init_weights, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection. ``preact`` marks the sum before the final ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(self.preact(out))


class CIFARResNet(nn.Module):
    """A CIFAR ResNet of depth ``6n + 2``.

    Args:
        depth: total depth; ``(depth - 2)`` must be divisible by 6.
        widths: channels of the stem and of the three stages.
        num_classes: size of the classifier.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_channels = widths[0]
        for index, (channels, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [BasicBlock(in_channels, channels, stride)]
            layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature_paths = {
            "stem": "relu",
            **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
            **{f"preact{i}": f"layer{i}.{blocks - 1}.preact" for i in (1, 2, 3)},
            **{f"preact{i}_norm": f"layer{i}.{blocks - 1}.bn2" for i in (1, 2, 3)},
            "embedding": "fc:input",
            "classifier": "fc",
        }
        self.feature_modules = ["conv1", "bn1", "relu", "layer1", "layer2", "layer3"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(8, _NARROW, num_classes)


@register_model
def resnet14(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(14, _NARROW, num_classes)


@register_model
def resnet20(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(20, _NARROW, num_classes)


@register_model
def resnet32(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(32, _NARROW, num_classes)


@register_model
def resnet44(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(44, _NARROW, num_classes)


@register_model
def resnet56(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(56, _NARROW, num_classes)


@register_model
def resnet110(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(110, _NARROW, num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(8, _WIDE, num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> CIFARResNet:
    return CIFARResNet(32, _WIDE, num_classes)
