"""RKD: Park et al. 2019, "Relational Knowledge Distillation"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.functional import rkd_loss


class RKD(RelationalDistiller):
    """Match the distances and angles between the samples of a batch (:func:`~lightning_kd.functional.rkd_loss`).

    Relational: the loss compares the samples of the per-device batch with each other, or of the global batch
    with ``batch_scope="global"`` (see :class:`~lightning_kd.distillers.base.RelationalDistiller`).
    Reference weight (CIFAR-100): ``weight=1`` with ``task_loss_weight=1``, distance 25, angle 50.

    Args:
        distance_weight: factor of the distance term.
        angle_weight: factor of the angle term.
        weight, student_layers, teacher_layers, name, batch_scope: see :class:`RelationalDistiller` (layers
            default to the penultimate embedding on both sides); several layer pairs are summed.
    """

    default_student_layers = ("embedding",)

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, weight: float = 1.0, **kwargs
    ) -> None:
        super().__init__(weight=weight, **kwargs)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        pairs = self.gathered_pairs(student_features, teacher_features)
        return sum(rkd_loss(s, t, self.distance_weight, self.angle_weight) for s, t in pairs)
