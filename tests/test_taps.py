"""Feature taps: outputs and inputs by module path, symbolic names, errors, clean removal."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from lightning_kd.models import create_model
from lightning_kd.taps import FeatureTaps, TapError, resolve_tap


def test_taps_capture_outputs_inputs_and_symbolic_names() -> None:
    net = create_model("resnet8", num_classes=10).eval()
    taps = FeatureTaps(net, ["layer2", "fc:input", "stage3", "preact1", "logits"])
    x = torch.randn(3, 3, 32, 32)
    logits = net(x)
    features = taps.pop()
    assert set(features) == {"layer2", "fc:input", "stage3", "preact1"}  # logits are not hooked
    assert features["layer2"].shape == (3, 32, 16, 16)
    assert features["stage3"].shape == (3, 64, 8, 8)
    # the classifier's input is the pooled last stage
    torch.testing.assert_close(features["fc:input"], features["stage3"].mean(dim=(2, 3)))
    torch.testing.assert_close(torch.nn.functional.linear(features["fc:input"], net.fc.weight, net.fc.bias), logits)
    # the pre-activation is the block's sum before its final ReLU
    assert (features["preact1"] < 0).any()
    assert taps.pop() == {}  # pop forgets


def test_preact_tap_reads_before_the_relu() -> None:
    net = create_model("resnet8", num_classes=10).eval()
    taps = FeatureTaps(net, ["preact3", "stage3"])
    net(torch.randn(2, 3, 32, 32))
    features = taps.pop()
    torch.testing.assert_close(torch.relu(features["preact3"]), features["stage3"])


def test_unknown_path_names_close_matches() -> None:
    net = create_model("resnet8", num_classes=10)
    with pytest.raises(TapError, match=r"layer4.*Closest: .*layer1"):
        FeatureTaps(net, ["layer4"])
    with pytest.raises(TapError, match="stage9"):
        resolve_tap(net, "stage9")


def _hooks(net: nn.Module) -> int:
    """Forward hooks and forward pre-hooks (an input tap is captured before its module runs)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_remove_leaves_the_network_clean() -> None:
    net = create_model("resnet8", num_classes=10)
    before = _hooks(net)
    taps = FeatureTaps(net, ["layer1", "layer2", "fc:input"])
    assert _hooks(net) == before + 3
    taps.remove()
    assert _hooks(net) == before
    net(torch.randn(1, 3, 32, 32))
    assert taps.features == {}


def test_taps_work_on_any_model_and_pickle() -> None:
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    taps = FeatureTaps(net, ["0", "2:input"])
    net(torch.ones(2, 4))
    features = taps.pop()
    torch.testing.assert_close(torch.relu(features["0"]), features["2:input"])
    clone = pickle.loads(pickle.dumps(net))  # ddp_spawn pickles modules with their hooks
    clone(torch.ones(1, 4))
