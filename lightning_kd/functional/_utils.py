"""Helpers shared by the pure losses: clamped normalisation, spatial matching, shape checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-12


def safe_normalize(x: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """L2-normalise ``x`` along ``dim`` with a clamped norm: ``x / max(||x||, eps)``.

    An all-zero row stays zero and its gradient stays finite (unlike a bare ``x / x.norm()``).
    """
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the spatially larger of two ``(B, C, H, W)`` maps to the other's size.

    Height and width are handled independently, so non-square maps work: each output dimension is the
    smaller of the two inputs'. Maps of equal size are returned unchanged.
    """
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) feature maps, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def check_batch(student: Tensor, teacher: Tensor) -> None:
    """Raise a clear error when the two sides' batch sizes differ."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]} "
            f"(shapes {tuple(student.shape)} and {tuple(teacher.shape)})"
        )


def as_float(x: Tensor) -> Tensor:
    """``x`` in at least fp32: half and bf16 become fp32, fp64 stays fp64 (so ``gradcheck`` works)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def flatten_samples(x: Tensor) -> Tensor:
    """``(B, ...)`` to ``(B, D)`` in at least fp32."""
    return as_float(x.reshape(x.shape[0], -1))
