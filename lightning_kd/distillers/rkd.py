"""RKD: Park et al. 2019, "Relational Knowledge Distillation"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import rkd_loss


class RKD(Distiller):
    """Match the distances and angles between the samples of a batch (:func:`~lightning_kd.functional.rkd_loss`).

    Relational: the loss compares samples of the (per-device) batch with each other.
    Reference weight (CIFAR-100): ``weight=1`` with ``task_loss_weight=1``, distance 25, angle 50.

    Args:
        distance_weight: factor of the distance term.
        angle_weight: factor of the angle term.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the
            penultimate embedding on both sides).
    """

    default_student_layers = ("embedding",)

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, weight: float = 1.0, **kwargs
    ) -> None:
        super().__init__(weight=weight, **kwargs)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return rkd_loss(student_features[0], teacher_features[0], self.distance_weight, self.angle_weight)
