"""The :class:`Distiller` base class: one distillation method, small and pluggable.

A distiller

1. names the layers it reads on each side (``student_layers`` / ``teacher_layers``: tap names, see
   :mod:`lightning_kd.taps`);
2. builds its learnable parts in :meth:`Distiller.build`, once the :class:`~lightning_kd.DistillationModule`
   has run a probe forward and knows the feature shapes (so the parts exist before the optimizer is made,
   and are trained, checkpointed and wrapped by DDP like the student);
3. turns the two sides' features (and the batch, for methods that need labels or indices) into one scalar
   loss in :meth:`Distiller.forward`, usually by calling a pure function of :mod:`lightning_kd.functional`.

A distiller never calls a network, never touches the optimizer and never reads the trainer.

Methods with an initialisation stage (AB, FT, FSP) set ``stage_epochs > 0`` and override
:meth:`Distiller.stage_loss` (and, if needed, :meth:`Distiller.stage_parameters`); see
:mod:`lightning_kd.stages`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_kd.batch import VIEW_SEPARATOR, split_view
from lightning_kd.distributed import gather_with_grad
from lightning_kd.hparams import RemembersInit
from lightning_kd.taps import TapError, expand_taps, resolve_tap

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class Distiller(RemembersInit, nn.Module):
    """Base class of every distillation method.

    A distiller remembers its constructor arguments (``init_config()``), so a module holding it can be rebuilt
    from its saved hyperparameters.

    Args:
        weight: the factor of this loss in the total objective
            ``task_loss_weight * CE + sum(weight_i * L_i)``: finite and >= 0 (0 turns the method off).
        student_layers: tap names on the student (groups such as ``"stages"`` allowed, see
            :func:`lightning_kd.taps.expand_taps`); ``None`` takes the method's default.
        teacher_layers: tap names on the teacher; ``None`` takes the method's default (or the student's).
        name: the name used in logs (``train/<name>``); defaults to the class name in lower case.
        stage_epochs: length of this method's own initialisation stage, run before the main stage;
            0 means none. Only methods that define :meth:`stage_loss` accept a positive value.
        stage_lr: learning rate of the initialisation stage (default: the module's ``stage_lr``, else the
            optimizer's own). The CRD benchmark trains FT's paraphraser at 0.01 for ResNet and WRN students.
    """

    #: default tap names, used when ``student_layers`` / ``teacher_layers`` are not given
    default_student_layers: tuple[str, ...] = ()
    default_teacher_layers: tuple[str, ...] | None = None
    #: whether the loss takes part in the main stage (AB and FSP only train in their initialisation stage)
    active_in_main: bool = True
    #: whether the method reads teacher features at all
    needs_teacher: bool = True
    #: whether the initialisation stage reads the student at all (FT's paraphraser stage does not: the module
    #: then skips the student forward, so not even its BatchNorm statistics move)
    stage_needs_student: bool = True
    #: whether student layer i is compared with teacher layer i (then both lists must have the same length)
    paired_layers: bool = True
    #: weights of named terms when :meth:`forward` returns a dictionary (terms not listed use ``weight``)
    component_weights: dict[str, float] = {}
    #: "train" puts the teacher's BatchNorm layers in train mode during training (OFD's reference does; it
    #: changes the teacher's running statistics); "eval" (every other method) keeps the whole teacher in eval mode
    teacher_bn_mode: str = "eval"

    def __init__(
        self,
        weight: float = 1.0,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
        name: str | None = None,
        stage_epochs: int = 0,
        stage_lr: float | None = None,
    ) -> None:
        super().__init__()
        name = name or type(self).__name__.lower()
        self.weight = check_weight(weight, f"{name}: weight")
        self.student_layers = list(student_layers if student_layers is not None else self.default_student_layers)
        teacher_default = self.default_teacher_layers if self.default_teacher_layers is not None else self.student_layers
        self.teacher_layers = list(teacher_layers if teacher_layers is not None else teacher_default)
        self.name = name
        if stage_epochs < 0:
            raise ValueError(f"{self.name}: stage_epochs must be >= 0, got {stage_epochs}")
        if stage_epochs and type(self).stage_loss is Distiller.stage_loss:
            raise ValueError(f"{type(self).__name__} has no initialisation stage; got stage_epochs={stage_epochs}")
        self.stage_epochs = int(stage_epochs)
        if stage_lr is not None and not stage_lr > 0:
            raise ValueError(f"{self.name}: stage_lr must be positive (or None for the optimizer's), got {stage_lr}")
        self.stage_lr = stage_lr
        #: 0-based epoch counted from the start of the current stage; set by the module before every step
        #: (methods with a warm-up read it, e.g. DKD's ``min((epoch + 1) / W, 1)``)
        self.epoch = 0

    # --- set-up -------------------------------------------------------------------------------------------
    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once by the module before :meth:`build`, with both networks (the teacher's weights already
        loaded). For methods that read network *parameters* rather than features (OFD's margins come from the
        teacher's BatchNorm); a distiller must not keep references to the networks or call them. Default: nothing.
        """

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        """Create the learnable parts from the probe's features (one tensor per layer, batch of 2).

        Called once by the module before any optimizer exists. Raise a clear error here for shapes the
        method cannot handle. The default builds nothing.
        """

    # --- the loss -----------------------------------------------------------------------------------------
    def forward(
        self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch
    ) -> Tensor | dict[str, Tensor]:
        """Return this method's (unweighted) loss for one batch.

        A method with several terms may return a dictionary of named scalar terms instead; each is logged as
        ``train/<name>/<key>`` and weighted by ``component_weights.get(key, self.weight)``.
        """
        raise NotImplementedError

    # --- stages -------------------------------------------------------------------------------------------
    def stage_loss(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        """The loss of this method's own initialisation stage (only methods with a stage define it)."""
        raise NotImplementedError(f"{type(self).__name__} has no initialisation stage")

    def stage_parameters(self) -> Iterator[nn.Parameter]:
        """This distiller's own parameters trained in its initialisation stage (default: all of them).

        When ``stage_needs_student`` is True the stage also trains the student's feature path (its
        ``feature_modules``, as the CRD benchmark's ``get_feat_modules()``; see
        :meth:`lightning_kd.core.Distillation.stage_student_modules`).
        """
        yield from (p for p in self.parameters() if p.requires_grad)

    def stage_student_parameters(self, student: nn.Module) -> list[nn.Parameter] | None:
        """The student parameters this method's initialisation stage trains, when it is not the student's
        feature path (FitNet's hint stage trains the layers up to the hint); ``None`` (default): the feature path."""
        return None

    def main_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of this distiller trained in the main stage (default: all that require grad)."""
        if self.active_in_main:
            yield from (p for p in self.parameters() if p.requires_grad)

    def on_stage(self, stage: str) -> None:
        """Called by the module whenever a stage begins, with its name (``"main"`` or ``"<name>_init"``)."""

    def setup_data(self, datamodule: Any) -> None:
        """Called by the module's ``setup`` with the Trainer's data module (or None): check what the method needs
        from the data and size what depends on it (CRD's memory banks). Default: nothing."""

    # --- state a skipped batch must leave untouched -------------------------------------------------------
    def snapshot_state(self) -> Any:
        """Before a batch that may be skipped: whatever :meth:`restore_state` needs to undo the changes
        :meth:`forward` makes besides the parameters. Default: a copy of every buffer."""
        return [b.detach().clone() for b in self.buffers()]

    def restore_state(self, snapshot: Any) -> None:
        """Undo the state changes of the last :meth:`forward` (the batch was skipped)."""
        for buffer, value in zip(self.buffers(), snapshot):
            buffer.data.copy_(value)

    def set_epoch(self, epoch: int) -> None:
        """Called by the module before each training step with the 0-based epoch within the current stage."""
        self.epoch = int(epoch)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, student_layers={self.student_layers}, teacher_layers={self.teacher_layers}"
            + (f", stage_epochs={self.stage_epochs}" if self.stage_epochs else "")
        )


class RelationalDistiller(Distiller):
    """A method whose loss compares the samples of a batch with each other (RKD, PKT, SP, CC).

    Under data parallelism "the batch" is a choice:

    - ``batch_scope="device"`` (default, what other libraries do): each device's slice of the batch;
    - ``batch_scope="global"``: the features of every rank are gathered with gradients first
      (:func:`lightning_kd.distributed.gather_with_grad`), so N devices with batch B each compute the loss
      and gradients of one device with batch N x B.

    Subclasses call :meth:`gather` on their features before the loss. On one process both scopes agree.
    """

    def __init__(self, batch_scope: Literal["device", "global"] = "device", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if batch_scope not in ("device", "global"):
            raise ValueError(f"{self.name}: batch_scope must be 'device' or 'global', got {batch_scope!r}")
        self.batch_scope = batch_scope
        #: how many times the loss got a batch of a single sample (no relation to compare)
        self.batch_of_one = 0

    def gather(self, features: list[Tensor]) -> list[Tensor]:
        """The features of the batch the loss should see (this device's, or all ranks').

        A batch of one sample has no relations: the loss is then a constant with no gradient. That is counted in
        :attr:`batch_of_one` (logged as ``train/<name>/batch_of_one``) and warned about once.
        """
        if self.batch_scope == "global":
            features = [gather_with_grad(f) for f in features]
        if features and features[0].shape[0] < 2:
            if not self.batch_of_one:
                log.warning(
                    "%s compares the samples of a batch, but got a batch of one: its loss carries no gradient here "
                    "(training loaders drop the last partial batch by default; with batch_scope='global' the batch "
                    "is every rank's)", self.name,
                )
            self.batch_of_one += 1
        return features

    def metrics(self) -> dict[str, Tensor]:
        """``batch_of_one``: how many times the relational loss saw a single sample (only once it has)."""
        return {"batch_of_one": torch.tensor(float(self.batch_of_one))} if self.batch_of_one else {}

    def gathered_pairs(
        self, student_features: list[Tensor], teacher_features: list[Tensor]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The (student, teacher) layer pairs, each gathered as :meth:`gather` does (in one call: a batch of one
        is counted once)."""
        gathered = self.gather([*student_features, *teacher_features])
        return zip(gathered[: len(student_features)], gathered[len(student_features) :])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_scope={self.batch_scope!r}"


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classifier of a network: ``model.feature_paths["classifier"]``, else ``fc`` or ``classifier``."""
    paths = getattr(model, "feature_paths", {}) or {}
    modules = dict(model.named_modules())
    for path in (paths.get("classifier"), "fc", "classifier", "linear", "head"):
        if path and path in modules:
            return modules[path]
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__}: give the model a feature_paths['classifier'] "
        "entry naming its final layer"
    )


def check_weight(value: float, name: str) -> float:
    """A loss weight: finite and >= 0 (0 turns the term off); raises naming ``name`` otherwise."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns the term off), got {value}")
    return value


def resolve_layers(distiller: Distiller, student: nn.Module, teacher: nn.Module | None) -> None:
    """Expand tap groups on each side (keeping any ``@view``) and check that paired methods read as many layers
    on both."""

    def expand(network: nn.Module, taps: list[str]) -> list[str]:
        out = []
        for tap in taps:
            base, view = split_view(tap)
            suffix = VIEW_SEPARATOR + view if view else ""
            out += [name + suffix for name in expand_taps(network, [base])]
        return out

    def resolved(network: nn.Module, taps: list[str], role: str) -> list[str]:
        """The taps with groups expanded, each checked to exist (the error says on which network)."""
        try:
            out = expand(network, taps)
            for tap in out:
                resolve_tap(network, split_view(tap)[0])
        except TapError as error:
            error.role = role
            raise
        return out

    distiller.student_layers = resolved(student, distiller.student_layers, "student")
    if not distiller.student_layers:
        raise ValueError(f"{distiller.name} reads no student layer: give student_layers at least one tap name")
    if teacher is None:
        return
    distiller.teacher_layers = resolved(teacher, distiller.teacher_layers, "teacher")
    if distiller.paired_layers and len(distiller.student_layers) != len(distiller.teacher_layers):
        raise ValueError(
            f"{distiller.name} compares layers pairwise but reads {len(distiller.student_layers)} student layers "
            f"{distiller.student_layers} and {len(distiller.teacher_layers)} teacher layers "
            f"{distiller.teacher_layers}: pass student_layers and teacher_layers of the same length"
        )


RESERVED_NAMES = {"ce", "loss", "total", "main"}


def make_names_unique(distillers: list[Distiller]) -> None:
    """Give repeated names a suffix (``kd``, ``kd_2``) and refuse names the module logs itself."""
    seen: dict[str, int] = {}
    for distiller in distillers:
        count = seen.get(distiller.name, 0)
        seen[distiller.name] = count + 1
        if count:
            distiller.name = f"{distiller.name}_{count + 1}"
    clash = [d.name for d in distillers if d.name in RESERVED_NAMES]
    if clash:
        raise ValueError(f"distiller names {clash} clash with the module's own log names {sorted(RESERVED_NAMES)}")
