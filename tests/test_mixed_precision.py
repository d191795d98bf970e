"""Every registered method trains under Lightning's ``bf16-mixed`` precision on CPU, through each of its stages
(initialisation and main): the student runs in bf16, the distiller is handed bf16 features, and every logged loss
term is an fp32 tensor with a finite value.

The conformance suite checks autocast on one batch of each method's first stage; this is the whole Lightning path.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import get_distiller, list_distillers

# every registered method, plus CRD with its memory banks (the registry's example uses in-batch negatives)
CASES = {name: (name, {}, 0) for name in list_distillers()}
CASES["crd_memory_banks"] = ("crd", {"negatives": "memory"}, 32)


def _setup(case: str) -> tuple[DistillationModule, DigitsDataModule]:
    name, overrides, negatives = CASES[case]
    entry = get_distiller(name)
    L.seed_everything(0)
    module = DistillationModule("resnet8", teacher="resnet14", distillers=[entry.build(**overrides)],
                                task_loss_weight=0.1, num_classes=10, input_size=(3, 16, 16))
    data = DigitsDataModule(size=16, batch_size=16, contrast_negatives=negatives, strong_view="strong" in entry.views)
    return module, data


class LossRecorder(Callback):
    """Every ``train/*`` value the module logs in each training step (read from its ``self.log`` calls, so nothing
    logged by an earlier batch or epoch is counted), the dtype of each logged tensor, and the step's stage."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, float], dict[str, torch.dtype]]] = []
        self._current: tuple[dict[str, float], dict[str, torch.dtype]] | None = None

    def on_fit_start(self, trainer, module) -> None:
        log = module.log

        def spy(name, value, *args, **kwargs):
            if self._current is not None and name.startswith("train/"):
                self._current[0][name] = float(value)
                if isinstance(value, torch.Tensor):
                    self._current[1][name] = value.dtype
            return log(name, value, *args, **kwargs)

        module.log = spy

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._current = ({}, {})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # the stage the batch trained in (the module selects it in its own on_train_batch_start, which Lightning
        # calls after the callbacks')
        self.records.append((module.current_stage.name, *self._current))
        self._current = None


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_mixed_training_gives_fp32_finite_losses(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, data = _setup(case)
    distiller = module.distillers[0]
    recorder = LossRecorder()
    # one training step per stage (an epoch of one batch each), then one validation batch
    trainer = make_trainer(precision="bf16-mixed", max_epochs=len(module.stages), limit_train_batches=1,
                           limit_val_batches=1, callbacks=[recorder])
    outputs: list[torch.dtype] = []
    module.student.register_forward_hook(lambda _, args, out: outputs.append(out.dtype))
    features: dict[str, list[torch.dtype]] = {}  # per stage, the dtypes of the features handed to the distiller

    def record(args: tuple) -> None:
        features.setdefault(module.current_stage.name, []).extend(f.dtype for f in [*args[0], *args[1]])

    distiller.register_forward_pre_hook(lambda _, args: record(args))
    stage_loss = distiller.stage_loss
    monkeypatch.setattr(distiller, "stage_loss", lambda *args: (record(args), stage_loss(*args))[1])

    trainer.fit(module, data)

    assert outputs and set(outputs) == {torch.bfloat16}, f"the student did not run in bf16: {outputs}"
    assert [stage for stage, _, _ in recorder.records] == [s.name for s in module.stages]
    metrics_names = {f"train/{distiller.name}/{k}" for k in getattr(distiller, "metrics", dict)()}
    for stage, logged, dtypes in recorder.records:
        wanted = {"train/loss", "train/lr"} | metrics_names | ({"train/stage"} if len(module.stages) > 1 else set())
        if stage != "main":
            wanted.add(f"train/{stage}")
        else:
            wanted.add("train/ce")
            if distiller.active_in_main:  # one term, or named terms train/<name>/<key>
                terms = {k for k in logged if k.startswith(f"train/{distiller.name}")} - metrics_names
                assert terms == {f"train/{distiller.name}"} or (
                    terms and all(k.startswith(f"train/{distiller.name}/") for k in terms)
                ), f"stage {stage}: terms {sorted(terms)}"
                wanted |= terms
        assert set(logged) == wanted, f"stage {stage}: logged {sorted(logged)}, expected {sorted(wanted)}"
        bad = {k: v for k, v in logged.items() if not math.isfinite(v)}
        assert not bad, f"stage {stage}: non-finite logged values {bad}"
        losses = wanted - metrics_names - {"train/lr", "train/stage"}
        low = {k: dtypes.get(k) for k in losses if dtypes.get(k) != torch.float32}
        assert not low, f"stage {stage}: loss terms not fp32 {low}"
        runs = stage != "main" or distiller.active_in_main
        if runs:
            assert torch.bfloat16 in features.get(stage, []), f"stage {stage}: features {features.get(stage)}"
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
