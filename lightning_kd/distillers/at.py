"""AT: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import at_loss


class AT(Distiller):
    """Attention transfer: ``sum over layer pairs of mean((a(f_s) - a(f_t))^2)``, ``a(f) = normalize(mean_c f^p)``.

    Reference (CRD benchmark, CIFAR-100): the three stage outputs of each network, equal weights, ``p=2``,
    ``weight=1000``. The channel counts may differ; a larger map is pooled to the smaller size.

    Args:
        p: exponent of the attention maps.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (default layers
            ``"stages"``: every stage output, stage1..stage3 of the CIFAR ResNets, on both sides).
    """

    default_student_layers = ("stages",)

    def __init__(self, p: float = 2.0, weight: float = 1000.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        if p < 1:
            raise ValueError(f"AT needs p >= 1, got p={p}")
        self.p = float(p)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return sum(at_loss(s, t, self.p) for s, t in zip(student_features, teacher_features))

