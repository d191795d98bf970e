"""KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import kd_loss


class KD(Distiller):
    """Soft-target distillation on the logits: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Reference weights (CIFAR-100): ``weight=0.9`` with the module's ``task_loss_weight=0.1``, ``T=4``.

    Args:
        temperature: softening temperature ``T``.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the logits).
    """

    default_student_layers = ("logits",)

    def __init__(self, temperature: float = 4.0, weight: float = 0.9, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        if temperature <= 0:
            raise ValueError(f"KD temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return kd_loss(student_features[0], teacher_features[0], self.temperature)
