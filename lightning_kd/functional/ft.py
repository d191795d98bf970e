"""FT: Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer"."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller, safe_normalize


def _factor(f: Tensor, form: str) -> Tensor:
    if form == "channel_mean":
        return safe_normalize(f.pow(2).mean(dim=1).reshape(f.shape[0], -1), dim=1)
    return safe_normalize(f.reshape(f.shape[0], -1), dim=1)


def ft_loss(
    student_factor: Tensor,
    teacher_factor: Tensor,
    p: float = 1,
    form: Literal["channel_mean", "whole"] = "channel_mean",
) -> Tensor:
    """Factor-transfer loss between the translator's and the paraphraser's factors.

    The spatially larger factor is average-pooled to the other's size; then
    ``phi(F) = normalize(mean_c F^2)`` flattened per sample (``form="channel_mean"``, the benchmark's code,
    default) or ``phi(F) = normalize(F)`` of the whole flattened factor (``form="whole"``, the paper's, which
    needs equal channel counts); loss ``mean |phi(F_s) - phi(F_t)|^p`` (``p = 1``: mean absolute error).

    Args:
        student_factor: ``(B, C_s, H, W)`` the translator's output ``F_s``.
        teacher_factor: ``(B, C_t, H', W')`` the paraphraser's encoding ``F_t``.
        p: exponent of the distance (reference 1).
        form: ``"channel_mean"`` or ``"whole"``, see above.

    Example:
        >>> import torch
        >>> f = torch.randn(2, 4, 3, 3)
        >>> float(ft_loss(f, 2 * f))
        0.0
    """
    check_batch(student_factor, teacher_factor)
    if form not in ("channel_mean", "whole"):
        raise ValueError(f"FT form must be 'channel_mean' or 'whole', got {form!r}")
    s, t = pool_to_smaller(as_float(student_factor), as_float(teacher_factor))
    if form == "whole" and s.shape[1] != t.shape[1]:
        raise ValueError(
            f"FT with form='whole' needs factors with equal channels, got student {tuple(s.shape)} and teacher "
            f"{tuple(t.shape)}: size the translator's output to the paraphraser's factor, or use 'channel_mean'"
        )
    diff = (_factor(s, form) - _factor(t, form)).abs()
    return diff.mean() if p == 1 else diff.pow(p).mean()
