"""FSP: Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """The flow of solution procedure between two maps: ``G[b] = top[b] bottom[b]^T / (H W)``.

    The spatially larger map is adaptive-average-pooled to the smaller size first.

    Args:
        bottom: ``(B, C_bottom, H, W)``, the earlier map.
        top: ``(B, C_top, H', W')``, the later map.

    Returns:
        ``(B, C_top, C_bottom)`` fp32.
    """
    check_batch(bottom, top)
    bottom, top = pool_to_smaller(as_float(bottom), as_float(top))
    positions = bottom.shape[2] * bottom.shape[3]
    with torch.autocast(bottom.device.type, enabled=False):
        return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / positions


def fsp_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """FSP-matrix matching over consecutive maps.

    For each side and each consecutive pair of maps ``(f_i, f_{i+1})`` (reference: the stem output and each
    stage output), ``G_i = fsp_matrix(f_i, f_{i+1})`` of shape ``(B, C_{i+1}, C_i)``; the loss is
    ``sum_i mean((G_i^s - G_i^t)^2)``. The two sides need the same channel count at every index (spatial sizes
    may differ).

    Args:
        student_maps: ``n >= 2`` student maps ``(B, C_i, H_i, W_i)``, in network order.
        teacher_maps: the ``n`` teacher maps, with the same channel counts.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
        >>> float(fsp_loss(maps, maps))
        0.0
    """
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise ValueError(
            f"fsp_loss needs the same number (at least 2) of student and teacher maps, got {len(student_maps)} "
            f"and {len(teacher_maps)}"
        )
    for index, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
        check_batch(student, teacher)
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"fsp_loss needs (B, C, H, W) maps with equal channel counts at every index; at index {index} the "
                f"student map has shape {tuple(student.shape)} and the teacher map {tuple(teacher.shape)}"
            )
    losses = [
        (fsp_matrix(student_maps[i], student_maps[i + 1]) - fsp_matrix(teacher_maps[i], teacher_maps[i + 1]))
        .pow(2)
        .mean()
        for i in range(len(student_maps) - 1)
    ]
    return torch.stack(losses).sum()
