"""The VID, RKD, PKT, AB and FT distillers inside the DistillationModule: their parts, their stages, their
configs.

Networks: resnet8 students at 16x16 on the digits, resnet14 (same widths) or resnet8x4 (wider) teachers.
"""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, make_trainer
from lightning_kd import DistillationModule
from lightning_kd.connectors import ABConnector, Paraphraser, Translator, VIDRegressor
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import AB, FT, PKT, RKD, VID
from lightning_kd.functional import ab_loss, pkt_loss, rkd_loss, vid_loss
from lightning_kd.demo import digits_config_args

SIZE = (3, 16, 16)


def _module(distiller, teacher: str = "resnet14") -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule("resnet8", teacher, [distiller], num_classes=10, input_size=SIZE)


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"image": torch.randn(n, *SIZE), "label": torch.randint(0, 10, (n,))}


def _features(module: DistillationModule, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The distiller's inputs for one batch, captured as the module captures them (teacher without grad)."""
    distiller = module.distillers[0]
    student = module._forward(module.student, module._student_taps, batch["image"])
    with torch.no_grad():
        teacher = module._forward(module.teacher, module._teacher_taps, batch["image"])
    return [student[t] for t in distiller.student_layers], [teacher[t] for t in distiller.teacher_layers]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------------------------------
# VID
# ----------------------------------------------------------------------------------------------------------
def test_vid_builds_a_regressor_per_stage_pair_with_variance_five() -> None:
    module = _module(VID(), teacher="resnet8x4")
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


# ----------------------------------------------------------------------------------------------------------
# RKD and PKT
# ----------------------------------------------------------------------------------------------------------
def test_rkd_and_pkt_defaults_and_losses() -> None:
    rkd, pkt = RKD(), PKT()
    assert rkd.student_layers == rkd.teacher_layers == pkt.student_layers == ["embedding"]
    assert (rkd.weight, rkd.distance_weight, rkd.angle_weight, pkt.weight) == (1.0, 25.0, 50.0, 30000.0)
    s, t = [torch.randn(6, 16)], [torch.randn(6, 64)]
    torch.testing.assert_close(rkd(s, t, {}), rkd_loss(s[0], t[0], 25.0, 50.0))
    torch.testing.assert_close(RKD(distance_weight=1, angle_weight=0)(s, t, {}), rkd_loss(s[0], t[0], 1.0, 0.0))
    torch.testing.assert_close(pkt(s, t, {}), pkt_loss(s[0], t[0]))


def test_rkd_and_pkt_are_relational_with_a_batch_scope() -> None:
    s, t = [torch.randn(5, 8), torch.randn(5, 3, 2)], [torch.randn(5, 4), torch.randn(5, 6)]
    for make, fn in ((RKD, rkd_loss), (PKT, pkt_loss)):
        with pytest.raises(ValueError, match="batch_scope"):
            make(batch_scope="world")
        # one process: the global batch is this batch; several layer pairs are summed
        torch.testing.assert_close(make(batch_scope="global")(s, t, {}), fn(s[0], t[0]) + fn(s[1], t[1]))


def test_four_stage_networks_get_every_stage() -> None:
    module = DistillationModule(
        "vgg8", "vgg13", [VID(), AB(), FT()], num_classes=10, input_size=(3, 32, 32)
    )
    vid, ab, ft = module.distillers
    assert vid.student_layers == vid.teacher_layers == ["stage1", "stage2", "stage3", "stage4"]
    assert len(vid.regressors) == 4
    assert ab.student_layers == ["preact1", "preact2", "preact3", "preact4"]
    assert ab.layer_weights == [0.125, 0.25, 0.5, 1.0] and len(ab.connectors) == 4
    assert ft.student_layers == ft.teacher_layers == ["stage4"]
    assert [s.name for s in module.stages] == ["ab_init", "ft_init", "main"]


@pytest.mark.parametrize("make", [VID, RKD, PKT, lambda: FT(stage_epochs=0)], ids=["vid", "rkd", "pkt", "ft"])
def test_main_stage_gradient_reaches_student_and_parts_not_teacher(make) -> None:
    module = _module(make())
    distiller = module.distillers[0]
    module.configure_optimizers()  # the module announces the (main) stage
    losses, weights = module.compute_losses(_batch())
    assert set(losses) == {"ce", distiller.name} and weights[distiller.name] == distiller.weight
    losses[distiller.name].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    trained = list(distiller.main_parameters())
    assert all(p.grad is not None for p in trained)
    if isinstance(distiller, FT):
        assert all(p.grad is None for p in distiller.paraphraser.parameters())


def test_batch_of_one_is_finite_through_the_module() -> None:
    for make in (RKD, PKT):
        module = _module(make())
        losses, _ = module.compute_losses(_batch(1))
        assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------------------
# AB
# ----------------------------------------------------------------------------------------------------------
def test_ab_parts_weights_and_loss() -> None:
    ab = _module(AB(), teacher="resnet8x4").distillers[0]
    assert ab.student_layers == ab.teacher_layers == ["preact1", "preact2", "preact3"]
    assert ab.layer_weights == [0.25, 0.5, 1.0] and ab.stage_epochs == 30 and not ab.active_in_main
    for connector, (c_s, c_t) in zip(ab.connectors, [(16, 64), (32, 128), (64, 256)]):
        conv, bn = connector.net
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (c_s, c_t, (1, 1))
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == c_t
    same = _module(AB()).distillers[0]
    assert all(isinstance(c, ABConnector) and isinstance(c.net, nn.Identity) for c in same.connectors)

    s = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    t = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    expected = 3 / 1000 * (0.25 * ab_loss(s[0], t[0]) + 0.5 * ab_loss(s[1], t[1]) + ab_loss(s[2], t[2]))
    torch.testing.assert_close(same.stage_loss(s, t, {}), expected)


def test_ab_needs_its_stage() -> None:
    with pytest.raises(ValueError, match="stage_epochs must be positive"):
        AB(stage_epochs=0)


def test_ab_initialisation_trains_features_not_classifier_then_main_is_ce_alone() -> None:
    module = _module(AB(stage_epochs=1))
    fc, features, teacher = _params(module.student.fc), _params(module.student), _snapshot(module.teacher)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(size=16, batch_size=16))
    assert module.current_stage.name == "ab_init"
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in module.student.named_parameters() if not n.startswith("fc.")}
    assert _same(fc, _params(module.student.fc))
    unchanged = [k for k in _all_changed(features, _params(module.student)) if not k.startswith("fc.")]
    assert not unchanged, f"student feature parameters left untouched by AB's stage: {unchanged}"
    assert _same(teacher, _snapshot(module.teacher))

    # the main stage: cross-entropy alone, no teacher forward, the connectors out of the optimizer
    module._stage = module.stages[-1]
    assert not module._teacher_needed(module._stage)
    losses, _ = module.compute_losses(_batch())
    assert set(losses) == {"ce"}
    assert list(module.distillers[0].main_parameters()) == []


# ----------------------------------------------------------------------------------------------------------
# FT
# ----------------------------------------------------------------------------------------------------------
def test_ft_parts() -> None:
    ft = _module(FT(), teacher="resnet8x4").distillers[0]
    assert ft.student_layers == ft.teacher_layers == ["stage3"]
    assert (ft.weight, ft.stage_epochs, ft.p, ft.form) == (200.0, 30, 1, "channel_mean")
    assert isinstance(ft.paraphraser, Paraphraser) and isinstance(ft.translator, Translator)
    enc = [m for m in ft.paraphraser.encoder if isinstance(m, nn.Conv2d)]
    dec = [m for m in ft.paraphraser.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in enc] == [(256, 256), (256, 128), (128, 128)]
    assert [(c.in_channels, c.out_channels) for c in dec] == [(128, 128), (128, 256), (256, 256)]
    assert all(c.kernel_size == (3, 3) for c in enc + dec)
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in ft.paraphraser.modules()) == 6
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ft.paraphraser.modules()) == 6
    plain = FT(paraphraser_bn=False)  # the CRD benchmark's paraphraser: no BatchNorm, convs with biases
    plain.build([torch.zeros(2, 64, 4, 4)], [torch.zeros(2, 256, 4, 4)])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.paraphraser.modules())
    assert all(m.bias is not None for m in plain.paraphraser.modules() if isinstance(m, nn.modules.conv._ConvNd))
    trans = [m for m in ft.translator.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in trans] == [(64, 64), (64, 128), (128, 128)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ft.translator.modules()) == 3

    x = torch.randn(2, 256, 4, 4)
    assert ft.paraphraser(x).shape == x.shape and ft.paraphraser.encode(x).shape == (2, 128, 4, 4)
    torch.testing.assert_close(ft.stage_loss([torch.randn(2, 64, 4, 4)], [x], {}), F.mse_loss(ft.paraphraser(x), x))


def test_ft_paraphraser_frozen_and_in_eval_mode_from_the_main_stage_on() -> None:
    module = _module(FT(stage_epochs=1))
    ft = module.distillers[0]
    ft.on_stage("ft_init")
    module.train()
    assert ft.paraphraser.training and all(p.requires_grad for p in ft.paraphraser.parameters())
    assert {id(p) for p in ft.stage_parameters(module.student)} == {id(p) for p in ft.paraphraser.parameters()}
    ft.on_stage("main")
    module.train()
    assert not ft.paraphraser.training and ft.translator.training
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    assert {id(p) for p in ft.main_parameters()} == {id(p) for p in ft.translator.parameters()}


class _Recorder(L.Callback):
    """Snapshots around FT's two stages and the paraphraser's mode during the main stage."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict] = {}
        self.main_modes: list[bool] = []
        self.optimized: dict[int, set[int]] = {}

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        paraphraser = module.distillers[0].paraphraser
        self.snapshots["start"] = {"student": _params(module.student), "para": _snapshot(paraphraser)}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        self.optimized[trainer.current_epoch] = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        if trainer.current_epoch == 1:
            self.main_modes.append(module.distillers[0].paraphraser.training)

    def on_train_epoch_end(self, trainer, module) -> None:  # noqa: ANN001
        ft = module.distillers[0]
        self.snapshots[f"epoch{trainer.current_epoch}"] = {
            "student": _params(module.student),
            "para": _snapshot(ft.paraphraser),
            "trans": _snapshot(ft.translator),
        }


def test_ft_two_stages_through_the_trainer() -> None:
    module = _module(FT(stage_epochs=1))
    ft = module.distillers[0]
    recorder = _Recorder()
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[recorder])
    trainer.fit(module, DigitsDataModule(size=16, batch_size=16))
    start, first, second = recorder.snapshots["start"], recorder.snapshots["epoch0"], recorder.snapshots["epoch1"]

    # stage one: only the paraphraser trains; the student's parameters do not move
    assert recorder.optimized[0] == {id(p) for p in ft.paraphraser.parameters()}
    assert _same(start["student"], first["student"])
    assert not _same(start["para"], first["para"])
    # stage two: the paraphraser is frozen (weights unchanged, eval mode throughout, validation included)
    main_params = [*module.student.parameters(), *ft.translator.parameters()]
    assert recorder.optimized[1] == {id(p) for p in main_params}
    assert _same(first["para"], second["para"])
    assert recorder.main_modes and not any(recorder.main_modes)
    assert not ft.paraphraser.training
    assert not _same(first["trans"], second["trans"])
    assert not _same(first["student"], second["student"])


def test_ft_stage_one_leaves_the_student_batchnorm_statistics_alone() -> None:
    module = _module(FT(stage_epochs=1))
    before = _snapshot(module.student)
    make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, DigitsDataModule(size=16, batch_size=16)
    )
    assert _same(before, _snapshot(module.student))


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
CONFIGS = ["ft", pytest.param("ab", marks=pytest.mark.slow)] + [
    pytest.param(name, marks=pytest.mark.slow) for name in ("vid", "rkd", "pkt")
]


@pytest.mark.parametrize("method", CONFIGS)
def test_digits_config_fast_dev_run(method: str, cli_env: dict[str, str], tmp_path) -> None:  # noqa: ANN001
    result = subprocess.run(
        [sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args(method), "--trainer.fast_dev_run=true",
         "--model.teacher_checkpoint=null", f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, env={**cli_env, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("method", ["vid", "rkd", "pkt", "ab", "ft"])
def test_method_configs_hold_the_reference_weights(method: str) -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / f"configs/methods/{method}.yaml").read_text())
    override = ROOT / f"configs/digits/overrides/{method}.yaml"
    digits = yaml.safe_load(override.read_text()) if override.exists() else {}
    (entry,) = cfg["model"]["distillers"]
    assert entry["class_path"] == f"lightning_kd.distillers.{method.upper()}"
    assert cfg["model"]["task_loss_weight"] == 1.0
    expected = {"vid": 1.0, "rkd": 1.0, "pkt": 30000.0, "ft": 200.0}
    if method in expected:
        assert entry["init_args"]["weight"] == expected[method]
    if method in ("ab", "ft"):
        assert entry["init_args"]["stage_epochs"] == 30 and cfg["trainer"]["max_epochs"] == 270
        assert digits["model"]["distillers"][0]["init_args"]["stage_epochs"] == 3
        assert digits["trainer"]["max_epochs"] == 13
    else:
        assert "trainer" not in cfg and "trainer" not in digits
