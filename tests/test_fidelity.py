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


# ----------------------------------------------------------------------------------------------------------
# AB's connector and loss, FitNet's regressor (the reference's Connector and ConvReg)
# ----------------------------------------------------------------------------------------------------------
def _convs(module: nn.Module) -> list[nn.modules.conv._ConvNd]:
    return [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _bns(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


# (student shape, teacher shape, the reference's convolution: kind, kernel, stride, padding)
CONNECTOR_CASES = {
    "student twice": ((2, 8, 16, 16), (2, 12, 8, 8), ("conv", (3, 3), 2, 1)),
    "student twice, same channels": ((2, 8, 16, 16), (2, 8, 8, 8), ("conv", (3, 3), 2, 1)),
    "student half": ((2, 8, 8, 8), (2, 12, 16, 16), ("transposed", (4, 4), 2, 1)),
    "equal size": ((2, 8, 8, 8), (2, 12, 8, 8), ("conv", (1, 1), 1, 0)),
    "student larger": ((2, 8, 10, 9), (2, 12, 8, 8), ("conv", (3, 2), 1, 0)),
}


def _reference_map(
    x: torch.Tensor, module: nn.Module, case: tuple, batch_statistics: bool, relu: bool
) -> torch.Tensor:
    """conv (the case's kind, kernel, stride and padding, with its bias) + BatchNorm (+ ReLU), by hand."""
    kind, kernel, stride, padding = case
    (conv,), (bn,) = _convs(module), _bns(module)
    c_in, c_out = x.shape[1], bn.num_features
    if kind == "conv":
        assert conv.weight.shape == (c_out, c_in, *kernel)
        out = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    else:
        assert conv.weight.shape == (c_in, c_out, *kernel)
        out = F.conv_transpose2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    assert conv.bias is not None and conv.bias.shape == (c_out,)  # PyTorch's default bias, as in the reference
    out = _bn(out, bn, batch_statistics)
    return F.relu(out) if relu else out


@pytest.mark.parametrize("batch_statistics", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CONNECTOR_CASES))
def test_ab_connector_matches_the_reference_connector(case: str, batch_statistics: bool) -> None:
    student_shape, teacher_shape, conv = CONNECTOR_CASES[case]
    torch.manual_seed(0)
    ab = AB(student_layers=["preact1"])
    s = torch.randn(student_shape)
    ab.build([s], [torch.randn(teacher_shape)])
    (connector,) = ab.connectors
    _randomise(connector, seed=5)
    connector.train(batch_statistics)
    with torch.no_grad():
        out = connector(s)
        expected = _reference_map(s, connector, conv, batch_statistics, relu=False)
    assert out.shape == teacher_shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_ab_connector_is_the_identity_only_for_equal_channels_and_size() -> None:
    ab = AB(student_layers=["preact1"])
    s = torch.randn(2, 8, 8, 8)
    ab.build([s], [torch.randn(2, 8, 8, 8)])
    assert not list(ab.connectors[0].parameters())
    assert torch.equal(ab.connectors[0](s), s)


@pytest.mark.parametrize("teacher_shape", [(2, 8, 16, 16), (2, 8, 10, 10), (2, 8, 8, 12)])
def test_ab_connector_refuses_a_smaller_student_other_than_half(teacher_shape: tuple) -> None:
    ab = AB(student_layers=["preact1"])
    with pytest.raises(ValueError) as info:
        ab.build([torch.zeros(2, 8, 4, 8)], [torch.zeros(teacher_shape)])
    message = str(info.value)
    assert "'preact1'" in message and "(2, 8, 4, 8)" in message and str(teacher_shape) in message


def _ab_by_loops(s: torch.Tensor, t: torch.Tensor, m: float = 1.0) -> float:
    """``sum (s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]`` over all elements, divided by B."""
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist()):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    return total / s.shape[0]


def test_ab_loss_with_the_reference_connectors_matches_loops() -> None:
    """Three layers: student twice the teacher's size, identical shapes (identity), student half."""
    shapes = [((4, 4, 16, 16), (4, 6, 8, 8)), ((4, 6, 8, 8), (4, 6, 8, 8)), ((4, 8, 4, 4), (4, 10, 8, 8))]
    convs = [("conv", (3, 3), 2, 1), None, ("transposed", (4, 4), 2, 1)]
    generator = torch.Generator().manual_seed(7)
    s = [torch.randn(a, generator=generator) for a, _ in shapes]
    t = [torch.randn(b, generator=generator) for _, b in shapes]
    torch.manual_seed(0)
    ab = AB(student_layers=["preact1", "preact2", "preact3"])
    ab.build(s, t)
    ab.train()
    with torch.no_grad():
        loss = float(ab.stage_loss(s, t, {}))
        mapped = [x if c is None else _reference_map(x, k, c, True, False) for x, k, c in zip(s, ab.connectors, convs)]
    expected = 3 / 1000 * sum(w * _ab_by_loops(a, b) for w, a, b in zip([0.25, 0.5, 1.0], mapped, t))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_ab_pool_connector_is_the_named_departure() -> None:
    """``connector="pool"``: 1x1 conv (no bias) + BN keeping the student's size; the loss pools the larger map."""
    generator = torch.Generator().manual_seed(8)
    s, t = [torch.randn(4, 4, 16, 16, generator=generator)], [torch.randn(4, 6, 8, 8, generator=generator)]
    torch.manual_seed(0)
    ab = AB(student_layers=["preact1"], connector="pool")
    ab.build(s, t)
    (conv,), (bn,) = _convs(ab.connectors[0]), _bns(ab.connectors[0])
    assert conv.weight.shape == (6, 4, 1, 1) and conv.bias is None
    ab.train()
    with torch.no_grad():
        mapped = F.avg_pool2d(_bn(F.conv2d(s[0], conv.weight), bn, batch_statistics=True), 2)
        loss = float(ab.stage_loss(s, t, {}))
    assert loss == pytest.approx(3 / 1000 * _ab_by_loops(mapped, t[0]), rel=1e-5)
    same = AB(student_layers=["preact1"], connector="pool")
    same.build([torch.zeros(2, 4, 16, 16)], [torch.zeros(2, 4, 8, 8)])
    assert isinstance(same.connectors[0].net, nn.Identity)
    with pytest.raises(ValueError, match="'reference', 'pool'"):
        AB(connector="avg")


@pytest.mark.parametrize("case", list(CONNECTOR_CASES))
def test_fitnet_regressor_matches_the_reference_convreg(case: str) -> None:
    student_shape, teacher_shape, conv = CONNECTOR_CASES[case]
    torch.manual_seed(0)
    fitnet = FitNet()
    s = torch.randn(student_shape)
    fitnet.build([s], [torch.randn(teacher_shape)])
    _randomise(fitnet.regressor, seed=6)
    fitnet.regressor.eval()
    with torch.no_grad():
        out = fitnet.regressor(s)
        expected = _reference_map(s, fitnet.regressor, conv, batch_statistics=False, relu=True)
    assert out.shape == teacher_shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
