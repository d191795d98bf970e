"""ShuffleNet (Zhang et al. 2018, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices") for CIFAR, as in the CRD benchmark: ``ShuffleV1``, 3 groups, stage widths 240, 480, 960 with 4, 8
and 4 units.

A 1x1 conv stem to 24 channels (BN, ReLU; no pooling), three stages whose first unit has stride 2 and
concatenates its branch with a 3x3 average-pooled shortcut, the other units adding an identity shortcut;
global average pooling and a linear classifier. A unit: grouped 1x1 conv to a quarter of its output width
(ungrouped, and then not shuffled, when it reads the 24-channel stem), BN, ReLU, channel shuffle, 3x3
depthwise conv (BN, ReLU: unlike the paper's unit, the benchmark's has a ReLU here), grouped 1x1 conv (BN),
shortcut, ReLU.

Feature points (the benchmark's ``is_feat`` list), shapes at 32x32:

- ``stem``: the stem after its ReLU (24 x 32 x 32);
- ``stage1..3``: each stage's output (240 x 16 x 16, 480 x 8 x 8, 960 x 4 x 4);
- ``preact1..3``: the same before the last unit's final ReLU (its residual sum); an ``nn.Identity`` named
  ``preact`` marks the point; ``preact1_norm..preact3_norm`` name that unit's ``bn3`` (the sum is its output
  plus the identity shortcut). The benchmark declares no such BNs for ShuffleNet (its OFD support raises);
- ``embedding``: the pooled 960 features; ``classifier``: the logits.

``feature_modules`` (the benchmark's ``get_feat_modules``): conv1, bn1 and the three stages; the classifier is
outside (the stem's parameter-free ReLU, a function in the benchmark, is not listed).

The benchmark's ShuffleNets keep PyTorch's default initialisation, and so do these.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kd.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups: (B, g * c, H, W) -> (B, c * g, H, W), transposed."""
    if groups == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """One ShuffleNet unit; with stride 2 its branch gives ``out_channels - in_channels`` channels and the
    average-pooled input is concatenated to them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels - in_channels if stride == 2 else out_channels
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 ShuffleNet unit must keep its channel count")
        mid = branch // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.relu1(self.bn1(self.conv1(x))), self.first_groups)
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        out = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return self.relu(self.preact(out))


class ShuffleNetV1(nn.Module):
    """The CIFAR ShuffleNet of the CRD benchmark.

    Args:
        widths: output channels of the three stages.
        units: units per stage.
        groups: groups of the pointwise convs.
        num_classes: size of the classifier.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        units: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_channels = 24
        for index, (channels, count) in enumerate(zip(widths, units), start=1):
            layers = [ShuffleUnit(in_channels, channels, 2, groups)]
            layers += [ShuffleUnit(channels, channels, 1, groups) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        self.feature_paths = {
            "stem": "relu",
            **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
            **{f"preact{i}": f"layer{i}.{count - 1}.preact" for i, count in enumerate(units, start=1)},
            # a stage's last unit adds an identity shortcut to bn3's output (when the stage has more than one)
            **{f"preact{i}_norm": f"layer{i}.{count - 1}.bn3" for i, count in enumerate(units, start=1) if count > 1},
            "embedding": "linear:input",
            "classifier": "linear",
        }
        self.feature_modules = ["conv1", "bn1", "layer1", "layer2", "layer3"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # noqa: N802  (the benchmark's name)
    return ShuffleNetV1(num_classes=num_classes)
