"""VID: Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller


def vid_loss(pred_mean: Tensor, target: Tensor, pred_var: Tensor) -> Tensor:
    """Gaussian negative log-likelihood of the teacher map under the student's prediction (no constant).

    ``mean over b, c, h, w of 0.5 * ((mu - f_t)^2 / var_c + log var_c)``. The value can be negative. When
    the two maps differ in spatial size, the larger is adaptive-average-pooled to the smaller first.

    Args:
        pred_mean: ``(B, C, H, W)`` predicted mean ``mu`` (the regressor's output on the student map).
        target: ``(B, C, H', W')`` teacher map ``f_t``.
        pred_var: ``(C,)`` positive per-channel variance (the distiller keeps it as
            ``softplus(alpha) + eps``).

    Example:
        >>> import math, torch
        >>> x = torch.zeros(1, 2, 1, 1)
        >>> round(float(vid_loss(x, x, torch.full((2,), math.e))), 6)  # 0.5 * log(e)
        0.5
    """
    check_batch(pred_mean, target)
    if pred_mean.dim() != 4 or target.dim() != 4:
        raise ValueError(
            f"VID expects (B, C, H, W) maps, got pred_mean {tuple(pred_mean.shape)} and target {tuple(target.shape)}"
        )
    if pred_mean.shape[1] != target.shape[1] or pred_var.shape != (target.shape[1],):
        raise ValueError(
            f"VID needs pred_mean, target and pred_var with the same channels: got pred_mean "
            f"{tuple(pred_mean.shape)}, target {tuple(target.shape)}, pred_var {tuple(pred_var.shape)} "
            "(the regressor must map the student's channels to the teacher's)"
        )
    mean, target = pool_to_smaller(as_float(pred_mean), as_float(target))
    var = as_float(pred_var).view(1, -1, 1, 1)
    return (0.5 * ((mean - target) ** 2 / var + var.log())).mean()
