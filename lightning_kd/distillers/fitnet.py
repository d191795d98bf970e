"""FitNet: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from lightning_kd.connectors import HintRegressor
from lightning_kd.distillers.base import Batch, Distiller, classifier_of
from lightning_kd.functional import hint_loss
from lightning_kd.taps import resolve_tap


class FitNet(Distiller):
    """Hint learning on one intermediate map: ``mean((r(f_s) - f_t)^2)``.

    ``r`` is a learnable :class:`~lightning_kd.connectors.HintRegressor` (conv + BN + ReLU, the CRD
    benchmark's ``ConvReg``) built from the probe's shapes: a 3x3 stride-2 conv for a student map twice the
    teacher's size, a 4x4 stride-2 transposed conv for half, a valid conv for any other larger or equal size.
    The reference (CRD benchmark, CIFAR-100) hints the second stage output of both networks and trains the
    regressor together with the student and the cross-entropy in one stage, ``weight=100``.

    Setting ``stage_epochs > 0`` adds the paper's hint stage before the main stage: the hint loss alone trains
    the regressor and the student up to the hint layer (the modules registered before it and the hint
    module itself; the bundled models register their modules in forward order).

    Args:
        weight: factor of the hint loss in the main objective (reference: 100).
        stage_epochs: length of the optional hint stage (reference: 0).
        student_layers, teacher_layers, name: see :class:`Distiller`; one layer on each side (default
            ``"stage2"``).
    """

    default_student_layers = ("stage2",)

    def __init__(self, weight: float = 100.0, stage_epochs: int = 0, **kwargs) -> None:
        super().__init__(weight=weight, stage_epochs=stage_epochs, **kwargs)
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"FitNet hints one layer on each side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}: use one FitNet distiller per hint"
            )
        self.regressor: nn.Module | None = None

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        student, teacher = student_features[0], teacher_features[0]
        try:
            self.regressor = HintRegressor(tuple(student.shape), tuple(teacher.shape))
        except ValueError as error:
            raise ValueError(
                f"FitNet (student layer {self.student_layers[0]!r}, teacher layer {self.teacher_layers[0]!r}): "
                f"{error}"
            ) from error

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        if self.regressor is None:
            raise RuntimeError("FitNet.build() has not run: the DistillationModule builds it from a probe forward")
        return hint_loss(self.regressor(student_features[0]), teacher_features[0])

    def stage_loss(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return self.forward(student_features, teacher_features, batch)

    def stage_student_parameters(self, student: nn.Module) -> list[nn.Parameter] | None:
        """The student's modules up to (and including) the hint layer, never the classifier (FitNet's hint
        stage); the regressor is this distiller's own (:meth:`stage_parameters`)."""
        return list(self._up_to_hint(student))

    def _up_to_hint(self, student: nn.Module) -> Iterator[nn.Parameter]:
        path, capture_input = resolve_tap(student, self.student_layers[0])
        skip = {id(p) for p in classifier_of(student).parameters()}
        if not path:  # the logits: every layer but the classifier feeds them
            yield from (p for p in student.parameters() if id(p) not in skip)
            return
        modules = list(student.named_modules())
        position = [name for name, _ in modules].index(path)
        chosen = modules[:position]
        if not capture_input:
            chosen += [(name, m) for name, m in modules[position:] if name == path or name.startswith(path + ".")]
        for _, module in chosen:
            yield from (p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in skip)
