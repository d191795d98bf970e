"""ShuffleNetV2 (Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design") for CIFAR, as in the CRD benchmark: ``ShuffleV2``, the 1x size (stage widths 116, 232, 464; 3, 7
and 3 basic units after each down-sampling unit; a 1x1 conv to 1024 channels before pooling).

The stem is a 1x1 conv to 24 channels (BN, ReLU; no pooling). A down-sampling unit runs two stride-2 branches
(3x3 depthwise + BN, 1x1 + BN + ReLU; and 1x1 + BN + ReLU, 3x3 depthwise + BN, 1x1 + BN + ReLU), each giving
half the output channels, concatenates and shuffles them. A basic unit splits the channels in halves, passes
the first through and runs the second through 1x1 (BN, ReLU), 3x3 depthwise (BN), 1x1 (BN, ReLU), then
concatenates and shuffles.

Feature points (the benchmark's ``is_feat`` list), shapes at 32x32:

- ``stem``: the stem after its ReLU (24 x 32 x 32);
- ``stage1..3``: each stage's output (116 x 16 x 16, 232 x 8 x 8, 464 x 4 x 4);
- ``preact1..3``: the last unit of each stage before its final ReLU and before the shuffle: the
  passed-through half concatenated with the branch's last BN output, in that (unshuffled) channel order, as
  the benchmark returns it. An ``nn.Identity`` named ``preact`` marks the point. The ReLU is applied to the
  whole concatenation, which equals the original's ReLU on the branch alone because the passed-through half
  is always the output of earlier ReLUs (non-negative);
- ``embedding``: the pooled 1024 features after the head conv; ``classifier``: the logits.

No ``preactN_norm`` entries: half of each pre-activation is the passed-through input, not a BatchNorm's output
(the benchmark's OFD support raises for ShuffleNetV2 too).

``feature_modules`` (the benchmark's ``get_feat_modules``): conv1, bn1 and the three stages. The head conv to
1024 channels with its BN (``conv2``, ``bn2``) and the classifier are outside.

The benchmark's ShuffleNets keep PyTorch's default initialisation, and so do these.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kd.models.registry import register_model
from lightning_kd.models.shufflenetv1 import channel_shuffle


class BasicUnit(nn.Module):
    """Channel split, a 1x1 / 3x3 depthwise / 1x1 branch on the second half, concatenation, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        half = channels - self.split
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        passed, branch = x[:, : self.split], x[:, self.split :]
        branch = self.relu1(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        out = self.relu(self.preact(torch.cat([passed, branch], 1)))
        return channel_shuffle(out, 2)


class DownUnit(nn.Module):
    """Two stride-2 branches of ``out_channels // 2`` channels each, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """The CIFAR ShuffleNetV2 of the CRD benchmark.

    Args:
        widths: output channels of the three stages and of the head conv.
        units: basic units per stage (after its down-sampling unit).
        num_classes: size of the classifier.
    """

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        units: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        in_channels = 24
        for index, (channels, count) in enumerate(zip(widths[:3], units), start=1):
            layers: list[nn.Module] = [DownUnit(in_channels, channels)]
            layers += [BasicUnit(channels) for _ in range(count)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_paths = {
            "stem": "relu1",
            **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
            **{f"preact{i}": f"layer{i}.{count}.preact" for i, count in enumerate(units, start=1)},
            "embedding": "linear:input",
            "classifier": "linear",
        }
        self.feature_modules = ["conv1", "bn1", "layer1", "layer2", "layer3"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # noqa: N802  (the benchmark's name)
    return ShuffleNetV2(num_classes=num_classes)
