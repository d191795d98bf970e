"""RKD: Park et al. 2019, "Relational Knowledge Distillation"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import check_batch, flatten_samples, safe_normalize

#: squared distances are clamped here before the square root, so its gradient stays finite
DIST_EPS = 1e-12


def _differences(e: Tensor) -> Tensor:
    """``(B, D)`` to ``(B, B, D)`` with ``[i, j] = e_j - e_i``."""
    return e.unsqueeze(0) - e.unsqueeze(1)


def _normalized_distances(diff: Tensor) -> Tensor:
    """Pairwise Euclidean distances (diagonal zero) divided by the mean off-diagonal distance."""
    batch = diff.shape[0]
    dist = (diff * diff).sum(dim=2).clamp_min(DIST_EPS).sqrt()
    off_diagonal = 1.0 - torch.eye(batch, device=diff.device, dtype=dist.dtype)
    dist = dist * off_diagonal
    mean = dist.sum() / max(batch * (batch - 1), 1)
    return dist / mean.clamp_min(DIST_EPS)


def _angles(diff: Tensor) -> Tensor:
    """``[i, j, k]`` = cosine between ``e_j - e_i`` and ``e_k - e_i`` (0 where a difference is zero)."""
    unit = safe_normalize(diff, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Relational KD: match the distance and angle structure of the batch.

    With ``e`` the samples flattened to ``(B, D)``:

    - distance: ``d_ij = ||e_i - e_j||`` (square root of a clamped square, diagonal zero), each side divided
      by the mean of its off-diagonal distances; ``huber(d_s, d_t)`` averaged over the ``B x B`` entries;
    - angle: ``a_ijk = <unit(e_j - e_i), unit(e_k - e_i)>``; ``huber(a_s, a_t)`` averaged over the
      ``B x B x B`` entries (computed with batched matrix products on the unit difference vectors).

    Loss ``distance_weight * distance + angle_weight * angle``; Huber is smooth L1 with beta 1. A batch of
    one has no pair: the loss is 0 with a zero gradient.

    Args:
        student: ``(B, ...)`` student features (flattened per sample).
        teacher: ``(B, ...)`` teacher features (flattened per sample); the dimension may differ.
        distance_weight: factor of the distance term (reference 25).
        angle_weight: factor of the angle term (reference 50).

    Example:
        >>> import torch
        >>> e = torch.randn(4, 8)
        >>> float(rkd_loss(e, 3 * e)) < 1e-6  # both terms are invariant to scale
        True
    """
    check_batch(student, teacher)
    with torch.autocast(student.device.type, enabled=False):  # the angles' matrix products stay in fp32
        s = flatten_samples(student)
        t = flatten_samples(teacher)
        diff_s, diff_t = _differences(s), _differences(t)
        loss = s.new_zeros(())
        if distance_weight:
            loss = loss + distance_weight * F.smooth_l1_loss(
                _normalized_distances(diff_s), _normalized_distances(diff_t), beta=1.0
            )
        if angle_weight:
            loss = loss + angle_weight * F.smooth_l1_loss(_angles(diff_s), _angles(diff_t), beta=1.0)
    return loss
