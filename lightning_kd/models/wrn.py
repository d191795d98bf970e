"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks") for CIFAR, as in the CRD
benchmark: ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (depth ``6n + 4``, widen factor ``k``).

Pre-activation blocks (BN-ReLU-conv, twice, dropout 0): the stem is a bare 3x3 conv to 16 channels, three
stages of ``n`` blocks with ``16k``, ``32k`` and ``64k`` channels at strides 1, 2, 2, then a final BN-ReLU,
global average pooling and a linear classifier.

Feature points (the benchmark's ``is_feat`` list):

- ``stem``: the stem conv's output, before any BN (16 x 32 x 32);
- ``stage1..3``: each stage's output, a residual sum not yet normalised (``16k x 32 x 32``,
  ``32k x 16 x 16``, ``64k x 8 x 8``);
- ``preact1..3``: each stage's output after the BN that the next layer applies before its ReLU: the first
  BN of the next stage's first block for stages 1 and 2, the final BN for stage 3 (what the benchmark
  feeds to AB). An ``nn.Identity`` named ``preact`` sits between that BN and its ReLU, so the tap reads the
  tensor the network computes anyway (no BN runs twice). ``preact1_norm..preact3_norm`` name those BNs;
- ``embedding``: the pooled ``64k`` features the classifier reads; ``classifier``: the logits.

``feature_modules`` (the benchmark's ``get_feat_modules``): the stem conv and the three stages. The final BN
(``bn1``) and the classifier are outside: an initialisation stage neither trains them nor updates the BN's
statistics.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import init_weights, register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity shortcut, or a 1x1 conv shortcut when the shape changes.

    When the shape changes, the shortcut reads the normalised, activated input (as in the original WRN);
    ``preact`` marks the input after ``bn1``, before ``relu1``.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.preact = nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)
        elif stride != 1:
            raise ValueError("a WRN block that keeps its channel count must have stride 1")

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.preact(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """A CIFAR wide ResNet of depth ``6n + 4`` and widen factor ``widen``.

    Args:
        depth: total depth; ``(depth - 4)`` must be divisible by 6.
        widen: channel multiplier of the three stages.
        num_classes: size of the classifier.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        in_channels = widths[0]
        for index, (channels, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [WideBlock(in_channels, channels, stride)]
            layers += [WideBlock(channels, channels, 1) for _ in range(blocks - 1)]
            self.add_module(f"block{index}", nn.Sequential(*layers))
            in_channels = channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature_paths = {
            "stem": "conv1",
            **{f"stage{i}": f"block{i}" for i in (1, 2, 3)},
            "preact1": "block2.0.preact",
            "preact2": "block3.0.preact",
            "preact3": "preact",
            "preact1_norm": "block2.0.bn1",
            "preact2_norm": "block3.0.bn1",
            "preact3_norm": "bn1",
            "embedding": "fc:input",
            "classifier": "fc",
        }
        self.feature_modules = ["conv1", "block1", "block2", "block3"]
        init_weights(self, linear="zero_bias")

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.preact(self.bn1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register_model
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
