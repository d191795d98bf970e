"""NKD: Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
with Normalized Loss and Customized Soft Labels"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.distillers.kd import check_factor, check_positive
from lightning_kd.functional import nkd_loss


class NKD(Distiller):
    """Normalized KD on the logits (:func:`~lightning_kd.functional.nkd_loss`): the target-class term at
    ``T = 1`` plus ``gamma * T^2`` times the soft cross-entropy over the non-target classes; the labels come from
    ``batch["label"]`` (soft ``(B, C)`` labels are reduced to their argmax, as in the reference).

    Reference (ImageNet R34->R18, mmcls): ``T=1``, ``gamma=1.5``, ``weight=1`` with the module's
    ``task_loss_weight=1``. There is no official setting for the CIFAR-100 benchmark pairs
    (``configs/methods/nkd.yaml`` keeps the ImageNet values).

    Args:
        temperature: ``T`` of the non-target term (> 0).
        gamma: factor of the non-target term (>= 0).
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the logits).
    """

    default_student_layers = ("logits",)

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5, weight: float = 1.0, **kwargs) -> None:
        super().__init__(weight=check_factor(weight, "weight", "NKD"), **kwargs)
        self.temperature = check_positive(temperature, "temperature", "NKD")
        self.gamma = check_factor(gamma, "gamma", "NKD")
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"NKD reads one layer (the logits) on each side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}"
            )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return nkd_loss(student_features[0], teacher_features[0], batch["label"], self.temperature, self.gamma)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature}, gamma={self.gamma}"
