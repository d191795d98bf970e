"""CTKD: Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation": a learnable temperature.

CTKD is not a loss of its own but a temperature provider: pass a :class:`CurriculumTemperature` as the
``temperature`` of :class:`~lightning_kd.distillers.KD` or :class:`~lightning_kd.distillers.DKD` (in a config,
as a nested ``class_path``; see ``configs/methods/ctkd.yaml``). The module then is a submodule of the distiller,
so the optimizer, DDP and checkpoints see its parameter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_kd.functional import ctkd_lambda, gradient_reversal


class CurriculumTemperature(nn.Module):
    """CTKD's global learnable temperature: ``tau = t_start + t_range * sigmoid(GRL_lambda(theta))``.

    One fp32 scalar parameter ``theta`` (initialised 1, so ``tau_0 = 1 + 20 * sigmoid(1) = 15.62``) behind a
    gradient reversal (:func:`~lightning_kd.functional.gradient_reversal`) whose factor follows the epoch,
    ``lambda_e = -(1 - cos(pi * min(e, L) / L)) / 2`` with ``e`` counted from 1
    (:func:`~lightning_kd.functional.ctkd_lambda`): 0 -> -1 over ``L = ramp_epochs`` epochs. ``theta`` therefore
    *ascends* the distillation loss (through the softmax temperature and the ``tau^2`` factor) with growing
    strength while the student descends it: an easy-to-hard curriculum. Like the reference, ``theta`` is
    trained by the student's optimizer (same learning rate, momentum and weight decay).

    The temperature is computed in fp32 with autocast off, so it moves under bf16/fp16 mixed precision.

    Reference (CIFAR-100): ``t_start=1``, ``t_range=20``, ``ramp_epochs=10`` with KD (weight 0.9, CE 0.1, the
    KD loss at ``tau``); ImageNet: ``ramp_epochs=5``.

    Args:
        t_start: the lowest temperature (> 0).
        t_range: the width of the temperature range (>= 0): ``tau`` lies in ``(t_start, t_start + t_range)``.
        ramp_epochs: ``L``, the length of the cosine ramp of the reversal factor, in epochs (> 0).
        init: the initial value of ``theta``.
        instance_wise: CTKD's instance-wise variant (a small network predicting one temperature per sample);
            not implemented.
    """

    def __init__(
        self,
        t_start: float = 1.0,
        t_range: float = 20.0,
        ramp_epochs: int = 10,
        init: float = 1.0,
        instance_wise: bool = False,
    ) -> None:
        super().__init__()
        if instance_wise:
            raise NotImplementedError(
                "CurriculumTemperature(instance_wise=True): the instance-wise CTKD variant is not implemented; "
                "use the global temperature (instance_wise=False), the one of the published CIFAR-100 and ImageNet "
                "numbers"
            )
        if not (math.isfinite(t_start) and t_start > 0):
            raise ValueError(f"CurriculumTemperature: t_start must be a finite number > 0, got {t_start}")
        if not (math.isfinite(t_range) and t_range >= 0):
            raise ValueError(f"CurriculumTemperature: t_range must be a finite number >= 0, got {t_range}")
        if int(ramp_epochs) != ramp_epochs or ramp_epochs < 1:
            raise ValueError(f"CurriculumTemperature: ramp_epochs must be a whole number >= 1, got {ramp_epochs}")
        if not math.isfinite(init):
            raise ValueError(f"CurriculumTemperature: init must be finite, got {init}")
        self.t_start = float(t_start)
        self.t_range = float(t_range)
        self.ramp_epochs = int(ramp_epochs)
        self.init = float(init)
        self.theta = nn.Parameter(torch.tensor(float(init), dtype=torch.float32))

    def reversal_factor(self, epoch: int) -> float:
        """The gradient-reversal factor ``lambda`` for a **0-based** epoch (as :attr:`Distiller.epoch`)."""
        return ctkd_lambda(epoch + 1, self.ramp_epochs)

    def forward(self, epoch: int) -> Tensor:
        """The temperature (a 0-d fp32 tensor) during the **0-based** epoch ``epoch`` of the current stage."""
        theta = self.theta
        with torch.autocast(theta.device.type, enabled=False):
            reversed_theta = gradient_reversal(theta.float(), self.reversal_factor(epoch))
            return self.t_start + self.t_range * torch.sigmoid(reversed_theta)

    def init_config(self) -> dict:
        """The constructor arguments as a ``{"class_path", "init_args"}`` config (the learnt ``theta`` lives in the
        state dict, not here), so a distiller holding this module can be saved as hyperparameters."""
        init_args = {"t_start": self.t_start, "t_range": self.t_range, "ramp_epochs": self.ramp_epochs}
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": {**init_args, "init": self.init, "instance_wise": False},
        }

    def extra_repr(self) -> str:
        return f"t_start={self.t_start}, t_range={self.t_range}, ramp_epochs={self.ramp_epochs}"


def check_temperature(temperature: float | CurriculumTemperature, method: str) -> float | CurriculumTemperature:
    """A fixed temperature as a float > 0, or a :class:`CurriculumTemperature` unchanged; a clear error otherwise."""
    if isinstance(temperature, CurriculumTemperature):
        return temperature
    if isinstance(temperature, nn.Module):
        raise TypeError(
            f"{method}: temperature must be a number or a CurriculumTemperature, got {type(temperature).__name__}"
        )
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"{method}: temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def temperature_at(temperature: float | CurriculumTemperature, epoch: int) -> float | Tensor:
    """The temperature to use during a 0-based epoch: the float itself, or the learnable one's value."""
    return temperature(epoch) if isinstance(temperature, CurriculumTemperature) else temperature


def detached_temperature(temperature: float | CurriculumTemperature, epoch: int) -> Tensor:
    """The temperature during a 0-based epoch as a detached 0-d fp32 tensor (for logging)."""
    with torch.no_grad():
        value = temperature_at(temperature, epoch)
    return value.detach() if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float32)
