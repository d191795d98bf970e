"""DIST: Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.functional._utils import as_float
from lightning_kd.functional.kd import check_logits

#: added to the product of the two norms of a Pearson correlation (the reference value)
PEARSON_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(N, D), (N, D) -> (N,)``.

    ``<a - mean(a), b - mean(b)> / (||a - mean(a)|| * ||b - mean(b)|| + eps)``. A constant row gives 0, with a
    finite gradient (the norm's gradient at 0 is taken as 0).
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return (a * b).sum(dim=1) / (norms + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """DIST: match the correlations of the class probabilities, within each sample and within each class.

    With ``Y = softmax(z / tau)`` (B x C) on each side and ``rho`` the Pearson correlation
    (:func:`pearson_rows`, eps 1e-8 added to the product of the norms as in the reference code):

    - ``inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (across the classes of each sample);
    - ``intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])`` (across the batch, for each class);
    - ``L = tau^2 * (beta * inter + gamma * intra)``.

    The ``tau^2`` factor is in the official code (which the published numbers come from) but not in the
    paper's pseudocode. ``intra`` compares the samples of the batch with each other: with a batch of one (or a
    class whose probability is constant over the batch) its centred vectors are 0, ``rho = 0``, and it adds a
    constant with no gradient.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        beta: factor of the inter-class term (reference 1).
        gamma: factor of the intra-class term (reference 1).
        temperature: ``tau`` (reference: 4 on CIFAR-100, 1 on ImageNet).

    Returns:
        The scalar loss (fp32, or fp64 for fp64 input).
    """
    check_logits(student_logits, teacher_logits, "DIST")
    y_s = torch.softmax(as_float(student_logits) / temperature, dim=1)
    y_t = torch.softmax(as_float(teacher_logits) / temperature, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)
