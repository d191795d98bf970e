"""NST: Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller, safe_normalize


def mean_polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``mean over b, i, j of (x[b, i] . y[b, j])^2`` for ``x`` ``(B, C_x, N)`` and ``y`` ``(B, C_y, N)``.

    Computed with batched matrix products only, never with a ``(B, C_x, C_y, N)`` tensor. The sum over
    ``i, j`` is ``||x y^T||_F^2 = <x^T x, y^T y>_F``, so whichever of the ``(B, C_x, C_y)`` and ``(B, N, N)``
    products is smaller is formed (for late stages ``N = H W`` is far below the channel count).
    """
    channels_x, channels_y, positions = x.shape[1], y.shape[1], x.shape[2]
    if positions * positions < channels_x * channels_y:
        gram_x = torch.bmm(x.transpose(1, 2), x)
        gram_y = gram_x if y is x else torch.bmm(y.transpose(1, 2), y)
        return (gram_x * gram_y).sum(dim=(1, 2)).mean() / (channels_x * channels_y)
    return torch.bmm(x, y.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Neuron selectivity transfer for one pair of maps: squared MMD with a polynomial kernel.

    After pooling the spatially larger map to the smaller size, each side is reshaped to ``(B, C, H W)`` and
    every channel's spatial map is L2-normalised (clamped norm). With ``k(a, b) = (a . b)^2`` over channels,
    the loss is ``mean K(t, t) + mean K(s, s) - 2 mean K(s, t)``, each mean over the batch and both channel
    indices. The channel counts may differ. Memory stays at ``B x C x C`` (or ``B x HW x HW``) at most.

    Args:
        student: ``(B, C_s, H_s, W_s)`` student map.
        teacher: ``(B, C_t, H_t, W_t)`` teacher map.

    Returns:
        A scalar fp32 tensor (non-negative up to rounding).

    Example:
        >>> import torch
        >>> f = torch.rand(2, 8, 4, 4)
        >>> abs(float(nst_loss(f, 5 * f))) < 1e-6  # each channel map is normalised
        True
    """
    check_batch(student, teacher)
    student, teacher = pool_to_smaller(as_float(student), as_float(teacher))
    with torch.autocast(student.device.type, enabled=False):
        s = safe_normalize(student.flatten(2), dim=2)
        t = safe_normalize(teacher.flatten(2), dim=2)
        return mean_polynomial_kernel(t, t) + mean_polynomial_kernel(s, s) - 2 * mean_polynomial_kernel(s, t)
