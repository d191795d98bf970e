"""VGG with batch normalisation (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition") for CIFAR, as in the CRD benchmark: ``vgg8``, ``vgg11``, ``vgg13``,
``vgg16``, ``vgg19``. The fully connected head of the original is replaced by global average pooling and
one linear layer.

Five blocks of 3x3 conv (with bias) + BN + ReLU; 2x2 max pooling after blocks 0, 1 and 2 (and after block
3 only for inputs of 64 pixels or more, as the benchmark does for 64x64 images), adaptive average pooling
after block 4. Block widths 64, 128, 256, 512, 512; convs per block:

======  ==============
vgg8    1, 1, 1, 1, 1
vgg11   1, 1, 2, 2, 2
vgg13   2, 2, 2, 2, 2
vgg16   2, 2, 3, 3, 3
vgg19   2, 2, 4, 4, 4
======  ==============

Feature points (the benchmark's ``is_feat`` list), shapes at 32x32:

- ``stem``: block 0 after its ReLU, before pooling (64 x 32 x 32);
- ``stage1..4``: blocks 1..4 after their final ReLU, before the pooling that follows (128 x 16 x 16,
  256 x 8 x 8, 512 x 4 x 4, 512 x 4 x 4);
- ``preact1..4``: the same blocks before their final ReLU (after the last BN); an ``nn.Identity`` named
  ``preact`` marks the point; ``preact1_norm..preact4_norm`` name that last BN (the tap is its output);
- ``embedding``: the pooled 512 features; ``classifier``: the logits.

``feature_modules`` (the benchmark's ``get_feat_modules``): the five blocks with the pooling after each
(``pool3`` runs only for 64-pixel inputs; ``avgpool`` is the global pooling); the classifier is outside.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import init_weights, register_model


class VGGBlock(nn.Module):
    """``convs`` times (3x3 conv + BN), with a ReLU between them and one at the end, after ``preact``."""

    def __init__(self, in_channels: int, channels: int, convs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(convs):
            if index:
                layers.append(nn.ReLU())
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.preact(self.layers(x)))


class VGG(nn.Module):
    """A CIFAR VGG with batch normalisation.

    Args:
        convs: number of 3x3 convs in each of the five blocks.
        num_classes: size of the classifier.
    """

    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(self, convs: tuple[int, int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = 3
        for index, (channels, count) in enumerate(zip(self.WIDTHS, convs)):
            self.add_module(f"block{index}", VGGBlock(in_channels, channels, count))
            in_channels = channels
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.feature_paths = {
            "stem": "block0",
            **{f"stage{i}": f"block{i}" for i in (1, 2, 3, 4)},
            **{f"preact{i}": f"block{i}.preact" for i in (1, 2, 3, 4)},
            **{f"preact{i}_norm": f"block{i}.layers.{3 * convs[i] - 2}" for i in (1, 2, 3, 4)},
            "embedding": "classifier:input",
            "classifier": "classifier",
        }
        self.feature_modules = [
            "block0", "pool0", "block1", "pool1", "block2", "pool2", "block3", "pool3", "block4", "avgpool"
        ]  # fmt: skip
        init_weights(self, linear="normal")

    def forward(self, x: Tensor) -> Tensor:
        large = x.shape[-2] >= 64
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if large:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.avgpool(x).flatten(1))


@register_model
def vgg8(num_classes: int = 100) -> VGG:
    return VGG((1, 1, 1, 1, 1), num_classes)


@register_model
def vgg11(num_classes: int = 100) -> VGG:
    return VGG((1, 1, 2, 2, 2), num_classes)


@register_model
def vgg13(num_classes: int = 100) -> VGG:
    return VGG((2, 2, 2, 2, 2), num_classes)


@register_model
def vgg16(num_classes: int = 100) -> VGG:
    return VGG((2, 2, 3, 3, 3), num_classes)


@register_model
def vgg19(num_classes: int = 100) -> VGG:
    return VGG((2, 2, 4, 4, 4), num_classes)
