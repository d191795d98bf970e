"""Every distiller trains under ``bf16-mixed`` on CPU with finite losses, and returns fp32 losses from bf16
features (both the initialisation stage and the main stage of the methods that have one)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_kd.distillers as distillers_package
from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import Distiller
from lightning_kd.module import as_batch

EXPECTED = {"KD", "VID", "RKD", "PKT", "AB", "FT", "FitNet", "AT", "SP", "CC", "FSP", "NST", "CRD"}
NEGATIVES = 32


def _distiller_classes() -> dict[str, type[Distiller]]:
    found = {}
    for name in distillers_package.__all__:
        obj = getattr(distillers_package, name)
        if isinstance(obj, type) and issubclass(obj, Distiller) and obj is not Distiller:
            found[name] = obj
    return found


CLASSES = _distiller_classes()


def _has_stage(cls: type[Distiller]) -> bool:
    return cls.stage_loss is not Distiller.stage_loss


def test_every_method_is_covered() -> None:
    assert EXPECTED <= set(CLASSES), f"missing distillers: {sorted(EXPECTED - set(CLASSES))}"


def _setup(name: str) -> tuple[DistillationModule, DigitsDataModule]:
    cls = CLASSES[name]
    L.seed_everything(0)
    distiller = cls(stage_epochs=1) if _has_stage(cls) else cls()
    module = DistillationModule("resnet8", teacher="resnet14", distillers=[distiller], task_loss_weight=0.1,
                                num_classes=10, input_size=(3, 16, 16))
    data = DigitsDataModule(size=16, batch_size=16, contrast_negatives=NEGATIVES if name == "CRD" else 0)
    return module, data


class LossRecorder(Callback):
    """The stage and every ``train/*`` value the module logs in each training step (read from its
    ``self.log`` calls, so nothing logged by an earlier batch or epoch is counted)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, float]]] = []
        self._current: dict[str, float] | None = None

    def on_fit_start(self, trainer, module) -> None:
        log = module.log

        def spy(name, value, *args, **kwargs):
            if self._current is not None and name.startswith("train/"):
                self._current[name] = float(value)
            return log(name, value, *args, **kwargs)

        module.log = spy

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._current = {}
        self.records.append((module.current_stage.name, self._current))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._current = None


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_bf16_mixed_training_gives_finite_losses(name: str) -> None:
    module, data = _setup(name)
    recorder = LossRecorder()
    # one training step per stage (an epoch of one batch each), then one validation batch
    trainer = make_trainer(precision="bf16-mixed", max_epochs=len(module.stages), limit_train_batches=1,
                           limit_val_batches=1, callbacks=[recorder])
    outputs: list[torch.dtype] = []
    module.student.register_forward_hook(lambda _, args, out: outputs.append(out.dtype))
    trainer.fit(module, data)
    assert outputs and set(outputs) == {torch.bfloat16}, f"the student did not run in bf16: {outputs}"
    distiller = module.distillers[0]
    expected_stages = [s.name for s in module.stages]
    assert [stage for stage, _ in recorder.records] == expected_stages
    for stage, metrics in recorder.records:
        wanted = {"train/loss"}
        if stage != "main":
            wanted.add(f"train/{stage}")
        else:
            wanted.add("train/ce")
            if distiller.active_in_main:
                wanted.add(f"train/{distiller.name}")
        assert set(metrics) == wanted, f"stage {stage}: logged {sorted(metrics)}, expected {sorted(wanted)}"
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, f"stage {stage}: non-finite logged values {bad}"
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_losses_are_fp32_from_bf16_features(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, data = _setup(name)
    data.setup("fit")
    batch = as_batch(next(iter(data.train_dataloader())))
    distiller = module.distillers[0]
    check = getattr(distiller, "setup_data", None)
    if check is not None:
        check(data)  # CRD sizes its memory banks here (the module's setup does it in a fit)

    features: list[torch.dtype] = []  # dtypes of the features handed to the distiller
    logits: list[torch.dtype] = []  # dtype of the student's output

    def record(args: tuple) -> None:
        student, teacher = args[0], args[1]
        features.extend(f.dtype for f in [*student, *teacher])

    distiller.register_forward_pre_hook(lambda _, args: record(args))
    stage_loss = distiller.stage_loss
    monkeypatch.setattr(distiller, "stage_loss", lambda *args: (record(args), stage_loss(*args))[1])
    module.student.register_forward_hook(lambda _, args, out: logits.append(out.dtype))

    module.train()
    for stage in module.stages:
        module._stage = stage
        for d in module.distillers:
            d.on_stage(stage.name)
        features.clear()
        logits.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, _ = module.compute_losses(batch)
        runs = not stage.is_main or distiller.active_in_main
        assert (stage.name if not stage.is_main else distiller.name) in losses or not runs
        if runs:
            assert torch.bfloat16 in features, f"stage {stage.name}: the features were not bf16 ({features})"
        if stage.is_main:  # the cross-entropy reads the student's bf16 logits
            assert "ce" in losses and logits == [torch.bfloat16], f"stage {stage.name}: logits {logits}"
        for loss_name, value in losses.items():
            assert value.dtype == torch.float32, f"stage {stage.name}: {loss_name} is {value.dtype}"
            assert value.dim() == 0 and torch.isfinite(value), f"stage {stage.name}: {loss_name} = {value}"
