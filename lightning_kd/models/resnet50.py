"""ResNet-50 (He et al. 2016, "Deep Residual Learning for Image Recognition") with a CIFAR stem, as in the CRD
benchmark: ``ResNet50``.

The stem is a 3x3 stride-1 conv to 64 channels (BN, ReLU) with no max pooling; four stages of 3, 4, 6 and 3
bottleneck blocks (1x1, 3x3, 1x1 convs with BN; expansion 4; the stride on the 3x3 conv; a 1x1 conv + BN
projection shortcut where the shape changes) at strides 1, 2, 2, 2; global average pooling and a linear
classifier.

Feature points (the benchmark's ``is_feat`` list), shapes at 32x32:

- ``stem``: the stem after its ReLU (64 x 32 x 32);
- ``stage1..4``: each stage's output (256 x 32 x 32, 512 x 16 x 16, 1024 x 8 x 8, 2048 x 4 x 4);
- ``preact1..4``: the same before the last block's final ReLU (its residual sum); an ``nn.Identity`` named
  ``preact`` marks the point; ``preact1_norm..preact4_norm`` name that block's ``bn3`` (the sum is its
  output plus the shortcut);
- ``embedding``: the pooled 2048 features; ``classifier``: the logits.

``feature_modules`` (the benchmark's ``get_feat_modules``): conv1, bn1 and the four stages; the classifier is
outside (the stem's parameter-free ReLU, a function in the benchmark, is not listed).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import init_weights, register_model


class Bottleneck(nn.Module):
    """1x1 (BN, ReLU), 3x3 with the stride (BN, ReLU), 1x1 to ``4 * channels`` (BN), shortcut, ``preact``, ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return self.relu(self.preact(out))


class CIFARBottleneckResNet(nn.Module):
    """A bottleneck ResNet with a CIFAR stem.

    Args:
        blocks: bottleneck blocks in each of the four stages.
        num_classes: size of the classifier.
    """

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_channels = 64
        for index, (channels, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
            layers = [Bottleneck(in_channels, channels, stride)]
            in_channels = channels * Bottleneck.expansion
            layers += [Bottleneck(in_channels, channels) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        self.feature_paths = {
            "stem": "relu",
            **{f"stage{i}": f"layer{i}" for i in (1, 2, 3, 4)},
            **{f"preact{i}": f"layer{i}.{count - 1}.preact" for i, count in enumerate(blocks, start=1)},
            **{f"preact{i}_norm": f"layer{i}.{count - 1}.bn3" for i, count in enumerate(blocks, start=1)},
            "embedding": "linear:input",
            "classifier": "linear",
        }
        self.feature_modules = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def ResNet50(num_classes: int = 100) -> CIFARBottleneckResNet:  # noqa: N802  (the benchmark's name)
    return CIFARBottleneckResNet((3, 4, 6, 3), num_classes)
