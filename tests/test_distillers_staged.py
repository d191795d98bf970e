"""The methods with an initialisation stage inside the DistillationModule: AB, FT, FSP, and FitNet's optional hint
stage. Their parts, what each stage trains (in the one optimizer, the groups of the other stages sit at learning
rate 0), and the main stage that follows.

Networks: resnet8 students at 16x16 on the digits, resnet14 (same widths) or resnet8x4 (wider) teachers.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SIZE, make_trainer, small_batch, small_module, state_snapshot
from lightning_kd import DistillationModule
from lightning_kd.connectors import ABConnector, Paraphraser, Translator
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import AB, FSP, FT, FitNet
from lightning_kd.distillers.ab import ab_layer_weights
from lightning_kd.functional import ab_loss, fsp_loss


def _digits() -> DigitsDataModule:
    return DigitsDataModule(size=16, batch_size=16)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unchanged(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if torch.equal(a[k], b[k])]


def _ids(params) -> set[int]:  # noqa: ANN001
    return {id(p) for p in params}


def _stepped(optimizer: torch.optim.Optimizer) -> set[int]:
    """The parameters the optimizer's next step moves: those of the groups at a positive learning rate."""
    return {id(p) for group in optimizer.param_groups if group["lr"] > 0 for p in group["params"]}


# ----------------------------------------------------------------------------------------------------------
# AB
# ----------------------------------------------------------------------------------------------------------
def test_ab_layer_weights() -> None:
    assert ab_layer_weights(3) == [0.25, 0.5, 1.0]
    assert ab_layer_weights(1) == [1.0]
    assert ab_layer_weights(4) == [0.125, 0.25, 0.5, 1.0]


def test_ab_parts_weights_and_loss() -> None:
    ab = small_module(AB(), teacher="resnet8x4").distillers[0]
    assert ab.student_layers == ab.teacher_layers == ["preact1", "preact2", "preact3"]
    assert ab.layer_weights == [0.25, 0.5, 1.0] and ab.stage_epochs == 30 and not ab.active_in_main
    for connector, (c_s, c_t) in zip(ab.connectors, [(16, 64), (32, 128), (64, 256)]):
        conv, bn = connector.net
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (c_s, c_t, (1, 1))
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == c_t
    same = small_module(AB()).distillers[0]
    assert all(isinstance(c, ABConnector) and isinstance(c.net, nn.Identity) for c in same.connectors)

    s = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    t = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    expected = 3 / 1000 * (0.25 * ab_loss(s[0], t[0]) + 0.5 * ab_loss(s[1], t[1]) + ab_loss(s[2], t[2]))
    torch.testing.assert_close(same.stage_loss(s, t, {}), expected)


def test_ab_needs_its_stage() -> None:
    with pytest.raises(ValueError, match="stage_epochs must be positive"):
        AB(stage_epochs=0)


def test_ab_initialisation_trains_features_not_classifier_then_main_is_ce_alone() -> None:
    module = small_module(AB(stage_epochs=1))
    fc, features, teacher = _params(module.student.fc), _params(module.student), state_snapshot(module.teacher)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, _digits())
    assert module.current_stage.name == "ab_init"
    optimized = _stepped(trainer.optimizers[0])
    assert optimized == {id(p) for n, p in module.student.named_parameters() if not n.startswith("fc.")}
    assert _same(fc, _params(module.student.fc))
    unchanged = [k for k in _unchanged(features, _params(module.student)) if not k.startswith("fc.")]
    assert not unchanged, f"student feature parameters left untouched by AB's stage: {unchanged}"
    assert _same(teacher, state_snapshot(module.teacher))

    # the main stage: cross-entropy alone, no teacher forward, the connectors out of the optimizer
    module.core.set_epoch(module.stages[-1].start_epoch)
    assert module.current_stage.is_main and not module.core.teacher_needed()
    terms = module.core.compute_losses(small_batch())
    assert set(terms.losses) == {"ce"}
    assert list(module.distillers[0].main_parameters()) == []


# ----------------------------------------------------------------------------------------------------------
# FT
# ----------------------------------------------------------------------------------------------------------
def test_ft_parts() -> None:
    ft = small_module(FT(), teacher="resnet8x4").distillers[0]
    assert ft.student_layers == ft.teacher_layers == ["stage3"]
    assert (ft.weight, ft.stage_epochs, ft.p, ft.form) == (200.0, 30, 1, "channel_mean")
    assert isinstance(ft.paraphraser, Paraphraser) and isinstance(ft.translator, Translator)
    enc = [m for m in ft.paraphraser.encoder if isinstance(m, nn.Conv2d)]
    dec = [m for m in ft.paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in enc] == [(256, 256), (256, 128), (128, 128)]
    assert [(c.in_channels, c.out_channels) for c in dec] == [(128, 128), (128, 256), (256, 256)]
    assert all(c.kernel_size == (3, 3) for c in enc + dec)
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in ft.paraphraser.modules()) == 6
    # by default the CRD benchmark's paraphraser: no BatchNorm, convs with biases
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ft.paraphraser.modules())
    assert all(m.bias is not None for m in ft.paraphraser.modules() if isinstance(m, nn.modules.conv._ConvNd))
    with_bn = FT(paraphraser_bn=True)  # the FT authors' paraphraser (a named departure from the benchmark)
    with_bn.build([torch.zeros(2, 64, 4, 4)], [torch.zeros(2, 256, 4, 4)])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.paraphraser.modules()) == 6
    assert all(m.bias is None for m in with_bn.paraphraser.modules() if isinstance(m, nn.modules.conv._ConvNd))
    trans = [m for m in ft.translator.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in trans] == [(64, 64), (64, 128), (128, 128)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ft.translator.modules()) == 3

    x = torch.randn(2, 256, 4, 4)
    assert ft.paraphraser(x).shape == x.shape and ft.paraphraser.encode(x).shape == (2, 128, 4, 4)
    torch.testing.assert_close(ft.stage_loss([torch.randn(2, 64, 4, 4)], [x], {}), F.mse_loss(ft.paraphraser(x), x))


def test_ft_paraphraser_frozen_and_in_eval_mode_from_the_main_stage_on() -> None:
    module = small_module(FT(stage_epochs=1))
    ft = module.distillers[0]
    module.train()
    assert module.current_stage.name == "ft_init" and ft.paraphraser.training
    paraphraser = _ids(ft.paraphraser.parameters())
    assert _ids(ft.stage_parameters()) == paraphraser
    assert _ids(module.core.stage_parameters(module.current_stage)) == paraphraser  # the student is not read

    module.core.set_epoch(1)
    module.train()
    assert module.current_stage.is_main
    assert not ft.paraphraser.training and ft.translator.training
    assert _ids(ft.main_parameters()) == _ids(ft.translator.parameters())
    assert not paraphraser & _ids(module.core.stage_parameters(module.current_stage))
    module.core.compute_losses(small_batch()).total.backward()
    assert all(p.grad is None for p in ft.paraphraser.parameters()), "the frozen paraphraser got a gradient"
    assert all(p.grad is not None for p in ft.translator.parameters())


class _Recorder(L.Callback):
    """Snapshots around FT's two stages, what each optimizer step moves, and the paraphraser's mode in the main
    stage (training batches after their forward, and validation batches)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict] = {}
        self.main_modes: list[bool] = []
        self.optimized: dict[int, set[int]] = {}

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        paraphraser = module.distillers[0].paraphraser
        self.snapshots["start"] = {"student": _params(module.student), "para": state_snapshot(paraphraser)}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        self.optimized.setdefault(trainer.current_epoch, set()).update(_stepped(optimizer))
        if trainer.current_epoch == 1:
            self.main_modes.append(module.distillers[0].paraphraser.training)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if trainer.current_epoch == 1:
            self.main_modes.append(module.distillers[0].paraphraser.training)

    def on_train_epoch_end(self, trainer, module) -> None:  # noqa: ANN001
        ft = module.distillers[0]
        self.snapshots[f"epoch{trainer.current_epoch}"] = {
            "student": _params(module.student),
            "para": state_snapshot(ft.paraphraser),
            "trans": state_snapshot(ft.translator),
        }


def test_ft_two_stages_through_the_trainer() -> None:
    module = small_module(FT(stage_epochs=1))
    ft = module.distillers[0]
    recorder = _Recorder()
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[recorder])
    trainer.fit(module, _digits())
    start, first, second = recorder.snapshots["start"], recorder.snapshots["epoch0"], recorder.snapshots["epoch1"]

    # stage one: only the paraphraser trains; the student's parameters do not move
    assert recorder.optimized[0] == _ids(ft.paraphraser.parameters())
    assert _same(start["student"], first["student"])
    assert not _same(start["para"], first["para"])
    # stage two: the paraphraser is frozen (weights unchanged, eval mode throughout, validation included)
    main_params = [*module.student.parameters(), *ft.translator.parameters()]
    assert recorder.optimized[1] == _ids(main_params)
    assert _same(first["para"], second["para"])
    assert len(recorder.main_modes) == 3 and not any(recorder.main_modes)  # 2 training + 1 validation batch
    assert not ft.paraphraser.training
    assert not _same(first["trans"], second["trans"])
    assert not _same(first["student"], second["student"])


def test_ft_stage_one_leaves_the_student_batchnorm_statistics_alone() -> None:
    module = small_module(FT(stage_epochs=1))
    before = state_snapshot(module.student)
    make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, _digits())
    assert _same(before, state_snapshot(module.student))


def test_ft_without_a_stage_trains_student_and_translator_in_the_main_stage() -> None:
    module = small_module(FT(stage_epochs=0))
    ft = module.distillers[0]
    terms = module.core.compute_losses(small_batch())
    assert set(terms.losses) == {"ce", "ft"} and terms.weights["ft"] == ft.weight
    terms.losses["ft"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is not None for p in ft.main_parameters())
    assert all(p.grad is None for p in ft.paraphraser.parameters())


# ----------------------------------------------------------------------------------------------------------
# FSP
# ----------------------------------------------------------------------------------------------------------
def test_fsp_defaults_and_constructor_errors() -> None:
    fsp = FSP()
    assert fsp.student_layers == fsp.teacher_layers == ["stem", "stages"]  # a group: every stage output
    assert (fsp.stage_epochs, fsp.active_in_main) == (30, False)
    with pytest.raises(ValueError, match="train nothing"):
        FSP(stage_epochs=0)
    assert FSP(stage_epochs=0, in_main=True).active_in_main


def test_fsp_forward_and_stage_loss_are_the_pure_function() -> None:
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    fsp = FSP(student_layers=["stem", "stage1"])
    torch.testing.assert_close(fsp(s, t, {}), fsp_loss(s, t))
    torch.testing.assert_close(fsp.stage_loss(s, t, {}), fsp_loss(s, t))


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
        DistillationModule("resnet8", "resnet8x4", [FSP()], num_classes=10, input_size=SIZE)


def test_fsp_initialisation_stage_trains_features_not_classifier() -> None:
    module = small_module(FSP(stage_epochs=1), teacher="resnet8")
    assert [s.name for s in module.stages] == ["fsp_init", "main"]
    student_before = state_snapshot(module.student)
    teacher_before = state_snapshot(module.teacher)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, _digits())
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
    module = small_module(FSP(stage_epochs=1), teacher="resnet8")
    module.core.set_epoch(1)
    terms = module.core.compute_losses({"image": torch.randn(4, *SIZE), "label": torch.randint(0, 10, (4,))})
    assert list(terms.losses) == ["ce"] and terms.weights == {"ce": 1.0}


def test_fsp_in_main_trains_in_two_steps_with_finite_logged_losses() -> None:
    module = small_module(FSP(stage_epochs=0, in_main=True))
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, _digits())
    assert trainer.global_step == 2
    logged = trainer.callback_metrics
    for key in ("train/fsp", "train/ce", "train/loss"):
        assert key in logged and torch.isfinite(logged[key]), (key, dict(logged))
    assert logged["train/fsp"] > 0


# ----------------------------------------------------------------------------------------------------------
# FitNet's hint stage
# ----------------------------------------------------------------------------------------------------------
def test_fitnet_hint_stage_trains_the_student_up_to_the_hint_layer() -> None:
    fitnet = FitNet(stage_epochs=1)
    module = small_module(fitnet)
    chosen = _ids(fitnet.stage_student_parameters(module.student))
    names = {n for n, p in module.student.named_parameters() if id(p) in chosen}
    upstream = {n for n, _ in module.student.named_parameters() if not n.startswith(("layer3.", "fc."))}
    assert names == upstream and "layer2.0.bn2.bias" in names
    assert _ids(fitnet.stage_parameters()) == _ids(fitnet.regressor.parameters())
    assert _ids(module.core.stage_parameters(module.current_stage)) == chosen | _ids(fitnet.regressor.parameters())

    student_before = state_snapshot(module.student)
    regressor_before = state_snapshot(fitnet.regressor)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, _digits())
    assert module.current_stage.name == "fitnet_init"
    assert torch.isfinite(trainer.callback_metrics["train/fitnet_init"])
    after = module.student.state_dict()
    for key in ("fc.weight", "layer3.0.conv1.weight", "layer3.0.bn1.weight"):
        assert torch.equal(after[key], student_before[key]), f"{key} changed in the hint stage"
    for key in ("conv1.weight", "layer2.0.conv1.weight"):
        assert not torch.equal(after[key], student_before[key]), f"{key} did not train"
    assert not torch.equal(fitnet.regressor.state_dict()["conv.weight"], regressor_before["conv.weight"])
