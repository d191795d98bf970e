"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks") for CIFAR, in
the CRD benchmark's half-width variant (its ``mobile_half``), registered as ``MobileNetV2``.

Width multiplier 0.5, expansion 6: a stride-2 3x3 conv stem to 16 channels, seven groups of inverted
residual blocks (expansion t, output channels c, blocks n, first stride s)::

    t  c   n  s            (channels after the 0.5 width multiplier)
    1  8   1  1
    6  12  2  1     <- stage1
    6  16  3  2     <- stage2
    6  32  4  2
    6  48  3  1     <- stage3
    6  80  3  2
    6  160 1  1     <- stage4

then a 1x1 conv to 1280 channels (BN, ReLU), global average pooling and a linear classifier. Every block has
its 1x1 expansion conv, the t = 1 block included, and the activations are plain ReLUs (not ReLU6), as in
the benchmark.

Feature points (the benchmark's ``is_feat`` list), shapes at 32x32:

- ``stem``: the stem's output after its ReLU (16 x 16 x 16);
- ``stage1..4``: the outputs of the block groups marked above (12 x 16 x 16, 16 x 8 x 8, 48 x 4 x 4,
  160 x 2 x 2);
- ``preact1..4``: **the same tensors as** ``stage1..4``. The blocks end in a linear bottleneck (a 1x1 conv
  and BN with no ReLU after it), so a stage output is already a pre-activation; the benchmark's
  ``preact=True`` returns these very tensors;
- ``preact1_norm..preact4_norm``: the projection BN of each group's last block, whose output (plus the
  residual where the block has one) is ``preactN``. No ReLU follows it inside the network; these are the
  BNs the benchmark's ``get_bn_before_relu`` returns for OFD;
- ``embedding``: the pooled 1280 features; ``classifier``: the logits.

``feature_modules`` (the benchmark's ``get_feat_modules``): the stem and the seven block groups. The last
1x1 conv to 1280 channels with its BN (``conv2``) and the classifier are outside.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import init_weights, register_model


def _conv_bn_relu(in_channels: int, channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    """1x1 expansion (BN, ReLU), 3x3 depthwise (BN, ReLU), 1x1 linear projection (BN); residual when shapes match."""

    def __init__(self, in_channels: int, channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == channels
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2CIFAR(nn.Module):
    """The CIFAR MobileNetV2 of the CRD benchmark.

    Args:
        num_classes: size of the classifier.
        width: channel multiplier of the stem and the blocks (the 1280-channel head is kept for width <= 1).
        expansion: expansion ratio of every block but the first.
    """

    # (expansion or None for "the model's", output channels, blocks, first stride)
    SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip
    STAGE_GROUPS = (1, 2, 4, 6)

    def __init__(self, num_classes: int = 100, width: float = 0.5, expansion: int = 6) -> None:
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, in_channels, 3, stride=2))
        groups = []
        for t, c, n, s in self.SETTINGS:
            channels = int(c * width)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_channels, channels, stride, t or expansion))
                in_channels = channels
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last_channels = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(in_channels, last_channels, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        stages = {f"stage{i}": f"blocks.{g}" for i, g in enumerate(self.STAGE_GROUPS, start=1)}
        self.feature_paths = {
            "stem": "conv1",
            **stages,
            **{f"preact{i}": f"blocks.{g}" for i, g in enumerate(self.STAGE_GROUPS, start=1)},
            **{
                f"preact{i}_norm": f"blocks.{g}.{len(self.blocks[g]) - 1}.layers.7"
                for i, g in enumerate(self.STAGE_GROUPS, start=1)
            },
            "embedding": "classifier:input",
            "classifier": "classifier",
        }
        self.feature_modules = ["conv1", "blocks"]
        init_weights(self, linear="normal")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(self.avgpool(x).flatten(1))


@register_model
def MobileNetV2(num_classes: int = 100) -> MobileNetV2CIFAR:  # noqa: N802  (the benchmark's name)
    return MobileNetV2CIFAR(num_classes, width=0.5, expansion=6)
