"""NST: Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import nst_loss


class NST(Distiller):
    """Neuron selectivity transfer: squared MMD (polynomial kernel) between normalised channel maps, per pair.

    Reference (CRD benchmark, CIFAR-100): the three stage outputs of each network, summed, ``weight=50``.
    The channel counts may differ; a larger map is pooled to the smaller size.

    Args:
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (default layers
            ``"stages"``: every stage output, stage1..stage3 of the CIFAR ResNets, on both sides).
    """

    default_student_layers = ("stages",)

    def __init__(self, weight: float = 50.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return sum(nst_loss(s, t) for s, t in zip(student_features, teacher_features))
