"""PKT: Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer"."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import check_batch, flatten_samples, safe_normalize


def _conditional_probabilities(x: Tensor) -> Tensor:
    unit = safe_normalize(flatten_samples(x), dim=1)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    # every row sums to at least 1/2 (its diagonal is 1, or 1/2 for an all-zero row); the clamp is a guard
    return similarity / similarity.sum(dim=1, keepdim=True).clamp_min(1e-12)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: match the batch's cosine-similarity distributions.

    ``C = normalize(f) normalize(f)^T`` (``B x B``, clamped norms), ``P = row_normalize((C + 1) / 2)`` on each
    side; loss ``mean_ij P_t * log((P_t + eps) / (P_s + eps))`` (a KL divergence per row, divided by ``B^2``).
    An all-zero row has cosine 0 with every sample and gives a finite loss and gradient.

    Args:
        student: ``(B, ...)`` student features (flattened per sample).
        teacher: ``(B, ...)`` teacher features (flattened per sample); the dimension may differ.
        eps: smoothing inside the logarithm (reference 1e-7).

    Example:
        >>> import torch
        >>> e = torch.randn(4, 8)
        >>> float(pkt_loss(e, 2 * e))
        0.0
    """
    check_batch(student, teacher)
    with torch.autocast(student.device.type, enabled=False):  # the similarity products stay in fp32
        p_s = _conditional_probabilities(student)
        p_t = _conditional_probabilities(teacher)
        return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()
