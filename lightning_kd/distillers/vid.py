"""VID: Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer"."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.connectors import VIDRegressor
from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional import pool_to_smaller, vid_loss


class VID(Distiller):
    """Maximise a variational lower bound of the mutual information between student and teacher maps.

    Per layer pair, a :class:`~lightning_kd.connectors.VIDRegressor` predicts the teacher map's mean from the
    student map (three 1x1 convs, ``C_s -> C_t -> C_t -> C_t``) and keeps a per-channel variance
    ``softplus(alpha) + eps`` (``var = 5`` at the start); the loss is the Gaussian negative log-likelihood
    :func:`~lightning_kd.functional.vid_loss`, summed over the layers. The larger map is pooled to the
    smaller one before the regressor.

    Reference weight (CIFAR-100): ``weight=1`` with ``task_loss_weight=1``.

    Args:
        init_variance: the variance at the start.
        eps: the variance's floor.
        weight, student_layers, teacher_layers, name: see :class:`Distiller` (layers default to
            ``"stages"``: every stage output, stage1..stage3 of the CIFAR ResNets, on both sides).
    """

    default_student_layers = ("stages",)

    def __init__(self, init_variance: float = 5.0, eps: float = 1e-5, weight: float = 1.0, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        self.init_variance = float(init_variance)
        self.eps = float(eps)
        self.regressors = nn.ModuleList()

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        for s_name, t_name, s, t in zip(self.student_layers, self.teacher_layers, student_features, teacher_features):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"VID needs (B, C, H, W) maps, got student {s_name!r} {tuple(s.shape)} and teacher {t_name!r} "
                    f"{tuple(t.shape)}: choose convolutional layers"
                )
        self.regressors = nn.ModuleList(
            VIDRegressor(s.shape[1], t.shape[1], init_variance=self.init_variance, eps=self.eps)
            for s, t in zip(student_features, teacher_features)
        )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        losses = []
        for regressor, s, t in zip(self.regressors, student_features, teacher_features):
            s, t = pool_to_smaller(s, t)
            losses.append(vid_loss(regressor(s), t, regressor.variance()))
        return sum(losses)
