"""PKT: Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import pkt_loss


class PKT(Distiller):
    """Match the batch's cosine-similarity distributions (:func:`~lightning_kd.functional.pkt_loss`).

    Relational: the loss compares samples of the (per-device) batch with each other.
    Reference weight (CIFAR-100): ``weight=30000`` with ``task_loss_weight=1``.

    Args:
        eps: smoothing inside the logarithm.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the
            penultimate embedding on both sides).
    """

    default_student_layers = ("embedding",)

    def __init__(self, eps: float = 1e-7, weight: float = 30000.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        self.eps = float(eps)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return pkt_loss(student_features[0], teacher_features[0], self.eps)
