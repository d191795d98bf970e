"""The ReviewKD, OFD and MLKD distillers: their parts, their totals against direct computations, their configs.

The direct computations below rebuild each step with plain tensor operations from the specification (METHODS-MODERN
sections 5, 7, 8): the ABF fusion with explicit 1x1 products, BatchNorm formulas and nearest-neighbour indexing;
OFD's connector, pooling and stage weights; MLKD's official sum with numpy's percentile masks. The pure losses they
end in are tested against loops in test_functional_review_ofd_mlkd.py.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lightning_kd.distillers import MLKD, OFD, ReviewKD
from lightning_kd.distillers.reviewkd import ABF
from lightning_kd.functional import hcl_loss
from lightning_kd.models import create_model
from lightning_kd.taps import FeatureTaps, expand_taps

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ----------------------------------------------------------------------------------------------------------
# helpers: direct computations
# ----------------------------------------------------------------------------------------------------------
def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def _bn_batch(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.einsum("oi,bihw->bohw", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by its definition: output (i, j) reads input (floor(i * H / h), floor(j * W / w))."""
    rows = [(i * x.shape[2]) // size[0] for i in range(size[0])]
    cols = [(j * x.shape[3]) // size[1] for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def abf_direct(abf: ABF, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
    """One fusion step in eval mode: reduce, gate with the resized residual, resize, expand."""
    conv, bn = abf.reduce
    y = _bn_eval(_conv1x1(x, conv.weight), bn)
    if residual is not None:
        r = _nearest(residual, tuple(y.shape[2:]))
        att_conv = abf.attention[0]
        gates = torch.sigmoid(_conv1x1(torch.cat([y, r], dim=1), att_conv.weight, att_conv.bias))
        y = y * gates[:, :1] + r * gates[:, 1:2]
    if tuple(y.shape[2:]) != tuple(out_size):
        y = _nearest(y, out_size)
    conv3, bn3 = abf.expand
    return _bn_eval(F.conv2d(y, conv3.weight, padding=1), bn3), y


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def _features(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


# resnet8x4 (student) and resnet32x4 (teacher) at 32x32: stages 64x32, 128x16, 256x8 and a 256 embedding
R8X4 = [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 256)]
R32X4 = R8X4
# ShuffleV2 (student) against resnet32x4: smaller maps, resized to the teacher's sizes
SHUFFLEV2 = [(2, 116, 16, 16), (2, 232, 8, 8), (2, 464, 4, 4), (2, 1024)]


# ----------------------------------------------------------------------------------------------------------
# ReviewKD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("student_shapes", "teacher_shapes"), [(R8X4, R32X4), (SHUFFLEV2, R32X4)],
                         ids=["resnet8x4", "ShuffleV2"])  # fmt: skip
def test_reviewkd_abf_shapes(student_shapes, teacher_shapes) -> None:
    distiller = ReviewKD()
    s, t = _features(student_shapes, 0), _features(teacher_shapes, 1)
    distiller.build(s, t)
    assert len(distiller.fusions) == 4
    mid = min(512, student_shapes[-1][1])  # 256 for resnet8x4, 512 for ShuffleV2's 1024-wide embedding
    for index, (fusion, s_shape, t_shape) in enumerate(zip(distiller.fusions, student_shapes, teacher_shapes)):
        assert fusion.reduce[0].in_channels == s_shape[1] and fusion.reduce[0].out_channels == mid
        assert fusion.expand[0].out_channels == t_shape[1] and fusion.expand[0].kernel_size == (3, 3)
        assert (fusion.attention is None) == (index == 3)  # the deepest level (the embedding) fuses nothing
    teacher_sizes = [shape[2:] if len(shape) == 4 else (1, 1) for shape in teacher_shapes]
    outputs = distiller.fuse(s, teacher_sizes)
    expected = [(2, shape[1], *size) for shape, size in zip(teacher_shapes, teacher_sizes)]
    assert [tuple(o.shape) for o in outputs] == expected
    assert torch.isfinite(distiller(s, t, {})).item()


def test_reviewkd_default_layers_give_the_official_channel_and_size_lists() -> None:
    """On the bundled models, ("stages", "embedding") / ("preacts", "embedding") reproduce the official
    build_review_kd lists: resnet8x4 in [64, 128, 256, 256] at [32, 16, 8, 1]; ShuffleV2 in [116, 232, 464, 1024]
    at [16, 8, 4, 1] against resnet32x4's out [64, 128, 256, 256] at [32, 16, 8, 1]."""
    torch.set_num_threads(1)
    teacher = create_model("resnet32x4").eval()
    distiller = ReviewKD()
    t_taps = expand_taps(teacher, distiller.teacher_layers)
    assert t_taps == ["preact1", "preact2", "preact3", "embedding"]
    expected = {
        "resnet8x4": ([64, 128, 256, 256], [32, 16, 8, 1], 256),
        "ShuffleV2": ([116, 232, 464, 1024], [16, 8, 4, 1], 512),
    }
    probe = torch.zeros(2, 3, 32, 32)
    teacher_tap = FeatureTaps(teacher, t_taps)
    with torch.no_grad():
        teacher(probe)
    teacher_features = teacher_tap.pop()
    teacher_tap.remove()
    t = [teacher_features[n] for n in t_taps]
    for name, (channels, sizes, mid) in expected.items():
        student = create_model(name).eval()
        s_taps = expand_taps(student, distiller.student_layers)
        taps = FeatureTaps(student, s_taps)
        with torch.no_grad():
            student(probe)
        features = taps.pop()
        taps.remove()
        s = [features[n] for n in s_taps]
        assert [f.shape[1] for f in s] == channels
        assert [f.shape[2] if f.dim() == 4 else 1 for f in s] == sizes
        fresh = ReviewKD()
        fresh.build(s, t)
        assert fresh.fusions[0].reduce[0].out_channels == mid
        assert [f.expand[0].out_channels for f in fresh.fusions] == [64, 128, 256, 256]


def test_reviewkd_forward_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    # every resize happens: residuals upsampled 2 -> 4 and 8 -> 16, level 1 resized from 4 to the teacher's 8
    student_shapes = [(2, 6, 16, 16), (2, 10, 4, 4), (2, 8, 2, 2), (2, 12)]
    teacher_shapes = [(2, 5, 16, 16), (2, 7, 8, 8), (2, 4, 2, 2), (2, 9)]
    s, t = _features(student_shapes, 2), _features(teacher_shapes, 3)
    distiller = ReviewKD(warmup_epochs=20)
    distiller.build(s, t)
    _randomise_norms(distiller)
    distiller.eval()
    distiller.set_epoch(4)
    got = distiller(s, t, {})

    maps_s = [x if x.dim() == 4 else x[:, :, None, None] for x in s]
    maps_t = [x if x.dim() == 4 else x[:, :, None, None] for x in t]
    outputs, residual = [None] * 4, None
    for index in (3, 2, 1, 0):  # deepest first
        fusion = distiller.fusions[index]
        outputs[index], residual = abf_direct(fusion, maps_s[index], residual, maps_t[index].shape[2:])
    expected = (5 / 20) * hcl_loss(outputs, maps_t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert distiller.fusions[3].reduce[0].out_channels == 12  # M = min(512, C of the deepest student level)


def test_reviewkd_warmup() -> None:
    distiller = ReviewKD(warmup_epochs=20)
    factors = {}
    for epoch in (0, 1, 9, 18, 19, 20, 100):
        distiller.set_epoch(epoch)
        factors[epoch] = distiller.warmup_factor()
    assert factors == {0: 1 / 20, 1: 2 / 20, 9: 10 / 20, 18: 19 / 20, 19: 1.0, 20: 1.0, 100: 1.0}  # mdistiller: from 1
    original = ReviewKD(warmup_epochs=20, warmup_from_zero=True)  # the original CIFAR script: from 0
    assert [(original.set_epoch(e), original.warmup_factor())[1] for e in (0, 1, 10, 20, 21)] == [0.0, 0.05, 0.5, 1, 1]
    none = ReviewKD(warmup_epochs=0)
    none.set_epoch(0)
    assert none.warmup_factor() == 1.0

    s, t = _features([(2, 4, 4, 4), (2, 6)], 4), _features([(2, 3, 4, 4), (2, 5)], 5)
    distiller.build(s, t)
    distiller.eval()
    distiller.set_epoch(19)
    full = distiller(s, t, {})
    distiller.set_epoch(3)
    torch.testing.assert_close(distiller(s, t, {}), full * 4 / 20)


def test_reviewkd_abf_init_and_gradients_reach_every_fusion() -> None:
    s, t = _features(R8X4, 6), _features(R32X4, 7)
    distiller = ReviewKD()
    distiller.build(s, t)
    conv = distiller.fusions[0].reduce[0]
    bound = math.sqrt(3 / conv.in_channels)  # kaiming_uniform(a=1): gain 1, U(-sqrt(3 / fan_in), +)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    distiller(s, t, {}).backward()
    for fusion in distiller.fusions:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_reviewkd_rejects_bad_arguments() -> None:
    for kwargs, word in (({"weight": -1.0}, "weight"), ({"weight": float("nan")}, "weight"),
                         ({"warmup_epochs": -1}, "warmup_epochs"), ({"teacher_bn": "frozen"}, "teacher_bn"),
                         ({"max_mid_channels": 0}, "max_mid_channels")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            ReviewKD(**kwargs)
    assert ReviewKD().teacher_bn_mode == "eval" and ReviewKD(teacher_bn="train").teacher_bn_mode == "train"
    with pytest.raises(ValueError, match="embeddings"):
        ReviewKD().build([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4, 4)])


# ----------------------------------------------------------------------------------------------------------
# OFD
# ----------------------------------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def margin_by_formula(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    return m - s * _phi(m / s) / _cdf(-m / s) if _cdf(-m / s) > 0.001 else -3 * s


class TinyTeacher(nn.Module):
    """Two stages, each conv-BN-(preact)-ReLU; ``feature_paths`` names the BatchNorms as the bundled models do."""

    def __init__(self, gammas: list[list[float]], betas: list[list[float]], with_norms: bool = True) -> None:
        super().__init__()
        channels = [len(g) for g in gammas]
        self.conv1, self.bn1 = nn.Conv2d(3, channels[0], 3, padding=1), nn.BatchNorm2d(channels[0])
        self.conv2, self.bn2 = nn.Conv2d(channels[0], channels[1], 3, 2, 1), nn.BatchNorm2d(channels[1])
        self.pre1, self.pre2 = nn.Identity(), nn.Identity()
        self.fc = nn.Linear(channels[1], 10)
        with torch.no_grad():
            for bn, g, b in ((self.bn1, gammas[0], betas[0]), (self.bn2, gammas[1], betas[1])):
                bn.weight.copy_(torch.tensor(g))
                bn.bias.copy_(torch.tensor(b))
        self.feature_paths = {"preact1": "pre1", "preact2": "pre2", "embedding": "fc:input", "classifier": "fc"}
        if with_norms:
            self.feature_paths.update({"preact1_norm": "bn1", "preact2_norm": "bn2"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pre1(self.bn1(self.conv1(x))))
        x = torch.relu(self.pre2(self.bn2(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


GAMMAS = [[1.0, -0.5, 2.0], [0.3, 1.0, 1.0, 0.8]]
BETAS = [[0.0, 0.3, 7.0], [-1.0, 3.0, 3.2, 0.5]]  # 3.0 / 3.2 sit either side of the -3 sigma cut-off


def test_ofd_margins_from_a_batchnorm_with_known_weights() -> None:
    teacher = TinyTeacher(GAMMAS, BETAS)
    distiller = OFD()
    distiller.attach(nn.Identity(), teacher)
    margins = distiller.margins()
    assert len(margins) == 2
    for margin, gammas, betas in zip(margins, GAMMAS, BETAS):
        g32, b32 = torch.tensor(gammas).tolist(), torch.tensor(betas).tolist()
        expected = [margin_by_formula(g, b) for g, b in zip(g32, b32)]
        assert margin.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert margins[1][2].item() == pytest.approx(-3.0, rel=1e-6)  # beta/gamma = 3.2: the -3 sigma branch
    assert margins[1][1].item() != pytest.approx(-3.0, rel=1e-2)  # beta/gamma = 3.0: the truncated mean
    # explicit BatchNorm paths give the same, and a teacher without feature_paths entries needs them
    explicit = OFD(teacher_norms=["bn1", "bn2"])
    explicit.attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS, with_norms=False))
    assert all(torch.equal(a, b) for a, b in zip(explicit.margins(), margins))


def test_ofd_margins_are_buffers_that_survive_a_state_dict_round_trip() -> None:
    first = OFD()
    first.attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS))
    state = first.state_dict()
    assert {"margin1", "margin2"} <= set(state)
    assert {name for name, _ in first.named_buffers()} >= {"margin1", "margin2"}
    other = OFD()
    other.attach(nn.Identity(), TinyTeacher([[2.0, 2.0, 2.0], [1.0] * 4], [[0.0] * 3, [0.0] * 4]))
    assert not torch.equal(other.margin1, first.margin1)
    other.load_state_dict(state)
    assert torch.equal(other.margin1, first.margin1) and torch.equal(other.margin2, first.margin2)
    # the buffers follow the module's device and dtype moves
    assert other.double().margin1.dtype == torch.float64


def test_ofd_margins_follow_the_teachers_weights_when_attached_again() -> None:
    teacher = TinyTeacher(GAMMAS, BETAS)
    distiller = OFD()
    distiller.attach(nn.Identity(), teacher)
    before = distiller.margin1.clone()
    with torch.no_grad():
        teacher.bn1.weight.mul_(2.0)
    distiller.attach(nn.Identity(), teacher)  # after loading other weights into the teacher
    assert not torch.equal(distiller.margin1, before)
    assert distiller.margin1[0].item() == pytest.approx(margin_by_formula(2.0, 0.0), rel=1e-6)


def test_ofd_margin_lookup_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="preact1_norm"):
        OFD().attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS, with_norms=False))
    with pytest.raises(ValueError, match="affine BatchNorm"):
        OFD(teacher_norms=["conv1", "bn2"]).attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS, with_norms=False))
    with pytest.raises(ValueError, match="one per layer"):
        OFD(teacher_norms=["bn1"]).attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS))
    with pytest.raises(RuntimeError, match="attach"):
        OFD().build([torch.zeros(2, 3, 4, 4)], [torch.zeros(2, 3, 4, 4)])
    distiller = OFD()
    distiller.attach(nn.Identity(), TinyTeacher(GAMMAS, BETAS))
    with pytest.raises(ValueError, match="channels"):
        distiller.build([torch.zeros(2, 3, 4, 4)] * 2, [torch.zeros(2, 5, 4, 4)] * 2)


def test_ofd_rejects_bad_arguments() -> None:
    for kwargs, word in (({"weight": -1e-3}, "weight"), ({"weight": float("inf")}, "weight"),
                         ({"teacher_bn": "frozen"}, "teacher_bn")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            OFD(**kwargs)
    assert OFD().teacher_bn_mode == "eval" and OFD(teacher_bn="train").teacher_bn_mode == "train"


def test_ofd_connector_init() -> None:
    distiller = OFD()
    distiller.attach(nn.Identity(), TinyTeacher([[1.0] * 256, [1.0] * 4], [[0.0] * 256, [0.0] * 4]))
    distiller.build([torch.zeros(2, 128, 4, 4), torch.zeros(2, 8, 2, 2)], [torch.zeros(2, 256, 4, 4),
                                                                          torch.zeros(2, 4, 2, 2)])  # fmt: skip
    conv, bn = distiller.connectors[0]
    assert conv.bias is None and conv.kernel_size == (1, 1)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)  # N(0, sqrt(2 / (k k C_out)))
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))


def test_ofd_forward_matches_a_direct_computation() -> None:
    torch.manual_seed(9)
    teacher = TinyTeacher([[1.0, 0.5, 2.0], [0.7, 1.0, 1.5, 0.2]], [[0.1, -0.3, 1.0], [0.0, 0.5, -1.0, 2.0]])
    teacher.feature_paths.update({"preact3": "pre2", "preact3_norm": "bn2"})  # a third stage, same BatchNorm
    distiller = OFD(teacher_layers=["preact1", "preact2", "preact3"], student_layers=["a", "b", "c"])
    distiller.attach(nn.Identity(), teacher)
    s = _features([(3, 2, 8, 8), (3, 5, 4, 4), (3, 6, 2, 2)], 10)
    t = _features([(3, 3, 8, 8), (3, 4, 8, 8), (3, 4, 2, 2)], 11)  # stage 2: the teacher map is twice as large
    distiller.build(s, t)
    got = distiller(s, t, {})

    expected = 0.0
    for index, (connector, x, y, margin) in enumerate(zip(distiller.connectors, s, t, distiller.margins())):
        out = _bn_batch(_conv1x1(x, connector[0].weight), connector[1])  # training mode: batch statistics
        if y.shape[2:] != out.shape[2:]:
            y = F.adaptive_avg_pool2d(y, out.shape[2:])
        target = torch.maximum(y, margin.view(1, -1, 1, 1))
        stage = ((out - target) ** 2 * ((out > target) | (y > 0))).sum() / x.shape[0]
        expected = expected + stage * [0.25, 0.5, 1.0][index]  # 1 / 2^(n-1-i)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ofd_on_the_bundled_resnets() -> None:
    """resnet32x4 -> resnet8x4 with the tap group "preacts": the margins come from each stage's last bn2."""
    torch.set_num_threads(1)
    teacher, student = create_model("resnet32x4").eval(), create_model("resnet8x4")
    _randomise_norms(teacher, 12)
    paths = [f"layer{i}.4.bn2" for i in (1, 2, 3)]  # 5 blocks per stage in resnet32x4
    if "preact1_norm" in teacher.feature_paths:
        assert [teacher.feature_paths[f"preact{i}_norm"] for i in (1, 2, 3)] == paths
        distiller = OFD()
    else:
        distiller = OFD(teacher_norms=paths)
    distiller.teacher_layers = expand_taps(teacher, distiller.teacher_layers)
    distiller.student_layers = expand_taps(student, distiller.student_layers)
    distiller.attach(student, teacher)
    modules = dict(teacher.named_modules())
    for margin, path in zip(distiller.margins(), paths):
        bn = modules[path]
        expected = [margin_by_formula(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert margin.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    images = torch.randn(2, 3, 32, 32)
    s_taps, t_taps = FeatureTaps(student, distiller.student_layers), FeatureTaps(teacher, distiller.teacher_layers)
    student(images)
    with torch.no_grad():
        teacher(images)
    s, t = s_taps.pop(), t_taps.pop()
    s = [s[n] for n in distiller.student_layers]
    t = [t[n] for n in distiller.teacher_layers]
    distiller.build([x.detach() for x in s], t)
    loss = distiller(s, t, {})
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in distiller.connectors.parameters())


# ----------------------------------------------------------------------------------------------------------
# MLKD
# ----------------------------------------------------------------------------------------------------------
def mlkd_total_direct(s_w, t_w, s_s, t_s, labels, w_ce=0.1, w_kd=0.9, t0=4.0) -> torch.Tensor:
    """The official objective, written out: w_ce [CE_w + CE_s] + w_kd [masked weak KD, the "strong" KD sum
    (T0, 3, 5 strong; 2, 6 weak), weak CC x mean(class mask), weak BC x mean(sample mask)]."""
    p = torch.softmax(t_w.double(), dim=1)
    confidence, class_confidence = p.max(dim=1).values.numpy(), p.sum(dim=0).numpy()
    m = float(np.mean(confidence <= np.percentile(confidence, 50)))
    k = float(np.mean(class_confidence <= np.percentile(class_confidence, 50)))
    s_w, t_w, s_s, t_s = (z.double() for z in (s_w, t_w, s_s, t_s))

    def kd(a, b, temp):
        q = torch.softmax(b / temp, dim=1)
        return temp**2 * (q * (torch.log(q) - torch.log_softmax(a / temp, dim=1))).sum(dim=1).mean()

    def cc(a, b, temp):
        pa, pb = torch.softmax(a / temp, dim=1), torch.softmax(b / temp, dim=1)
        return ((pa.T @ pa - pb.T @ pb) ** 2).sum() / a.shape[1]

    def bc(a, b, temp):
        pa, pb = torch.softmax(a / temp, dim=1), torch.softmax(b / temp, dim=1)
        return ((pa @ pa.T - pb @ pb.T) ** 2).sum() / a.shape[0]

    temps = (t0, 3.0, 5.0, 2.0, 6.0)
    weak = sum(m * kd(s_w, t_w, x) for x in temps)
    strong = kd(s_s, t_s, t0) + kd(s_s, t_s, 3.0) + kd(s_s, t_s, 5.0) + kd(s_w, t_w, 2.0) + kd(s_w, t_w, 6.0)
    class_level = sum(k * cc(s_w, t_w, x) for x in temps)
    batch_level = sum(m * bc(s_w, t_w, x) for x in temps)
    ce = F.cross_entropy(s_w, labels) + F.cross_entropy(s_s, labels)
    return w_ce * ce + w_kd * (weak + strong + class_level + batch_level)


def _views(batch: int = 8, classes: int = 10, seed: int = 13):
    generator = torch.Generator().manual_seed(seed)
    logits = [3 * torch.randn(batch, classes, generator=generator) for _ in range(4)]
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return logits, labels


def test_mlkd_total_matches_the_official_objective() -> None:
    (s_w, t_w, s_s, t_s), labels = _views()
    distiller = MLKD()  # temperature 4, weight 0.9, strong_ce_weight 0.1
    assert distiller.student_layers == ["logits", "logits@strong"] == distiller.teacher_layers
    terms = distiller([s_w, s_s], [t_w, t_s], {"label": labels})
    assert set(terms) == {"kd", "ce_strong"}
    task_loss_weight = 0.1  # the module's CE on the weak view
    total = (
        task_loss_weight * F.cross_entropy(s_w, labels)
        + distiller.component_weights.get("kd", distiller.weight) * terms["kd"]
        + distiller.component_weights["ce_strong"] * terms["ce_strong"]
    )
    expected = mlkd_total_direct(s_w, t_w, s_s, t_s, labels)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distiller.component_weights == {"ce_strong": 0.1}


def test_mlkd_options_reach_the_loss() -> None:
    (s_w, t_w, s_s, t_s), labels = _views(seed=14)
    batch = {"label": labels}
    official = MLKD()([s_w, s_s], [t_w, t_s], batch)["kd"]
    for kwargs in ({"temperature": 2.0}, {"mask": "per_sample"}, {"standardize": True}):
        assert MLKD(**kwargs)([s_w, s_s], [t_w, t_s], batch)["kd"].item() != pytest.approx(official.item(), rel=1e-3)
    global_scope = MLKD(batch_scope="global")([s_w, s_s], [t_w, t_s], batch)["kd"]  # one process: the same batch
    torch.testing.assert_close(global_scope, official)


def test_mlkd_gradients_reach_both_student_views() -> None:
    (s_w, t_w, s_s, t_s), labels = _views(seed=15)
    s_w.requires_grad_()
    s_s.requires_grad_()
    terms = MLKD()([s_w, s_s], [t_w, t_s], {"label": labels})
    (terms["kd"] + terms["ce_strong"]).backward()
    assert torch.isfinite(s_w.grad).all() and s_w.grad.abs().sum() > 0
    assert torch.isfinite(s_s.grad).all() and s_s.grad.abs().sum() > 0


def test_mlkd_rejects_bad_arguments_and_data_without_the_strong_view() -> None:
    for kwargs, word in (({"temperature": 0.0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                         ({"weight": -0.9}, "weight"), ({"strong_ce_weight": float("nan")}, "strong_ce_weight"),
                         ({"mask": "paper"}, "mask"), ({"student_layers": ["logits"]}, "two layers"),
                         ({"batch_scope": "node"}, "batch_scope")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            MLKD(**kwargs)

    class Data:
        strong_view = False

    with pytest.raises(ValueError, match="strong_view"):
        MLKD().setup_data(Data())
    Data.strong_view = True
    MLKD().setup_data(Data())
    MLKD().setup_data(None)
    with pytest.raises(ValueError, match="label"):
        MLKD()([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)] * 2, {})


def test_mlkd_through_the_core_on_two_views() -> None:
    """The module side runs each network once per view: its total equals the objective on the networks' logits."""
    core_module = pytest.importorskip("lightning_kd.core")
    torch.set_num_threads(1)
    torch.manual_seed(16)
    core = core_module.Distillation("resnet8", "resnet14", [MLKD()], task_loss_weight=0.1, num_classes=10,
                                    input_size=(3, 16, 16))  # fmt: skip
    _randomise_norms(core.teacher, 17)
    core.eval()  # deterministic BatchNorm on both networks
    batch = {"image": torch.randn(6, 3, 16, 16), "image_strong": torch.randn(6, 3, 16, 16),
             "label": torch.randint(0, 10, (6,))}  # fmt: skip
    total = core.compute_losses(batch).total
    with torch.no_grad():
        s_w, s_s = core.student(batch["image"]), core.student(batch["image_strong"])
        t_w, t_s = core.teacher(batch["image"]), core.teacher(batch["image_strong"])
    expected = mlkd_total_direct(s_w, t_w, s_s, t_s, batch["label"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _distiller_from(config: dict):
    [spec] = config["model"]["distillers"]
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


def test_method_configs_hold_the_official_settings() -> None:
    review = _load(CONFIGS / "methods" / "reviewkd.yaml")
    distiller = _distiller_from(review)
    assert isinstance(distiller, ReviewKD) and review["model"]["task_loss_weight"] == 1.0
    assert (distiller.weight, distiller.warmup_epochs, distiller.warmup_from_zero) == (5.0, 20, False)

    ofd = _load(CONFIGS / "methods" / "ofd.yaml")
    distiller = _distiller_from(ofd)
    assert isinstance(distiller, OFD) and ofd["model"]["task_loss_weight"] == 1.0
    assert (distiller.weight, distiller.teacher_bn_mode) == (1e-3, "train")

    mlkd = _load(CONFIGS / "methods" / "mlkd.yaml")
    distiller = _distiller_from(mlkd)
    assert isinstance(distiller, MLKD) and mlkd["model"]["task_loss_weight"] == 0.1
    assert (distiller.temperature, distiller.weight, distiller.strong_ce_weight, distiller.mask) == (
        4.0, 0.9, 0.1, "scalar"
    )  # fmt: skip
    assert mlkd["model"]["optimizer"]["init_args"]["lr"] == 0.025
    assert mlkd["data"]["init_args"]["strong_view"] is True


def test_override_files_name_real_pairs_and_hold_the_official_values() -> None:
    pairs = {p.stem for p in (CONFIGS / "cifar100" / "pairs").glob("*.yaml")}
    overrides = CONFIGS / "cifar100" / "overrides"
    review = {p.stem: _distiller_from(_load(p)).weight for p in (overrides / "reviewkd").glob("*.yaml")}
    assert review == {"resnet32x4-ShuffleV2": 8.0, "resnet56-resnet20": 0.6, "resnet110-resnet32": 1.0}
    mlkd = {p.stem: _load(p) for p in (overrides / "mlkd").glob("*.yaml")}
    epochs = {stem: c["trainer"]["max_epochs"] for stem, c in mlkd.items()}
    assert epochs == {"vgg13-MobileNetV2": 480, "ResNet50-MobileNetV2": 480, "wrn_40_2-ShuffleV1": 480,
                      "resnet32x4-ShuffleV1": 960, "resnet32x4-ShuffleV2": 960}  # fmt: skip
    assert all(c["model"]["optimizer"]["init_args"] == {"lr": 0.01} for c in mlkd.values())
    assert set(review) | set(mlkd) <= pairs
    assert not (overrides / "ofd").exists()  # no official per-pair OFD values


@pytest.mark.parametrize(
    ("method", "pair", "override"),
    [("reviewkd", "resnet56-resnet20", True), ("ofd", "resnet56-resnet20", False),
     ("mlkd", "resnet32x4-ShuffleV2", True), ("mlkd", "resnet56-resnet20", False)],
)  # fmt: skip
def test_configs_compose_through_the_cli(method: str, pair: str, override: bool, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from lightning_kd.cli import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    torch.set_num_threads(1)
    args = ["--config", str(CONFIGS / "cifar100" / "pairs" / f"{pair}.yaml"),
            "--config", str(CONFIGS / "methods" / f"{method}.yaml")]  # fmt: skip
    if override:
        args += ["--config", str(CONFIGS / "cifar100" / "overrides" / method / f"{pair}.yaml")]
    cli = run_cli([*args, "--model.teacher_checkpoint=null", "--trainer.logger=false"], run=False)
    [distiller] = cli.model.distillers
    optimizer = cli.model.optimizer_factory([nn.Parameter(torch.zeros(1))])
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)  # the pair's recipe survives the merge
    if method == "reviewkd":
        assert isinstance(distiller, ReviewKD) and distiller.weight == 0.6 and group["lr"] == 0.05
    elif method == "ofd":
        assert isinstance(distiller, OFD) and distiller.teacher_bn_mode == "train" and len(distiller.margins()) == 3
    else:
        assert isinstance(distiller, MLKD) and cli.model.task_loss_weight == 0.1
        assert cli.datamodule.strong_view is True
        expected = (0.01, 960) if override else (0.025, 240)
        assert (group["lr"], cli.trainer.max_epochs) == expected
