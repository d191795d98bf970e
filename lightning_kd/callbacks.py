"""Callbacks of the library: progress that reads well in a terminal and in a log file, and predictions on disk.

- :class:`DistillationProgressBar`: Lightning's rich progress bar for terminals, each loss term on its own line next
  to its value (never split from it when the terminal is narrow), four significant digits (PKT's loss of 1e-4 shows
  as 1.234e-04, not 0.000), the stage of staged methods, no ``v_num``.
- :class:`EpochLines`: one line per epoch when the output is a file (SLURM, nohup, CI), where a redrawn bar writes
  nothing readable.
- :func:`progress_bar`: the one that suits where the output goes.
- :class:`PredictionWriter`: ``lightning-kd predict`` writes ``predictions.csv`` (index, label, prediction,
  probability of each class).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_info

METRICS_FORMAT = ".4g"


def run_dir(trainer: L.Trainer) -> Path:
    """The run's own folder: the version folder of a CSV or TensorBoard logger (``trainer.log_dir``),
    ``<save_dir>/<name>/<version>`` of other loggers (Weights & Biases: project and run id), and
    ``default_root_dir`` without a logger. Two runs never share it, so nothing a run writes there is overwritten
    by the next."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return Path(trainer.default_root_dir)
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(trainer.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "logs") / version


def _shown(trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, Any]) -> dict[str, Any]:
    metrics.pop("v_num", None)
    stages = getattr(pl_module, "stages", ())
    if len(stages) > 1:
        metrics["stage"] = pl_module.current_stage.name
    return metrics


class DistillationProgressBar(RichProgressBar):
    """Lightning's rich progress bar with one line per loss term, four significant digits and the stage."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("theme", RichProgressBarTheme(metrics_format=METRICS_FORMAT, metrics_text_delimiter="\n"))
        super().__init__(**kwargs)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _shown(trainer, pl_module, super().get_metrics(trainer, pl_module))


class EpochLines(ProgressBar):
    """Progress for output that is not a terminal: one line per training epoch with the epoch, the stage, the epoch
    means of the loss terms, the validation metrics and the time the epoch took.

    An epoch's line is written when the next epoch starts (and at the end of the fit), once the module has logged
    the epoch's means and validation has run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._start: float | None = None
        self._epoch = 0
        self._stage = ""

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)
        self._start, self._epoch = time.perf_counter(), trainer.current_epoch
        stages = getattr(pl_module, "stages", ())
        self._stage = f"[{pl_module.current_stage.name}]" if len(stages) > 1 else ""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if not self._enabled or self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self._start = None
        logged = trainer.callback_metrics
        names = [k for k in logged if k.endswith("_epoch")] + [k for k in logged if k.startswith("val/")]
        metrics = {k: logged[k] for k in names}
        parts = [f"epoch {self._epoch + 1}/{trainer.max_epochs}"] + ([self._stage] if self._stage else [])
        parts += [f"{name.removeprefix('train/').removesuffix('_epoch')}={_format(value)}" for name, value in metrics.items()]
        parts.append(f"({seconds:.1f} s)")
        rank_zero_info(" ".join(parts))


def _format(value: Any) -> str:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return f"{value:{METRICS_FORMAT}}"


def progress_bar(stream: Any = None) -> ProgressBar:
    """A rich bar when ``stream`` (default: standard output) is a terminal, else :class:`EpochLines`."""
    stream = stream if stream is not None else sys.stdout
    return DistillationProgressBar() if getattr(stream, "isatty", lambda: False)() else EpochLines()


class PredictionWriter(BasePredictionWriter):
    """Write the student's predictions to ``<output_dir>/predictions.csv``: one row per sample with its index (when
    the data module gives one, else its position), label (when known), predicted class and the probabilities.

    Args:
        output_dir: the folder; default: the run's log folder (``trainer.log_dir``), else ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.path: Path | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        folder = Path(self.output_dir) if self.output_dir else run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions.rank{rank}.csv"
        self.path = folder / name
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        position = 0
        with open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            header_written = False
            for batch in batches:
                probabilities = batch["probabilities"].cpu()
                if not header_written:
                    classes = [f"p{c}" for c in range(probabilities.shape[1])]
                    writer.writerow(["index", "label", "prediction", *classes])
                    header_written = True
                n = probabilities.shape[0]
                index = batch["index"].tolist() if "index" in batch else list(range(position, position + n))
                labels = batch["label"].tolist() if "label" in batch else [""] * n
                for i in range(n):
                    row = [index[i], labels[i], int(batch["prediction"][i])]
                    writer.writerow(row + [f"{p:.6g}" for p in probabilities[i].tolist()])
                position += n
        rank_zero_info(f"Predictions of {position} samples written to {os.fspath(self.path)}")
