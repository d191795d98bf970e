"""MLKD: Jin et al. 2023, "Multi-Level Logit Distillation" (CVPR)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.distillers.base import Batch, RelationalDistiller
from lightning_kd.functional import as_float, mlkd_loss

MASK_MODES = ("scalar", "per_sample")


class MLKD(RelationalDistiller):
    """Multi-level logit distillation on two views of each image: instance (KD), batch and class correlation
    terms at five temperatures (:func:`~lightning_kd.functional.mlkd_loss`).

    Reads the logits of both networks on the weak view (``batch["image"]``, tap ``"logits"``) and on the strong
    view (``batch["image_strong"]``, tap ``"logits@strong"``); the module runs each network once per view.
    :meth:`forward` returns ``{"kd": mlkd_loss(...), "ce_strong": CE(student strong logits, labels)}`` with
    ``component_weights = {"ce_strong": strong_ce_weight}``, so with ``task_loss_weight = w_ce`` (the module's
    cross-entropy on the weak view) the objective is the official
    ``w_ce [CE_w + CE_s] + w_kd [KD/CC/BC terms]`` when ``strong_ce_weight = w_ce`` and ``weight = w_kd``.

    The official code's quirks are kept (see :func:`~lightning_kd.functional.mlkd_loss`): temperatures
    ``(T0, 3, 5, 2, 6)``, masks acting as scalar factors (``mask="scalar"``), the "strong" KD sum whose last two
    terms read the weak view, the strong-view CC/BC terms left out. ``mask="per_sample"`` is a departure: the
    per-sample (and per-class) selection the masks suggest.

    Relational: the masks and the CC/BC terms compare the samples of the per-device batch, or of the global
    batch with ``batch_scope="global"``; the strong-view cross-entropy always uses the local batch.

    Reference (CIFAR-100): ``temperature=4``, ``weight=0.9``, ``strong_ce_weight=0.1`` with
    ``task_loss_weight=0.1``, lr 0.025 (0.01 for MobileNetV2/ShuffleNet students), the data module's strong view
    (RandAugment + Cutout). With logit standardisation (``standardize=True``, KD terms only): ``temperature=2``,
    ``weight=9``.

    Args:
        temperature: ``T0``, the first temperature of the set.
        weight: ``w_kd``, the factor of the KD/CC/BC terms.
        strong_ce_weight: the factor of the strong view's cross-entropy.
        mask: ``"scalar"`` (official) or ``"per_sample"`` (departure).
        standardize: logit standardisation in the KD terms (the logit-standardisation paper's MLKD variant).
        batch_scope: ``"device"`` or ``"global"``, see :class:`RelationalDistiller`.
        student_layers, teacher_layers, name: see :class:`Distiller`; two layers on each side, the weak view's
            logits first, then the strong view's (default ``("logits", "logits@strong")``).
    """

    default_student_layers = ("logits", "logits@strong")

    def __init__(
        self,
        temperature: float = 4.0,
        weight: float = 0.9,
        strong_ce_weight: float = 0.1,
        mask: Literal["scalar", "per_sample"] = "scalar",
        standardize: bool = False,
        batch_scope: Literal["device", "global"] = "device",
        **kwargs: Any,
    ) -> None:
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"MLKD temperature must be positive and finite, got {temperature}")
        if not math.isfinite(strong_ce_weight) or strong_ce_weight < 0:
            raise ValueError(f"MLKD strong_ce_weight must be finite and >= 0, got {strong_ce_weight}")
        if mask not in MASK_MODES:
            raise ValueError(f"MLKD mask must be 'scalar' (official) or 'per_sample', got {mask!r}")
        super().__init__(batch_scope=batch_scope, weight=weight, **kwargs)
        if len(self.student_layers) != 2 or len(self.teacher_layers) != 2:
            raise ValueError(
                f"MLKD reads two layers on each side (the weak view's logits, then the strong view's), got "
                f"student_layers={self.student_layers} and teacher_layers={self.teacher_layers}"
            )
        self.temperature = float(temperature)
        self.strong_ce_weight = float(strong_ce_weight)
        self.mask = mask
        self.standardize = bool(standardize)
        self.component_weights = {"ce_strong": self.strong_ce_weight}

    def setup_data(self, datamodule: Any) -> None:
        """Called by the module's ``setup``: a data module that can leave out the strong view must give it."""
        if datamodule is not None and getattr(datamodule, "strong_view", True) is False:
            raise ValueError(
                f"MLKD reads a strong view of every image (batch['image_strong']), but {type(datamodule).__name__} "
                "has strong_view=False: set data.init_args.strong_view=true"
            )

    def forward(
        self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch
    ) -> dict[str, Tensor]:
        if "label" not in batch:
            raise ValueError("MLKD needs batch['label'] for the strong view's cross-entropy")
        student_weak, student_strong = student_features
        ce_strong = F.cross_entropy(as_float(student_strong), batch["label"])
        student_weak, student_strong, teacher_weak, teacher_strong = self.gather(
            [student_weak, student_strong, *teacher_features]
        )
        kd = mlkd_loss(
            student_weak, teacher_weak, student_strong, teacher_strong, self.temperature, self.mask, self.standardize
        )
        return {"kd": kd, "ce_strong": ce_strong}

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", temperature={self.temperature}, strong_ce_weight={self.strong_ce_weight}, mask={self.mask!r}, "
            f"standardize={self.standardize}"
        )
