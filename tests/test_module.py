"""DistillationModule: frozen teacher, checkpoints without the teacher, exact resume, export, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.checkpoints import CheckpointError
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import AB, KD, Distiller
from lightning_kd.taps import TapError

SMALL = dict(num_classes=10, input_size=(3, 16, 16))


def digits(**kw) -> DigitsDataModule:
    return DigitsDataModule(size=16, batch_size=32, **kw)


def kd_module(**kw) -> DistillationModule:
    return DistillationModule("resnet8", teacher="resnet14", distillers=[KD()], task_loss_weight=0.1, **SMALL, **kw)


class WatchTeacher(Callback):
    """Records the teacher's mode at every training and validation batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.modes.append(module.teacher.training)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.modes.append(module.teacher.training)


def test_teacher_stays_frozen_and_in_eval_mode() -> None:
    L.seed_everything(0)
    module = kd_module()
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    watch = WatchTeacher()
    trainer = make_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=[watch])
    trainer.fit(module, digits())
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a teacher tensor changed"
    assert any(k.endswith("num_batches_tracked") for k in before)  # BatchNorm buffers were compared too
    assert watch.modes and not any(watch.modes), "the teacher was in train mode during a batch"
    module.train()
    assert not module.teacher.training and module.student.training
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    in_optimizer = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert in_optimizer and not any(id(p) in teacher_ids for p in in_optimizer)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    # the student did train, and the teacher's accuracy was measured once
    assert "val/teacher_acc1" in trainer.callback_metrics


def test_student_alone_learns_the_digits() -> None:
    L.seed_everything(0)
    module = DistillationModule("resnet8", **SMALL)
    trainer = make_trainer(max_epochs=4)  # 4 x 33 steps: the 60 % training split, last partial batch dropped
    trainer.fit(module, digits())
    assert trainer.callback_metrics["val/acc1"] > 0.7  # chance is 0.1


def _fit_with_checkpoints(tmp: Path, max_epochs: int, ckpt_path: str | None = None, **module_kw) -> DistillationModule:
    L.seed_everything(0)
    module = kd_module(**module_kw)
    trainer = make_trainer(
        max_epochs=max_epochs,
        limit_train_batches=5,
        limit_val_batches=2,
        deterministic=True,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1)],
    )
    trainer.fit(module, digits(), ckpt_path=ckpt_path)
    return module


def test_checkpoint_leaves_out_the_teacher_and_resume_is_exact(tmp_path: Path) -> None:
    full = _fit_with_checkpoints(tmp_path / "full", max_epochs=3)
    ckpt = tmp_path / "full" / "epoch=1.ckpt"  # written after the second of the three epochs
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("student.") for k in state)
    resumed = _fit_with_checkpoints(tmp_path / "resumed", max_epochs=3, ckpt_path=str(ckpt))
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"student tensor {name} differs after resume")


def test_save_teacher_keeps_it(tmp_path: Path) -> None:
    _fit_with_checkpoints(tmp_path, max_epochs=1, save_teacher=True)
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("teacher.") for k in state)


def test_teacher_from_a_teacher_run_checkpoint_and_student_export(tmp_path: Path) -> None:
    L.seed_everything(0)
    teacher_run = DistillationModule("resnet14", **SMALL)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(teacher_run, digits())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    module = kd_module(teacher_checkpoint=str(tmp_path / "teacher.ckpt"))
    for a, b in zip(teacher_run.student.state_dict().values(), module.teacher.state_dict().values()):
        assert torch.equal(a, b)
    # a plain state dict works too
    torch.save(teacher_run.student.state_dict(), tmp_path / "teacher.pt")
    kd_module(teacher_checkpoint=str(tmp_path / "teacher.pt"))
    # the exported student is a plain state dict
    module.export_student(tmp_path / "student.pt")
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    assert exported.keys() == module.student.state_dict().keys()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_and_broken_teacher_files_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"weight": _Payload(str(marker))}, hostile)
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        kd_module(teacher_checkpoint=str(hostile))
    assert not marker.exists(), "the pickle payload ran"

    good = tmp_path / "good.pt"
    torch.save(DistillationModule("resnet14", **SMALL).student.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        kd_module(teacher_checkpoint=str(truncated))

    wrong = tmp_path / "wrong.pt"
    torch.save(DistillationModule("resnet8", **SMALL).student.state_dict(), wrong)  # resnet8 is not resnet14
    with pytest.raises(CheckpointError, match=r"unexpected keys|missing keys") as error:
        kd_module(teacher_checkpoint=str(wrong))
    assert "layer1.1.conv1.weight" in str(error.value)  # resnet14 has two blocks per stage, resnet8 one

    with pytest.raises(CheckpointError, match="does not exist"):
        kd_module(teacher_checkpoint=str(tmp_path / "nowhere.pt"))


def test_bad_configurations_fail_before_training() -> None:
    with pytest.raises(ValueError, match="teacher predicts 100 classes but the student 10"):
        DistillationModule("resnet8", teacher=torch.nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 100)),
                           distillers=[KD()], **SMALL)
    with pytest.raises(TapError, match="layer9"):
        DistillationModule("resnet8", teacher="resnet8", distillers=[KD(student_layers=["layer9"])], **SMALL)
    with pytest.raises(ValueError, match="need a teacher"):
        DistillationModule("resnet8", distillers=[KD()], **SMALL)
    module = DistillationModule("resnet8", num_classes=100, input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="data module has 10 classes but the student predicts 100"):
        make_trainer(max_steps=1).fit(module, digits())


class _Exploding(Distiller):
    default_student_layers = ("logits",)

    def forward(self, student, teacher, batch):
        return student[0].sum() * float("nan")


def test_non_finite_loss_stops_and_names_the_component() -> None:
    module = DistillationModule("resnet8", teacher="resnet8", distillers=[_Exploding(name="boom")], **SMALL)
    with pytest.raises(FloatingPointError, match=r"component\(s\) \['boom'\]"):
        make_trainer(max_steps=2).fit(module, digits())


def test_non_finite_batches_are_skipped_with_nan_policy_skip() -> None:
    skipping = DistillationModule("resnet8", teacher="resnet8", distillers=[_Exploding(name="boom")],
                                  nan_policy="skip", **SMALL)
    make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(skipping, digits())
    assert skipping.skipped_batches == 3


class _ExplodesAt(Distiller):
    """Finite until its ``at``-th call, then ``inf``."""

    default_student_layers = ("logits",)

    def __init__(self, at: int, **kw) -> None:
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def forward(self, student, teacher, batch):
        self.calls += 1
        scale = float("inf") if self.calls > self.at else 1.0
        return student[0].square().mean() * scale


def test_non_finite_loss_is_reported_at_its_own_step_when_checked_later() -> None:
    # log_every_n_steps=50: nothing synchronises before the end of the fit, yet the error names step 3
    module = DistillationModule("resnet8", teacher="resnet8", distillers=[_ExplodesAt(3, name="late")], **SMALL)
    with pytest.raises(FloatingPointError, match=r"global step 3 \(epoch 0, stage 'main'\) from component\(s\) \['late'\]"):
        make_trainer(max_steps=6, limit_val_batches=0).fit(module, digits())


def test_no_checkpoint_is_written_after_a_non_finite_step(tmp_path: Path) -> None:
    module = DistillationModule("resnet8", teacher="resnet8", distillers=[_ExplodesAt(1, name="late")], **SMALL)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(FloatingPointError, match="global step 1"):
        make_trainer(max_steps=6, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver]).fit(
            module, digits()
        )
    assert not list(tmp_path.glob("*.ckpt"))


class _StageAtBatchStart(Callback):
    """The epoch and the module's stage as a callback sees them at the start of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, module.current_stage.name))


def test_callbacks_see_the_stage_of_the_epoch_at_batch_start() -> None:
    module = DistillationModule("resnet8", teacher="resnet8", distillers=[AB(stage_epochs=1)], **SMALL)
    watch = _StageAtBatchStart()
    make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[watch]).fit(module, digits())
    assert watch.seen == [(0, "ab_init")] * 2 + [(1, "main")] * 2


class _LogSpy(Callback):
    """The ``train/*`` names the module logs at each global step."""

    def __init__(self) -> None:
        self.logged: dict[int, set[str]] = {}

    def on_fit_start(self, trainer, module) -> None:
        log = module.log

        def spy(name, value, *args, **kwargs):
            if name.startswith("train/") and kwargs.get("on_step", True):
                self.logged.setdefault(module.global_step, set()).add(name)
            return log(name, value, *args, **kwargs)

        module.log = spy


def test_loss_components_are_logged_on_the_loggers_steps_and_the_last_ones(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    spy = _LogSpy()
    trainer = make_trainer(max_epochs=2, limit_train_batches=10, limit_val_batches=0, log_every_n_steps=4,
                           logger=CSVLogger(tmp_path, name="run"), callbacks=[spy])
    trainer.fit(kd_module(), digits())
    # the loggers write at global steps 3, 7, 11, 15, 19 (Lightning's rule: (step + 1) % 4 == 0);
    # the module adds the last step of each epoch (9, 19)
    assert sorted(spy.logged) == [3, 7, 9, 11, 15, 19]
    assert all(names == {"train/loss", "train/ce", "train/kd", "train/lr"} for names in spy.logged.values())
    import csv

    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/kd")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11, 15, 19]
    assert float(trainer.callback_metrics["train/kd"]) == pytest.approx(float(rows[-1]["train/kd"]), rel=1e-6)
