"""The newer methods (DKD, DIST, NKD, CTKD = KD with a CurriculumTemperature, MLKD, ReviewKD, OFD with either
teacher BatchNorm setting) under ``bf16-mixed`` precision and under 2-process DDP, on the digits, CPU only.

- bf16-mixed: a few Lightning steps of each; both networks run in bf16, every logged loss term is a finite fp32
  tensor, and each method's own state behaves: CTKD's ``theta`` stays an fp32 parameter with an fp32 gradient and
  the logged temperature is ``1 + 20 sigmoid(theta)``; MLKD reads the strong view; OFD's ``teacher_bn="train"``
  moves the teacher's BatchNorm statistics and ``"eval"`` leaves them alone.
- DDP: ``strategy="ddp_spawn"`` with 2 CPU processes (gloo); a callback saves each rank's state at the start and
  the end of the fit. Every trainable parameter (student and the distiller's own: ReviewKD's fusions, OFD's
  connectors, CTKD's ``theta``) starts and ends identical on both ranks; the student's first convolution and every
  distiller parameter moved; the student's BatchNorm statistics end apart (each rank saw its own half of the data). With OFD's ``teacher_bn="train"`` the teacher's statistics move
  and are per rank; with ``"eval"`` they stay as loaded.

DKD represents the DDP cases in the default suite; the others are ``slow`` (each is a 2-process spawn).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import CurriculumTemperature, get_distiller

NEW_METHODS = ("dkd", "dist", "nkd", "ctkd", "mlkd", "reviewkd", "ofd")
# case -> (registry name, overrides of the registry's example)
CASES: dict[str, tuple[str, dict[str, Any]]] = {name: (name, {}) for name in NEW_METHODS}
CASES["ofd"] = ("ofd", {"teacher_bn": "eval"})
CASES["ofd_teacher_bn_train"] = ("ofd", {"teacher_bn": "train"})  # the official setting, a config opt-in
STEPS = 3  # bf16-mixed fits
DDP_STEPS = 2


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread per process: on a shared 2-core machine two threads per process wait on each other. Spawned
    ranks read OMP_NUM_THREADS (Lightning sets their thread count from it when it is present)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(case: str, seed: int = 0) -> tuple[DistillationModule, DigitsDataModule]:
    name, overrides = CASES[case]
    entry = get_distiller(name)
    L.seed_everything(seed)
    module = DistillationModule("resnet8", teacher="resnet14", distillers=[entry.build(**overrides)],
                                task_loss_weight=1.0, num_classes=10, input_size=(3, 16, 16))
    data = DigitsDataModule(size=16, batch_size=16, strong_view="strong" in entry.views)
    return module, data


def _theta(module: DistillationModule) -> nn.Parameter:
    temperature = module.distillers[0].temperature
    assert isinstance(temperature, CurriculumTemperature), f"CTKD's temperature is {type(temperature).__name__}"
    [(_, theta)] = list(temperature.named_parameters())
    return theta


def _teacher_norm_stats(module: DistillationModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.teacher.state_dict().items() if "running_" in k}


# ---------------------------------------------------------------------------------------------------------------
# bf16-mixed
# ---------------------------------------------------------------------------------------------------------------
class StepRecorder(Callback):
    """Per training step: every ``train/*`` value the module logs (through its ``self.log``) with its dtype; for
    CTKD, ``theta`` at the step's start and the dtype of its gradient before the optimizer step."""

    def __init__(self, ctkd: bool) -> None:
        self.ctkd = ctkd
        self.steps: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: L.Trainer, module: DistillationModule) -> None:
        log = module.log

        def spy(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if self.steps and name.startswith("train/"):
                self.steps[-1]["values"][name] = float(value)
                self.steps[-1]["dtypes"][name] = value.dtype if isinstance(value, torch.Tensor) else type(value)
            return log(name, value, *args, **kwargs)

        module.log = spy

    def on_train_batch_start(self, trainer: L.Trainer, module: DistillationModule, batch: Any, batch_idx: int) -> None:
        step: dict[str, Any] = {"values": {}, "dtypes": {}, "keys": sorted(batch)}
        if self.ctkd:
            theta = _theta(module)
            step["theta"] = (theta.dtype, float(theta.detach()))
        self.steps.append(step)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: DistillationModule, optimizer: Any) -> None:
        if self.ctkd:
            grad = _theta(module).grad
            self.steps[-1]["theta_grad"] = None if grad is None else (grad.dtype, float(grad))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_mixed_fit(case: str) -> None:
    module, data = _setup(case)
    name = CASES[case][0]
    distiller = module.distillers[0]
    recorder = StepRecorder(ctkd=name == "ctkd")
    teacher_before = _teacher_norm_stats(module)
    dtypes: dict[str, list[torch.dtype]] = {"student": [], "teacher": []}
    module.student.register_forward_hook(lambda _, args, out: dtypes["student"].append(out.dtype))
    module.teacher.register_forward_hook(lambda _, args, out: dtypes["teacher"].append(out.dtype))
    theta_before = float(_theta(module).detach()) if name == "ctkd" else None
    params_before = {k: v.detach().clone() for k, v in distiller.named_parameters()}

    # one epoch of STEPS batches, then one validation batch
    trainer = make_trainer(precision="bf16-mixed", max_epochs=1, limit_train_batches=STEPS, limit_val_batches=1,
                           log_every_n_steps=1, callbacks=[recorder])
    trainer.fit(module, data)

    assert trainer.global_step == STEPS and len(recorder.steps) == STEPS
    views = 2 if name == "mlkd" else 1  # MLKD runs both networks on the weak and the strong view
    # each training step runs each network once per view; validation adds student and teacher forwards after
    assert dtypes["student"][: STEPS * views] == [torch.bfloat16] * (STEPS * views), dtypes["student"]
    assert dtypes["teacher"][: STEPS * views] == [torch.bfloat16] * (STEPS * views), dtypes["teacher"]
    for index, step in enumerate(recorder.steps):
        values, logged = step["values"], step["dtypes"]
        terms = {k for k in values if k == f"train/{distiller.name}" or k.startswith(f"train/{distiller.name}/")}
        terms -= {f"train/{distiller.name}/temperature"}
        assert {"train/loss", "train/ce"} <= set(values) and terms, f"step {index}: logged {sorted(values)}"
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        assert not bad, f"step {index}: non-finite logged values {bad}"
        low = {k: logged[k] for k in {"train/loss", "train/ce", *terms} if logged[k] != torch.float32}
        assert not low, f"step {index}: loss terms not fp32 {low}"
        if name == "mlkd":
            assert "image_strong" in step["keys"], f"step {index}: batch keys {step['keys']}"
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))

    if name == "ctkd":
        theta = _theta(module)
        assert theta.dtype == torch.float32 and theta.requires_grad
        assert any(theta is p for group in trainer.optimizers[0].param_groups for p in group["params"])
        for index, step in enumerate(recorder.steps):
            dtype, value = step["theta"]
            assert dtype == torch.float32, f"step {index}: theta is {dtype}"
            grad_dtype, grad = step["theta_grad"]
            assert grad_dtype == torch.float32 and math.isfinite(grad) and grad != 0.0, step["theta_grad"]
            # the logged temperature is the one of the step's theta: t_start + t_range * sigmoid(theta)
            logged = step["values"][f"train/{distiller.name}/temperature"]
            assert logged == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-value)), rel=1e-6)
        assert float(theta.detach()) != theta_before, "theta did not move"
    if params_before:  # ReviewKD's fusions, OFD's connectors, CTKD's theta: trained in bf16-mixed too
        after = dict(distiller.named_parameters())
        unchanged = [k for k, v in params_before.items() if torch.equal(v, after[k].detach())]
        assert not unchanged, f"distiller parameters that did not move: {unchanged}"
        assert all(p.dtype == torch.float32 for p in after.values())
    teacher_after = _teacher_norm_stats(module)
    moved = [k for k, v in teacher_before.items() if not torch.equal(v, teacher_after[k])]
    if case == "ofd_teacher_bn_train":
        assert moved and not module.teacher.training, "teacher_bn='train': its BatchNorm statistics should move"
    else:
        assert not moved, f"the frozen teacher's BatchNorm statistics moved: {moved[:5]}"


# ---------------------------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------------------------
class RankStates(Callback):
    """Each rank saves its module's state (teacher included) when the fit starts and when it ends."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _save(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size, "global_step": trainer.global_step},
                   os.path.join(self.folder, f"{when}{trainer.global_rank}.pt"))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "start")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "end")


def _ddp_fit(case: str, folder: Path) -> None:
    module, data = _setup(case)
    trainable = [k for k, p in module.named_parameters() if p.requires_grad]
    distiller_params = [k for k in trainable if k.startswith("distillers.")]
    trainer = make_trainer(devices=2, strategy="ddp_spawn", max_steps=DDP_STEPS, limit_val_batches=0,
                           callbacks=[RankStates(str(folder))])
    trainer.fit(module, data)

    saved = {f"{when}{r}": torch.load(folder / f"{when}{r}.pt", weights_only=True) for when in ("start", "end")
             for r in (0, 1)}  # fmt: skip
    assert all(s["world_size"] == 2 for s in saved.values())
    assert [saved[f"end{r}"]["global_step"] for r in (0, 1)] == [DDP_STEPS, DDP_STEPS]
    start, end = [saved["start0"]["state"], saved["start1"]["state"]], [saved["end0"]["state"], saved["end1"]["state"]]
    for key in trainable:
        assert torch.equal(start[0][key], start[1][key]), f"{key}: the ranks started apart"
        assert torch.equal(end[0][key], end[1][key]), f"{key}: the ranks ended with different values"
    for key in ["student.conv1.weight", *distiller_params]:
        assert not torch.equal(start[0][key], end[0][key]), f"{key} did not train"
    # each rank saw its own half of the data: its BatchNorm statistics end apart (DDP broadcasts rank 0's buffers
    # before each forward; the last update is each rank's own)
    assert not torch.equal(end[0]["student.bn1.running_mean"], end[1]["student.bn1.running_mean"])
    teacher_stats = [k for k in start[0] if k.startswith("teacher.") and "running_" in k]
    assert teacher_stats
    if case == "ofd_teacher_bn_train":  # the official setting: the teacher's statistics move, per rank
        for rank in (0, 1):
            assert any(not torch.equal(start[rank][k], end[rank][k]) for k in teacher_stats), f"rank {rank}"
        assert any(not torch.equal(end[0][k], end[1][k]) for k in teacher_stats)
    else:
        for rank in (0, 1):
            moved = [k for k in teacher_stats if not torch.equal(start[rank][k], end[rank][k])]
            assert not moved, f"rank {rank}: the frozen teacher's BatchNorm statistics moved: {moved[:5]}"
    if CASES[case][0] == "ofd":  # the margins come from the teacher's BatchNorm weights: fixed, the same everywhere
        margins = [k for k in start[0] if k.startswith("distillers.0.margin")]
        assert margins and all(torch.equal(start[0][k], end[r][k]) for k in margins for r in (0, 1))


def test_ddp_two_processes_dkd(tmp_path: Path) -> None:
    _ddp_fit("dkd", tmp_path)


@pytest.mark.slow  # a 2-process spawn each, like the DKD case
@pytest.mark.parametrize("case", sorted(set(CASES) - {"dkd"}))
def test_ddp_two_processes(case: str, tmp_path: Path) -> None:
    _ddp_fit(case, tmp_path)
