"""ReviewKD: Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch

#: the pooled sizes of the hierarchical context loss, in the order their weights are handed out
HCL_POOL_SIZES = (4, 2, 1)


def hcl_level_weights(height: int) -> list[tuple[int, float]]:
    """The pooled terms of one HCL level of spatial height ``height``: ``[(pool size, weight), ...]``.

    Pool sizes 4, 2, 1 are used when smaller than ``height``; the first one used weighs 1/2, the next 1/4,
    the next 1/8 (the weight halves with each term *used*, so a 4x4 level pools to 2 with weight 1/2 and to
    1 with weight 1/4), as the official code counts.
    """
    terms, weight = [], 1.0
    for size in HCL_POOL_SIZES:
        if size >= height:
            continue
        weight /= 2.0
        terms.append((size, weight))
    return terms


def hcl_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over the levels.

    Per level with maps of height ``h``:
    ``L = [MSE(s, t) + sum_k w_k MSE(pool_k(s), pool_k(t))] / (1 + sum_k w_k)``, where ``pool_k`` is adaptive
    average pooling to ``k x k`` for ``k`` in 4, 2, 1 with ``k < h``, and the weights are 1/2, 1/4, 1/8 in
    the order the pooled terms are used (see :func:`hcl_level_weights`); MSE is the mean over every element.
    ``HCL = sum over levels of L`` (summed, not averaged). The height alone decides the pooled terms, as in
    the official code; non-square maps are pooled to square ``k x k`` grids.

    Args:
        student_maps: one ``(B, C_l, H_l, W_l)`` map per level (the student's fused, projected features).
        teacher_maps: the teacher's maps, the same shapes level by level.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> s, t = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        >>> float(hcl_loss([s], [t]))  # a 1x1 level has no pooled term
        1.0
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"hcl_loss needs as many student maps as teacher maps (at least one), got {len(student_maps)} and "
            f"{len(teacher_maps)}"
        )
    total = None
    for level, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
        check_batch(student, teacher)
        if student.dim() != 4 or student.shape != teacher.shape:
            raise ValueError(
                f"hcl_loss level {level}: expected two (B, C, H, W) maps of the same shape, got student "
                f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}: project the student to the teacher's "
                "shape first (the ReviewKD distiller's fusion modules do this)"
            )
        s, t = as_float(student), as_float(teacher)
        loss = F.mse_loss(s, t)
        norm = 1.0
        for size, weight in hcl_level_weights(s.shape[2]):
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            norm += weight
        loss = loss / norm
        total = loss if total is None else total + loss
    return total
