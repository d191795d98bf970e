"""DKD: Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"."""

from __future__ import annotations

import logging

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.distillers.ctkd import CurriculumTemperature, check_temperature, detached_temperature, temperature_at
from lightning_kd.distillers.kd import check_factor
from lightning_kd.functional import dkd_loss

log = logging.getLogger(__name__)


class DKD(Distiller):
    """Decoupled KD on the logits: ``min((epoch + 1) / W, 1) * (alpha * TCKD + beta * NCKD)``
    (:func:`~lightning_kd.functional.dkd_loss`); the labels come from ``batch["label"]``.

    The warm-up is per epoch and, as in the reference (which counts epochs from 1), the first epoch already gets
    ``1 / W``: ``self.epoch`` is 0-based, hence the ``+ 1``.

    Reference (CIFAR-100, res32x4->res8x4): ``alpha=1``, ``beta=8``, ``T=4``, ``W=20``, ``weight=1`` with the
    module's ``task_loss_weight=1`` (``configs/methods/dkd.yaml``; per-pair ``beta`` in
    ``configs/cifar100/overrides/dkd/``). ImageNet R34->R18: ``beta=0.5``, ``T=1``, ``W=1``.

    Options: ``standardize=True`` (DKD+LS: logit standardisation of both sides; reference ``alpha=9``, ``beta=72``,
    ``T=2``), and ``temperature=CurriculumTemperature(...)`` (DKD+CTKD: the learnable temperature replaces ``T``).

    Soft labels (a ``(B, C)`` float ``batch["label"]``, from mixup or cutmix) are refused with an error: the
    target / non-target split is not defined for a mixed label. With two classes NCKD is always 0; the
    distiller warns when it is built.

    Args:
        alpha: factor of TCKD (>= 0).
        beta: factor of NCKD (>= 0).
        temperature: ``T`` (> 0), or a :class:`~lightning_kd.distillers.CurriculumTemperature`.
        warmup_epochs: ``W``, the length of the linear warm-up in epochs; 0 for none.
        standardize: logit standardisation (LS) of both sides before the temperature.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the logits).
    """

    default_student_layers = ("logits",)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float | CurriculumTemperature = 4.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
        weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(weight=check_factor(weight, "weight", "DKD"), **kwargs)
        self.alpha = check_factor(alpha, "alpha", "DKD")
        self.beta = check_factor(beta, "beta", "DKD")
        self.temperature = check_temperature(temperature, "DKD")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"DKD: warmup_epochs must be a whole number of epochs >= 0, got {warmup_epochs}")
        self.warmup_epochs = int(warmup_epochs)
        self.standardize = bool(standardize)
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"DKD reads one layer (the logits) on each side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}"
            )

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        shape = tuple(student_features[0].shape)
        if len(shape) != 2 or shape[1] < 2:
            raise ValueError(f"DKD needs (B, C) logits with at least 2 classes, got student features of shape {shape}")
        if shape[1] == 2:
            log.warning(
                "DKD with 2 classes: the non-target distribution has a single class, so NCKD (the beta term) is "
                "always 0 and only TCKD distils"
            )

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / W, 1)`` for the current 0-based epoch (1 without a warm-up)."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    @property
    def current_temperature(self) -> Tensor:
        """The temperature of the current epoch, a detached 0-d fp32 tensor (a learnable one's current value)."""
        return detached_temperature(self.temperature, self.epoch)

    def metrics(self) -> dict[str, Tensor]:
        """Values for the module to log: the temperature, when it is learnable (CTKD's main diagnostic)."""
        return {"temperature": self.current_temperature} if isinstance(self.temperature, CurriculumTemperature) else {}

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        tau = temperature_at(self.temperature, self.epoch)
        loss = dkd_loss(
            student_features[0], teacher_features[0], batch["label"], self.alpha, self.beta, tau, self.standardize
        )
        return self.warmup_factor() * loss

    def extra_repr(self) -> str:
        fixed = "" if isinstance(self.temperature, CurriculumTemperature) else f", temperature={self.temperature}"
        return (
            super().extra_repr()
            + f", alpha={self.alpha}, beta={self.beta}{fixed}, warmup_epochs={self.warmup_epochs}"
            + (", standardize=True" if self.standardize else "")
        )
