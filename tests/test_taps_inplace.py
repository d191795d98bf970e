"""Taps on networks that compute in place read the value at the tap, not what overwrote it later."""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.taps import FeatureTaps


class InPlace(nn.Module):
    """``bn`` output, then ``+= x`` and an in-place ReLU: both overwrite the tensors a tap captured."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x
        out = self.relu(out)
        return self.fc(out.mean(dim=(2, 3)))


def test_overwritten_taps_are_found_by_the_probe_and_copied_afterwards() -> None:
    torch.manual_seed(0)
    net = InPlace().eval()
    taps = FeatureTaps(net, ["bn", "relu:input", "conv"])
    net(torch.zeros(2, 3, 4, 4))  # the probe
    taps.pop()
    assert sorted(taps.copied) == ["bn", "relu:input"]  # conv's output is not overwritten
    x = torch.randn(2, 3, 4, 4)
    net(x)
    got = taps.pop()
    with torch.no_grad():
        expected_bn = net.bn(net.conv(x))
    torch.testing.assert_close(got["bn"], expected_bn)
    torch.testing.assert_close(got["relu:input"], expected_bn + x)
    assert (got["relu:input"] < 0).any(), "the pre-activation keeps its negative values"


def test_copied_taps_keep_their_gradient() -> None:
    torch.manual_seed(0)
    net = InPlace().train()
    taps = FeatureTaps(net, ["relu:input"])
    net(torch.zeros(2, 3, 4, 4))
    taps.pop()
    net(torch.randn(2, 3, 4, 4))
    taps.pop()["relu:input"].pow(2).sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0
