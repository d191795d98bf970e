"""DIST: Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.distillers.kd import check_factor, check_positive
from lightning_kd.functional import dist_loss


class DIST(RelationalDistiller):
    """Inter- and intra-class correlation of the class probabilities (:func:`~lightning_kd.functional.dist_loss`):
    ``tau^2 * (beta * inter + gamma * intra)`` on ``softmax(z / tau)``.

    The intra-class term correlates each class's probabilities across the samples of the batch: relational,
    so under data parallelism "the batch" is the device's slice (``batch_scope="device"``, what the reference
    does: its ImageNet result used 32 images per GPU) or the global batch (``batch_scope="global"``: the logits
    of every rank are gathered with gradients; see
    :class:`~lightning_kd.distillers.base.RelationalDistiller`).

    Reference CIFAR-100 setting (``dist_cifar.yaml``, ``kd: dist_t4``): ``tau=4``, ``weight=2`` with the module's
    ``task_loss_weight=1``, ``beta=gamma=1`` (``configs/methods/dist.yaml``). ImageNet: ``tau=1``, ``weight=2``.

    Args:
        beta: factor of the inter-class term (>= 0).
        gamma: factor of the intra-class term (>= 0).
        temperature: ``tau`` (> 0).
        weight, student_layers, teacher_layers, name, batch_scope: see
            :class:`~lightning_kd.distillers.base.RelationalDistiller` (layers default to the logits).
    """

    default_student_layers = ("logits",)

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        weight: float = 2.0,
        batch_scope: Literal["device", "global"] = "device",
        **kwargs,
    ) -> None:
        super().__init__(weight=check_factor(weight, "weight", "DIST"), batch_scope=batch_scope, **kwargs)
        self.beta = check_factor(beta, "beta", "DIST")
        self.gamma = check_factor(gamma, "gamma", "DIST")
        self.temperature = check_positive(temperature, "temperature", "DIST")
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"DIST reads one layer (the logits) on each side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}"
            )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        student, teacher = self.gather([student_features[0], teacher_features[0]])
        return dist_loss(student, teacher, self.beta, self.gamma, self.temperature)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
