"""The :class:`DistillationModule`: the Lightning face of :class:`~lightning_kd.core.Distillation`.

The core holds the networks, taps, distillers and the loss; this module adds what Lightning needs: the optimizer
and its schedule (one optimizer, parameter groups per stage, see :mod:`lightning_kd.stages`), logging, metrics, and
the checkpoint hooks (the teacher left out of checkpoints and identified by a fingerprint, the random states
captured). It uses public Lightning APIs only. With no teacher and no distillers it trains the student alone, which
is how teachers are trained.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.core import Distillation, as_batch
from lightning_kd.distillers.base import Distiller
from lightning_kd.finite import DeferredFiniteCheck, DivergenceGuard
from lightning_kd.hparams import clean_module_hparams
from lightning_kd.loss_log import EpochMeans, is_logging_step
from lightning_kd.module_checkpoint import TEACHER_PREFIX, CheckpointHooks, TeacherMismatchError  # noqa: F401
from lightning_kd.module_eval import EvaluationSteps
from lightning_kd.stages import MAIN, active_lr, enter_stage, silence_idle_groups
from lightning_kd.taps import TapError, layers_hint

log = logging.getLogger(__name__)
# the frozen teacher is in eval mode on purpose; Lightning's warning about it would only alarm users
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

def reference_sgd(params: Iterable) -> torch.optim.Optimizer:
    """The CRD benchmark's optimizer: SGD, lr 0.05, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class DistillationModule(EvaluationSteps, CheckpointHooks):
    """Distil a frozen teacher into a student with any list of distillers, under a Lightning ``Trainer``.

    Args:
        student, teacher, distillers, task_loss_weight, teacher_checkpoint, student_checkpoint, num_classes,
        input_size, teacher_precision, student_feature_paths, teacher_feature_paths, stage_lr: see
            :class:`~lightning_kd.core.Distillation`.
        optimizer: builds the optimizer from parameter groups (default: :func:`reference_sgd`).
        lr_scheduler: builds the main stage's schedule from the optimizer, stepped once per epoch (default:
            constant). Initialisation stages run at a constant rate and do not advance it.
        save_teacher: keep the teacher's weights in checkpoints (by default they are left out and rebuilt from
            ``teacher``/``teacher_checkpoint``; a fingerprint of them is saved either way).
        allow_teacher_change: accept a checkpoint made with other teacher weights (by default resuming,
            validating or testing with a different teacher is an error).
        nan_policy: on a non-finite loss, ``"raise"`` (stop, naming the component and the step; checked without a
            per-step synchronisation, see :mod:`lightning_kd.finite`), ``"skip"`` (drop the batch leaving
            parameters, BatchNorm statistics, optimizer and distiller state exactly as before it, and count it in
            ``train/skipped``; single device only) or ``"ignore"``.
        divergence_factor: stop with an error when, in an initialisation stage, the epoch mean of the stage's loss
            exceeds this many times its lowest so far (a diverging stage would otherwise wreck the student);
            ``None`` turns the check off.
        channels_last: keep both networks and the images in the ``channels_last`` memory format.
        compile: ``torch.compile`` the student and the teacher in place when the fit starts.
        teacher_cache, cache_verify_fraction: serve the teacher's default-view logits from a teacher-output cache
            (see :class:`~lightning_kd.core.Distillation`); checked against the data module in ``setup``, the
            verification's largest deviation logged as ``train/cache_max_abs_error``.
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | None = None,
        distillers: Sequence[Distiller | Mapping[str, Any]] = (),
        task_loss_weight: float = 1.0,
        teacher_checkpoint: str | None = None,
        student_checkpoint: str | None = None,
        num_classes: int = 100,
        input_size: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = reference_sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        stage_lr: float | None = None,
        save_teacher: bool = False,
        allow_teacher_change: bool = False,
        nan_policy: Literal["raise", "skip", "ignore"] = "raise",
        divergence_factor: float | None = 10.0,
        channels_last: bool = False,
        compile: bool = False,
        teacher_precision: Literal["same", "bf16", "fp16"] = "same",
        student_feature_paths: dict[str, str] | None = None,
        teacher_feature_paths: dict[str, str] | None = None,
        teacher_cache: str | None = None,
        cache_verify_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if nan_policy not in ("raise", "skip", "ignore"):
            raise ValueError(f"nan_policy must be 'raise', 'skip' or 'ignore', got {nan_policy!r}")
        try:
            core = Distillation(
                student, teacher, distillers, task_loss_weight, teacher_checkpoint, student_checkpoint, num_classes,
                input_size, teacher_precision, student_feature_paths, teacher_feature_paths, stage_lr,
                teacher_cache=teacher_cache, cache_verify_fraction=cache_verify_fraction,
            )  # fmt: skip
        except TapError as error:  # e.g. a method's default layers on a network without symbolic names
            raise layers_hint(error, {"student": student, "teacher": teacher}, num_classes, input_size) from None
        self.save_hyperparameters(logger=True)  # they rebuild the module (load_from_checkpoint) and reach the loggers
        clean_module_hparams(self.hparams, list(core.distillers))
        # the core's parts are this module's children (checkpoint keys student.*, teacher.*, distillers.*); the
        # core itself is not registered a second time
        self.student, self.teacher, self.distillers = core.student, core.teacher, core.distillers
        object.__setattr__(self, "core", core)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.save_teacher = save_teacher
        self.allow_teacher_change = allow_teacher_change
        self.nan_policy = nan_policy
        self.channels_last, self.compile_networks = channels_last, compile
        self.teacher_fingerprint = core.teacher_fingerprint()
        self.skipped_batches = 0
        self.finite_check = DeferredFiniteCheck()
        self.divergence = DivergenceGuard(divergence_factor)
        self.epoch_means = EpochMeans()

        classes, top5 = core.num_classes, min(5, core.num_classes)
        for split in ("val", "test"):
            setattr(self, f"{split}_acc1", MulticlassAccuracy(classes, top_k=1, average="micro"))
            setattr(self, f"{split}_acc5", MulticlassAccuracy(classes, top_k=top5, average="micro"))
            setattr(self, f"{split}_loss", MeanMetric())
        self.teacher_acc1 = MulticlassAccuracy(classes, top_k=1, average="micro")
        self.teacher_measured = self.teacher is None

    # ------------------------------------------------------------------------------------------------------
    # what the core does, as module attributes
    # ------------------------------------------------------------------------------------------------------
    @property
    def stages(self) -> list:
        return self.core.stages

    @property
    def current_stage(self):  # noqa: ANN201
        """The stage the fit is in (``main`` when the methods have no initialisation stage)."""
        return self.core.stage

    @property
    def num_classes(self) -> int:
        return self.core.num_classes

    @property
    def task_loss_weight(self) -> float:
        return self.core.task_loss_weight

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.core.input_size

    def forward(self, images: Tensor) -> Tensor:
        """The student's logits (what an exported student computes)."""
        return self.core(images)

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.core.teacher_forward(images)

    def compute_losses(self, batch: Any):  # noqa: ANN201
        """The loss terms of one batch in the current stage (:meth:`Distillation.compute_losses`)."""
        return self.core.compute_losses(batch)

    def export_student(self, path: str | os.PathLike) -> None:
        """Write the student alone as a plain state dict (load it with ``weights_only=True``)."""
        self.core.export_student(path)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.core.train(mode)  # teacher in eval mode; an initialisation stage trains the feature path only
        return self

    # ------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Apply the speed options once the module is on its device."""
        if not getattr(self, "_speed_options_applied", False):
            self._speed_options_applied = True
            self.core.apply_speed_options(self.channels_last, self.compile_networks)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ValueError(
                f"the data module has {data_classes} classes but the student predicts {self.num_classes}: "
                f"set model.num_classes={data_classes} (or build the networks for {data_classes} classes)"
            )
        for distiller in self.distillers:
            distiller.setup_data(datamodule)
        if stage == "fit" and self.core.teacher_cache is not None:
            self.core.teacher_cache.check_data(datamodule)  # this data and augmentation, or an error naming the field

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.core.param_groups())
        scheduler = self.lr_scheduler_factory(optimizer) if self.lr_scheduler_factory is not None else None
        stage = self.core.stage  # the first stage, or the one a restored checkpoint is in
        enter_stage(optimizer, stage.name, self.core.stage_learning_rate(stage), scheduler if stage.is_main else None)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """The main stage's schedule advances in the main stage only; idle groups stay at learning rate 0."""
        if not self.core.stage.is_main:
            return
        super().lr_scheduler_step(scheduler, metric)
        for optimizer in self.trainer.optimizers:
            silence_idle_groups(optimizer, MAIN)

    # ------------------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.train(True)

    def on_train_epoch_start(self) -> None:
        self._select_stage()  # callbacks' batch hooks see the epoch's stage

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._select_stage()  # also after a resume inside an epoch, where Lightning starts no epoch

    def _select_stage(self) -> None:
        """Select the stage and the distillers' epoch; a new stage starts in the optimizer with a fresh state."""
        scheduler = self.lr_schedulers()
        scheduler = None if isinstance(scheduler, list) else scheduler
        if self.core.set_epoch(self.current_epoch, self.trainer.optimizers[0], scheduler):
            self.divergence.new_stage()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        batch = as_batch(batch)
        if self.nan_policy == "skip":
            with self.core.revertible() as undo:
                terms = self.core.compute_losses(batch)
                loss = terms.total
                if not torch.isfinite(loss):  # skipping needs the answer now: one synchronisation per step
                    undo.revert()
                    bad = [name for name, value in terms.losses.items() if not torch.isfinite(value)] or ["total"]
                    self.skipped_batches += 1
                    self.log("train/skipped", float(self.skipped_batches), on_step=True, on_epoch=False)
                    log.warning("Skipping batch %d: non-finite loss from %s (nothing was updated)", batch_idx, bad)
                    return None
        else:
            terms = self.core.compute_losses(batch)
            loss = terms.total
        if self.trainer.world_size > 1:
            # parameters outside this stage get a zero gradient, so DDP needs no find_unused_parameters
            idle = self.core.idle_parameters()
            if idle:
                loss = loss + sum(p.reshape(-1)[0] for p in idle) * 0.0
        if self.nan_policy == "raise":  # "total" is named only when no term is non-finite itself
            checked = {**terms.losses, "total": loss} if len(terms.losses) > 1 else terms.losses
            self.finite_check.record(self.global_step, self.current_epoch, self.core.stage.name, checked)
        self.epoch_means.add({**terms.losses, "loss": loss})
        metrics = self._distiller_metrics()
        if metrics:  # e.g. CTKD's learnable temperature: its main diagnostic, logged every step
            self.log_dict(metrics, batch_size=batch["label"].shape[0])
        if is_logging_step(self.trainer, self.global_step, batch_idx):
            self.finite_check.check()  # the loggers synchronise here anyway
            size = batch["label"].shape[0]
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
            for name, value in terms.losses.items():
                self.log(f"train/{name}", value.detach(), prog_bar=len(terms.losses) > 1, batch_size=size)
            self.log("train/lr", active_lr(self.trainer.optimizers[0], self.core.stage.name), batch_size=size)
            if len(self.stages) > 1:
                self.log("train/stage", float(self.stages.index(self.core.stage)), batch_size=size)
        return loss

    def _distiller_metrics(self) -> dict[str, Tensor]:
        """Values a distiller asks to see, from its ``metrics()``, as ``train/<distiller>/<name>``."""
        out: dict[str, Tensor] = {}
        for distiller in self.distillers:
            metrics = getattr(distiller, "metrics", None)
            if metrics is not None:
                out.update({f"train/{distiller.name}/{k}": v.detach().float() for k, v in metrics().items()})
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        cache = self.core.teacher_cache
        error = cache.pop_max_abs_error() if cache is not None else None
        if error is not None:  # the cached logits against the live teacher's on a sample of the lookups
            self.log("train/cache_max_abs_error", error.float(), batch_size=len(as_batch(batch)["label"]))

    def on_train_epoch_end(self) -> None:
        self.finite_check.check()
        means = self.epoch_means.pop()
        for name, value in means.items():
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True)
        if "loss" in means and not self.core.stage.is_main:  # main stages swing around tiny values
            self.divergence.check({"loss": float(means["loss"])}, self.current_epoch, self.core.stage)

    def on_train_end(self) -> None:
        self.finite_check.check()
