"""CC: Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (the CRD benchmark's version)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.connectors import LinearEmbed
from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.functional import cc_loss


class CC(RelationalDistiller):
    """Correlation congruence on learnable embeddings of the penultimate features.

    Two :class:`~lightning_kd.connectors.LinearEmbed` maps to ``dim`` (one per side; the teacher's is trained
    too), then :func:`~lightning_kd.functional.cc_loss`: with ``d = |e_s - e_t|``, the mean over adjacent
    rows of ``sum_k d[i, k] * d[i + 1, k]``. Reference (CRD benchmark, CIFAR-100): the pooled embedding,
    ``dim=128``, ``weight=0.02``. A relational loss: it compares the samples of the per-device batch, or of
    the global batch with ``batch_scope="global"``.

    Args:
        dim: size of the embeddings.
        weight, student_layers, teacher_layers, name, batch_scope: see
            :class:`~lightning_kd.distillers.base.RelationalDistiller` (one layer on each side, default
            ``"embedding"``).
    """

    default_student_layers = ("embedding",)

    def __init__(self, dim: int = 128, weight: float = 0.02, **kwargs) -> None:
        super().__init__(weight=weight, **kwargs)
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"CC reads one layer on each side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}"
            )
        if dim < 1:
            raise ValueError(f"CC needs a positive embedding size, got dim={dim}")
        self.dim = int(dim)
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None

    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        self.embed_student = LinearEmbed(student_features[0][0].numel(), self.dim)
        self.embed_teacher = LinearEmbed(teacher_features[0][0].numel(), self.dim)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        if self.embed_student is None or self.embed_teacher is None:
            raise RuntimeError("CC.build() has not run: the DistillationModule builds it from a probe forward")
        embedded = [self.embed_student(student_features[0]), self.embed_teacher(teacher_features[0])]
        student, teacher = self.gather(embedded)
        return cc_loss(student, teacher)
