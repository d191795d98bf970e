"""KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; with the logit standardisation of
Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation" (LS) as an option.

Also the helpers the other logit losses (DKD, DIST, NKD) share: :func:`standardize_logits` and
:func:`check_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch

#: added to the standard deviation by logit standardisation (the LS reference value)
STANDARDIZE_EPS = 1e-7


def check_logits(
    student_logits: Tensor, teacher_logits: Tensor, method: str = "KD", min_classes: int = 1, two_dim: bool = True
) -> None:
    """Raise a clear error unless both sides are logits of one shape, ``(B, C)`` when ``two_dim``, with at least
    ``min_classes`` classes (dimension 1)."""
    check_batch(student_logits, teacher_logits)
    bad_dim = student_logits.dim() != 2 if two_dim else student_logits.dim() < 2
    if bad_dim or student_logits.shape != teacher_logits.shape:
        shape = "(B, C) logits" if two_dim else "logits"
        raise ValueError(
            f"{method} needs {shape} of the same shape, got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}: do the two networks have the same number of classes?"
        )
    if student_logits.shape[1] < min_classes:
        raise ValueError(
            f"{method} needs at least {min_classes} classes, got logits of shape {tuple(student_logits.shape)}"
        )


def standardize_logits(logits: Tensor, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): z-score each sample over its classes.

    ``Z(z)_c = (z_c - mean_c z) / (std(z) + eps)`` with the **Bessel-corrected** standard deviation
    (divisor ``C - 1``, as the reference's ``Tensor.std``) and ``eps = 1e-7`` added to it. Computed in at least
    fp32. Constant logits (a zero head) give ``std = 0``: the output is 0 and the gradient is finite (the square
    root is taken only where the variance is positive; its gradient at 0 is set to 0).

    Args:
        logits: ``(B, C)`` logits, ``C >= 2``.
        eps: added to the standard deviation.

    Returns:
        ``(B, C)`` standardised logits (fp32, or fp64 for fp64 input).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logit standardisation needs (B, C) logits with C >= 2 (the std divides by C - 1), "
            f"got shape {tuple(logits.shape)}"
        )
    z = as_float(logits)
    centred = z - z.mean(dim=1, keepdim=True)
    var = centred.pow(2).sum(dim=1, keepdim=True) / (z.shape[1] - 1)
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return centred / (std + eps)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 4.0, standardize: bool = False
) -> Tensor:
    """Soft-target distillation.

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes and averaged over the batch
    (KL "batchmean"). With ``standardize=True`` both sides first go through :func:`standardize_logits` (LS,
    Sun et al. CVPR 2024): ``T^2 * KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T))``.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: the softening temperature ``T`` (reference: 4; LS: 2), a float or a scalar tensor (a
            learnable temperature, as CTKD's: its gradient flows through the softmax and the ``T^2`` factor).
        standardize: apply logit standardisation to both sides before the temperature.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(kd_loss(z, z))
        0.0
    """
    check_logits(student_logits, teacher_logits, "KD", min_classes=2 if standardize else 1, two_dim=standardize)
    z_s, z_t = as_float(student_logits), as_float(teacher_logits)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2
