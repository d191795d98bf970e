"""Validation, test and prediction steps of :class:`~lightning_kd.module.DistillationModule`.

The student is evaluated alone (what an exported student computes): top-1, top-5 and cross-entropy per split, and,
once per fit, the teacher's top-1 on the validation split beside it. ``predict`` returns the student's logits,
probabilities and predicted class per sample.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.batch import as_batch
from lightning_kd.taps import LOGITS


class EvaluationSteps(L.LightningModule):
    """The evaluation half of the module (it reads ``core``, the ``<split>_acc1/acc5/loss`` metrics and
    ``teacher_acc1``, which the module builds)."""

    def _evaluate(self, batch: Any, split: str) -> None:
        batch = as_batch(batch)
        images, labels = batch["image"], batch["label"]
        logits = self(images)
        acc1, acc5, loss = (getattr(self, f"{split}_{name}") for name in ("acc1", "acc5", "loss"))
        loss(F.cross_entropy(logits.float(), labels, reduction="none"))
        acc1(logits, labels)
        acc5(logits, labels)
        self.log(f"{split}/loss", loss)
        self.log(f"{split}/acc1", acc1, prog_bar=True)
        self.log(f"{split}/acc5", acc5)
        if split == "val" and not self.teacher_measured and not self.trainer.sanity_checking:
            self.teacher_acc1(self.core.teacher_forward(images)[LOGITS], labels)
            self.log("val/teacher_acc1", self.teacher_acc1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.teacher_measured = True

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """The student's prediction per sample: ``logits``, ``probabilities``, ``prediction`` and, when the batch
        has them, ``label`` and ``index``."""
        batch = as_batch(batch)
        logits = self(batch["image"]).float()
        out = {"logits": logits, "probabilities": logits.softmax(dim=1), "prediction": logits.argmax(dim=1)}
        out.update({key: batch[key] for key in ("label", "index") if key in batch})
        return out

