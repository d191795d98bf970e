"""AT: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.functional._utils import as_float, check_batch, pool_to_smaller, safe_normalize


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """The spatial attention map of AT: ``normalize(mean_c |f|^p)`` flattened per sample.

    Args:
        feature: ``(B, C, H, W)`` feature map.
        p: the exponent (reference: 2).

    Returns:
        ``(B, H * W)`` fp32, each row of unit L2 norm (an all-zero map stays zero).
    """
    if feature.dim() != 4:
        raise ValueError(f"attention_map expects a (B, C, H, W) feature map, got shape {tuple(feature.shape)}")
    return safe_normalize(as_float(feature).abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer for one pair of feature maps.

    ``a(f) = normalize(mean_c |f|^p)`` flattened per sample; loss ``mean((a(f_s) - a(f_t))^2)`` averaged over
    the batch and the ``H * W`` positions. The spatially larger map is first adaptive-average-pooled to the
    smaller size (height and width separately). The channel counts may differ.

    Args:
        student: ``(B, C_s, H_s, W_s)`` student map.
        teacher: ``(B, C_t, H_t, W_t)`` teacher map.
        p: the exponent of the activations (reference: 2); must be at least 1, so that the gradient stays
            finite where an activation is zero.

    Returns:
        A scalar fp32 tensor.

    Example:
        >>> import torch
        >>> f = torch.rand(2, 8, 4, 4)
        >>> float(at_loss(f, 3 * f.repeat(1, 2, 1, 1))) < 1e-12  # blind to the scale; channel counts may differ
        True
    """
    if p < 1:
        raise ValueError(f"at_loss needs p >= 1 (gradients are infinite at zero activations otherwise), got p={p}")
    check_batch(student, teacher)
    student, teacher = pool_to_smaller(as_float(student), as_float(teacher))
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()
