"""Feature-map distillers (VID, FitNet, AT, NST) inside the DistillationModule: the CRD benchmark's defaults, tap
groups expanded per model, learnable parts and their shape checks, and short fits on the digits.

Networks: resnet8 students at 16x16 on the digits, resnet14 (same widths) or resnet8x4 (wider) teachers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SIZE, assert_two_steps_train, small_batch, small_module
from lightning_kd import DistillationModule
from lightning_kd.connectors import HintRegressor, VIDRegressor
from lightning_kd.distillers import AB, AT, FSP, FT, NST, SP, VID, FitNet
from lightning_kd.functional import at_loss, hint_loss, nst_loss, vid_loss


# --------------------------------------------------------------------------------------------------------------
# defaults: the CRD benchmark's layers and weights, tap groups per model
# --------------------------------------------------------------------------------------------------------------
def test_reference_defaults() -> None:
    assert (FitNet().weight, FitNet().student_layers, FitNet().teacher_layers) == (100.0, ["stage2"], ["stage2"])
    assert FitNet().stage_epochs == 0 and FitNet().active_in_main
    stages = ["stages"]  # a group: every stage output of the model (see test_default_groups_expand_per_model)
    assert (AT().weight, AT().p, AT().student_layers, AT().teacher_layers) == (1000.0, 2.0, stages, stages)
    assert (NST().weight, NST().student_layers, NST().teacher_layers) == (50.0, stages, stages)


def test_default_groups_expand_per_model() -> None:
    module = DistillationModule("vgg8", teacher="vgg13", distillers=[AT(), SP(), FSP()], num_classes=10)
    at, sp, fsp = module.distillers
    four = ["stage1", "stage2", "stage3", "stage4"]
    assert at.student_layers == at.teacher_layers == four  # VGGs have four stages, the CIFAR ResNets three
    assert sp.student_layers == sp.teacher_layers == ["stage4"]
    assert fsp.student_layers == ["stem", *four]
    module = DistillationModule("resnet8", teacher="resnet14", distillers=[AT()], num_classes=10)
    assert module.distillers[0].student_layers == ["stage1", "stage2", "stage3"]


def test_four_stage_networks_get_every_stage() -> None:
    module = DistillationModule("vgg8", "vgg13", [VID(), AB(), FT()], num_classes=10, input_size=(3, 32, 32))
    vid, ab, ft = module.distillers
    assert vid.student_layers == vid.teacher_layers == ["stage1", "stage2", "stage3", "stage4"]
    assert len(vid.regressors) == 4
    assert ab.student_layers == ["preact1", "preact2", "preact3", "preact4"]
    assert ab.layer_weights == [0.125, 0.25, 0.5, 1.0] and len(ab.connectors) == 4
    assert ft.student_layers == ft.teacher_layers == ["stage4"]
    assert [s.name for s in module.stages] == ["ab_init", "ft_init", "main"]


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="one layer on each side"):
        FitNet(student_layers=["stage1", "stage2"])
    with pytest.raises(ValueError, match="compares layers pairwise"):
        DistillationModule("resnet8", teacher="resnet8", distillers=[AT(student_layers=["stage1", "stage2"],
                                                                        teacher_layers=["stage3"])],
                           num_classes=10, input_size=SIZE)  # fmt: skip
    with pytest.raises(ValueError, match="reads no student layer"):
        DistillationModule("resnet8", teacher="resnet8", distillers=[NST(student_layers=[])], num_classes=10,
                           input_size=SIZE)
    with pytest.raises(ValueError, match="p >= 1"):
        AT(p=0.5)
    with pytest.raises(ValueError, match="no initialisation stage"):
        AT(stage_epochs=3)


def test_at_and_nst_sum_the_pure_function_over_layers() -> None:
    s = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4), torch.randn(3, 8, 2, 2)]
    t = [torch.randn(3, 5, 4, 4), torch.randn(3, 6, 4, 4), torch.randn(3, 3, 4, 4)]
    torch.testing.assert_close(AT()(s, t, {}), sum(at_loss(a, b) for a, b in zip(s, t)))
    torch.testing.assert_close(AT(p=3.0)(s, t, {}), sum(at_loss(a, b, 3.0) for a, b in zip(s, t)))
    torch.testing.assert_close(NST()(s, t, {}), sum(nst_loss(a, b) for a, b in zip(s, t)))


# --------------------------------------------------------------------------------------------------------------
# VID
# --------------------------------------------------------------------------------------------------------------
def test_vid_builds_a_regressor_per_stage_pair_with_variance_five() -> None:
    module = small_module(VID(), teacher="resnet8x4")
    vid = module.distillers[0]
    assert vid.student_layers == vid.teacher_layers == ["stage1", "stage2", "stage3"]
    assert vid.weight == 1.0
    for regressor, (c_s, c_t) in zip(vid.regressors, [(16, 64), (32, 128), (64, 256)]):
        assert isinstance(regressor, VIDRegressor)
        convs = [m for m in regressor.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(c_s, c_t), (c_t, c_t), (c_t, c_t)]
        assert all(c.kernel_size == (1, 1) and c.bias is None for c in convs)
        assert [type(m) for m in regressor.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
        torch.testing.assert_close(regressor.variance(), torch.full((c_t,), 5.0), rtol=1e-6, atol=0)


def test_vid_variance_is_stable_for_large_parameters() -> None:
    regressor = VIDRegressor(3, 4)
    x, target = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    for alpha, variance in ((1000.0, 1000.0 + 1e-5), (-1000.0, 1e-5)):
        with torch.no_grad():
            regressor.alpha.fill_(alpha)
        var = regressor.variance()
        torch.testing.assert_close(var, torch.full((4,), variance), rtol=1e-6, atol=0)
        loss = vid_loss(regressor(x), target, var)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(regressor.alpha.grad).all()
        regressor.zero_grad()


def test_vid_forward_pools_the_student_before_its_regressor_and_sums_layers() -> None:
    vid = VID(student_layers=["a", "b"], teacher_layers=["a", "b"])
    s = [torch.randn(2, 3, 8, 6), torch.randn(2, 5, 4, 4)]
    t = [torch.randn(2, 4, 4, 3), torch.randn(2, 6, 4, 4)]
    vid.build(s, t)
    expected = sum(
        vid_loss(r(F.adaptive_avg_pool2d(a, b.shape[2:])), b, r.variance()) for r, a, b in zip(vid.regressors, s, t)
    )
    torch.testing.assert_close(vid(s, t, {}), expected)


def test_vid_main_stage_gradient_reaches_student_and_regressors_not_teacher() -> None:
    module = small_module(VID())
    vid = module.distillers[0]
    terms = module.core.compute_losses(small_batch())
    assert set(terms.losses) == {"ce", "vid"} and terms.weights["vid"] == vid.weight
    terms.losses["vid"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is not None for p in vid.main_parameters())


# --------------------------------------------------------------------------------------------------------------
# FitNet's regressor
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "student_shape, teacher_shape, conv",
    [
        ((2, 16, 16, 16), (2, 32, 8, 8), torch.nn.Conv2d),  # student twice the teacher's size
        ((2, 16, 4, 4), (2, 32, 8, 8), torch.nn.ConvTranspose2d),  # half
        ((2, 16, 8, 8), (2, 32, 8, 8), torch.nn.Conv2d),  # equal
        ((2, 8, 12, 6), (2, 4, 6, 3), torch.nn.Conv2d),  # non-square, twice
        ((2, 8, 3, 5), (2, 4, 6, 10), torch.nn.ConvTranspose2d),  # non-square, half
    ],
)
def test_hint_regressor_shapes(student_shape: tuple, teacher_shape: tuple, conv: type) -> None:
    regressor = HintRegressor(student_shape, teacher_shape)
    assert type(regressor.conv) is conv
    if student_shape[2:] == teacher_shape[2:]:
        assert regressor.conv.kernel_size == (1, 1)
    out = regressor(torch.randn(student_shape))
    assert out.shape == teacher_shape
    assert (out >= 0).all()  # conv + BN + ReLU


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [
        ((2, 16, 4, 4), (2, 32, 16, 16)),  # a quarter of the teacher's size
        ((2, 16, 6, 6), (2, 32, 8, 8)),  # smaller, but not half
        ((2, 16, 8, 4), (2, 32, 8, 8)),  # equal heights, narrower student
    ],
)
def test_hint_regressor_refuses_sizes_the_reference_refuses(student_shape: tuple, teacher_shape: tuple) -> None:
    with pytest.raises(ValueError, match="same, half or twice") as info:
        HintRegressor(student_shape, teacher_shape)
    assert f"student {student_shape} and teacher {teacher_shape}" in str(info.value)


def test_fitnet_build_error_names_layers_and_shapes() -> None:
    fitnet = FitNet(student_layers=["stage3"], teacher_layers=["stage1"])
    with pytest.raises(ValueError) as info:
        fitnet.build([torch.zeros(2, 64, 4, 4)], [torch.zeros(2, 16, 16, 16)])
    message = str(info.value)
    for part in ("'stage3'", "'stage1'", "(2, 64, 4, 4)", "(2, 16, 16, 16)"):
        assert part in message


def test_fitnet_regresses_then_compares() -> None:
    fitnet = FitNet()
    s, t = torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4)
    fitnet.build([s], [t])
    fitnet.eval()
    torch.testing.assert_close(fitnet([s], [t], {}), hint_loss(fitnet.regressor(s), t))


# --------------------------------------------------------------------------------------------------------------
# short fits on the digits
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [FitNet, AT, NST, VID], ids=["fitnet", "at", "nst", "vid"])
def test_two_steps_give_finite_logged_losses_and_train_the_parts(make) -> None:
    assert_two_steps_train(make(), positive=make is not VID)  # VID's loss: a negative log-likelihood, any sign
