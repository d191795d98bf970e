"""KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target distillation.

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes and averaged over the batch
    (KL "batchmean").

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: the softening temperature ``T`` (reference: 4).

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(kd_loss(z, z))
        0.0
    """
    check_batch(student_logits, teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"KD needs logits of the same shape, got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}: do the two networks have the same number of classes?"
        )
    log_p_s = F.log_softmax(as_float(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(as_float(teacher_logits) / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2
