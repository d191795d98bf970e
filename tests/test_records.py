"""RunRecord: every run leaves run.json with its status, labels, curve, best and last top-1."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule, __version__
from lightning_kd.cli import run_cli
from lightning_kd.distillers import KD
from lightning_kd.records import RECORD_NAME, RunRecord, read_record, summarize_curve, write_record

CONFIGS = ROOT / "configs"


def _csv_curve(folder: Path) -> list[tuple[int, float]]:
    """(epoch, val/acc1) per validation, as the CSV logger wrote them."""
    with open(folder / "metrics.csv", newline="") as handle:
        return [(int(r["epoch"]), float(r["val/acc1"])) for r in csv.DictReader(handle) if r.get("val/acc1")]


def _loader(seed: int = 0, n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def _trainer(folder: Path, callbacks: list[Callback], **options) -> L.Trainer:
    settings = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=CSVLogger(folder, name="", version=""),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
    )  # fmt: skip
    settings.update(options)
    return L.Trainer(callbacks=callbacks, **settings)


def _module(teacher: str | None = None) -> DistillationModule:
    distillers = [KD()] if teacher else []
    return DistillationModule(student="resnet8", teacher=teacher, distillers=distillers, num_classes=10,
                              input_size=(3, 16, 16))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# a digits fit through the CLI
# ------------------------------------------------------------------------------------------------------------
def test_digits_fit_writes_a_finished_record_with_the_csv_curve(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    common = [
        "--config", str(CONFIGS / "digits" / "base.yaml"), "--config", str(CONFIGS / "methods" / "kd.yaml"),
        "--model.teacher_checkpoint=null", "--data.init_args.batch_size=16", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={folder}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={folder}", "--trainer.logger.name=", "--trainer.logger.version=",
        "--trainer.check_val_every_n_epoch=1", "--seed_everything=7",  # the random teacher is the same in the test command
    ]  # fmt: skip
    cli = run_cli(["fit", *common, "--trainer.max_epochs=3"])
    record = read_record(folder)
    assert record is not None and record["status"] == "finished"
    assert record["labels"] == {"benchmark": "digits", "pair": "resnet56-resnet8", "method": "kd", "seed": 7,
                                "student": "resnet8", "teacher": "resnet56"}  # fmt: skip
    assert (record["epoch"], record["max_epochs"], record["global_step"]) == (3, 3, 6)
    # the curve is the CSV logger's, value for value
    curve = [(entry["epoch"], entry["val/acc1"]) for entry in record["curve"]]
    assert curve == _csv_curve(folder) and [e for e, _ in curve] == [0, 1, 2]
    values = [v for _, v in curve]
    best = max(values)
    assert record["top1_best"] == best and record["top1_last"] == values[-1]
    assert record["best_epoch"] == curve[values.index(best)][0]
    assert all(set(entry) == {"epoch", "step", "val/acc1", "val/acc5", "val/loss"} for entry in record["curve"])
    assert 0.0 <= record["teacher_top1"] <= 1.0
    assert record["wall_time_s"] > 0 and record["attempts"] == 1 and record["error"] is None
    assert record["versions"]["lightning_kd"] == __version__
    (checkpoint,) = record["checkpoints"]
    assert Path(checkpoint["best"]).is_file() and Path(checkpoint["best"]).parent == folder / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert cli.trainer.callback_metrics["val/acc1"].item() == values[-1]

    # a test command writing into the same folder adds its metrics and leaves the fit's status alone
    run_cli(["test", *common, f"--ckpt_path={checkpoint['best']}"])
    tested = read_record(folder)
    assert tested["status"] == "finished" and tested["curve"] == record["curve"]
    test = tested["evaluations"]["test"]
    assert set(test["metrics"]) == {"test/acc1", "test/acc5", "test/loss"}
    assert test["ckpt_path"] == checkpoint["best"] and 0.0 <= test["metrics"]["test/acc1"] <= 1.0


# ------------------------------------------------------------------------------------------------------------
# failures, interruptions, ranks, resumes
# ------------------------------------------------------------------------------------------------------------
class Boom(Callback):
    """Raises at a given training batch."""

    def __init__(self, at: int, error: BaseException) -> None:
        self.at, self.error = at, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at:
            raise self.error


def test_a_fit_that_raises_writes_failed(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [RunRecord(), Boom(3, RuntimeError("the loss went to the moon"))])
    with pytest.raises(RuntimeError, match="moon"):
        trainer.fit(_module(teacher="resnet14"), _loader(), _loader(1))
    record = read_record(tmp_path / RECORD_NAME)
    assert record["status"] == "failed"
    assert record["error"] == {"type": "RuntimeError", "message": "the loss went to the moon"}
    assert [e["epoch"] for e in record["curve"]] == [0]  # the epoch before the failure was validated
    assert record["labels"]["pair"] == "resnet14-resnet8" and record["labels"]["method"] == "kd"
    assert record["labels"]["benchmark"] == "custom"  # no data module


def test_an_interrupted_fit_writes_interrupted(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)
    trainer = _trainer(tmp_path, [RunRecord(), Boom(1, KeyboardInterrupt())])
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
            trainer.fit(_module(), _loader(), _loader(1))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C while it shuts down
    record = read_record(tmp_path)
    assert record["status"] == "interrupted" and record["error"]["type"] == "KeyboardInterrupt"
    assert (record["labels"]["pair"], record["labels"]["method"]) == ("resnet8", "student")


def test_only_global_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    record = RunRecord(pair="a-b")
    _trainer(tmp_path, [record], max_epochs=1).fit(_module(), _loader(), _loader(1))
    assert record.path == tmp_path / RECORD_NAME  # the callback ran (and resolved its folder on every rank)
    assert not (tmp_path / RECORD_NAME).exists()
    with pytest.raises(RuntimeError):
        _trainer(tmp_path, [record, Boom(0, RuntimeError("stop"))]).fit(_module(), _loader(), _loader(1))
    assert not (tmp_path / RECORD_NAME).exists()  # not on an exception either


def test_a_resumed_fit_continues_the_record(tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1, filename="{epoch}")
    L.seed_everything(3)
    _trainer(tmp_path, [RunRecord(), every_epoch], enable_checkpointing=True).fit(_module(), _loader(), _loader(1))
    first = read_record(tmp_path)
    assert [e["epoch"] for e in first["curve"]] == [0, 1] and first["labels"]["seed"] == 3
    # resume from the end of epoch 0: epoch 1 is trained (and validated) again, then epoch 2
    trainer = _trainer(tmp_path, [RunRecord()], max_epochs=3, enable_checkpointing=True)
    trainer.fit(_module(), _loader(), _loader(1), ckpt_path=tmp_path / "checkpoints" / "epoch=0.ckpt")
    second = read_record(tmp_path)
    assert second["status"] == "finished" and second["attempts"] == 2
    assert [e["epoch"] for e in second["curve"]] == [0, 1, 2]
    assert second["curve"][0] == first["curve"][0]  # the first attempt's validation of epoch 0 is kept
    assert second["wall_time_s"] > first["wall_time_s"] and second["started_at"] == first["started_at"]
    # a fresh fit (no ckpt_path) in the same folder starts a new record
    _trainer(tmp_path, [RunRecord()], max_epochs=1).fit(_module(), _loader(), _loader(1))
    third = read_record(tmp_path)
    assert third["attempts"] == 1 and [e["epoch"] for e in third["curve"]] == [0]


# ------------------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------------------
def test_summarize_curve_by_hand() -> None:
    curve = [
        {"epoch": 0, "val/acc1": 0.25},
        {"epoch": 1, "val/acc1": 0.75},
        {"epoch": 2},  # a validation that did not log the monitor
        {"epoch": 3, "val/acc1": 0.75},  # a tie: the earliest best epoch is kept
        {"epoch": 4, "val/acc1": 0.5, "val/x": 0.9},
    ]
    assert summarize_curve(curve) == {"top1_best": 0.75, "best_epoch": 1, "top1_last": 0.5}
    assert summarize_curve(curve, "val/x") == {"top1_best": 0.9, "best_epoch": 4, "top1_last": 0.9}
    assert summarize_curve([]) == {"top1_best": None, "best_epoch": None, "top1_last": None}


def test_write_record_is_strict_json_and_read_record_checks(tmp_path: Path) -> None:
    path = tmp_path / "deep" / RECORD_NAME
    write_record(path, {"status": "running", "curve": [{"val/loss": math.nan, "val/acc1": 0.5}], "x": math.inf})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a record")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"status": "running", "curve": [{"val/loss": None, "val/acc1": 0.5}], "x": None}
    assert list(path.parent.iterdir()) == [path]
    assert read_record(tmp_path / "nothing") is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable run record"):
        read_record(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object with a 'status'"):
        read_record(tmp_path / "list.json")
