"""The Lightning-free core: the README's plain loop runs and equals the Lightning fit step for step; stages switch
in one optimizer; a skipped batch leaves no trace; checkpoints rebuild the module; subclasses train through the CLI.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT, make_trainer
from lightning_kd import DistillationModule
from lightning_kd.core import Distillation
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import AB, CRD, FT, KD
from lightning_kd.models import create_model


def readme_block(marker: str) -> str:
    """The python code block that follows ``<!-- marker -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no python block after <!-- {marker} --> in the README"
    return match.group(1)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _random_teacher(path: Path, name: str = "resnet56") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save(create_model(name, num_classes=10).state_dict(), path)


def test_readme_plain_loop_runs_and_equals_the_lightning_fit(in_tmp: Path) -> None:
    teacher = Path("outputs/digits/teacher/teacher.ckpt")
    _random_teacher(in_tmp / teacher)
    code = readme_block("plain-loop").replace("epochs = 10", "epochs = 2")
    namespace: dict = {}
    exec(compile(code, "README plain loop", "exec"), namespace)  # noqa: S102 - the README's own example
    plain = namespace["core"].student.state_dict()
    assert Path("outputs/student.pt").exists()

    torch.manual_seed(0)  # the README's seed, before anything random is built
    module = DistillationModule(
        "resnet8", "resnet56", [KD(temperature=4.0, weight=0.9)], task_loss_weight=0.1,
        teacher_checkpoint=str(teacher), num_classes=10, input_size=(3, 16, 16),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )  # fmt: skip
    make_trainer(max_epochs=2, limit_val_batches=0).fit(module, DigitsDataModule(size=16, batch_size=64))
    assert module.global_step == 2 * len(namespace["loader"])
    for name, value in module.student.state_dict().items():
        torch.testing.assert_close(value, plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_stages_switch_inside_one_optimizer() -> None:
    """AB: the initialisation stage trains the feature path and the connectors at the stage rate, the classifier
    at 0; the main stage starts with a fresh optimizer state, the classifier trains, the connectors sit at 0."""
    torch.manual_seed(0)
    core = Distillation("resnet8", "resnet8x4", [AB(stage_epochs=1, stage_lr=0.01)], num_classes=10, input_size=(3, 16, 16))
    groups = core.param_groups()
    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    classifier = {id(p) for p in core.student.fc.parameters()}
    connectors = {id(p) for p in core.distillers[0].parameters()}
    assert connectors, "resnet8 -> resnet8x4 needs connectors (other channel counts)"
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8) % 10}

    def lrs() -> dict[str, float]:
        out = {}
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            kind = "classifier" if ids <= classifier else "connectors" if ids <= connectors else "features"
            out[kind] = group["lr"]
        return out

    core.train()
    assert core.set_epoch(0, optimizer) is False  # the fit starts in the AB stage; the optimizer enters it
    assert lrs() == {"features": 0.01, "connectors": 0.01, "classifier": 0.0}
    assert not core.student.fc.training and core.student.layer1.training
    core.compute_losses(batch).total.backward()
    optimizer.step()
    assert optimizer.state, "momentum buffers exist after a step"
    assert core.set_epoch(1, optimizer) is True
    assert core.stage.name == "main" and not optimizer.state  # fresh
    assert lrs() == {"features": 0.05, "connectors": 0.0, "classifier": 0.05}


def test_initialisation_stage_leaves_batchnorm_outside_the_feature_path_alone() -> None:
    """WRN student: its final bn1 is outside the benchmark's feature path; an AB stage must not update it."""
    L.seed_everything(0)
    module = DistillationModule("wrn_16_1", "wrn_16_2", [AB(stage_epochs=1)], num_classes=10, input_size=(3, 16, 16))
    before = {k: v.clone() for k, v in module.student.bn1.state_dict().items()}
    inside = module.student.block1[0].bn1.running_mean.clone()
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, DigitsDataModule(size=16, batch_size=16))
    for name, value in module.student.bn1.state_dict().items():
        assert torch.equal(value, before[name]), f"bn1.{name} changed in the AB stage"
    assert not torch.equal(module.student.block1[0].bn1.running_mean, inside), "the feature path's BN did not train"
    assert module.student.fc.weight.grad is None or not module.student.fc.weight.grad.any()


def test_stage_learning_rate_is_read_from_the_fit() -> None:
    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet14", [FT(stage_epochs=1, stage_lr=0.01)], num_classes=10,
                                input_size=(3, 16, 16))  # fmt: skip
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append((pl_module.current_stage.name, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, callbacks=[Watch()]).fit(
        module, DigitsDataModule(size=16, batch_size=16)
    )
    (stage0, lrs0), (stage1, lrs1) = seen
    assert stage0 == "ft_init" and sorted(lrs0) == [0.0, 0.01]  # paraphraser at 0.01, the rest idle
    assert stage1 == "main" and 0.01 not in lrs1 and 0.05 in lrs1


def test_skipped_batch_leaves_no_trace() -> None:
    """A NaN image in the middle of a fit: parameters, BatchNorm statistics, optimizer state and CRD's banks are
    exactly as they were before that batch."""
    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet14", [CRD(num_data=64)], num_classes=10, input_size=(3, 16, 16),
                                nan_policy="skip")  # fmt: skip
    images = torch.randn(4 * 16, 3, 16, 16)
    images[33] = float("nan")  # batch 2 of 4
    labels = torch.arange(64) % 10
    contrast = torch.randint(0, 64, (64, 9))
    batches = [
        {"image": images[i : i + 16], "label": labels[i : i + 16], "index": torch.arange(i, i + 16),
         "contrast_index": torch.cat([torch.arange(i, i + 16)[:, None], contrast[i : i + 16, 1:]], 1)}
        for i in range(0, 64, 16)
    ]  # fmt: skip
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 2:
                snapshots["before"] = _state(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 2:
                snapshots["after"] = _state(trainer, pl_module)

    make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Snap()]).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert module.skipped_batches == 1
    before, after = snapshots["before"], snapshots["after"]
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed in the skipped batch"
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


def _state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    state = {f"module.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    for index, (param, values) in enumerate(trainer.optimizers[0].state.items()):
        for key, value in values.items():
            if torch.is_tensor(value):
                state[f"optimizer.{index}.{key}"] = value.detach().clone()
    return state


def test_load_from_checkpoint_rebuilds_the_module(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    _random_teacher(teacher, "resnet14")
    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet14", [KD(temperature=2.0), CRD(negatives="batch")],
                                teacher_checkpoint=str(teacher), num_classes=10, input_size=(3, 16, 16))  # fmt: skip
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True,
                           default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DigitsDataModule(size=16, batch_size=16))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)

    loaded = DistillationModule.load_from_checkpoint(path)
    assert [type(d) for d in loaded.distillers] == [KD, CRD] and loaded.distillers[0].temperature == 2.0
    for name, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    batch = {"image": torch.randn(4, 3, 16, 16)}
    module.eval(), loaded.eval()
    assert torch.equal(module(batch["image"]), loaded(batch["image"]))


def test_a_different_teacher_is_refused_on_resume(tmp_path: Path) -> None:
    from lightning_kd.module import TeacherMismatchError

    first, second = tmp_path / "t1.pt", tmp_path / "t2.pt"
    _random_teacher(first, "resnet14")
    torch.manual_seed(5)
    torch.save(create_model("resnet14", num_classes=10).state_dict(), second)
    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet14", [KD()], teacher_checkpoint=str(first), num_classes=10,
                                input_size=(3, 16, 16))  # fmt: skip
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(size=16, batch_size=16))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    other = DistillationModule("resnet8", "resnet14", [KD()], teacher_checkpoint=str(second), num_classes=10,
                               input_size=(3, 16, 16))  # fmt: skip
    with pytest.raises(TeacherMismatchError, match="other teacher weights"):
        make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0).fit(
            other, DigitsDataModule(size=16, batch_size=16), ckpt_path=tmp_path / "run.ckpt"
        )
    allowed = DistillationModule("resnet8", "resnet14", [KD()], teacher_checkpoint=str(second), num_classes=10,
                                 input_size=(3, 16, 16), allow_teacher_change=True)  # fmt: skip
    make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0).fit(
        allowed, DigitsDataModule(size=16, batch_size=16), ckpt_path=tmp_path / "run.ckpt"
    )


SUBCLASS = '''
import torch
from lightning_kd import DistillationModule


class HalfCE(DistillationModule):
    """A research variant: the cross-entropy weight halves every epoch."""

    def on_train_epoch_start(self) -> None:
        self.core.task_loss_weight = 0.5 ** self.current_epoch
        self.log("train/ce_weight", self.core.task_loss_weight)
'''


def test_a_subclass_trains_through_the_command_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    import subprocess

    (tmp_path / "my_research.py").write_text(SUBCLASS)
    _random_teacher(tmp_path / "teacher.pt", "resnet14")
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}"}
    from lightning_kd.demo import digits_config_args

    result = subprocess.run(
        [sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args("kd"),
         "--model.class_path=my_research.HalfCE", "--model.teacher=resnet14",
         f"--model.teacher_checkpoint={tmp_path / 'teacher.pt'}", "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/ce_weight" in metrics
    config = next(tmp_path.rglob("config.yaml")).read_text()
    assert "my_research.HalfCE" in config
