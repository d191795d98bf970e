"""KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; with logit standardisation (LS, Sun et
al. CVPR 2024) and CTKD's learnable temperature (Li et al. AAAI 2023) as options."""

from __future__ import annotations

import math

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.distillers.ctkd import CurriculumTemperature, check_temperature, detached_temperature, temperature_at
from lightning_kd.functional import kd_loss


def check_factor(value: float, name: str, method: str) -> float:
    """``value`` as a float, or a clear error unless it is finite and >= 0 (weights and loss factors)."""
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{method}: {name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive(value: float, name: str, method: str) -> float:
    """``value`` as a float, or a clear error unless it is finite and > 0 (temperatures)."""
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{method}: {name} must be a finite number > 0, got {value}")
    return float(value)


class KD(Distiller):
    """Soft-target distillation on the logits: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Reference weights (CIFAR-100): ``weight=0.9`` with the module's ``task_loss_weight=0.1``, ``T=4``.

    Options:

    - ``standardize=True``: logit standardisation of both sides before the temperature (KD+LS, Sun et al.
      CVPR 2024; :func:`~lightning_kd.functional.standardize_logits`). Reference CIFAR-100 setting: ``T=2``,
      ``weight=9``, ``task_loss_weight=0.1`` (``configs/methods/kd_ls.yaml``).
    - ``temperature=CurriculumTemperature(...)``: CTKD's learnable temperature (Li et al. AAAI 2023), trained
      with the student behind a gradient reversal; reference CIFAR-100 setting: ``weight=0.9``,
      ``task_loss_weight=0.1`` (``configs/methods/ctkd.yaml``).

    Args:
        temperature: softening temperature ``T`` (> 0), or a
            :class:`~lightning_kd.distillers.CurriculumTemperature`.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to the logits).
        standardize: logit standardisation (LS) of both sides.
    """

    default_student_layers = ("logits",)

    def __init__(
        self,
        temperature: float | CurriculumTemperature = 4.0,
        weight: float = 0.9,
        standardize: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(weight=check_factor(weight, "weight", "KD"), **kwargs)
        self.temperature = check_temperature(temperature, "KD")
        self.standardize = bool(standardize)

    @property
    def current_temperature(self) -> Tensor:
        """The temperature of the current epoch, a detached 0-d fp32 tensor (a learnable one's current value)."""
        return detached_temperature(self.temperature, self.epoch)

    def metrics(self) -> dict[str, Tensor]:
        """Values for the module to log: the temperature, when it is learnable (CTKD's main diagnostic)."""
        return {"temperature": self.current_temperature} if isinstance(self.temperature, CurriculumTemperature) else {}

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        tau = temperature_at(self.temperature, self.epoch)
        return kd_loss(student_features[0], teacher_features[0], tau, self.standardize)

    def extra_repr(self) -> str:
        fixed = "" if isinstance(self.temperature, CurriculumTemperature) else f", temperature={self.temperature}"
        return super().extra_repr() + fixed + (", standardize=True" if self.standardize else "")
