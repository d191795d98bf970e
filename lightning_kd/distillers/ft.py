"""FT: Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.connectors import Paraphraser, Translator
from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import as_float, ft_loss
from lightning_kd.stages import MAIN


class FT(Distiller):
    """Factor transfer: the student's translated factor imitates the teacher's paraphrased factor.

    Two stages on the last conv map of each network:

    1. initialisation (``stage_epochs``, reference 30): a :class:`~lightning_kd.connectors.Paraphraser`
       (an auto-encoder on the teacher map, factor ``k * C_t`` channels) learns to reconstruct the teacher
       map (MSE); only the paraphraser trains, the student is not used;
    2. main: the paraphraser is frozen (no gradient, always in eval mode); a
       :class:`~lightning_kd.connectors.Translator` maps the student map to a factor ``F_s`` and the loss is
       :func:`~lightning_kd.functional.ft_loss` ``(F_s, encoder(f_t))``.

    Reference weight (CIFAR-100): ``weight=200`` with ``task_loss_weight=1``.

    Args:
        paraphrase_rate: ``k``, the factor's share of the teacher's channels.
        p: exponent of the factor distance (1: mean absolute error).
        form: ``"channel_mean"`` (the benchmark's factor map, default) or ``"whole"`` (the paper's); see
            :func:`~lightning_kd.functional.ft_loss`.
        paraphraser_bn: BatchNorm inside the paraphraser. Off by default, as in the CRD benchmark, which trains
            the plain paraphraser at learning rate 0.01 for ResNet and WRN students (``stage_lr=0.01`` in
            configs/methods/ft.yaml; at 0.05 it diverged to NaN on the digits). ``True`` is a departure from the
            benchmark (the FT authors' own code has it) that tolerates larger stage learning rates.
        stage_epochs: length of the paraphraser's training stage (0: use it untrained, e.g. after loading
            its weights).
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to
            ``"last_stage"``, the last stage output, ``stage3`` of the CIFAR ResNets, on both sides).
    """

    default_student_layers = ("last_stage",)
    #: the initialisation stage reads only the teacher; the student's forward is not needed there
    stage_needs_student = False

    def __init__(
        self,
        paraphrase_rate: float = 0.5,
        p: float = 1,
        form: Literal["channel_mean", "whole"] = "channel_mean",
        paraphraser_bn: bool = False,
        weight: float = 200.0,
        stage_epochs: int = 30,
        **kwargs,
    ) -> None:
        super().__init__(weight=weight, stage_epochs=stage_epochs, **kwargs)
        if form not in ("channel_mean", "whole"):
            raise ValueError(f"FT form must be 'channel_mean' or 'whole', got {form!r}")
        self.paraphrase_rate = float(paraphrase_rate)
        self.p = p
        self.form = form
        self.paraphraser_bn = paraphraser_bn
        self.paraphraser_frozen = False
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        if len(student_features) != 1 or len(teacher_features) != 1:
            raise ValueError(
                f"FT reads one layer on each side, got student {self.student_layers} and teacher {self.teacher_layers}"
            )
        s, t = student_features[0], teacher_features[0]
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                f"FT needs (B, C, H, W) maps, got student {self.student_layers[0]!r} {tuple(s.shape)} and teacher "
                f"{self.teacher_layers[0]!r} {tuple(t.shape)}: choose convolutional layers such as 'stage3'"
            )
        self.paraphraser = Paraphraser(t.shape[1], self.paraphrase_rate, use_bn=self.paraphraser_bn)
        self.translator = Translator(s.shape[1], self.paraphraser.factor_channels)

    # --- stages -------------------------------------------------------------------------------------------
    def stage_loss(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        """Reconstruction MSE of the teacher map by the paraphraser (the student features are ignored)."""
        target = teacher_features[0]
        return F.mse_loss(as_float(self.paraphraser(target)), as_float(target))

    def stage_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.paraphraser.parameters()

    def main_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.translator.parameters()

    def on_stage(self, stage: str) -> None:
        # frozen in the main stage: out of its optimizer groups, encoded under no_grad, BatchNorm in eval mode
        self.paraphraser_frozen = stage == MAIN
        self.paraphraser.train(self.training and not self.paraphraser_frozen)

    def train(self, mode: bool = True) -> FT:
        super().train(mode)
        if self.paraphraser_frozen and self.paraphraser is not None:
            self.paraphraser.eval()
        return self

    # --- the loss -----------------------------------------------------------------------------------------
    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        with torch.no_grad():
            teacher_factor = self.paraphraser.encode(teacher_features[0])
        student_factor = self.translator(student_features[0])
        return ft_loss(student_factor, teacher_factor, p=self.p, form=self.form)
