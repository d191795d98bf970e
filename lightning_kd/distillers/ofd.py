"""OFD: Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import ofd_loss, ofd_margin
from lightning_kd.taps import expand_taps

TEACHER_BN_MODES = ("eval", "train")


def ofd_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """OFD's connector: conv1x1 (no bias) + BN to the teacher's channels; conv ``N(0, sqrt(2 / C_t))``
    (``2 / (k * k * C_out)`` with ``k = 1``), BN weight 1 and bias 0, as in both official codes."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    norm = nn.BatchNorm2d(teacher_channels)
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    return nn.Sequential(conv, norm)


class OFD(Distiller):
    """Overhaul of feature distillation: the partial L2 loss (:func:`~lightning_kd.functional.ofd_loss`)
    between each student pre-ReLU map, through a learnable connector, and the teacher's pre-ReLU map, whose
    inactive responses are raised to a per-channel margin.

    ``L = CE + weight * sum_i ofd_loss(connector_i(s_i), t_i, margin_i) / 2^(n-1-i)`` (stage weights 1/4, 1/2, 1
    for three stages; the loss is a sum over channels and positions divided by the batch size). Layers: the
    pre-ReLU output of every stage on both sides (tap group ``"preacts"``); the teacher map is
    adaptive-average-pooled to the connector output's size when they differ (mdistiller).

    Margins (:func:`~lightning_kd.functional.ofd_margin`) come from the teacher's BatchNorm just before each
    stage's final ReLU. :meth:`attach` computes them, once the teacher's weights are loaded, and stores them as
    buffers ``margin1 .. marginN``, saved in checkpoints. The BatchNorm of teacher tap ``"preactN"`` is found
    through the teacher's ``feature_paths["preactN_norm"]``, or given explicitly as module paths in
    ``teacher_norms``. There is no estimate from features: a teacher layer without either raises a clear error
    in :meth:`attach` (the probe runs on zeros, which says nothing about the response distribution).

    Reference (CIFAR-100, CRD pairs as run by mdistiller; same normalisation in the official CIFAR code):
    ``weight=1e-3`` with ``task_loss_weight=1``; ImageNet ``1e-4``.

    Args:
        weight: factor of the summed stage losses.
        teacher_bn: ``"eval"`` (default, the library's frozen teacher) or ``"train"``: the teacher's BatchNorm in
            train mode during distillation, the choice of both official codes (paper Table 8). ``"train"``
            changes the teacher's running statistics as it distils, so the teacher evaluates differently
            afterwards (and a checkpoint stores the drifted statistics). Read by the module as
            ``teacher_bn_mode``.
        teacher_norms: module paths, in the teacher, of the BatchNorm before each teacher layer's ReLU (one per
            teacher layer); ``None`` looks them up in the teacher's ``feature_paths["<tap>_norm"]``.
        student_layers, teacher_layers, name: see :class:`Distiller`.
    """

    default_student_layers = ("preacts",)

    def __init__(
        self,
        weight: float = 1e-3,
        teacher_bn: str = "eval",
        teacher_norms: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        if teacher_bn not in TEACHER_BN_MODES:
            raise ValueError(f"OFD teacher_bn must be 'eval' or 'train', got {teacher_bn!r}")
        super().__init__(weight=weight, **kwargs)
        self.teacher_bn_mode = teacher_bn
        self.teacher_norms = list(teacher_norms) if teacher_norms is not None else None
        self.num_margins = 0
        self.connectors = nn.ModuleList()

    # --- margins ------------------------------------------------------------------------------------------
    def norm_paths(self, teacher: nn.Module) -> list[str]:
        """The module path of the BatchNorm before the ReLU of each teacher layer."""
        layers = expand_taps(teacher, self.teacher_layers)
        if self.teacher_norms is not None:
            if len(self.teacher_norms) != len(layers):
                raise ValueError(
                    f"OFD teacher_norms names {len(self.teacher_norms)} BatchNorms for {len(layers)} teacher layers "
                    f"{layers}: give one per layer"
                )
            return list(self.teacher_norms)
        feature_paths = getattr(teacher, "feature_paths", {}) or {}
        paths = []
        for tap in layers:
            path = feature_paths.get(f"{tap}_norm")
            if path is None:
                raise ValueError(
                    f"OFD computes the margins of teacher layer {tap!r} from the BatchNorm before its ReLU, but "
                    f"{type(teacher).__name__}.feature_paths has no {tap + '_norm'!r} entry: add it, or pass "
                    "OFD(teacher_norms=[...]) with the module paths of those BatchNorms (e.g. 'layer3.4.bn2' for "
                    "the last block of a CIFAR ResNet's third stage)"
                )
            paths.append(path)
        return paths

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Compute the margins from the teacher's BatchNorm weights (call after they are loaded)."""
        if teacher is None:
            raise ValueError("OFD needs a teacher: its margins come from the teacher's BatchNorm layers")
        modules = dict(teacher.named_modules())
        margins = []
        for path in self.norm_paths(teacher):
            norm = modules.get(path)
            if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.weight is None:
                raise ValueError(
                    f"OFD margins need an affine BatchNorm at {path!r} in {type(teacher).__name__}, found "
                    f"{type(norm).__name__ if norm is not None else 'no module'}"
                )
            margins.append(ofd_margin(norm.weight.detach(), norm.bias.detach()).float())
        for index in range(len(margins), self.num_margins):  # fewer layers than before: drop the extra buffers
            delattr(self, f"margin{index + 1}")
        for index, margin in enumerate(margins):
            self.register_buffer(f"margin{index + 1}", margin)
        self.num_margins = len(margins)

    def margins(self) -> list[Tensor]:
        """The per-channel margins of the teacher layers, ``(C_t,)`` each."""
        return [getattr(self, f"margin{index + 1}") for index in range(self.num_margins)]

    # --- connectors and loss ------------------------------------------------------------------------------
    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        if self.num_margins != len(teacher_features):
            raise RuntimeError(
                f"OFD has {self.num_margins} margin vectors for {len(teacher_features)} teacher layers: attach() "
                "computes them from the teacher before build() (the DistillationModule calls both)"
            )
        for s_name, t_name, s, t, margin in zip(
            self.student_layers, self.teacher_layers, student_features, teacher_features, self.margins()
        ):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"OFD needs (B, C, H, W) pre-ReLU maps, got student {s_name!r} {tuple(s.shape)} and teacher "
                    f"{t_name!r} {tuple(t.shape)}"
                )
            if margin.shape[0] != t.shape[1]:
                raise ValueError(
                    f"OFD: the BatchNorm of teacher layer {t_name!r} has {margin.shape[0]} channels but the layer "
                    f"has {t.shape[1]}: teacher_norms / feature_paths name the wrong BatchNorm"
                )
        self.connectors = nn.ModuleList(
            ofd_connector(int(s.shape[1]), int(t.shape[1])) for s, t in zip(student_features, teacher_features)
        )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        if len(self.connectors) != len(student_features):
            raise RuntimeError("OFD.build() has not run: the DistillationModule builds it from a probe forward")
        count = len(student_features)
        total = None
        for index, (connector, s, t, margin) in enumerate(
            zip(self.connectors, student_features, teacher_features, self.margins())
        ):
            s = connector(s)
            if tuple(t.shape[-2:]) != tuple(s.shape[-2:]):
                t = F.adaptive_avg_pool2d(t, tuple(s.shape[-2:]))
            loss = ofd_loss(s, t, margin) / 2 ** (count - 1 - index)
            total = loss if total is None else total + loss
        return total

    def extra_repr(self) -> str:
        return super().extra_repr() + f", teacher_bn={self.teacher_bn_mode!r}"
