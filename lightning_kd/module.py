"""The :class:`DistillationModule`: the library's only LightningModule.

It holds a frozen teacher, a trainable student and a list of distillers. One training step::

    student logits, student taps  <- student(images)
    teacher logits, teacher taps  <- teacher(images)      (no_grad, eval mode, same autocast)
    loss = task_loss_weight * CE(student logits, labels) + sum_i weight_i * distiller_i(taps)

With no teacher and no distillers it trains the student alone, which is how teachers are trained.
Lightning does the rest: devices, DDP, precision, checkpointing, logging.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.checkpoints import load_into
from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.finite import DeferredFiniteCheck
from lightning_kd.models import create_model
from lightning_kd.stages import MAIN, Stage, plan_stages, stage_at
from lightning_kd.taps import LOGITS, FeatureTaps, expand_taps

log = logging.getLogger(__name__)
# the frozen teacher is in eval mode on purpose; Lightning's warning about it would only alarm users
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

TEACHER_PREFIX = "teacher."


def reference_sgd(params: Iterable) -> torch.optim.Optimizer:
    """The CRD benchmark's optimizer: SGD, lr 0.05, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def as_batch(batch: Any) -> Batch:
    """Accept the library's dictionary batches and plain ``(images, labels, ...)`` tuples alike."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise KeyError(f"a batch dictionary needs 'image' and 'label' keys, found {sorted(batch)}")
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        named = {"image": batch[0], "label": batch[1]}
        if len(batch) > 2:
            named["index"] = batch[2]
        if len(batch) > 3:
            named["contrast_index"] = batch[3]
        return named
    raise TypeError(f"expected a batch dictionary or an (images, labels, ...) tuple, found {type(batch).__name__}")


@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    modes = [(m, m.training) for m in modules if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


class DistillationModule(L.LightningModule):
    """Distil a frozen teacher into a student with any list of distillers.

    Args:
        student: the network to train: a module, or a bundled model's name (see
            :func:`lightning_kd.models.create_model`).
        teacher: the frozen network to learn from (module or name), or ``None`` to train the student alone.
        distillers: the distillation methods (:class:`~lightning_kd.distillers.Distiller` objects).
        task_loss_weight: ``gamma``, the weight of the cross-entropy with the labels.
        teacher_checkpoint: weights for the teacher: a plain state dict file, or a Lightning checkpoint of
            this library in which the teacher was trained as a student. Loaded with ``weights_only=True``.
        num_classes: classifier size for networks built by name.
        input_size: ``(C, H, W)`` of one input; the probe forward that sizes the distillers' learnable
            parts uses it.
        optimizer: builds the optimizer from parameters (default: :func:`reference_sgd`).
        lr_scheduler: builds the main stage's schedule from the optimizer, stepped once per epoch
            (default: constant).
        stage_lr: learning rate of the initialisation stages (default: the optimizer's own).
        save_teacher: keep the teacher's weights in checkpoints (by default they are left out and rebuilt
            from ``teacher``/``teacher_checkpoint`` on resume).
        nan_policy: on a non-finite loss, ``"raise"`` (stop, naming the component and the step; checked
            without a per-step synchronisation, so the error comes at the next logging step, epoch end or
            checkpoint, see :mod:`lightning_kd.finite`), ``"skip"`` (drop the batch and count it in
            ``train/skipped``; single-device only) or ``"ignore"``.
        channels_last: keep both networks and the images in the ``channels_last`` memory format (faster
            convolutions on recent GPUs and CPUs with oneDNN).
        compile: ``torch.compile`` the student and the teacher in place when the fit starts (taps keep
            working; the state dict keys do not change).
        teacher_precision: run the frozen teacher under its own autocast in ``"bf16"`` or ``"fp16"`` (fp16 on
            GPU), whatever the student's precision; ``"same"`` runs it in the student's.
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        task_loss_weight: float = 1.0,
        teacher_checkpoint: str | None = None,
        num_classes: int = 100,
        input_size: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = reference_sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        stage_lr: float | None = None,
        save_teacher: bool = False,
        nan_policy: Literal["raise", "skip", "ignore"] = "raise",
        channels_last: bool = False,
        compile: bool = False,
        teacher_precision: Literal["same", "bf16", "fp16"] = "same",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["student", "teacher", "distillers", "optimizer", "lr_scheduler"], logger=False
        )
        self.student = create_model(student, num_classes=num_classes) if isinstance(student, str) else student
        if isinstance(teacher, str):
            teacher = create_model(teacher, num_classes=num_classes)
        self.teacher = teacher
        distillers = list(distillers)
        if distillers and teacher is None and any(d.needs_teacher for d in distillers):
            raise ValueError(
                f"distillers {[d.name for d in distillers]} need a teacher, but teacher is None: pass a teacher "
                "network (and usually teacher_checkpoint)"
            )
        if teacher_checkpoint is not None and teacher is None:
            raise ValueError("teacher_checkpoint was given but teacher is None: name the teacher network too")
        _make_names_unique(distillers)
        self.distillers = nn.ModuleList(distillers)
        self.task_loss_weight = float(task_loss_weight)
        self.input_size = tuple(input_size)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.stage_lr = stage_lr
        self.save_teacher = save_teacher
        if nan_policy not in ("raise", "skip", "ignore"):
            raise ValueError(f"nan_policy must be 'raise', 'skip' or 'ignore', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.skipped_batches = 0
        self._finite_check = DeferredFiniteCheck()
        if teacher_precision not in ("same", "bf16", "fp16"):
            raise ValueError(f"teacher_precision must be 'same', 'bf16' or 'fp16', got {teacher_precision!r}")
        self.channels_last = channels_last
        self.compile_networks = compile
        self.teacher_precision = teacher_precision

        if self.teacher is not None:
            if teacher_checkpoint is not None:
                load_into(self.teacher, teacher_checkpoint, what="teacher")
            elif distillers:
                log.warning("The teacher has no teacher_checkpoint: distilling from random weights.")
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        for distiller in distillers:
            _resolve_layers(distiller, self.student, self.teacher)
        self._student_taps = FeatureTaps(self.student, [t for d in distillers for t in d.student_layers])
        self._teacher_taps = (
            FeatureTaps(self.teacher, [t for d in distillers for t in d.teacher_layers]) if self.teacher else None
        )
        self.num_classes = self._probe_and_build()
        top5 = min(5, self.num_classes)
        self.val_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")
        self.test_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")
        self.teacher_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self._teacher_measured = self.teacher is None

        self.stages = plan_stages(distillers)
        self._stage = self.stages[0]
        self._idle_params: list[nn.Parameter] = []

    # ------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------
    def _probe_and_build(self) -> int:
        """Run both networks once on zeros (eval mode, no grad) and let each distiller build its parts."""
        probe = torch.zeros(2, *self.input_size)
        with torch.no_grad(), _eval_mode(self.student, self.teacher):
            student_features = self._forward(self.student, self._student_taps, probe)
            teacher_features = self._forward(self.teacher, self._teacher_taps, probe) if self.teacher else {}
        student_classes = _num_outputs(student_features[LOGITS], "student")
        if self.teacher is not None:
            teacher_classes = _num_outputs(teacher_features[LOGITS], "teacher")
            if teacher_classes != student_classes:
                raise ValueError(
                    f"the teacher predicts {teacher_classes} classes but the student {student_classes}: "
                    "both must be built for the same classes"
                )
        for distiller in self.distillers:
            distiller.build(
                [student_features[t] for t in distiller.student_layers],
                [teacher_features[t] for t in distiller.teacher_layers] if self.teacher else [],
            )
        return student_classes

    def configure_model(self) -> None:
        """Apply the speed options (memory format, compilation) once the module is on its device."""
        if getattr(self, "_speed_options_applied", False):
            return
        self._speed_options_applied = True
        networks = [n for n in (self.student, self.teacher) if n is not None]
        if self.channels_last:
            for network in networks:
                network.to(memory_format=torch.channels_last)
        if self.compile_networks:
            for network in networks:
                network.compile()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ValueError(
                f"the data module has {data_classes} classes but the student predicts {self.num_classes}: "
                f"set model.num_classes={data_classes} (or build the networks for {data_classes} classes)"
            )
        for distiller in self.distillers:
            check = getattr(distiller, "check_datamodule", None)
            if check is not None:
                check(datamodule)

    # ------------------------------------------------------------------------------------------------------
    # the teacher stays frozen and in eval mode whatever Lightning does
    # ------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------------------
    # forward passes
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _forward(network: nn.Module, taps: FeatureTaps | None, images: Tensor) -> dict[str, Tensor]:
        logits = network(images)
        features = taps.pop() if taps is not None else {}
        features[LOGITS] = logits
        return features

    def _prepare_images(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        """The teacher's logits and tapped features: no grad, eval mode, in ``teacher_precision``."""
        with torch.no_grad():
            if self.teacher_precision == "same":
                return self._forward(self.teacher, self._teacher_taps, images)
            dtype = torch.bfloat16 if self.teacher_precision == "bf16" else torch.float16
            with torch.autocast(images.device.type, dtype=dtype):
                features = self._forward(self.teacher, self._teacher_taps, images)
            # the distillers' teacher-side parts run in the student's precision
            return {name: value.float() for name, value in features.items()}

    def forward(self, images: Tensor) -> Tensor:
        """The student's logits (what an exported model computes)."""
        logits = self.student(images)
        self._student_taps.features.clear()
        return logits

    # ------------------------------------------------------------------------------------------------------
    # stages and optimizers
    # ------------------------------------------------------------------------------------------------------
    @property
    def current_stage(self) -> Stage:
        """The stage the fit is in (``main`` when the methods have no initialisation stage)."""
        return self._stage

    def _trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        if stage.distiller is not None:
            params = list(stage.distiller.stage_parameters(self.student))
        else:
            params = [p for p in self.student.parameters() if p.requires_grad]
            for distiller in self.distillers:
                params += list(distiller.main_parameters())
        return list({id(p): p for p in params}.values())

    def configure_optimizers(self) -> Any:
        stage = self._stage
        for distiller in self.distillers:
            distiller.on_stage(stage.name)
        params = self._trainable_parameters(stage)
        if not params:
            raise ValueError(f"stage {stage.name!r} has no parameter to train")
        chosen = {id(p) for p in params}
        self._idle_params = [p for p in self.parameters() if p.requires_grad and id(p) not in chosen]
        optimizer = self.optimizer_factory(params)
        if not stage.is_main:
            stage_lr = stage.distiller.stage_lr if stage.distiller.stage_lr is not None else self.stage_lr
            if stage_lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = stage_lr
            return optimizer
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:
            self.teacher.eval()
        stage = stage_at(self.stages, self.current_epoch)
        if stage is not self._stage:
            log.info("Epoch %d: stage %r begins (fresh optimizer).", self.current_epoch, stage.name)
            self._stage = stage
            self.trainer.strategy.setup_optimizers(self.trainer)
        if len(self.stages) > 1:
            self.log("train/stage", float(self.stages.index(self._stage)), on_step=False, on_epoch=True)
        optimizers = self.trainer.optimizers
        if optimizers:
            self.log("train/lr", float(optimizers[0].param_groups[0]["lr"]), on_step=False, on_epoch=True)

    def on_train_start(self) -> None:
        """After a restore in the middle of an epoch, start the training samplers where the epoch stopped.

        Lightning restores how many batches of the epoch were done but iterates the loader from its start;
        a :class:`~lightning_kd.data.sampling.ResumableRandomSampler` can skip what was already seen.
        """
        fit_loop = self.trainer.fit_loop
        done = fit_loop.epoch_loop.batch_progress.current.processed  # "completed" lags by one in a checkpoint
        if not fit_loop.restarted_mid_epoch or done <= 0:
            return
        loaders = self.trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            sampler = getattr(loader, "sampler", None)
            batch_size = getattr(loader, "batch_size", None)
            if hasattr(sampler, "skip") and batch_size:
                sampler.skip(done * batch_size)
            else:
                log.warning("Resuming inside an epoch with a sampler that cannot skip: the epoch restarts.")

    # ------------------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------------------
    def _teacher_needed(self, stage: Stage) -> bool:
        if self.teacher is None:
            return False
        if stage.distiller is not None:
            return stage.distiller.needs_teacher
        return any(d.active_in_main and d.needs_teacher for d in self.distillers)

    def compute_losses(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The loss components of one training batch and their weights, for the current stage."""
        stage = self._stage
        images = self._prepare_images(batch["image"])
        if stage.distiller is None or stage.distiller.stage_needs_student:
            student = self._forward(self.student, self._student_taps, images)
        else:
            student = {}
        teacher: dict[str, Tensor] = {}
        if self._teacher_needed(stage):
            teacher = self.teacher_forward(images)
        elif self._teacher_taps is not None:
            self._teacher_taps.features.clear()

        def features(distiller: Distiller) -> tuple[list[Tensor], list[Tensor]]:
            return (
                [student[t] for t in distiller.student_layers] if student else [],
                [teacher[t] for t in distiller.teacher_layers] if teacher else [],
            )

        losses: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if stage.distiller is not None:
            losses[stage.name] = stage.distiller.stage_loss(*features(stage.distiller), batch)
            weights[stage.name] = 1.0
            return losses, weights
        if self.task_loss_weight:
            losses["ce"] = F.cross_entropy(student[LOGITS].float(), batch["label"])
            weights["ce"] = self.task_loss_weight
        for distiller in self.distillers:
            if distiller.active_in_main and distiller.weight:
                losses[distiller.name] = distiller(*features(distiller), batch)
                weights[distiller.name] = distiller.weight
        return losses, weights

    def _logging_step(self, batch_idx: int) -> bool:
        """Whether to log this step's loss components: on the steps the loggers write
        (``Trainer(log_every_n_steps)``), and on the last step of an epoch and of the fit, so that
        ``trainer.callback_metrics`` holds the final values for callbacks that monitor them.

        Not at every step: each ``self.log`` call costs about 0.3 ms, and a value shown in the progress bar
        is read back to the host (a synchronisation on a GPU) at every step it is logged.
        """
        trainer = self.trainer
        if trainer.fast_dev_run or batch_idx + 1 == trainer.num_training_batches:
            return True
        if 0 < trainer.max_steps <= self.global_step + 1:
            return True
        return bool(getattr(trainer._logger_connector, "should_update_logs", True))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        batch = as_batch(batch)
        for distiller in self.distillers:
            distiller.set_epoch(self.current_epoch - self._stage.start_epoch)
        losses, weights = self.compute_losses(batch)
        loss = sum(weights[name] * value for name, value in losses.items())
        if self._idle_params and self.trainer.world_size > 1:
            # parameters outside this stage get a zero gradient, so DDP needs no find_unused_parameters
            loss = loss + sum(p.reshape(-1)[0] for p in self._idle_params) * 0.0
        if self.nan_policy == "skip":
            if not torch.isfinite(loss):  # skipping needs the answer now: one synchronisation per step
                bad = [name for name, value in losses.items() if not torch.isfinite(value)] or ["total"]
                self.skipped_batches += 1
                self.log("train/skipped", float(self.skipped_batches), on_step=True, on_epoch=False)
                log.warning("Skipping batch %d: non-finite loss from %s", batch_idx, bad)
                return None
        elif self.nan_policy == "raise":
            recorded = {**losses, "total": loss} if len(losses) > 1 else losses
            self._finite_check.record(self.global_step, self.current_epoch, self._stage.name, recorded)
        if self._logging_step(batch_idx):
            self._finite_check.check()  # the loggers synchronise here anyway
            batch_size = batch["label"].shape[0]
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
            for name, value in losses.items():
                self.log(f"train/{name}", value.detach(), prog_bar=len(losses) > 1, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, prefix: str, acc1: MulticlassAccuracy, acc5: MulticlassAccuracy) -> None:
        batch = as_batch(batch)
        images, labels = self._prepare_images(batch["image"]), batch["label"]
        logits = self(images)
        self.log(f"{prefix}/loss", F.cross_entropy(logits.float(), labels), batch_size=labels.shape[0])
        acc1(logits, labels)
        acc5(logits, labels)
        self.log(f"{prefix}/acc1", acc1, prog_bar=True)
        self.log(f"{prefix}/acc5", acc5)
        if prefix == "val" and not self._teacher_measured and not self.trainer.sanity_checking:
            teacher_logits = self.teacher_forward(images)[LOGITS]
            self.teacher_acc1(teacher_logits, labels)
            self.log("val/teacher_acc1", self.teacher_acc1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc1, self.val_acc5)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._teacher_measured = True

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc1, self.test_acc5)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints and export
    # ------------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        self._finite_check.check()

    def on_train_end(self) -> None:
        self._finite_check.check()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._finite_check.check()  # never write weights that a non-finite loss has already updated
        if not self.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
                del state[key]
        checkpoint["lightning_kd"] = {
            "stage": self._stage.name,
            "teacher_saved": self.save_teacher,
            "skipped_batches": self.skipped_batches,
            "rng": _rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.teacher is not None and not any(k.startswith(TEACHER_PREFIX) for k in state):
            # the teacher was left out of the checkpoint: keep the one rebuilt from its source
            state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
        self._stage = stage_at(self.stages, int(checkpoint.get("epoch", 0)))
        own = checkpoint.get("lightning_kd", {})
        self.skipped_batches = int(own.get("skipped_batches", 0))
        if "rng" in own:  # a resumed fit draws the same shuffles and augmentations as an uninterrupted one
            _set_rng_states(own["rng"])

    def export_student(self, path: str | os.PathLike) -> None:
        """Write the student alone as a plain state dict (load it with ``weights_only=True``)."""
        torch.save({k: v.detach().cpu() for k, v in self.student.state_dict().items()}, path)


def _rng_states() -> dict[str, Any]:
    """The CPU random states (torch, Python, NumPy) as tensors, so ``weights_only`` loading accepts them."""
    numpy_state = np.random.get_state()
    _, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": python_gauss,
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(int(v) for v in states["python"].tolist()), states["python_gauss"]))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))


def _num_outputs(logits: Tensor, who: str) -> int:
    if logits.dim() != 2:
        raise ValueError(f"the {who} must return (batch, classes) logits, returned shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def _resolve_layers(distiller: Distiller, student: nn.Module, teacher: nn.Module | None) -> None:
    """Expand tap groups on each side and check that paired methods read as many layers on both."""
    distiller.student_layers = expand_taps(student, distiller.student_layers)
    if not distiller.student_layers:
        raise ValueError(f"{distiller.name} reads no student layer: give student_layers at least one tap name")
    if teacher is None:
        return
    distiller.teacher_layers = expand_taps(teacher, distiller.teacher_layers)
    if distiller.paired_layers and len(distiller.student_layers) != len(distiller.teacher_layers):
        raise ValueError(
            f"{distiller.name} compares layers pairwise but reads {len(distiller.student_layers)} student layers "
            f"{distiller.student_layers} and {len(distiller.teacher_layers)} teacher layers "
            f"{distiller.teacher_layers}: pass student_layers and teacher_layers of the same length"
        )


def _make_names_unique(distillers: list[Distiller]) -> None:
    seen: dict[str, int] = {}
    for distiller in distillers:
        count = seen.get(distiller.name, 0)
        seen[distiller.name] = count + 1
        if count:
            distiller.name = f"{distiller.name}_{count + 1}"
    reserved = {"ce", "loss", MAIN}
    clash = [d.name for d in distillers if d.name in reserved]
    if clash:
        raise ValueError(f"distiller names {clash} clash with the module's own log names {sorted(reserved)}")
