"""CC: Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (the CRD benchmark's version)."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.functional._utils import check_batch, flatten_samples


def cc_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Correlation congruence as the CRD benchmark computes it.

    With ``d = |e_s - e_t|`` of shape ``(B, k)`` (both embeddings already projected to the same ``k``, e.g.
    by the :class:`~lightning_kd.distillers.CC` distiller's linear embeddings), the loss is the mean over
    adjacent rows of ``sum_k d[i, k] * d[i + 1, k]``, ``i = 0 .. B - 2``.

    This is a relational loss: it depends on the order of the samples in the batch it is given. A batch of
    one has no adjacent pair: the loss is then 0 (with zero gradients), not NaN.

    Args:
        student_embedding: ``(B, k)`` projected student embedding.
        teacher_embedding: ``(B, k)`` projected teacher embedding.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> float(cc_loss(e, torch.zeros(2, 2)))  # 1*3 + 2*4
        11.0
    """
    check_batch(student_embedding, teacher_embedding)
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(
            f"cc_loss needs embeddings of the same shape, got student {tuple(student_embedding.shape)} and teacher "
            f"{tuple(teacher_embedding.shape)}: project both sides to the same size first (the CC distiller does)"
        )
    distance = (flatten_samples(student_embedding) - flatten_samples(teacher_embedding)).abs()
    if distance.shape[0] < 2:
        return distance.sum() * 0.0
    return (distance[:-1] * distance[1:]).sum(dim=1).mean()
