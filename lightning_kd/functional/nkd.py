"""NKD: Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float
from lightning_kd.functional.dkd import class_indices, non_target_logits
from lightning_kd.functional.kd import check_logits


def nkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0, gamma: float = 1.5
) -> Tensor:
    """Normalized KD: a target term at ``T = 1`` plus a soft cross-entropy over the non-target classes.

    With ``y`` the label of a sample, ``p^T = softmax(z / T)`` and ``z~`` the ``C - 1`` non-target logits:

    - ``L_t = -(1/B) sum_i p^1(z_t)_{i,y} * log p^1(z_s)_{i,y}`` (the teacher's probability is detached);
    - ``L_n = -gamma * T^2 * (1/B) sum_i sum_c p^T(z~_t)_{i,c} * log p^T(z~_s)_{i,c}``;
    - ``L = L_t + L_n``.

    ``L_n`` is a cross-entropy, not a KL, as in the reference code: same gradient, but the value is offset by
    the teacher's non-target entropy, so the loss is not >= 0 and is not 0 when the student equals the teacher.

    Args:
        student_logits: ``(B, C)`` student logits, ``C >= 2``.
        teacher_logits: ``(B, C)`` teacher logits.
        labels: ``(B,)`` (or ``(B, 1)``) integer class indices, or ``(B, C)`` soft labels, reduced to their argmax
            as in the reference.
        temperature: ``T`` of the non-target term (reference ImageNet: 1).
        gamma: factor of the non-target term (reference ImageNet: 1.5).

    Returns:
        The scalar loss (fp32, or fp64 for fp64 input).
    """
    check_logits(student_logits, teacher_logits, "NKD", min_classes=2)
    batch, classes = student_logits.shape
    target = class_indices(labels.to(student_logits.device), batch, classes, "NKD", soft="argmax")[:, None]
    z_s, z_t = as_float(student_logits), as_float(teacher_logits)
    log_p_s = F.log_softmax(z_s, dim=1).gather(1, target)
    p_t = F.softmax(z_t, dim=1).gather(1, target).detach()
    target_term = -(p_t * log_p_s).mean()
    log_q_s = F.log_softmax(non_target_logits(z_s, target[:, 0]) / temperature, dim=1)
    q_t = F.softmax(non_target_logits(z_t, target[:, 0]) / temperature, dim=1)
    non_target_term = -(q_t * log_q_s).sum(dim=1).mean()
    return target_term + gamma * temperature**2 * non_target_term
