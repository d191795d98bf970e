"""CRD: Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation".

The pieces of CRD's objective as pure functions; :class:`lightning_kd.distillers.CRD` owns the embeddings,
the two memory banks and the normalising constants, and puts them together:

1. :func:`contrast_scores`: ``x[b, k] = exp(<v_b, M[c_bk]> / T)`` for an anchor embedding ``v_b`` and the
   memory rows at the sample's contrast indices (column 0 the positive, then K negatives);
2. dividing by ``Z`` (estimated once: mean score x N) and :func:`contrast_loss`, the NCE loss with noise
   probability ``1 / N``;
3. :func:`momentum_update`: the memory rows after a step, ``normalize(m * M[i] + (1 - m) * v)``.

:func:`crd_batch_loss` is the in-batch alternative (no memory bank): a symmetric InfoNCE over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, safe_normalize

#: logits ``<v, m> / T`` are clamped to at most this value, so ``exp`` and ``Z = mean x N`` stay finite in
#: fp32 whatever the inputs (for unit vectors and T = 0.07 the logits never exceed 1 / 0.07 ~ 14.3)
MAX_LOGIT = 50.0


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def contrast_scores(anchor: Tensor, memory: Tensor, contrast_index: Tensor, temperature: float = 0.07) -> Tensor:
    """Unnormalised CRD scores of each anchor against its positive and negative memory rows.

    ``x[b, k] = exp(min(<anchor_b, memory[contrast_index[b, k]]>, ...) / T)`` in fp32 (autocast is turned
    off: the scores overflow fp16). Differentiable in ``anchor``; ``memory`` is read, never differentiated.

    Two equal ways to compute it; the cheaper is chosen: gathering the rows ``(B, K + 1, D)`` when
    ``B (K + 1) < N``, else one product with the whole bank ``(B, N)`` followed by a gather (for CIFAR-100,
    B = 64 and K = 16384, that is 13 MB instead of 537 MB). The result never aliases ``memory``, so the caller
    may update the bank in place afterwards.

    Args:
        anchor: ``(B, D)`` embeddings (L2-normalised in CRD).
        memory: ``(N, D)`` memory bank of the other side's embeddings.
        contrast_index: ``(B, K + 1)`` row indices into ``memory`` (column 0 the positive).
        temperature: ``T`` (reference 0.07).

    Returns:
        ``(B, K + 1)`` positive scores.
    """
    if anchor.dim() != 2 or memory.dim() != 2 or anchor.shape[1] != memory.shape[1]:
        raise ValueError(
            f"expected anchor (B, D) and memory (N, D) of the same D, "
            f"got {tuple(anchor.shape)} and {tuple(memory.shape)}"
        )
    if contrast_index.dim() != 2 or contrast_index.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"contrast_index must be (B, K + 1) with B = {anchor.shape[0]}, got shape {tuple(contrast_index.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with _no_autocast(anchor):
        v = as_float(anchor)
        bank = memory.detach().to(v.dtype)
        index = contrast_index.long()
        batch, columns = index.shape
        if batch * columns < bank.shape[0]:
            rows = bank[index]  # (B, K + 1, D), a copy
            logits = torch.bmm(rows, v.unsqueeze(2)).squeeze(2)
        else:
            if bank.data_ptr() == memory.data_ptr():
                bank = bank.clone()  # autograd keeps it for the backward, and the caller may update memory
            logits = (v @ bank.t()).gather(1, index)
        return torch.exp(logits.div(temperature).clamp(max=MAX_LOGIT))


def contrast_loss(x: Tensor, n_data: int) -> Tensor:
    """CRD's NCE loss for scores whose column 0 is the positive and columns 1..K the negatives.

    With noise probability ``1 / N`` and ``K`` negatives, the probability that a pair came from the data:
    ``P_pos = x_0 / (x_0 + K / N)`` for the positive and ``P_neg = (K / N) / (x_k + K / N)`` for "not from
    the data" at each negative; the loss is the negative log-likelihood averaged over the batch::

        loss = -(sum_b log P_pos[b] + sum_b sum_k log P_neg[b, k]) / B

    Computed in fp32 as ``softplus`` of log-ratios (``-log P_pos = softplus(log(K/N) - log x_0)``), so it is
    finite for any finite non-negative ``x`` (zeros are clamped to the smallest positive float).

    Args:
        x: ``(B, K + 1)`` non-negative scores, already divided by the normalising constant ``Z``.
        n_data: ``N``, the size of the memory bank (the training set).

    Example:
        >>> x = torch.tensor([[1.0, 1.0, 1.0]])  # positive and two negatives scored alike, N = 2: K/N = 1
        >>> round(float(contrast_loss(x, 2)), 4)  # -(log 1/2 + 2 log 1/2) = 3 log 2
        2.0794
    """
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"expected scores (B, K + 1) with K >= 1 negatives, got shape {tuple(x.shape)}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    with _no_autocast(x):
        x = as_float(x)
        log_x = x.clamp_min(torch.finfo(x.dtype).tiny).log()
        log_noise = torch.log(torch.tensor((x.shape[1] - 1) / n_data, dtype=x.dtype, device=x.device))
        positive = F.softplus(log_noise - log_x[:, 0]).sum()  # -log P_pos
        negative = F.softplus(log_x[:, 1:] - log_noise).sum()  # -log P_neg
        return (positive + negative) / x.shape[0]


def momentum_update(rows: Tensor, embeddings: Tensor, momentum: float = 0.5) -> Tensor:
    """New memory rows after a step: ``normalize(momentum * rows + (1 - momentum) * embeddings)``.

    Args:
        rows: ``(n, D)`` current memory rows of the samples.
        embeddings: ``(n, D)`` the samples' new embeddings (detached by the caller).
        momentum: weight of the old row (reference 0.5).

    Returns:
        ``(n, D)`` unit rows (an all-zero sum stays zero instead of NaN).
    """
    if rows.shape != embeddings.shape:
        raise ValueError(f"memory rows {tuple(rows.shape)} and embeddings {tuple(embeddings.shape)} differ in shape")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    with _no_autocast(rows):
        mixed = momentum * as_float(rows) + (1 - momentum) * as_float(embeddings)
        return safe_normalize(mixed, dim=1)


def crd_batch_loss(
    student: Tensor, teacher: Tensor, temperature: float = 0.07, labels: Tensor | None = None
) -> Tensor:
    """CRD with in-batch negatives: a symmetric InfoNCE, no memory bank (not the reference's NCE).

    With ``s_ij = <student_i, teacher_j> / T`` (B x B), each sample's positive is its own pair ``(i, i)``
    and its negatives the other samples of the batch; the loss is the softmax cross-entropy in both
    directions, averaged over the batch::

        loss = mean_i [-log softmax_j(s_ij)_i] + mean_j [-log softmax_i(s_ij)_j]

    With ``labels``, pairs of distinct samples of the same class are left out of the negatives (as the
    memory variant draws negatives from other classes only). At batch size 1 the loss is 0.

    Args:
        student: ``(B, D)`` student embeddings (L2-normalised in CRD).
        teacher: ``(B, D)`` teacher embeddings.
        temperature: ``T`` (reference 0.07).
        labels: optional ``(B,)`` classes.
    """
    check_batch(student, teacher)
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"expected two (B, D) embeddings of the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with _no_autocast(student):
        s, t = as_float(student), as_float(teacher).to(as_float(student).dtype)
        logits = s @ t.t() / temperature
        if labels is not None:
            same = labels.reshape(-1, 1) == labels.reshape(1, -1)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(s.shape[0], device=s.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
