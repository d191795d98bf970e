"""SP: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation"."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import check_batch, flatten_samples, safe_normalize


def similarity_matrix(feature: Tensor) -> Tensor:
    """SP's batch similarity: ``normalize_rows(f f^T)`` for ``f`` flattened to ``(B, D)``; shape ``(B, B)``, fp32."""
    with torch.autocast(feature.device.type, enabled=False):
        flat = flatten_samples(feature)
        return safe_normalize(flat @ flat.t(), dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving distillation.

    Each side is flattened to ``(B, D)``; ``G = normalize_rows(f f^T)`` is its ``(B, B)`` similarity matrix with
    L2-normalised rows (clamped norm, so an all-zero sample gives a zero row); loss
    ``||G_s - G_t||_F^2 / B^2``. The feature sizes ``D_s`` and ``D_t`` may differ.

    This is a relational loss: it compares the samples of the batch it is given.

    Args:
        student: ``(B, ...)`` student feature (reference: the last conv map).
        teacher: ``(B, ...)`` teacher feature.

    Returns:
        A scalar fp32 tensor (defined for a batch of one).

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 2, 2)
        >>> float(sp_loss(f, 2 * f))  # invariant to the scale of a side
        0.0
    """
    check_batch(student, teacher)
    batch = student.shape[0]
    difference = similarity_matrix(student) - similarity_matrix(teacher)
    return difference.pow(2).sum() / batch**2
