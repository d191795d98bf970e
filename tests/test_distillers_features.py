"""FitNet, AT, SP, CC, FSP and NST distillers: defaults, learnable parts, shape checks, short fits,
the initialisation stages, and the digits configs through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_kd.cli import run_cli
from lightning_kd.connectors import HintRegressor
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import AT, CC, FSP, KD, NST, SP, FitNet
from lightning_kd.functional import at_loss, cc_loss, fsp_loss, hint_loss, nst_loss, sp_loss
from lightning_kd.module import DistillationModule

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fitnet", "at", "sp", "cc", "fsp", "nst"]


# --------------------------------------------------------------------------------------------------------------
# defaults: the CRD benchmark's layers and weights
# --------------------------------------------------------------------------------------------------------------
def test_reference_defaults() -> None:
    assert (FitNet().weight, FitNet().student_layers, FitNet().teacher_layers) == (100.0, ["stage2"], ["stage2"])
    assert FitNet().stage_epochs == 0 and FitNet().active_in_main
    stages = ["stages"]  # a group: every stage output of the model (see test_default_groups_expand_per_model)
    assert (AT().weight, AT().p, AT().student_layers, AT().teacher_layers) == (1000.0, 2.0, stages, stages)
    assert (SP().weight, SP().student_layers, SP().teacher_layers) == (3000.0, ["last_stage"], ["last_stage"])
    assert (CC().weight, CC().dim, CC().student_layers, CC().teacher_layers) == (0.02, 128, ["embedding"], ["embedding"])
    fsp = FSP()
    assert fsp.student_layers == fsp.teacher_layers == ["stem", *stages]
    assert (fsp.stage_epochs, fsp.active_in_main) == (30, False)
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


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="one layer on each side"):
        FitNet(student_layers=["stage1", "stage2"])
    small = dict(num_classes=10, input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="compares layers pairwise"):
        DistillationModule("resnet8", teacher="resnet8", distillers=[AT(student_layers=["stage1", "stage2"],
                                                                        teacher_layers=["stage3"])], **small)
    with pytest.raises(ValueError, match="reads no student layer"):
        DistillationModule("resnet8", teacher="resnet8", distillers=[NST(student_layers=[])], **small)
    with pytest.raises(ValueError, match="p >= 1"):
        AT(p=0.5)
    with pytest.raises(ValueError, match="one layer"):
        CC(student_layers=["embedding", "stage3"])
    with pytest.raises(ValueError, match="train nothing"):
        FSP(stage_epochs=0)
    assert FSP(stage_epochs=0, in_main=True).active_in_main
    with pytest.raises(ValueError, match="no initialisation stage"):
        AT(stage_epochs=3)


def test_forward_is_the_summed_pure_function() -> None:
    s = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4), torch.randn(3, 8, 2, 2)]
    t = [torch.randn(3, 5, 4, 4), torch.randn(3, 6, 4, 4), torch.randn(3, 3, 4, 4)]
    torch.testing.assert_close(AT()(s, t, {}), sum(at_loss(a, b) for a, b in zip(s, t)))
    torch.testing.assert_close(AT(p=3.0)(s, t, {}), sum(at_loss(a, b, 3.0) for a, b in zip(s, t)))
    torch.testing.assert_close(NST()(s, t, {}), sum(nst_loss(a, b) for a, b in zip(s, t)))
    torch.testing.assert_close(SP()(s[2:], t[2:], {}), sp_loss(s[2], t[2]))
    fsp_s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    fsp_t = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    fsp = FSP(student_layers=["stem", "stage1"])
    torch.testing.assert_close(fsp(fsp_s, fsp_t, {}), fsp_loss(fsp_s, fsp_t))
    torch.testing.assert_close(fsp.stage_loss(fsp_s, fsp_t, {}), fsp_loss(fsp_s, fsp_t))


# --------------------------------------------------------------------------------------------------------------
# FitNet's regressor and FSP's channel check
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
    [((2, 16, 24, 24), (2, 32, 8, 8)), ((2, 16, 8, 8), (2, 32, 8, 4)), ((2, 16, 7, 7), (2, 32, 4, 4))],
)
def test_hint_regressor_refuses_other_sizes(student_shape: tuple, teacher_shape: tuple) -> None:
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


def test_fsp_build_names_the_first_mismatching_index() -> None:
    fsp = FSP(student_layers=["stem", "stage1", "stage2", "stage3"])
    s = [torch.zeros(2, c, 4, 4) for c in (16, 16, 32, 64)]
    t = [torch.zeros(2, c, 4, 4) for c in (16, 16, 48, 128)]
    with pytest.raises(ValueError) as info:
        fsp.build(s, t)
    message = str(info.value)
    for part in ("index 2", "'stage2'", "32 channels", "48"):
        assert part in message
    assert "128" not in message


def test_fsp_refuses_a_pair_with_different_widths() -> None:
    with pytest.raises(ValueError, match="index 0 .*'stem' has 16 channels .* has 32"):
        DistillationModule("resnet8", "resnet8x4", [FSP()], num_classes=10, input_size=(3, 16, 16))


def test_cc_embeds_both_sides_with_trainable_linear_maps() -> None:
    cc = CC(dim=7)
    s, t = torch.randn(4, 16), torch.randn(4, 64)
    cc.build([s], [t])
    assert cc.embed_student.linear.weight.shape == (7, 16)
    assert cc.embed_teacher.linear.weight.shape == (7, 64)
    loss = cc([s], [t], {})
    torch.testing.assert_close(loss, cc_loss(cc.embed_student(s), cc.embed_teacher(t)))
    loss.backward()
    assert cc.embed_teacher.linear.weight.grad.abs().sum() > 0
    assert {id(p) for p in cc.main_parameters()} == {id(p) for p in cc.parameters()}


# --------------------------------------------------------------------------------------------------------------
# short fits on the digits
# --------------------------------------------------------------------------------------------------------------
def _module(distiller, teacher: str = "resnet14") -> DistillationModule:
    return DistillationModule("resnet8", teacher, [distiller], num_classes=10, input_size=(3, 16, 16))


def _trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "make",
    [FitNet, AT, SP, CC, NST, lambda: FSP(stage_epochs=0, in_main=True)],
    ids=["fitnet", "at", "sp", "cc", "nst", "fsp_in_main"],
)
def test_two_steps_give_finite_logged_losses(make) -> None:
    torch.manual_seed(0)
    distiller = make()
    module = _module(distiller)
    before = _snapshot(distiller)
    trainer = _trainer()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, size=16))
    assert trainer.global_step == 2
    logged = trainer.callback_metrics
    for key in (f"train/{distiller.name}", "train/ce", "train/loss"):
        assert key in logged and torch.isfinite(logged[key]), (key, dict(logged))
    assert logged[f"train/{distiller.name}"] > 0
    # learnable parts are in the optimizer
    for key, value in distiller.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert not torch.equal(value, before[key]), f"{key} did not train"


def test_fsp_initialisation_stage_trains_features_not_classifier() -> None:
    torch.manual_seed(0)
    module = _module(FSP(stage_epochs=1), teacher="resnet8")
    assert [s.name for s in module.stages] == ["fsp_init", "main"]
    student_before = _snapshot(module.student)
    teacher_before = _snapshot(module.teacher)
    trainer = _trainer(max_steps=-1, max_epochs=1, limit_train_batches=3)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, size=16))
    assert module.current_stage.name == "fsp_init"
    assert "train/fsp_init" in trainer.callback_metrics and "train/ce" not in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/fsp_init"])
    after = module.student.state_dict()
    assert torch.equal(after["fc.weight"], student_before["fc.weight"])
    assert torch.equal(after["fc.bias"], student_before["fc.bias"])
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight", "layer3.0.conv1.weight"):
        assert not torch.equal(after[key], student_before[key]), f"{key} did not train"
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])


def test_fsp_main_stage_is_plain_cross_entropy() -> None:
    module = _module(FSP(stage_epochs=1), teacher="resnet8")
    module._stage = module.stages[-1]
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.randint(0, 10, (4,))}
    losses, weights = module.compute_losses(batch)
    assert list(losses) == ["ce"] and weights == {"ce": 1.0}


def test_fitnet_hint_stage_trains_the_student_up_to_the_hint_layer() -> None:
    torch.manual_seed(0)
    fitnet = FitNet(stage_epochs=1)
    module = _module(fitnet)
    chosen = {id(p) for p in fitnet.stage_parameters(module.student)}
    names = {n for n, p in module.student.named_parameters() if id(p) in chosen}
    upstream = {n for n, _ in module.student.named_parameters() if not n.startswith(("layer3.", "fc."))}
    assert names == upstream and "layer2.0.bn2.bias" in names
    assert all(id(p) in chosen for p in fitnet.regressor.parameters())

    student_before = _snapshot(module.student)
    regressor_before = _snapshot(fitnet.regressor)
    trainer = _trainer(max_steps=-1, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, size=16))
    assert torch.isfinite(trainer.callback_metrics["train/fitnet_init"])
    after = module.student.state_dict()
    for key in ("fc.weight", "layer3.0.conv1.weight", "layer3.0.bn1.weight"):
        assert torch.equal(after[key], student_before[key]), f"{key} changed in the hint stage"
    for key in ("conv1.weight", "layer2.0.conv1.weight"):
        assert not torch.equal(after[key], student_before[key]), f"{key} did not train"
    assert not torch.equal(fitnet.regressor.state_dict()["conv.weight"], regressor_before["conv.weight"])


# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------
DIGITS_CONFIGS = {
    "fitnet": (FitNet, {"weight": 100.0}),
    "at": (AT, {"weight": 250.0, "p": 2.0}),  # the reference 1000 scaled for 16x16 inputs (see the config)
    "sp": (SP, {"weight": 3000.0}),
    "cc": (CC, {"weight": 0.02, "dim": 128}),
    "fsp": (FSP, {"stage_epochs": 3, "active_in_main": False}),
    "nst": (NST, {"weight": 50.0}),
}


@pytest.mark.parametrize("method", METHODS)
def test_digits_config_builds(method: str) -> None:
    cls, attributes = DIGITS_CONFIGS[method]
    cli = run_cli(
        ["--config", str(ROOT / "configs" / "digits" / f"{method}.yaml"), "--model.teacher_checkpoint=null"],
        run=False,
    )
    model = cli.model
    assert (model.task_loss_weight, type(model.student).__name__, type(model.teacher).__name__) == (
        1.0, "CIFARResNet", "CIFARResNet",
    )  # fmt: skip
    assert [type(d) for d in model.distillers] == [cls] and model.distillers[0].name == method
    for name, value in attributes.items():
        assert getattr(model.distillers[0], name) == value
    assert cli.trainer.max_epochs == (13 if method == "fsp" else 10)
    assert [s.name for s in model.stages] == (["fsp_init", "main"] if method == "fsp" else ["main"])
    assert cli.trainer.logger.save_dir == f"outputs/digits/{method}"


# one config through the console entry point by default (FSP: it has a stage); the rest with the slow tests
@pytest.mark.parametrize(
    "method", [m if m == "fsp" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_digits_config_runs_through_the_cli(method: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    config = ROOT / "configs" / "digits" / f"{method}.yaml"
    result = subprocess.run(
        [
            sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(config),
            "--trainer.fast_dev_run=true", "--model.teacher_checkpoint=null",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=ROOT, env={**cli_env, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


EXPECTED_METHOD_CONFIGS = {
    "kd": (KD, 0.1, {"weight": 0.9, "temperature": 4.0}),
    "fitnet": (FitNet, 1.0, {"weight": 100.0}),
    "at": (AT, 1.0, {"weight": 1000.0, "p": 2.0}),
    "sp": (SP, 1.0, {"weight": 3000.0}),
    "cc": (CC, 1.0, {"weight": 0.02, "dim": 128}),
    "fsp": (FSP, 1.0, {"stage_epochs": 30, "active_in_main": False}),
    "nst": (NST, 1.0, {"weight": 50.0}),
}


@pytest.mark.parametrize("method", sorted(EXPECTED_METHOD_CONFIGS))
def test_method_config_composes_after_a_pair(method: str) -> None:
    cls, gamma, attributes = EXPECTED_METHOD_CONFIGS[method]
    cli = run_cli(
        [
            "--config", str(ROOT / "configs" / "digits" / "kd.yaml"),
            "--config", str(ROOT / "configs" / "methods" / f"{method}.yaml"),
            "--model.teacher_checkpoint=null", "--trainer.logger=false",
        ],
        run=False,
    )  # fmt: skip
    model = cli.model
    assert model.task_loss_weight == gamma
    assert [type(d) for d in model.distillers] == [cls]
    for name, value in attributes.items():
        assert getattr(model.distillers[0], name) == value
    assert cli.trainer.max_epochs == (270 if method == "fsp" else 10)
