"""The CIFAR model zoo beyond the ResNets: WRN, VGG, MobileNetV2, ShuffleNetV1/V2, ResNet50.

Each model is built once (module-scoped cache) and run on a (2, 3, 32, 32) batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_kd.models import create_model, feature_module_paths, list_models
from lightning_kd.taps import FeatureTaps, resolve_tap

# Parameter counts at 100 classes of the CRD benchmark's CIFAR models (RepDistiller, models/wrn.py, vgg.py
# (the *_bn variants its model_dict registers as vgg8..vgg19), mobilenetv2.py (mobile_half), ShuffleNetv1.py,
# ShuffleNetv2.py, resnetv2.py at commit eedab9d), counted layer by layer from their conv / BN / linear shapes
# (conv weights, plus biases in VGG; BN weight and bias; linear weight and bias). They agree with the rounded
# sizes KD papers publish for these networks: wrn_40_2 2.26M, wrn_16_2 0.70M, wrn_40_1 0.57M, vgg13 9.46M,
# vgg8 3.96M, MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50 23.71M.
REFERENCE_PARAMETERS = {
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252,
}

# (C, H, W) of every feature point on a 32x32 input: the benchmark's is_feat lists (feat[0] = stem,
# feat[i] = stage i, feat[-1] = embedding).
_WRN = {1: (16, 32, 64), 2: (32, 64, 128)}
_VGG = {
    "stem": (64, 32, 32),
    "stage1": (128, 16, 16),
    "stage2": (256, 8, 8),
    "stage3": (512, 4, 4),
    "stage4": (512, 4, 4),
    "embedding": (512,),
}


def _wrn_shapes(widen: int) -> dict[str, tuple[int, ...]]:
    c1, c2, c3 = _WRN[widen]
    return {
        "stem": (16, 32, 32),
        "stage1": (c1, 32, 32),
        "stage2": (c2, 16, 16),
        "stage3": (c3, 8, 8),
        "embedding": (c3,),
    }


EXPECTED_SHAPES = {
    "wrn_16_1": _wrn_shapes(1),
    "wrn_16_2": _wrn_shapes(2),
    "wrn_40_1": _wrn_shapes(1),
    "wrn_40_2": _wrn_shapes(2),
    **{name: _VGG for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": {
        "stem": (16, 16, 16),
        "stage1": (12, 16, 16),
        "stage2": (16, 8, 8),
        "stage3": (48, 4, 4),
        "stage4": (160, 2, 2),
        "embedding": (1280,),
    },
    "ShuffleV1": {
        "stem": (24, 32, 32),
        "stage1": (240, 16, 16),
        "stage2": (480, 8, 8),
        "stage3": (960, 4, 4),
        "embedding": (960,),
    },
    "ShuffleV2": {
        "stem": (24, 32, 32),
        "stage1": (116, 16, 16),
        "stage2": (232, 8, 8),
        "stage3": (464, 4, 4),
        "embedding": (1024,),
    },
    "ResNet50": {
        "stem": (64, 32, 32),
        "stage1": (256, 32, 32),
        "stage2": (512, 16, 16),
        "stage3": (1024, 8, 8),
        "stage4": (2048, 4, 4),
        "embedding": (2048,),
    },
}
MODELS = list(REFERENCE_PARAMETERS)


def _stages(shapes: dict[str, tuple[int, ...]]) -> list[int]:
    return sorted(int(name[5:]) for name in shapes if name.startswith("stage"))


_CACHE: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    """One model per name for the whole file, seeded, in eval mode (tests that train work on a copy)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_model(name, num_classes=100).eval()
    return _CACHE[name]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # noqa: ANN202
    """These forwards are tiny: a second intra-op thread only adds synchronisation (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_every_model_is_registered() -> None:
    assert set(MODELS) <= set(list_models())


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_reference(name: str) -> None:
    count = sum(p.numel() for p in _model(name).parameters())
    reference = REFERENCE_PARAMETERS[name]
    assert abs(count - reference) <= 0.01 * reference, f"{name}: {count} parameters, reference {reference}"


@pytest.mark.parametrize("name", MODELS)
def test_feature_shapes_and_preactivations(name: str, batch: torch.Tensor) -> None:
    model = _model(name)
    expected = EXPECTED_SHAPES[name]
    stages = _stages(expected)
    wanted = {"stem", "embedding", "classifier", *(f"stage{i}" for i in stages), *(f"preact{i}" for i in stages)}
    if name != "ShuffleV2":  # the BatchNorm before each pre-activation, for OFD (none in ShuffleV2)
        wanted |= {f"preact{i}_norm" for i in stages}
    assert set(model.feature_paths) == wanted
    assert not [m for m in model.modules() if getattr(m, "inplace", False)], "in-place modules found"
    # a second set of hooks copies each tensor the moment it is produced: a later in-place change shows up
    modules = dict(model.named_modules())
    snapshots: dict[str, torch.Tensor] = {}
    handles = []
    for tap in model.feature_paths:
        path, capture_input = resolve_tap(model, tap)

        def snapshot(module, args, output, tap=tap, capture_input=capture_input):  # noqa: ANN001, ANN202
            snapshots[tap] = (args[0] if capture_input else output).clone()

        handles.append(modules[path].register_forward_hook(snapshot))
    taps = FeatureTaps(model, list(model.feature_paths))
    try:
        with torch.no_grad():
            logits = model(batch)
        features = taps.pop()
    finally:
        taps.remove()
        for handle in handles:
            handle.remove()
    assert logits.shape == (2, 100)
    for tap, shape in expected.items():
        assert tuple(features[tap].shape) == (2, *shape), tap
    assert snapshots.keys() == features.keys()
    for tap, copied in snapshots.items():
        assert torch.equal(features[tap], copied), f"{name}: {tap} was modified after it was captured"
    assert torch.equal(features["classifier"], logits)
    # the embedding is what the classifier reads: the pooled last map (or the pooled head conv)
    classifier = modules[resolve_tap(model, "classifier")[0]]
    torch.testing.assert_close(classifier(features["embedding"]), logits)
    for i in stages:
        stage, preact = features[f"stage{i}"], features[f"preact{i}"]
        assert preact.shape[0] == 2 and preact.shape[2:] == stage.shape[2:], i
        assert (preact < 0).any(), f"preact{i} of {name} has no negative value: it is not a pre-activation"
        _check_preact(name, model, i, stage, preact)


def _check_preact(name: str, model: nn.Module, i: int, stage: torch.Tensor, preact: torch.Tensor) -> None:
    """The pre-activation relates to the stage output as the architecture says."""
    if name.startswith("wrn"):
        # the BN the next layer applies to the stage output (eval mode: running statistics)
        bn = model.bn1 if i == 3 else getattr(model, f"block{i + 1}")[0].bn1
        torch.testing.assert_close(preact, bn(stage))
    elif name == "MobileNetV2":
        # linear bottleneck: the stage output is the pre-activation itself
        assert preact is stage
    elif name == "ShuffleV2":
        # unshuffled concatenation; the stage output is ReLU then a 2-group channel shuffle
        b, c, h, w = preact.shape
        shuffled = torch.relu(preact).view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        torch.testing.assert_close(stage, shuffled)
    else:
        torch.testing.assert_close(stage, torch.relu(preact))
        assert preact.shape == stage.shape


def _batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: value.clone()
        for key, value in model.state_dict().items()
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


@pytest.mark.parametrize("name", MODELS)
def test_taps_change_no_batchnorm_statistics(name: str) -> None:
    """One train-mode forward with every tap attached updates each BN exactly as one without taps does."""
    batch = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # 16x16 keeps this quick
    plain = copy.deepcopy(_model(name)).train()
    tapped = copy.deepcopy(_model(name)).train()
    taps = FeatureTaps(tapped, list(tapped.feature_paths))
    try:
        with torch.no_grad():
            plain_logits = plain(batch)
            tapped_logits = tapped(batch)
    finally:
        taps.remove()
    torch.testing.assert_close(tapped_logits, plain_logits, rtol=0, atol=0)
    plain_state, tapped_state = _batchnorm_state(plain), _batchnorm_state(tapped)
    assert plain_state.keys() == tapped_state.keys() and plain_state
    for key, value in plain_state.items():
        assert torch.equal(tapped_state[key], value), key
        if key.endswith("num_batches_tracked"):
            assert int(value) == 1, f"{key}: {int(value)} updates in one forward"
    # the statistics did move: the forward really ran in train mode
    initial = _batchnorm_state(_model(name))
    assert any(not torch.equal(value, initial[key]) for key, value in plain_state.items())


@pytest.mark.parametrize("name", ["vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_other_input_sizes(name: str) -> None:
    model = _model(name)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 24, 40)).shape == (1, 100)  # non-square, not a multiple of 32
        if name == "vgg8":  # 64-pixel inputs take the extra pooling before the last block
            taps = FeatureTaps(model, ["stage3", "stage4"])
            assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 100)
            shapes = {k: tuple(v.shape) for k, v in taps.pop().items()}
            taps.remove()
            assert shapes == {"stage3": (1, 512, 8, 8), "stage4": (1, 512, 4, 4)}


def test_num_classes() -> None:
    assert create_model("wrn_16_1", num_classes=10).fc.out_features == 10
    assert create_model("ShuffleV2", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    "wrong, suggestion",
    [("wrn_40_3", "wrn_40_2"), ("vgg14", "vgg13"), ("ShuffleV3", "ShuffleV1"), ("ResNet56", "resnet56")],
)
def test_unknown_name_names_close_matches(wrong: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="Did you mean") as info:
        create_model(wrong)
    message = str(info.value)
    assert repr(wrong) in message and suggestion in message.split("Known models")[0]


# ----------------------------------------------------------------------------------------------------------
# feature modules: the CRD benchmark's get_feat_modules(), the part its initialisation stages train
# ----------------------------------------------------------------------------------------------------------
# The benchmark's lists (RepDistiller models/*.py, get_feat_modules) in this implementation's module names:
# resnet.py: conv1, bn1, relu, layer1..3; resnetv2.py (ResNet50): conv1, bn1, layer1..4; wrn.py: conv1,
# block1..3; vgg.py: block0, pool0, ..., block4, pool4 (pool4 is the global average pooling, our avgpool);
# mobilenetv2.py: conv1, blocks; ShuffleNetv1.py and ShuffleNetv2.py: conv1, bn1, layer1..3. Then the
# parameters left outside each list.
_CIFAR_RESNETS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                  "resnet32x4"]  # fmt: skip
_VGG_FEATURES = ["block0", "pool0", "block1", "pool1", "block2", "pool2", "block3", "pool3", "block4", "avgpool"]
EXPECTED_FEATURE_MODULES: dict[str, tuple[list[str], set[str]]] = {
    **{name: (["conv1", "bn1", "relu", "layer1", "layer2", "layer3"], {"fc.weight", "fc.bias"})
       for name in _CIFAR_RESNETS},
    "ResNet50": (["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"], {"linear.weight", "linear.bias"}),
    **{name: (["conv1", "block1", "block2", "block3"], {"bn1.weight", "bn1.bias", "fc.weight", "fc.bias"})
       for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: (_VGG_FEATURES, {"classifier.weight", "classifier.bias"})
       for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": (
        ["conv1", "blocks"],
        {"conv2.0.weight", "conv2.1.weight", "conv2.1.bias", "classifier.weight", "classifier.bias"},
    ),
    "ShuffleV1": (["conv1", "bn1", "layer1", "layer2", "layer3"], {"linear.weight", "linear.bias"}),
    "ShuffleV2": (
        ["conv1", "bn1", "layer1", "layer2", "layer3"],
        {"conv2.weight", "bn2.weight", "bn2.bias", "linear.weight", "linear.bias"},
    ),
}  # fmt: skip


def test_every_model_declares_feature_modules() -> None:
    assert set(EXPECTED_FEATURE_MODULES) == set(list_models())


@pytest.mark.parametrize("name", list(EXPECTED_FEATURE_MODULES))
def test_feature_modules_are_the_reference_ones(name: str) -> None:
    model = _model(name)
    expected, outside = EXPECTED_FEATURE_MODULES[name]
    paths = feature_module_paths(model)
    assert paths == expected
    inside = [p for p in paths if any(True for _ in model.get_submodule(p).parameters())]
    assert inside, "no parameter inside the feature modules"
    left_out = {
        key for key, _ in model.named_parameters() if not any(key.startswith(path + ".") for path in paths)
    }
    assert left_out == outside
    # forward order: the order in which each listed module (or one inside it, for a ModuleList) first runs;
    # VGG at 64 pixels, where pool3 runs
    calls: list[str] = []
    handles = [
        sub.register_forward_pre_hook(lambda m, a, path=path: calls.append(path))
        for path in paths
        for sub in model.get_submodule(path).modules()
    ]
    size = 64 if name.startswith("vgg") else 32
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    assert list(dict.fromkeys(calls)) == expected


def test_feature_module_paths_of_other_networks() -> None:
    assert feature_module_paths(nn.Linear(2, 2)) is None
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    net.feature_modules = ["0", "conv"]
    with pytest.raises(ValueError, match=r"\['conv'\]"):
        feature_module_paths(net)


# ----------------------------------------------------------------------------------------------------------
# preactN_norm: the BatchNorm whose output (plus the residual) is the pre-activation (for OFD)
# ----------------------------------------------------------------------------------------------------------
def _resnet_norms(name: str) -> list[str]:
    last = (int(name[6:].split("x")[0]) - 2) // 6 - 1
    return [f"layer{i}.{last}.bn2" for i in (1, 2, 3)]


_VGG_NORMS = {  # the last BN of blocks 1..4: index 3 * convs - 2 in [conv, bn, relu, conv, bn, ...]
    "vgg8": [1, 1, 1, 1], "vgg11": [1, 4, 4, 4], "vgg13": [4, 4, 4, 4], "vgg16": [4, 7, 7, 7], "vgg19": [4, 10, 10, 10],
}  # fmt: skip
EXPECTED_NORMS: dict[str, list[str]] = {
    **{name: _resnet_norms(name) for name in _CIFAR_RESNETS},
    "ResNet50": ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
    **{name: ["block2.0.bn1", "block3.0.bn1", "bn1"] for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: [f"block{i}.layers.{k}" for i, k in enumerate(ks, start=1)] for name, ks in _VGG_NORMS.items()},
    "MobileNetV2": ["blocks.1.1.layers.7", "blocks.2.2.layers.7", "blocks.4.2.layers.7", "blocks.6.0.layers.7"],
    "ShuffleV1": ["layer1.3.bn3", "layer2.7.bn3", "layer3.3.bn3"],
    "ShuffleV2": [],  # half of each pre-activation is the passed-through input: no such BatchNorm
}


def _block_of(bn_path: str) -> str:
    """The residual block holding a BN: ``layer1.0.bn2 -> layer1.0``, ``blocks.1.1.layers.7 -> blocks.1.1``."""
    return bn_path.split(".layers.")[0] if ".layers." in bn_path else bn_path.rsplit(".", 1)[0]


@pytest.mark.parametrize("name", list(EXPECTED_NORMS))
def test_preact_norm_names_the_batchnorm_before_the_preactivation(name: str) -> None:
    """The BN's output plus the block's residual (its input, its shortcut, or nothing) is the pre-activation."""
    model = _model(name)
    norms = {k: v for k, v in model.feature_paths.items() if k.endswith("_norm")}
    expected = EXPECTED_NORMS[name]
    assert norms == {f"preact{i}_norm": path for i, path in enumerate(expected, start=1)}
    if not expected:
        return
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for i, path in enumerate(expected, start=1):
        bn = modules[path]
        assert isinstance(bn, nn.BatchNorm2d), path
        handles.append(bn.register_forward_hook(lambda m, a, out, i=i: captured.setdefault(f"bn{i}", out)))
        if not name.startswith(("wrn", "vgg")):
            block = modules[_block_of(path)]
            handles.append(block.register_forward_pre_hook(lambda m, a, i=i: captured.setdefault(f"in{i}", a[0])))
    taps = FeatureTaps(model, [f"preact{i}" for i in range(1, len(expected) + 1)])
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
        preacts = taps.pop()
    finally:
        taps.remove()
        for handle in handles:
            handle.remove()
    for i, path in enumerate(expected, start=1):
        preact, out = preacts[f"preact{i}"], captured[f"bn{i}"]
        assert modules[path].num_features == preact.shape[1] and out.shape == preact.shape, path
        if name.startswith(("wrn", "vgg")):  # no residual: the tap is the BN's output itself
            assert torch.equal(preact, out), path
            continue
        block, x = modules[_block_of(path)], captured[f"in{i}"]
        with torch.no_grad():
            if hasattr(block, "shortcut"):  # ResNet blocks, ShuffleNet units
                residual = block.shortcut(x)
            else:  # MobileNetV2's inverted residual
                residual = x if block.residual else torch.zeros_like(out)
        torch.testing.assert_close(preact, out + residual)
