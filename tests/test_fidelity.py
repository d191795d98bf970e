"""Agreement with the CRD benchmark's reference code (RepDistiller) on single building blocks.

Each block's output is recomputed here from its weights with ``torch.nn.functional`` convolutions and the
batch-norm formula written out, sharing no code with the library:

- a ShuffleNetV1 unit (stride 1, stride 2, and the first unit of the first stage, whose first 1x1 conv is
  ungrouped and not followed by a shuffle), with random weights and random BatchNorm running statistics;
- AB's connector for a student map twice, half and equal to the teacher's size, and AB's loss over such
  layers against a loop on Python floats;
- FitNet's regressor in the "valid convolution" case (student map larger than the teacher's, not twice).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.distillers import AB, FitNet
from lightning_kd.models.shufflenetv1 import ShuffleUnit


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights everywhere and random BatchNorm affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                sub.weight.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
                sub.bias.copy_(torch.randn(sub.num_features, generator=generator) * 0.5)
                sub.running_mean.copy_(torch.randn(sub.num_features, generator=generator) * 0.5)
                sub.running_var.copy_(torch.rand(sub.num_features, generator=generator) + 0.5)
            elif isinstance(sub, nn.modules.conv._ConvNd):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * 0.3)
                if sub.bias is not None:
                    sub.bias.copy_(torch.randn(sub.bias.shape, generator=generator) * 0.3)


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, batch_statistics: bool = False) -> torch.Tensor:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel; the batch's biased statistics if asked,
    else the running ones."""
    if batch_statistics:
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return (x - mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[None, :, None, None]


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle by an explicit permutation: output channel ``j * groups + g`` is input channel
    ``g * (C / groups) + j``."""
    per_group = x.shape[1] // groups
    order = [g * per_group + j for j in range(per_group) for g in range(groups)]
    return x[:, order]


def _avg_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 average pooling with zero padding 1, the padding counted (a depthwise conv of ones / 9)."""
    c = x.shape[1]
    return F.conv2d(x, torch.full((c, 1, 3, 3), 1.0 / 9.0, dtype=x.dtype), stride=2, padding=1, groups=c)


def _shuffle_unit_by_hand(unit: ShuffleUnit, x: torch.Tensor, stride: int, first_groups: int, groups: int):
    """The reference bottleneck: grouped 1x1 + BN + ReLU, shuffle, depthwise 3x3 + BN + ReLU, grouped 1x1 + BN,
    then ``+ x`` (stride 1) or ``cat([branch, avgpool(x)])`` (stride 2), then ReLU. Returns (output, preact)."""
    out = F.relu(_bn(F.conv2d(x, unit.conv1.weight, groups=first_groups), unit.bn1))
    out = _shuffle(out, first_groups)
    mid = out.shape[1]
    out = F.relu(_bn(F.conv2d(out, unit.conv2.weight, stride=stride, padding=1, groups=mid), unit.bn2))
    out = _bn(F.conv2d(out, unit.conv3.weight, groups=groups), unit.bn3)
    preact = torch.cat([out, _avg_pool_3x3_s2(x)], 1) if stride == 2 else out + x
    return F.relu(preact), preact


@pytest.mark.parametrize(
    "in_channels, out_channels, stride, first_groups",
    [
        (240, 240, 1, 3),  # an identity-shortcut unit inside a stage
        (240, 480, 2, 3),  # the first unit of stage 2: branch of 480 - 240 channels, pooled input concatenated
        (24, 240, 2, 1),  # the first unit of stage 1 reads the 24-channel stem: ungrouped 1x1, no shuffle
    ],
)
def test_shufflenetv1_unit_matches_the_reference_block(
    in_channels: int, out_channels: int, stride: int, first_groups: int
) -> None:
    torch.manual_seed(0)
    unit = ShuffleUnit(in_channels, out_channels, stride, groups=3)
    _randomise(unit, seed=in_channels + out_channels)
    unit.eval()
    branch = out_channels - in_channels if stride == 2 else out_channels
    assert (unit.conv1.groups, unit.conv1.out_channels) == (first_groups, branch // 4)
    assert (unit.conv2.groups, unit.conv3.groups, unit.conv3.out_channels) == (branch // 4, 3, branch)
    x = torch.randn(2, in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    captured = {}
    handle = unit.preact.register_forward_hook(lambda m, args, output: captured.setdefault("preact", output))
    with torch.no_grad():
        out = unit(x)
        expected, expected_preact = _shuffle_unit_by_hand(unit, x, stride, first_groups, 3)
    handle.remove()
    assert out.shape == (2, out_channels, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured["preact"], expected_preact, rtol=1e-5, atol=1e-5)
