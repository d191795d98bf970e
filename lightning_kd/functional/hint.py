"""FitNet hints: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The FitNet hint loss: ``mean((r(f_s) - f_t)^2)``.

    ``student`` is the student's map *after* the learnable regressor ``r`` (the :class:`~lightning_kd.
    distillers.FitNet` distiller owns it), so both sides must already have the same shape.

    Args:
        student: the regressed student feature, any shape ``(B, ...)``, e.g. ``(B, C_t, H_t, W_t)``.
        teacher: the teacher feature of the same shape.

    Returns:
        A scalar fp32 tensor: the mean squared difference over every element.

    Example:
        >>> import torch
        >>> float(hint_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)))
        1.0
    """
    check_batch(student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"hint_loss needs the regressed student feature and the teacher feature to have the same shape, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}: map the student feature to the "
            "teacher's shape first (the FitNet distiller's connector does this)"
        )
    return (as_float(student) - as_float(teacher)).pow(2).mean()
