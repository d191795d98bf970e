"""CTKD: Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation": the gradient reversal and
its schedule. The learnable temperature itself is :class:`lightning_kd.distillers.CurriculumTemperature`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.lambda_, None


def gradient_reversal(x: Tensor, lambda_: float) -> Tensor:
    """Identity forward; the backward multiplies the incoming gradient by ``lambda_``.

    No extra negation: the reversal comes from ``lambda_`` itself, negative in CTKD's schedule
    (:func:`ctkd_lambda`), so a parameter behind it ascends the loss that the rest of the graph descends.

    Args:
        x: any tensor.
        lambda_: the gradient factor (a Python float).
    """
    return _GradientReversal.apply(x, float(lambda_))


def ctkd_lambda(epoch: int, ramp_epochs: int) -> float:
    """CTKD's gradient-reversal factor for an epoch counted **from 1**: a cosine ramp from 0 to -1.

    ``lambda_e = -(1 - cos(pi * min(e, L) / L)) / 2``: -0.0245 at ``e = 1`` for ``L = 10``, -0.5 at ``e = L/2``,
    -1 from ``e >= L`` (reference: ``L = 10`` on CIFAR-100, 5 on ImageNet). Epochs below 1 count as 0 (factor 0).

    Args:
        epoch: the epoch, counted from 1 (a distiller passes ``self.epoch + 1``).
        ramp_epochs: ``L``, the length of the ramp (> 0).
    """
    if ramp_epochs <= 0:
        raise ValueError(f"ctkd_lambda: ramp_epochs must be a positive number of epochs, got {ramp_epochs}")
    progress = min(max(epoch, 0), ramp_epochs) / ramp_epochs
    return -(1.0 - math.cos(math.pi * progress)) / 2.0
