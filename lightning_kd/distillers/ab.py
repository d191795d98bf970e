"""AB: Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightning_kd.connectors import ABConnector
from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import ab_loss


def ab_layer_weights(num_layers: int) -> list[float]:
    """Weight ``2^(i - n + 1)`` of layer ``i`` of ``n``: ``[0.25, 0.5, 1.0]`` for three layers."""
    return [2.0 ** (i - num_layers + 1) for i in range(num_layers)]


class AB(Distiller):
    """Transfer the teacher's activation boundaries in an initialisation stage, then train with CE alone.

    Reads the **pre-activation** maps (before each stage's final ReLU) on both sides. A connector per layer
    (:class:`~lightning_kd.connectors.ABConnector`) maps the student's ``(B, C_s, H_s, W_s)`` map to the
    teacher's ``(B, C_t, H_t, W_t)`` as the CRD benchmark does: the identity when channels and size agree,
    else conv + BN, the conv a 3x3 stride-2 conv (student twice the teacher's size), a 4x4 stride-2
    transposed conv (half) or a valid conv (larger otherwise, 1x1 for equal sizes).
    Loss ``3/1000 * sum_i 2^(i - n + 1) * ab_loss(connector_i(s_i), t_i)``
    (:func:`~lightning_kd.functional.ab_loss`).

    The loss trains only in this method's initialisation stage (``stage_epochs``, reference 30), which
    updates the connectors and the student's feature layers, not its classifier; the main stage is then
    plain cross-entropy from that initialisation (``active_in_main`` is False, so ``weight`` is unused).

    Args:
        margin: the margin ``m``.
        scale: the factor of the weighted sum (reference ``3 / 1000``).
        stage_epochs: length of the initialisation stage; must be positive.
        connector: ``"reference"`` (default, the benchmark's connector above) or ``"pool"``, **a departure
            from the reference**: identity when the channel counts agree, else a 1x1 conv + BN keeping the
            student's size, and ``ab_loss`` average-pools the spatially larger map to the smaller.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to
            ``"preacts"``: every stage's pre-activation map, preact1..preact3 of the CIFAR ResNets, on both
            sides).
    """

    default_student_layers = ("preacts",)
    active_in_main = False

    def __init__(
        self,
        margin: float = 1.0,
        scale: float = 3.0 / 1000.0,
        weight: float = 1.0,
        stage_epochs: int = 30,
        connector: Literal["reference", "pool"] = "reference",
        **kwargs,
    ) -> None:
        super().__init__(weight=weight, stage_epochs=stage_epochs, **kwargs)
        if self.stage_epochs <= 0:
            raise ValueError(
                f"AB trains only in its initialisation stage, so stage_epochs must be positive, got {stage_epochs}"
            )
        if connector not in ABConnector.MODES:
            raise ValueError(f"AB connector must be one of {ABConnector.MODES}, got {connector!r}")
        self.connector = connector
        self.margin = float(margin)
        self.scale = float(scale)
        self.layer_weights: list[float] = []  # set in build(), once the layers are known
        self.connectors = nn.ModuleList()

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        for s_name, t_name, s, t in zip(self.student_layers, self.teacher_layers, student_features, teacher_features):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"AB needs (B, C, H, W) pre-activation maps, got student {s_name!r} {tuple(s.shape)} and teacher "
                    f"{t_name!r} {tuple(t.shape)}: choose convolutional layers such as 'preact1'"
                )
        connectors = []
        for s_name, t_name, s, t in zip(self.student_layers, self.teacher_layers, student_features, teacher_features):
            try:
                connectors.append(ABConnector(tuple(s.shape), tuple(t.shape), mode=self.connector))
            except ValueError as error:
                raise ValueError(f"AB (student layer {s_name!r}, teacher layer {t_name!r}): {error}") from error
        self.connectors = nn.ModuleList(connectors)
        self.layer_weights = ab_layer_weights(len(self.connectors))

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        losses = [
            w * ab_loss(connector(s), t, self.margin)
            for w, connector, s, t in zip(self.layer_weights, self.connectors, student_features, teacher_features)
        ]
        return self.scale * sum(losses)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", connector={self.connector!r}"

    def stage_loss(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        return self(student_features, teacher_features, batch)
