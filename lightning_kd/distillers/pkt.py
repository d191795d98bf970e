"""PKT: Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.functional import pkt_loss


class PKT(RelationalDistiller):
    """Match the batch's cosine-similarity distributions (:func:`~lightning_kd.functional.pkt_loss`).

    Relational: the loss compares the samples of the per-device batch with each other, or of the global batch
    with ``batch_scope="global"`` (see :class:`~lightning_kd.distillers.base.RelationalDistiller`).
    Reference weight (CIFAR-100): ``weight=30000`` with ``task_loss_weight=1``.

    Args:
        eps: smoothing inside the logarithm.
        weight, student_layers, teacher_layers, name, batch_scope: see :class:`RelationalDistiller` (layers
            default to the penultimate embedding on both sides); several layer pairs are summed.
    """

    default_student_layers = ("embedding",)

    def __init__(self, eps: float = 1e-7, weight: float = 30000.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        self.eps = float(eps)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return sum(pkt_loss(s, t, self.eps) for s, t in self.gathered_pairs(student_features, teacher_features))
