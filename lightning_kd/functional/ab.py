"""AB: Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller


def ab_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss of one layer of pre-activation maps.

    ``sum over all elements of (s + m)^2 * [s > -m and t <= 0] + (s - m)^2 * [s <= m and t > 0]``, divided
    by the batch size ``B``: the student's neuron is pushed below ``-m`` where the teacher's is off and above
    ``m`` where it is on. The masks carry no gradient. The distiller weights the layers and scales the sum.

    Args:
        student: ``(B, C, H, W)`` student pre-activations (after the connector, i.e. in the teacher's
            channels); a spatially larger map is average-pooled to the other's size.
        teacher: ``(B, C, H', W')`` teacher pre-activations.
        margin: the margin ``m`` (reference 1).

    Example:
        >>> import torch
        >>> s = torch.tensor([[[[2.0]], [[-2.0]]]])  # (1, 2, 1, 1): on where the teacher is on, off where off
        >>> t = torch.tensor([[[[1.0]], [[-1.0]]]])
        >>> float(ab_loss(s, t))
        0.0
    """
    check_batch(student, teacher)
    s, t = as_float(student), as_float(teacher)
    if s.dim() == 4 and t.dim() == 4:
        s, t = pool_to_smaller(s, t)
    if s.shape != t.shape:
        raise ValueError(
            f"AB needs maps of the same shape after pooling, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}: map the student to the teacher's channels with a connector"
        )
    with torch.no_grad():
        push_off = ((s > -margin) & (t <= 0)).to(s.dtype)
        push_on = ((s <= margin) & (t > 0)).to(s.dtype)
    loss = (s + margin) ** 2 * push_off + (s - margin) ** 2 * push_on
    return loss.sum() / s.shape[0]
