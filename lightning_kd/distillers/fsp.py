"""FSP: Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning"."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import fsp_loss


class FSP(Distiller):
    """Flow-of-solution-procedure matching: ``sum_i mean((G_i^s - G_i^t)^2)`` over consecutive maps.

    ``G_i[b] = f_{i+1}[b] f_i[b]^T / (H W)`` (see :func:`~lightning_kd.functional.fsp_loss`). Both networks
    need the same channel count at every layer index; :meth:`build` checks it.

    Reference (CRD benchmark, CIFAR-100): the stem output and the three stage outputs; the loss trains the
    student's feature layers (not its classifier) alone in an initialisation stage of 30 epochs, then the
    main stage is plain cross-entropy (set ``trainer.max_epochs`` to 30 + 240).

    Args:
        stage_epochs: length of the initialisation stage (reference: 30).
        in_main: also add ``weight * FSP`` to the main stage's objective (the reference does not).
        weight: factor of the loss in the main stage, used only with ``in_main=True``.
        student_layers, teacher_layers, name: see :class:`Distiller` (default layers ``stem`` and
            ``"stages"``, i.e. stem, stage1..stage3 of the CIFAR ResNets, on both sides).
    """

    default_student_layers = ("stem", "stages")

    def __init__(self, stage_epochs: int = 30, in_main: bool = False, weight: float = 1.0, **kwargs) -> None:
        super().__init__(weight=weight, stage_epochs=stage_epochs, **kwargs)
        if len(self.student_layers) < 2:
            raise ValueError(f"FSP needs at least two consecutive layers per side, got {self.student_layers}")
        if not stage_epochs and not in_main:
            raise ValueError(
                "FSP with stage_epochs=0 and in_main=False would train nothing: give stage_epochs > 0 (the reference "
                "uses 30) or in_main=True"
            )
        self.active_in_main = bool(in_main)

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        layers = zip(self.student_layers, self.teacher_layers, student_features, teacher_features)
        for index, (s_layer, t_layer, s, t) in enumerate(layers):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"FSP needs (B, C, H, W) maps; at index {index} student layer {s_layer!r} has shape "
                    f"{tuple(s.shape)} and teacher layer {t_layer!r} {tuple(t.shape)}"
                )
            if s.shape[1] != t.shape[1]:
                raise ValueError(
                    f"FSP needs equal channel counts at every layer index; at index {index} student layer "
                    f"{s_layer!r} has {s.shape[1]} channels and teacher layer {t_layer!r} has {t.shape[1]}: "
                    "choose layers with matching channels (FSP suits pairs of the same family and width)"
                )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return fsp_loss(student_features, teacher_features)

    def stage_loss(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return fsp_loss(student_features, teacher_features)
