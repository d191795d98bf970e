"""OFD: Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch

#: below this probability of a negative response, the margin is ``-3 sigma`` instead of the truncated mean
OFD_TAIL_THRESHOLD = 1e-3


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    """OFD's per-channel margin: the expected value of the negative responses before a ReLU.

    The BatchNorm before the ReLU makes channel ``c`` about ``N(m, s^2)`` with ``m = beta_c``,
    ``s = |gamma_c|``. Its negative part has mean ``m - s * phi(m/s) / Phi(-m/s)`` (``phi``, ``Phi``: the
    standard normal density and distribution function), used when ``Phi(-m/s) > 0.001``; otherwise the margin
    is ``-3 s``. The residual addition after the BatchNorm is ignored, as in the paper and both official codes.
    A channel with ``gamma_c = 0`` (where the reference divides by zero) gets the limit of the formula,
    ``min(beta_c, 0)``. Computed in float64 with torch ops, returned in the inputs' float dtype (at least fp32).

    Args:
        bn_weight: ``(C,)`` the BatchNorm's ``gamma``.
        bn_bias: ``(C,)`` the BatchNorm's ``beta``.

    Returns:
        ``(C,)`` margins, all ``<= 0``.

    Example:
        >>> import torch
        >>> round(float(ofd_margin(torch.tensor([1.0]), torch.tensor([0.0]))), 6)  # -sqrt(2 / pi)
        -0.797885
    """
    if bn_weight.shape != bn_bias.shape or bn_weight.dim() != 1:
        raise ValueError(
            f"ofd_margin needs the (C,) weight and bias of one BatchNorm, got shapes {tuple(bn_weight.shape)} and "
            f"{tuple(bn_bias.shape)}"
        )
    dtype = as_float(bn_weight).dtype
    s, m = bn_weight.double().abs(), bn_bias.double()
    positive = s > 0
    z = m / torch.where(positive, s, torch.ones_like(s))
    tail = torch.special.ndtr(-z)
    use_mean = positive & (tail > OFD_TAIL_THRESHOLD)
    # keep the branch that where() drops finite, so that no inf or nan reaches the gradient
    z_used = torch.where(use_mean, z, torch.zeros_like(z))
    tail_used = torch.where(use_mean, tail, torch.ones_like(tail))
    density = torch.exp(-0.5 * z_used * z_used) / math.sqrt(2 * math.pi)
    margin = torch.where(use_mean, m - s * density / tail_used, -3.0 * s)
    margin = torch.where(positive, margin, m.clamp(max=0.0))
    return margin.to(dtype)


def ofd_loss(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 distance between the student's connector output and the teacher's pre-ReLU map.

    ``t' = max(t, margin_c)``; ``loss = sum over (b, c, h, w) of (s - t')^2 * [s > t' or t > 0]``, divided by
    the batch size ``B``: no gradient where the teacher is inactive (``t <= 0``) and the student is already
    below ``t'``. The per-batch normalisation (sum over every position and channel, mean over the batch) is the
    one of the official CIFAR code (``loss.sum() / batch_size``, then ``/ 1000``) and of mdistiller, whose
    runs give the CRD-pair numbers (``.mean(dim=0).sum()`` times ``FEAT_WEIGHT = 1e-3``); both agree.
    For margins ``<= 0`` (all of :func:`ofd_margin`'s) the mask equals both references' forms.

    Args:
        student: ``(B, C, H, W)`` the student map after the connector (conv1x1 + BN to the teacher's channels).
        teacher: ``(B, C, H, W)`` the teacher's pre-ReLU map, same shape.
        margin: ``(C,)`` per-channel margins (or any shape broadcastable to the maps, e.g. ``(1, C, 1, 1)``).

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> s, t = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1), torch.tensor([0.5, -3.0]).view(1, 2, 1, 1)
        >>> float(ofd_loss(s, t, torch.tensor([-1.0, -1.0])))  # (1 - 0.5)^2; -2 < max(-3, -1) costs nothing
        0.25
    """
    check_batch(student, teacher)
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"ofd_loss needs two (B, C, H, W) maps of the same shape, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}: map the student to the teacher's channels and size first (the OFD "
            "distiller's connectors and pooling do this)"
        )
    s, t = as_float(student), as_float(teacher)
    margin = as_float(margin).to(s.dtype)
    if margin.dim() == 1:
        if margin.shape[0] != s.shape[1]:
            raise ValueError(f"ofd_loss needs one margin per channel ({s.shape[1]}), got {margin.shape[0]}")
        margin = margin.view(1, -1, 1, 1)
    target = torch.maximum(t, margin)
    keep = (s > target) | (t > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]
