"""ReviewKD: Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import hcl_loss

TEACHER_BN_MODES = ("eval", "train")


class ABF(nn.Module):
    """Attention-based fusion, one per ReviewKD level (learnable, training-only).

    ``x' = BN(conv1x1(x))`` to ``mid_channels``; on every level but the deepest, the residual ``y`` from the
    deeper level is nearest-resized to ``x'``'s size, ``[a1, a2] = sigmoid(conv1x1_{2M -> 2}(concat(x', y)))``
    (with bias) and ``x' = a1 x' + a2 y``. ``x'`` is nearest-resized to the teacher's size if it differs; the
    output is ``BN(conv3x3(x'))`` with the teacher's channel count, and ``x'`` is handed on as the next
    (shallower) level's residual. Both convs without bias start from ``kaiming_uniform_(a=1)``.

    Args:
        in_channels: the student level's channels.
        mid_channels: the width ``M`` of the fused features (shared by every level).
        out_channels: the teacher level's channels.
        fuse: whether this level fuses a residual from a deeper level (all but the deepest).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.expand = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, out_size: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x``: ``(B, C_in, H, W)``; ``residual``: ``(B, M, h, w)`` from the deeper level (fusing levels only);
        ``out_size``: the teacher's ``(H_t, W_t)``. Returns ``(output (B, C_out, H_t, W_t), x' (B, M, H_t, W_t))``.
        """
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("this ABF fuses a deeper level: pass the residual of the level below it")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            gates = self.attention(torch.cat([x, residual], dim=1))
            x = x * gates[:, 0:1] + residual * gates[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.expand(x), x


def as_map(feature: Tensor) -> Tensor:
    """A ``(B, C)`` embedding as a ``(B, C, 1, 1)`` map; ``(B, C, H, W)`` maps unchanged."""
    if feature.dim() == 2:
        return feature[:, :, None, None]
    if feature.dim() != 4:
        raise ValueError(f"ReviewKD reads (B, C, H, W) maps or (B, C) embeddings, got shape {tuple(feature.shape)}")
    return feature


class ReviewKD(Distiller):
    """Knowledge review: the student's levels, fused deepest first by :class:`ABF` modules, each matched to the
    teacher's level of the same depth with the hierarchical context loss (:func:`~lightning_kd.functional.hcl_loss`).

    ``L = CE + weight * min(e / W, 1) * HCL``. Levels (official CIFAR code, mdistiller): the student's stage
    outputs and its pooled embedding as a 1x1 map (``("stages", "embedding")``); the teacher's *pre-activation*
    stage outputs and its embedding (``("preacts", "embedding")``); the stem is not used. Layers are listed
    shallow to deep; the last one (the embedding) is the deepest and is fused first. The fusion width is
    ``M = min(max_mid_channels, C_s of the deepest level)``. On the bundled models these defaults reproduce the
    official channel and size lists (e.g. resnet8x4: in 64, 128, 256, 256 at 32, 16, 8, 1).

    Reference (CIFAR-100, res32x4 -> res8x4): ``weight=5``, ``warmup_epochs=20``, ``task_loss_weight=1``;
    per pair: 8 for ShuffleV2, 0.6 for resnet56 -> resnet20, 1.0 for resnet110 -> resnet32. ImageNet: weight 1,
    no warm-up. The fusion modules are training-only: they live in the distiller, not in the student.

    Warm-up: ``e`` counts epochs from 1 as mdistiller does (``min((epoch + 1) / W, 1)`` with the 0-based
    ``epoch``). ``warmup_from_zero=True`` is the original CIFAR script's count (``min(epoch / W, 1)``: the first
    epoch gets weight 0), a departure from mdistiller.

    Args:
        weight: factor of the HCL loss.
        warmup_epochs: the warm-up length ``W`` (0: none).
        warmup_from_zero: count the warm-up from 0 (the original CIFAR script) instead of 1 (mdistiller).
        max_mid_channels: the cap on the fusion width ``M`` (512 in both official codes).
        teacher_bn: ``"eval"`` (default; mdistiller and the official ImageNet code) or ``"train"``: the
            teacher's BatchNorm in train mode during distillation, as the original CIFAR script leaves it by
            omission; it changes the teacher's running statistics. Read by the module as ``teacher_bn_mode``.
        student_layers, teacher_layers, name: see :class:`Distiller`.
    """

    default_student_layers = ("stages", "embedding")
    default_teacher_layers = ("preacts", "embedding")

    def __init__(
        self,
        weight: float = 5.0,
        warmup_epochs: int = 20,
        warmup_from_zero: bool = False,
        max_mid_channels: int = 512,
        teacher_bn: str = "eval",
        **kwargs,
    ) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"ReviewKD warmup_epochs must be >= 0 (0: no warm-up), got {warmup_epochs}")
        if max_mid_channels < 1:
            raise ValueError(f"ReviewKD max_mid_channels must be >= 1, got {max_mid_channels}")
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"ReviewKD teacher_bn must be 'eval' or 'train', got {teacher_bn!r}")
        super().__init__(weight=weight, **kwargs)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_from_zero = bool(warmup_from_zero)
        self.max_mid_channels = int(max_mid_channels)
        self.teacher_bn_mode = teacher_bn
        self.fusions = nn.ModuleList()

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        pairs = list(zip(self.student_layers, self.teacher_layers, student_features, teacher_features))
        for s_name, t_name, s, t in pairs:
            if s.dim() not in (2, 4) or t.dim() not in (2, 4):
                raise ValueError(
                    f"ReviewKD reads (B, C, H, W) maps or (B, C) embeddings, got student {s_name!r} "
                    f"{tuple(s.shape)} and teacher {t_name!r} {tuple(t.shape)}: choose stage outputs or embeddings"
                )
        mid = min(self.max_mid_channels, int(student_features[-1].shape[1]))
        last = len(student_features) - 1
        self.fusions = nn.ModuleList(
            ABF(int(s.shape[1]), mid, int(t.shape[1]), fuse=index < last)
            for index, (s, t) in enumerate(zip(student_features, teacher_features))
        )

    def warmup_factor(self) -> float:
        """``min(e / W, 1)`` for the current epoch (1 when ``warmup_epochs`` is 0)."""
        if not self.warmup_epochs:
            return 1.0
        count = self.epoch if self.warmup_from_zero else self.epoch + 1
        return min(count / self.warmup_epochs, 1.0)

    def fuse(self, student_features: list[Tensor], teacher_sizes: list[Sequence[int]]) -> list[Tensor]:
        """The ABF outputs, shallow to deep (the deepest level is computed first and feeds the next)."""
        if len(self.fusions) != len(student_features):
            raise RuntimeError(
                f"ReviewKD has {len(self.fusions)} fusion modules for {len(student_features)} levels: "
                "build() runs from the DistillationModule's probe forward before training"
            )
        outputs: list[Tensor] = [None] * len(student_features)  # type: ignore[list-item]
        residual = None
        for index in reversed(range(len(student_features))):
            outputs[index], residual = self.fusions[index](
                as_map(student_features[index]), residual, teacher_sizes[index]
            )
        return outputs

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        teacher_maps = [as_map(t) for t in teacher_features]
        outputs = self.fuse(student_features, [tuple(t.shape[-2:]) for t in teacher_maps])
        return self.warmup_factor() * hcl_loss(outputs, teacher_maps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", warmup_epochs={self.warmup_epochs}, warmup_from_zero={self.warmup_from_zero}, "
            f"teacher_bn={self.teacher_bn_mode!r}"
        )
