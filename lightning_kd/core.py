"""The distillation core: a plain ``nn.Module`` that a PyTorch loop can train without Lightning.

:class:`Distillation` holds a trainable student, a frozen teacher and a list of distillers. It builds the
distillers' learnable parts from a probe forward, runs both networks with feature taps, and turns a batch into
the weighted loss terms of the current stage::

    student features  <- student(images)                 (taps by module path)
    teacher features  <- teacher(images)                 (no_grad, eval mode, same autocast)
    loss = task_loss_weight * CE(student logits, labels) + sum_i weight_i * distiller_i(features)

A plain loop (the :class:`~lightning_kd.DistillationModule` does the same under a Lightning ``Trainer``)::

    core = Distillation("resnet8", "resnet56", [KD()], teacher_checkpoint="teacher.ckpt", num_classes=10,
                        input_size=(3, 16, 16))
    optimizer = torch.optim.SGD(core.param_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    core.train()
    for epoch in range(10):
        core.set_epoch(epoch, optimizer)          # stage and warm-ups; a new stage gets a fresh optimizer state
        for batch in loader:
            loss = core.compute_losses(batch).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

Images of a second view (MLKD's strong augmentation) come in ``batch["image_<view>"]``; a distiller asks for a
tap on that view as ``"<tap>@<view>"`` (``"logits@strong"``), and each network runs once per view asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.batch import IMAGE, VIEW_SEPARATOR, Batch, as_batch, split_view
from lightning_kd.cache.serve import serve_teacher_cache
from lightning_kd.checkpoints import fingerprint, load_into
from lightning_kd.core_parts import _eval_mode, _num_outputs, _Revert
from lightning_kd.distillers.base import (
    Distiller,
    check_weight,
    classifier_of,
    make_names_unique,
    resolve_layers,
)
from lightning_kd.hparams import instantiate
from lightning_kd.loss_terms import LossTerms
from lightning_kd.models import build_network, feature_module_paths
from lightning_kd.stages import Stage, active_stage, enter_stage, plan_stages, stage_at
from lightning_kd.taps import LOGITS, FeatureTaps

log = logging.getLogger(__name__)


class Distillation(nn.Module):
    """Student, frozen teacher, taps and distillers: the distillation objective without Lightning.

    Args:
        student: the network to train: a module, or a bundled model's name
            (:func:`lightning_kd.models.create_model`).
        teacher: the frozen network to learn from (module or name), or ``None`` to train the student alone.
        distillers: the methods (:class:`~lightning_kd.distillers.Distiller` objects, or ``{"class_path": ...,
            "init_args": {...}}`` dictionaries).
        task_loss_weight: ``gamma``, the weight of the cross-entropy with the labels (finite, >= 0).
        teacher_checkpoint: weights for the teacher: a plain state dict file, or a Lightning checkpoint of this
            library in which the teacher was trained as a student. Read with ``weights_only=True``.
        student_checkpoint: initial weights for the student (same formats), e.g. an exported student to evaluate.
        num_classes: classifier size of networks built by name.
        input_size: ``(C, H, W)`` of one input, for the probe forward that sizes the distillers' parts.
        teacher_precision: ``"same"`` runs the teacher in the student's precision; ``"bf16"``/``"fp16"`` under
            its own autocast.
        student_feature_paths / teacher_feature_paths: symbolic tap names for any network, e.g.
            ``{"stage1": "layer1", ..., "embedding": "fc:input", "classifier": "fc"}`` for a torchvision ResNet;
            merged over the bundled models' own ``feature_paths``.
        stage_lr: learning rate of the initialisation stages when a distiller gives none (default: the
            optimizer's own).
        teacher_cache: a teacher-output cache (``lightning-kd cache``) serving the teacher's logits on the default
            view; ``cache_verify_fraction`` of its lookups are checked live (:mod:`lightning_kd.cache.serve`).
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | None = None,
        distillers: Sequence[Distiller | Mapping[str, Any]] = (),
        task_loss_weight: float = 1.0,
        teacher_checkpoint: str | os.PathLike | None = None,
        student_checkpoint: str | os.PathLike | None = None,
        num_classes: int = 100,
        input_size: Sequence[int] = (3, 32, 32),
        teacher_precision: Literal["same", "bf16", "fp16"] = "same",
        student_feature_paths: Mapping[str, str] | None = None,
        teacher_feature_paths: Mapping[str, str] | None = None,
        stage_lr: float | None = None,
        teacher_cache: str | os.PathLike | None = None,
        cache_verify_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.student = build_network(student, num_classes, student_feature_paths, "student")
        self.teacher = build_network(teacher, num_classes, teacher_feature_paths, "teacher") if teacher is not None else None
        distillers = [instantiate(d, Distiller, "distiller") for d in distillers]
        if distillers and self.teacher is None and any(d.needs_teacher for d in distillers):
            raise ValueError(
                f"distillers {[d.name for d in distillers]} need a teacher, but teacher is None: pass a teacher "
                "network (and usually teacher_checkpoint)"
            )
        if teacher_checkpoint is not None and self.teacher is None:
            raise ValueError("teacher_checkpoint was given but teacher is None: name the teacher network too")
        if teacher_precision not in ("same", "bf16", "fp16"):
            raise ValueError(f"teacher_precision must be 'same', 'bf16' or 'fp16', got {teacher_precision!r}")
        if stage_lr is not None and not stage_lr > 0:
            raise ValueError(f"stage_lr must be positive (or None for the optimizer's), got {stage_lr}")
        make_names_unique(distillers)
        self.distillers = nn.ModuleList(distillers)
        self.task_loss_weight = check_weight(task_loss_weight, "task_loss_weight")
        self.input_size = tuple(int(v) for v in input_size)
        self.teacher_precision = teacher_precision
        self.stage_lr = stage_lr

        if student_checkpoint is not None:
            load_into(self.student, student_checkpoint, what="student")
        if self.teacher is not None:
            if teacher_checkpoint is not None:
                load_into(self.teacher, teacher_checkpoint, what="teacher")
            elif distillers:
                log.warning("The teacher has no teacher_checkpoint: distilling from random weights.")
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.teacher_bn_train = any(getattr(d, "teacher_bn_mode", "eval") == "train" for d in distillers)

        for distiller in distillers:
            resolve_layers(distiller, self.student, self.teacher)
        other_views = {split_view(t)[1] for d in distillers for t in d.student_layers + d.teacher_layers}
        self.views = [IMAGE] + sorted(v for v in other_views if v and v != IMAGE)
        self.student_taps = FeatureTaps(self.student, [split_view(t)[0] for d in distillers for t in d.student_layers])
        self.teacher_taps = (
            FeatureTaps(self.teacher, [split_view(t)[0] for d in distillers for t in d.teacher_layers])
            if self.teacher is not None
            else None
        )
        for distiller in distillers:
            distiller.attach(self.student, self.teacher)
        self.num_classes = self._probe_and_build()
        self.stages = plan_stages(distillers)
        self.stage = self.stages[0]
        for distiller in distillers:
            distiller.on_stage(self.stage.name)
        self.teacher_cache = serve_teacher_cache(self, teacher_cache, cache_verify_fraction) if teacher_cache else None

    # ------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------
    def _probe_and_build(self) -> int:
        """Run both networks once on zeros (eval mode, no grad) and let each distiller build its parts."""
        probe = torch.zeros(2, *self.input_size)
        batch = {IMAGE: probe, **{f"{IMAGE}_{v}": probe for v in self.views if v != IMAGE}}
        with torch.no_grad(), _eval_mode(self.student, self.teacher):
            student = self._run(self.student, self.student_taps, batch, self.views)
            teacher = self._run(self.teacher, self.teacher_taps, batch, self.views) if self.teacher is not None else {}
        classes = _num_outputs(student[LOGITS], "student")
        if self.teacher is not None and (teacher_classes := _num_outputs(teacher[LOGITS], "teacher")) != classes:
            raise ValueError(
                f"the teacher predicts {teacher_classes} classes but the student {classes}: both must be built for "
                "the same classes"
            )
        for distiller in self.distillers:
            distiller.build(
                [student[t] for t in distiller.student_layers],
                [teacher[t] for t in distiller.teacher_layers] if self.teacher is not None else [],
            )
        return classes

    def apply_speed_options(self, channels_last: bool = False, compile: bool = False) -> None:
        """Keep both networks in the ``channels_last`` memory format, and/or ``torch.compile`` them in place
        (taps keep working; state dict keys do not change)."""
        networks = [n for n in (self.student, self.teacher) if n is not None]
        for network in networks:
            if channels_last:
                network.to(memory_format=torch.channels_last)
            if compile:
                network.compile()
        self.channels_last = channels_last

    # ------------------------------------------------------------------------------------------------------
    # modes: the teacher stays frozen and in eval mode; an initialisation stage trains the student's feature path
    # ------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            if mode and self.teacher_bn_train:
                for module in self.teacher.modules():
                    if isinstance(module, nn.modules.batchnorm._NormBase):
                        module.train()
        stage = getattr(self, "stage", None)
        if mode and stage is not None and not stage.is_main:
            self.student.eval()
            if stage.distiller.stage_needs_student:
                for module in self.stage_student_modules():
                    module.train()
        return self

    def stage_student_modules(self) -> list[nn.Module]:
        """The student's modules trained in an initialisation stage: its feature path (the bundled models'
        ``feature_modules``, as the CRD benchmark's ``get_feat_modules()``), else every child but the classifier."""
        modules = dict(self.student.named_modules())
        paths = feature_module_paths(self.student)
        if paths is not None:
            return [modules[p] for p in paths]
        classifier = classifier_of(self.student)
        return [m for m in self.student.children() if m is not classifier]

    # ------------------------------------------------------------------------------------------------------
    # stages and optimizer parameter groups
    # ------------------------------------------------------------------------------------------------------
    def stage_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (unique, in a fixed order)."""
        if stage.distiller is not None:
            params = list(stage.distiller.stage_parameters())
            if stage.distiller.stage_needs_student:
                own = stage.distiller.stage_student_parameters(self.student)
                params += own if own is not None else [p for m in self.stage_student_modules() for p in m.parameters()]
        else:
            params = list(self.student.parameters())
            for distiller in self.distillers:
                params += list(distiller.main_parameters())
        return list({id(p): p for p in params if p.requires_grad}.values())

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per set of stages a parameter trains in (``group["stages"]``).

        A fit with one stage gets one group. With initialisation stages, :meth:`set_epoch` (given the
        optimizer) switches between them: a new stage starts with a fresh optimizer state, its groups at the
        stage's learning rate and every other group at 0.
        """
        membership: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for stage in self.stages:
            for p in self.stage_parameters(stage):
                membership.setdefault(id(p), []).append(stage.name)
                params[id(p)] = p
        groups: dict[tuple[str, ...], list[nn.Parameter]] = {}
        for pid in sorted(params, key=list(params).index):
            groups.setdefault(tuple(membership[pid]), []).append(params[pid])
        return [{"params": ps, "stages": stages} for stages, ps in groups.items()]

    def stage_learning_rate(self, stage: Stage) -> float | None:
        """The learning rate an initialisation stage asks for (its distiller's, else ``stage_lr``); ``None`` for
        the main stage or when neither is set (the optimizer's own)."""
        if stage.distiller is None:
            return None
        return stage.distiller.stage_lr if stage.distiller.stage_lr is not None else self.stage_lr

    def set_epoch(self, epoch: int, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> bool:
        """Tell the core which (0-based) epoch the fit is in: selects the stage, sets the distillers' epoch within
        it and, on a change of stage, re-applies the train/eval modes. Given the optimizer (made from
        :meth:`param_groups`), starts the stage in it unless it is there already
        (:func:`~lightning_kd.stages.enter_stage`: a new stage gets a fresh optimizer state); ``scheduler`` is the
        main stage's. Returns whether the stage changed."""
        stage = stage_at(self.stages, epoch)
        changed = stage is not self.stage
        if changed:
            log.info("Epoch %d: stage %r begins.", epoch, stage.name)
            self.stage = stage
            for distiller in self.distillers:
                distiller.on_stage(stage.name)
            self.train(self.training)
        if optimizer is not None and active_stage(optimizer) != stage.name:
            schedule = scheduler if stage.is_main else None  # initialisation stages run at a constant rate
            enter_stage(optimizer, stage.name, self.stage_learning_rate(stage), schedule)
        for distiller in self.distillers:
            distiller.set_epoch(epoch - stage.start_epoch)
        return changed

    def idle_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the current stage does not train (DDP needs a zero gradient for them)."""
        active = {id(p) for p in self.stage_parameters(self.stage)}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in active]

    # ------------------------------------------------------------------------------------------------------
    # forward passes
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _run(network: nn.Module, taps: FeatureTaps | None, batch: Batch, views: Sequence[str]) -> dict[str, Tensor]:
        """The network's logits and tapped features on each view; keys of a view other than the default carry
        ``@<view>``."""
        features: dict[str, Tensor] = {}
        for view in views:
            key = IMAGE if view == IMAGE else f"{IMAGE}_{view}"
            if key not in batch:
                raise KeyError(
                    f"a distiller reads the view {view!r}, but the batch has no {key!r} (keys {sorted(batch)}): "
                    f"ask the data module for it (e.g. data.init_args.strong_view=true)"
                )
            logits = network(batch[key])
            out = taps.pop() if taps is not None else {}
            out[LOGITS] = logits
            suffix = "" if view == IMAGE else VIEW_SEPARATOR + view
            features.update({name + suffix: value for name, value in out.items()})
        return features

    def _prepare(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if getattr(self, "channels_last", False) else images

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        """The teacher's logits and tapped features on ``images``: no grad, eval mode, in ``teacher_precision``."""
        return self.teacher_features({IMAGE: images}, [IMAGE])

    def teacher_features(self, batch: Batch, views: Sequence[str]) -> dict[str, Tensor]:
        """The teacher's outputs (``"logits"``, ``"tap@view"``) for the image ``views`` of a prepared batch."""
        with torch.no_grad():
            if self.teacher_precision == "same":
                return self._run(self.teacher, self.teacher_taps, batch, views)
            dtype = torch.bfloat16 if self.teacher_precision == "bf16" else torch.float16
            device = batch[IMAGE].device.type
            with torch.autocast(device, dtype=dtype):
                features = self._run(self.teacher, self.teacher_taps, batch, views)
            # the distillers' teacher-side parts run in the student's precision
            return {name: value.float() for name, value in features.items()}

    def forward(self, images: Tensor) -> Tensor:
        """The student's logits (what an exported student computes)."""
        logits = self.student(self._prepare(images))
        self.student_taps.features.clear()
        return logits

    def teacher_needed(self, stage: Stage | None = None) -> bool:
        """Whether ``stage`` (default: the current one) reads the teacher at all."""
        stage = stage or self.stage
        if self.teacher is None:
            return False
        if stage.distiller is not None:
            return stage.distiller.needs_teacher
        return any(d.active_in_main and d.needs_teacher and d.weight for d in self.distillers)

    def compute_losses(self, batch: Any) -> LossTerms:
        """The loss terms of one training batch in the current stage and their weights.

        Main stage: ``ce`` (weight ``task_loss_weight``) and one term per active distiller (its ``weight``; a
        distiller returning named terms gives ``<name>/<term>``). Initialisation stage: the stage's own loss,
        weight 1.
        """
        batch = as_batch(batch)
        stage = self.stage
        views = self.views
        prepared = {k: self._prepare(v) if k.startswith(IMAGE) and isinstance(v, Tensor) else v for k, v in batch.items()}
        needs_student = stage.distiller is None or stage.distiller.stage_needs_student
        student = self._run(self.student, self.student_taps, prepared, views) if needs_student else {}
        if self.teacher_needed(stage):
            cache = self.teacher_cache  # looks up the default view's logits, runs the teacher on the other views
            teacher = cache.features(self, prepared, views) if cache else self.teacher_features(prepared, views)
        else:
            teacher = {}
            if self.teacher_taps is not None:
                self.teacher_taps.features.clear()

        def features(distiller: Distiller) -> tuple[list[Tensor], list[Tensor]]:
            return (
                [student[t] for t in distiller.student_layers] if student else [],
                [teacher[t] for t in distiller.teacher_layers] if teacher else [],
            )

        terms = LossTerms()
        if stage.distiller is not None:
            terms.add(stage.name, stage.distiller.stage_loss(*features(stage.distiller), batch), 1.0)
            return terms
        if self.task_loss_weight:
            terms.add("ce", F.cross_entropy(student[LOGITS].float(), batch["label"]), self.task_loss_weight)
        for distiller in self.distillers:
            if not (distiller.active_in_main and distiller.weight):
                continue
            value = distiller(*features(distiller), batch)
            if isinstance(value, Mapping):
                for key, term in value.items():
                    terms.add(f"{distiller.name}/{key}", term, distiller.component_weights.get(key, distiller.weight))
            else:
                terms.add(distiller.name, value, distiller.weight)
        return terms

    # ------------------------------------------------------------------------------------------------------
    # state that a skipped batch must leave untouched
    # ------------------------------------------------------------------------------------------------------
    @contextmanager
    def revertible(self) -> Iterator[_Revert]:
        """Everything a forward changes besides the parameters can be undone: BatchNorm statistics (the
        student's, and the teacher's when a distiller puts its BatchNorm in train mode) and the distillers' own
        state (e.g. CRD's memory banks). ``with core.revertible() as step: ...; step.revert()``."""
        networks = [self.student] + ([self.teacher] if self.teacher is not None and self.teacher_bn_train else [])
        buffers = [b for n in networks for b in n.buffers()]
        saved = [b.detach().clone() for b in buffers]
        states = [d.snapshot_state() for d in self.distillers]
        step = _Revert(buffers, saved, list(self.distillers), states)
        yield step

    # ------------------------------------------------------------------------------------------------------
    # identity and export
    # ------------------------------------------------------------------------------------------------------
    def teacher_fingerprint(self) -> str | None:
        """sha256 of the teacher's weights (names, shapes, dtypes, values): identifies the teacher a fit used."""
        return fingerprint(self.teacher) if self.teacher is not None else None

    def export_student(self, path: str | os.PathLike) -> None:
        """Write the student alone as a plain state dict (load it with ``weights_only=True``)."""
        torch.save({k: v.detach().cpu() for k, v in self.student.state_dict().items()}, path)
