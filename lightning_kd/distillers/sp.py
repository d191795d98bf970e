"""SP: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.functional import sp_loss


class SP(RelationalDistiller):
    """Similarity preservation: ``||G_s - G_t||_F^2 / B^2`` with ``G = normalize_rows(f f^T)`` per layer pair.

    Reference (CRD benchmark, CIFAR-100): the last conv map (``stage3`` of the CIFAR ResNets), ``weight=3000``.
    A relational loss: it compares the samples of the per-device batch, or of the global batch with
    ``batch_scope="global"`` (see :class:`~lightning_kd.distillers.base.RelationalDistiller`).

    Args:
        weight, student_layers, teacher_layers, name, batch_scope: see :class:`RelationalDistiller` (default
            layer ``"last_stage"``); several layer pairs are summed.
    """

    default_student_layers = ("last_stage",)

    def __init__(self, weight: float = 3000.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return sum(sp_loss(s, t) for s, t in self.gathered_pairs(student_features, teacher_features))
