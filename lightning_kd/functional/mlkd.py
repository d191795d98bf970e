"""MLKD: Jin et al. 2023, "Multi-Level Logit Distillation" (CVPR)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.functional._utils import as_float
from lightning_kd.functional.kd import check_logits, standardize_logits

#: the temperatures the official code adds, hard-coded, after the configured one: the set is (T0, 3, 5, 2, 6)
MLKD_EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(p^T(z_t) || p^T(z_s))`` per sample, ``(B,)``."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2


def confidence_masks(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """MLKD's confidence masks, from the teacher's weak-view logits (softmax at temperature 1).

    ``sample_mask_i = [max_c p_ic <= median_i(max_c p_ic)]`` (the less confident half of the batch) and
    ``class_mask_c = [sum_i p_ic <= median_c(sum_i p_ic)]``. Medians are ``torch.quantile(0.5,
    interpolation="linear")``, numpy's default percentile, on the device: no host synchronisation.

    Args:
        teacher_logits: ``(B, C)`` teacher logits.

    Returns:
        ``(sample_mask (B,), class_mask (C,))`` of 0.0 / 1.0 in fp32 (fp64 for fp64 input), no gradient.

    Example:
        >>> import torch
        >>> sample, cls = confidence_masks(torch.tensor([[4.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        >>> sample.tolist(), cls.tolist()
        ([0.0, 1.0, 1.0], [0.0, 1.0])
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"confidence_masks needs (B, C) logits, got shape {tuple(teacher_logits.shape)}")
    p = F.softmax(as_float(teacher_logits).detach(), dim=1)
    confidence = p.max(dim=1).values
    class_confidence = p.sum(dim=0)
    sample_mask = confidence <= torch.quantile(confidence, 0.5, interpolation="linear")
    class_mask = class_confidence <= torch.quantile(class_confidence, 0.5, interpolation="linear")
    return sample_mask.to(p.dtype), class_mask.to(p.dtype)


def batch_correlation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, sample_weights: Tensor | None = None
) -> Tensor:
    """MLKD's batch-level term: ``||P_s P_s^T - P_t P_t^T||_F^2 / B``, ``P = softmax(z / T)`` row-wise.

    No ``T^2`` factor (as in the official code). ``sample_weights`` (``(B,)``, optional) weight the rows of the
    squared difference of the ``B x B`` Gram matrices (a per-sample selection; the normaliser stays ``B``).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        temperature: the softening temperature.
        sample_weights: optional ``(B,)`` row weights.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 10)
        >>> float(batch_correlation_loss(z, z))
        0.0
    """
    check_logits(student_logits, teacher_logits, "batch_correlation_loss")
    _check_temperature(temperature)
    with torch.autocast(student_logits.device.type, enabled=False):  # the Gram matrices in fp32
        p_s = F.softmax(as_float(student_logits) / temperature, dim=1)
        p_t = F.softmax(as_float(teacher_logits) / temperature, dim=1)
        diff = (p_s @ p_s.T - p_t @ p_t.T).pow(2)
    if sample_weights is not None:
        diff = diff * as_float(sample_weights).to(diff.dtype).view(-1, 1)
    return diff.sum() / p_s.shape[0]


def class_correlation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, class_weights: Tensor | None = None
) -> Tensor:
    """MLKD's class-level term: ``||P_s^T P_s - P_t^T P_t||_F^2 / C``, ``P = softmax(z / T)`` row-wise.

    No ``T^2`` factor (as in the official code). ``class_weights`` (``(C,)``, optional) weight the rows of the
    squared difference of the ``C x C`` class-correlation matrices (the normaliser stays ``C``).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        temperature: the softening temperature.
        class_weights: optional ``(C,)`` row weights.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 10)
        >>> float(class_correlation_loss(z, z))
        0.0
    """
    check_logits(student_logits, teacher_logits, "class_correlation_loss")
    _check_temperature(temperature)
    with torch.autocast(student_logits.device.type, enabled=False):  # the correlation matrices in fp32
        p_s = F.softmax(as_float(student_logits) / temperature, dim=1)
        p_t = F.softmax(as_float(teacher_logits) / temperature, dim=1)
        diff = (p_s.T @ p_s - p_t.T @ p_t).pow(2)
    if class_weights is not None:
        diff = diff * as_float(class_weights).to(diff.dtype).view(-1, 1)
    return diff.sum() / p_s.shape[1]


def mlkd_loss(
    student_weak: Tensor,
    teacher_weak: Tensor,
    student_strong: Tensor,
    teacher_strong: Tensor,
    temperature: float = 4.0,
    mask: Literal["scalar", "per_sample"] = "scalar",
    standardize: bool = False,
) -> Tensor:
    """Every KD, class- and batch-correlation term of MLKD, as the official code sums them (without ``w_kd``).

    With ``T_set = (T0, 3, 5, 2, 6)``, ``KD_T`` = ``T^2 KL`` batchmean, ``CC_T``/``BC_T`` =
    :func:`class_correlation_loss` / :func:`batch_correlation_loss`, masks from :func:`confidence_masks` on
    the teacher's weak logits, ``m = mean(sample_mask)``, ``k = mean(class_mask)``:

    ``L = sum_T m KD_T(w) + [KD_T0(s) + KD_3(s) + KD_5(s) + KD_2(w) + KD_6(w)] + sum_T k CC_T(w)
    + sum_T m BC_T(w)``.

    The official code's quirks are kept: its masks multiply losses already reduced to scalars, so they act as
    the scalar factors ``m`` and ``k`` (``mask="scalar"``); the last two terms of the "strong" sum read the
    weak view; the strong-view CC and BC sums are computed there but never added, so they are absent here.

    ``mask="per_sample"`` is a departure (the per-sample selection the masks suggest): each weak KD term is
    ``mean_i(sample_mask_i KD_T,i)``, CC keeps the rows of the masked classes and BC the rows of the masked
    samples (normalisers unchanged, so an all-ones mask gives the unmasked loss). ``standardize=True`` applies
    logit standardisation (Sun et al. 2024, ``(z - mean) / (std + 1e-7)``, Bessel-corrected) to both sides in
    the KD terms only, as the logit-standardisation code does for MLKD; masks, CC and BC read the raw logits.

    Args:
        student_weak: ``(B, C)`` student logits on the weak view.
        teacher_weak: ``(B, C)`` teacher logits on the weak view.
        student_strong: ``(B, C)`` student logits on the strong view.
        teacher_strong: ``(B, C)`` teacher logits on the strong view.
        temperature: ``T0``, the first temperature of the set (official CIFAR: 4; with standardisation: 2).
        mask: ``"scalar"`` (official) or ``"per_sample"`` (departure).
        standardize: logit standardisation in the KD terms.

    Returns:
        A scalar fp32 tensor.
    """
    check_logits(student_weak, teacher_weak, "mlkd_loss (weak view)")
    check_logits(student_strong, teacher_strong, "mlkd_loss (strong view)")
    if student_strong.shape != student_weak.shape:
        raise ValueError(
            f"mlkd_loss needs the weak and strong views' logits to have the same shape, got {tuple(student_weak.shape)}"
            f" and {tuple(student_strong.shape)}"
        )
    if mask not in ("scalar", "per_sample"):
        raise ValueError(f"mlkd_loss mask must be 'scalar' or 'per_sample', got {mask!r}")
    _check_temperature(temperature)
    temperatures = (float(temperature), *MLKD_EXTRA_TEMPERATURES)
    s_w, t_w, s_s, t_s = (as_float(z) for z in (student_weak, teacher_weak, student_strong, teacher_strong))
    sample_mask, class_mask = confidence_masks(t_w)
    kd_inputs = (s_w, t_w, s_s, t_s)
    if standardize:
        kd_inputs = tuple(standardize_logits(z) for z in kd_inputs)
    kd_s_w, kd_t_w, kd_s_s, kd_t_s = kd_inputs
    scalar = mask == "scalar"
    m, k = sample_mask.mean(), class_mask.mean()

    total = s_w.new_zeros(())
    for t in temperatures:
        per_sample = _kd_per_sample(kd_s_w, kd_t_w, t)
        total = total + (m * per_sample.mean() if scalar else (sample_mask * per_sample).mean())
    # the "strong" sum: T0, 3, 5 on the strong view, then 2 and 6 on the weak view (as written officially)
    for t in temperatures[:3]:
        total = total + _kd_per_sample(kd_s_s, kd_t_s, t).mean()
    for t in temperatures[3:]:
        total = total + _kd_per_sample(kd_s_w, kd_t_w, t).mean()
    for t in temperatures:
        if scalar:
            total = total + k * class_correlation_loss(s_w, t_w, t) + m * batch_correlation_loss(s_w, t_w, t)
        else:
            total = total + class_correlation_loss(s_w, t_w, t, class_weights=class_mask)
            total = total + batch_correlation_loss(s_w, t_w, t, sample_weights=sample_mask)
    return total
