"""DKD: Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation".

Also the label helpers NKD shares: :func:`class_indices` and :func:`non_target_logits`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float
from lightning_kd.functional.kd import check_logits, standardize_logits


def class_indices(labels: Tensor, batch_size: int, num_classes: int, method: str, soft: str = "refuse") -> Tensor:
    """Hard labels as a ``(B,)`` int64 tensor of class indices.

    Accepts ``(B,)`` or ``(B, 1)`` integer labels. ``(B, C)`` floating-point labels (soft labels from mixup or
    cutmix) are refused with ``soft="refuse"`` and reduced to their argmax with ``soft="argmax"``.
    """
    if labels.dim() == 2 and labels.is_floating_point() and labels.shape == (batch_size, num_classes):
        if soft == "argmax":
            return labels.argmax(dim=1)
        raise ValueError(
            f"{method} needs hard labels (B,) of class indices, got soft labels of shape {tuple(labels.shape)}: the "
            "target/non-target split is not defined for a mixed label. Turn mixup/cutmix off, or pass "
            "labels.argmax(1) to distil towards the dominant class."
        )
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != batch_size or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{method} needs integer labels of shape ({batch_size},) for logits of shape ({batch_size}, "
            f"{num_classes}), got {labels.dtype} labels of shape {tuple(labels.shape)}"
        )
    return labels.long()


def non_target_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """The ``(B, C - 1)`` logits of every class but each sample's label, in class order (an exact gather).

    Args:
        logits: ``(B, C)``.
        labels: ``(B,)`` int64 class indices.
    """
    batch, classes = logits.shape
    columns = torch.arange(classes - 1, device=logits.device).expand(batch, classes - 1)
    columns = columns + (columns >= labels[:, None]).long()  # skip the label's column
    return logits.gather(1, columns)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float | Tensor = 4.0,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (the warm-up factor is the distiller's).

    With ``p = softmax(z / T)`` and ``y`` the label of a sample:

    - ``TCKD = T^2 * KL(b_t || b_s)``, ``b = (p_y, 1 - p_y)`` (the binary target / non-target split);
    - ``NCKD = T^2 * KL(q_t || q_s)``, ``q = softmax over the classes c != y of z_c / T``;

    both summed over their bins and averaged over the batch. Computed in log space, exactly:
    ``log p_y = z_y/T - logsumexp_c(z/T)``, ``log(1 - p_y) = logsumexp_{c != y}(z/T) - logsumexp_c(z/T)``, and the
    non-target classes are gathered (no log of a softmax, unlike the reference, which takes ``log`` of summed
    probabilities and removes the target with ``z/T - 1000 * onehot``; the two agree to rounding on ordinary
    logits, and the reference gives inf/NaN once ``p_y`` underflows, e.g. logits of magnitude 1e4).
    With ``standardize=True`` both sides go through
    :func:`~lightning_kd.functional.standardize_logits` first (DKD+LS).

    Two classes leave one non-target class, whose distribution is always ``(1,)``: NCKD is then 0 (the
    :class:`~lightning_kd.distillers.DKD` distiller warns at setup).

    Args:
        student_logits: ``(B, C)`` student logits, ``C >= 2``.
        teacher_logits: ``(B, C)`` teacher logits.
        labels: ``(B,)`` (or ``(B, 1)``) integer class indices. Soft ``(B, C)`` labels are refused (the split
            is not defined for a mixed label); pass ``labels.argmax(1)`` to use the dominant class.
        alpha: factor of TCKD (reference 1).
        beta: factor of NCKD (reference 8 for res32x4->res8x4; 6 or 2 for some pairs; 0.5 on ImageNet).
        temperature: ``T`` (reference 4), a float or a scalar tensor (CTKD's learnable temperature).
        standardize: logit standardisation of both sides before the temperature (LS, Sun et al. CVPR 2024).

    Returns:
        The scalar loss (fp32, or fp64 for fp64 input).
    """
    check_logits(student_logits, teacher_logits, "DKD", min_classes=2)
    batch, classes = student_logits.shape
    target = class_indices(labels.to(student_logits.device), batch, classes, "DKD")
    z_s, z_t = as_float(student_logits), as_float(teacher_logits)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)

    def split(z: Tensor) -> tuple[Tensor, Tensor]:
        """``(log b, log q)``: the (B, 2) log target / non-target split and the (B, C-1) non-target log-softmax."""
        scaled = z / temperature
        others = non_target_logits(scaled, target)
        log_all = torch.logsumexp(scaled, dim=1, keepdim=True)
        log_others = torch.logsumexp(others, dim=1, keepdim=True)
        log_b = torch.cat([scaled.gather(1, target[:, None]) - log_all, log_others - log_all], dim=1)
        return log_b, others - log_others

    log_b_s, log_q_s = split(z_s)
    log_b_t, log_q_t = split(z_t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1).mean()
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2
