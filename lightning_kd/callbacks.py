"""Callbacks of the library: a progress bar that shows the training stage next to the loss components."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class DistillationProgressBar(RichProgressBar):
    """Lightning's rich progress bar, plus the current stage (``main``, ``ab_init``, ...) for staged methods.

    The loss components (``train/ce``, ``train/<distiller>``) are logged with ``prog_bar=True`` by the module,
    so they appear next to ``train/loss``; they are refreshed on the steps the loggers write
    (``Trainer(log_every_n_steps)``) and at the end of each epoch.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        stages = getattr(pl_module, "stages", ())
        if len(stages) > 1:
            metrics["stage"] = pl_module.current_stage.name
        return metrics
