"""A record of every run: ``run.json`` in the run's log folder, written by the :class:`RunRecord` callback.

The ``lightning-kd`` command adds a :class:`RunRecord` to every run, so each fit leaves a small JSON file beside
its ``metrics.csv`` saying what ran (labels, seed, versions), how far it got (status, epoch), what it reached (the
validation curve, best and last top-1) and where its checkpoints are. :mod:`lightning_kd.report` builds the
results table from these files; :mod:`lightning_kd.reproduce` reads them to skip the runs that are done.

A record, as written (values as logged: accuracies are fractions in [0, 1]; epochs count from 0 as in Lightning's
``metrics.csv`` and checkpoint names)::

    {
      "schema": 1,
      "status": "finished",                  # running | finished | failed | interrupted | evaluated
      "labels": {"benchmark": "cifar100", "pair": "resnet32x4-resnet8x4", "method": "kd", "seed": 0,
                 "student": "resnet8x4", "teacher": "resnet32x4"},
      "epoch": 240, "max_epochs": 240, "global_step": 187680,
      "monitor": "val/acc1",
      "curve": [{"epoch": 0, "step": 782, "val/acc1": 0.31, "val/acc5": 0.62, "val/loss": 2.71}, ...],
                                             # step: optimizer steps taken by that validation
      "top1_best": 0.7412, "best_epoch": 231, "top1_last": 0.7398, "teacher_top1": 0.7942,
      "wall_time_s": 15532.1, "attempts": 1, "started_at": "...", "updated_at": "...",
      "checkpoints": [{"best": ".../last.ckpt", "last": ".../last.ckpt", "dirpath": "..."}],
      "evaluations": {"test": {"metrics": {"test/acc1": 0.7398, ...}, "ckpt_path": "...", "at": "..."}},
      "error": null,                         # {"type": "RuntimeError", "message": "..."} when failed/interrupted
      "versions": {"lightning_kd": "0.1.0", "lightning": "2.6.6", "torch": "...", "python": "..."},
      "environment": {"host": "...", "slurm": {...}, "devices": 1, "num_nodes": 1, "precision": "32-true"},
      "log_dir": "...", "argv": ["..."]
    }

Only global rank 0 writes, atomically (a temporary file in the same folder, then a rename), at the start of the
fit, after every validation, at the end and on an exception; a run killed without notice (SIGKILL, a lost node)
keeps its last "running" record. A resumed fit (``ckpt_path`` given) writing into the same folder continues the
record: the curve up to the resumed epoch is kept, ``attempts`` and ``wall_time_s`` accumulate.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_kd.callbacks import run_dir

RECORD_NAME = "run.json"
SCHEMA = 1
RUNNING, FINISHED, FAILED, INTERRUPTED, EVALUATED = "running", "finished", "failed", "interrupted", "evaluated"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED, EVALUATED)
TEACHER_METRIC = "val/teacher_acc1"  # the teacher's top-1, measured by the module at the first validation
ALONE = "student"  # the method label of a run without distillers (a network trained alone)
_EVALUATIONS = {TrainerFn.VALIDATING: "validate", TrainerFn.TESTING: "test", TrainerFn.PREDICTING: "predict"}
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path`` (a ``run.json`` file, or a folder holding one), or ``None`` when there is none.

    Raises:
        ValueError: the file exists but is not a record (not JSON, or no ``status``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable run record ({error}); delete it or rerun the run") from None
    if not isinstance(record, dict) or "status" not in record:
        raise ValueError(f"{path} is not a run record: expected a JSON object with a 'status', found {type(record)}")
    return record


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    Non-finite numbers become ``null`` so that the file stays strict JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(_finite(record), handle, indent=1, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def summarize_curve(curve: list[dict[str, Any]], monitor: str = "val/acc1") -> dict[str, Any]:
    """``top1_best`` (the highest ``monitor`` value; the earliest on ties), its ``best_epoch``, and ``top1_last``
    (the latest value), from curve entries ``{"epoch": e, monitor: value, ...}``; ``None`` where there is none."""
    points = [(entry["epoch"], entry[monitor]) for entry in curve if entry.get(monitor) is not None]
    if not points:
        return {"top1_best": None, "best_epoch": None, "top1_last": None}
    best_epoch, best = points[0]
    for epoch, value in points[1:]:
        if value > best:
            best_epoch, best = epoch, value
    return {"top1_best": best, "best_epoch": best_epoch, "top1_last": points[-1][1]}


class RunRecord(Callback):
    """Write ``run.json`` into the run's log folder: status, labels, seed, validation curve, best and last top-1.

    The folder is the run's own (:func:`~lightning_kd.callbacks.run_dir`, where ``config.yaml`` goes too):
    ``trainer.log_dir`` for a CSV or TensorBoard logger, ``<save_dir>/<name>/<version>`` for other loggers,
    ``trainer.default_root_dir`` without a logger. See the module docstring for the fields. ``lightning-kd`` adds
    one to every run unless the config brings its own; :mod:`lightning_kd.reproduce` brings its own to name the
    run's labels.

    Labels not given are read from the run: ``pair`` is ``"<teacher>-<student>"`` with the networks' names when
    the module was given them by name (``hparams["student"]``), their class names otherwise, and the network's
    name alone when there is no teacher; ``method`` joins the distillers' names with ``"+"`` (``"student"``
    without distillers); ``benchmark`` is the data module's class name without ``DataModule``, in lower case
    (``CIFAR100DataModule`` -> ``cifar100``); ``seed`` is the one ``seed_everything`` set (else
    ``torch.initial_seed()``).

    Args:
        benchmark: the benchmark label (e.g. ``"cifar100"``); read from the data module when ``None``.
        pair: the pair label (e.g. ``"resnet32x4-resnet8x4"``, or a network's name for a run without teacher).
        method: the method label (e.g. ``"kd"``, ``"kd_ls"``, ``"teacher"``, ``"student"``).
        monitor: the logged metric the curve, best and last values follow.
        curve_metrics: other metrics logged at every validation that each curve entry keeps.
        filename: the record's file name in the log folder.
    """

    def __init__(
        self,
        benchmark: str | None = None,
        pair: str | None = None,
        method: str | None = None,
        monitor: str = "val/acc1",
        curve_metrics: Sequence[str] = ("val/acc5", "val/loss"),
        filename: str = RECORD_NAME,
    ) -> None:
        self.labels = {k: v for k, v in {"benchmark": benchmark, "pair": pair, "method": method}.items() if v}
        self.monitor = monitor
        self.curve_metrics = tuple(curve_metrics)
        self.filename = filename
        self.path: Path | None = None
        self.record: dict[str, Any] | None = None
        self.fit_started: float | None = None
        self.earlier_wall_time = 0.0

    # ------------------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the folder is resolved here, where every rank runs the hook: trainer.log_dir broadcasts from rank 0
        self.path = run_dir(trainer) / self.filename
        if stage == "fit":  # a new fit (a validate/test after a fit in this process adds to the fit's record)
            self.record = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = self._new_record(trainer, pl_module, RUNNING)
        earlier = self._read_existing() if trainer.ckpt_path is not None else None
        self.earlier_wall_time = 0.0
        if earlier is not None and earlier.get("labels") == record["labels"]:
            record["curve"] = list(earlier.get("curve") or [])
            record["attempts"] = int(earlier.get("attempts") or 1) + 1
            record["started_at"] = earlier.get("started_at", record["started_at"])
            record["evaluations"] = dict(earlier.get("evaluations") or {})
            self.earlier_wall_time = float(earlier.get("wall_time_s") or 0.0)
        self.record = record
        self.fit_started = time.monotonic()
        self._write(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed fit has its epoch counter back by now (it is restored after on_fit_start): the validations of
        # the epochs it is about to redo leave the curve
        if self.record is None or not trainer.is_global_zero:
            return
        self.record["curve"] = [e for e in self.record["curve"] if e["epoch"] < trainer.current_epoch]
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.state.fn == TrainerFn.FITTING and self.record is not None:
            metrics = trainer.callback_metrics  # keeps every key ever logged: read only those logged each time
            entry = {"epoch": trainer.current_epoch, "step": trainer.global_step}
            entry.update({k: _number(metrics[k]) for k in dict.fromkeys((self.monitor, *self.curve_metrics))
                          if k in metrics})  # fmt: skip
            self.record["curve"].append(entry)
            if self.record.get("teacher_top1") is None and TEACHER_METRIC in metrics:
                self.record["teacher_top1"] = _number(metrics[TEACHER_METRIC])
            self._write(trainer)
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._evaluation(trainer, pl_module, "validate", "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._evaluation(trainer, pl_module, "test", "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record is None or not trainer.is_global_zero:
            return
        self.record["status"] = FINISHED
        self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        error = {"type": type(exception).__name__, "message": str(exception)[:4000]}
        if trainer.state.fn == TrainerFn.FITTING:
            if self.record is None:  # failed before the fit started (setup, configure_model)
                self.record = self._new_record(trainer, pl_module, RUNNING)
            self.record["status"] = INTERRUPTED if interrupted else FAILED
            self.record["error"] = error
        else:  # a failed validate/test leaves the status of the fit it evaluates alone
            if self.record is None:
                self.record = self._read_existing()
            if self.record is None:
                self.record = self._new_record(trainer, pl_module, FAILED)
                self.record["error"] = error
            name = _EVALUATIONS.get(trainer.state.fn, str(trainer.state.fn))
            self.record.setdefault("evaluations", {})[name] = {"error": error, "at": _now()}
        if self.path is None:  # failed before setup
            self.path = Path(trainer.default_root_dir) / self.filename
        self._write(trainer, fit=trainer.state.fn == TrainerFn.FITTING)

    # ------------------------------------------------------------------------------------------------------
    # the record
    # ------------------------------------------------------------------------------------------------------
    def _evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, prefix: str) -> None:
        if self.record is None:  # a validate/test command: add to the run's record when it writes into its folder
            self.record = self._read_existing() or self._new_record(trainer, pl_module, EVALUATED)
        metrics = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        self.record.setdefault("evaluations", {})[name] = {"metrics": metrics, "ckpt_path": trainer.ckpt_path,
                                                           "at": _now()}  # fmt: skip
        self._write(trainer, fit=False)

    def _read_existing(self) -> dict[str, Any] | None:
        try:
            return read_record(self.path) if self.path is not None else None
        except ValueError:
            return None  # an unreadable earlier record is replaced

    def _new_record(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> dict[str, Any]:
        now = _now()
        return {
            "schema": SCHEMA,
            "status": status,
            "labels": self._labels(trainer, pl_module),
            "epoch": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
            "global_step": trainer.global_step,
            "monitor": self.monitor,
            "curve": [],
            "top1_best": None,
            "best_epoch": None,
            "top1_last": None,
            "teacher_top1": None,
            "wall_time_s": 0.0,
            "attempts": 1,
            "started_at": now,
            "updated_at": now,
            "checkpoints": [],
            "evaluations": {},
            "error": None,
            "versions": _versions(),
            "environment": _environment(trainer),
            "log_dir": str(self.path.parent) if self.path is not None else None,
            "argv": list(sys.argv),
        }

    def _labels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        hparams = getattr(pl_module, "hparams", {}) or {}
        student_net = getattr(pl_module, "student", pl_module)
        teacher_net = getattr(pl_module, "teacher", None)
        student = _network_name(hparams.get("student"), student_net)
        teacher = _network_name(hparams.get("teacher"), teacher_net) if teacher_net is not None else None
        distillers = [getattr(d, "name", type(d).__name__.lower()) for d in getattr(pl_module, "distillers", ())]
        datamodule = trainer.datamodule
        benchmark = type(datamodule).__name__.removesuffix("DataModule").lower() if datamodule is not None else None
        labels = {
            "benchmark": benchmark or "custom",
            "pair": f"{teacher}-{student}" if teacher else student,
            "method": "+".join(distillers) if distillers else ALONE,
            "seed": _seed(),
            "student": student,
            "teacher": teacher,
        }
        labels.update(self.labels)
        return labels

    def _write(self, trainer: L.Trainer, fit: bool = True) -> None:
        """Write the record; ``fit`` also refreshes the fit's progress (an evaluation leaves it as it is)."""
        record = self.record
        assert record is not None and self.path is not None
        if fit:
            record["epoch"] = trainer.current_epoch
            record["global_step"] = trainer.global_step
            record.update(summarize_curve(record["curve"], self.monitor))
            if self.fit_started is not None:
                record["wall_time_s"] = round(self.earlier_wall_time + time.monotonic() - self.fit_started, 3)
            record["checkpoints"] = [
                {"best": c.best_model_path or None, "last": c.last_model_path or None, "dirpath": c.dirpath}
                for c in trainer.checkpoint_callbacks
                if isinstance(c, ModelCheckpoint)
            ]
        record["updated_at"] = _now()
        write_record(self.path, record)


def _network_name(given: Any, network: Any) -> str:
    """A network's name: the one it was built from when given by name, else its class name."""
    return given if isinstance(given, str) and given else type(network).__name__


def _seed() -> int:
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by lightning.seed_everything (and LightningCLI's seed_everything)
    try:
        return int(seed) if seed is not None else torch.initial_seed()
    except ValueError:
        return torch.initial_seed()


def _number(value: Any) -> float | None:
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else None


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from lightning_kd import __version__

    return {"lightning_kd": __version__, "lightning": L.__version__, "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def _environment(trainer: L.Trainer) -> dict[str, Any]:
    slurm = {k: os.environ[k] for k in _SLURM_VARIABLES if k in os.environ}
    return {
        "host": socket.gethostname(),
        "slurm": slurm or None,
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
    }
