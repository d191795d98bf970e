"""Exact mid-epoch resume through Lightning's stateful-dataloader protocol, with a plain Trainer and a tiny
LightningModule of the test's own: a fit resumed from any step's checkpoint sees the same batches (indices,
augmented pixels, second views, CRD negatives) as an uninterrupted fit, with and without loader workers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_kd.data import DigitsDataModule

BATCH = 64


class Recorder(L.LightningModule):
    """Records, per training step, what the batch holds: indices, pixel sums, second views, negatives."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3 * 8 * 8, 10)
        self.steps: list[tuple[Any, ...]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps.append((
            self.global_step,
            batch["index"].tolist(),
            batch["image"].flatten(1).sum(1).tolist(),
            batch["image_strong"].flatten(1).sum(1).tolist(),
            batch["contrast_index"].tolist(),
        ))
        return F.cross_entropy(self.layer(batch["image"].flatten(1)), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(workers: int) -> DigitsDataModule:
    return DigitsDataModule(size=8, batch_size=BATCH, num_workers=workers, contrast_negatives=6, strong_view=True,
                            data_seed=17)


def _trainer(root: Path, callbacks: list[Any], **options: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=root, callbacks=callbacks, enable_checkpointing=bool(callbacks), **options)


def _fit(root: Path, workers: int, ckpt_path: Path | None = None, every: int | None = None,
         **options: Any) -> list[tuple[Any, ...]]:
    torch.manual_seed(0)
    module = Recorder()
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")  # Lightning's, when not stateful
        _trainer(root, callbacks, **options).fit(module, datamodule=_data(workers), ckpt_path=ckpt_path)
    return module.steps


def _checkpoint(root: Path, step: int) -> Path:
    (path,) = root.glob(f"*step={step}.ckpt")
    return path


def _check_resumes(tmp_path: Path, workers: int, resume_steps: list[int], every: int, **options: Any) -> Path:
    whole = _fit(tmp_path / "whole", workers, **options)
    assert [s[0] for s in whole] == list(range(len(whole)))
    recorded = _fit(tmp_path / "saved", workers, every=every, **options)
    assert recorded == whole  # checkpointing changes nothing
    for step in resume_steps:
        resumed = _fit(tmp_path / f"resumed{step}", workers, ckpt_path=_checkpoint(tmp_path / "saved", step), **options)
        assert resumed == whole[step:], f"resumed from the checkpoint of step {step}"
    return tmp_path / "saved"


def test_resume_mid_epoch_equals_the_uninterrupted_fit(tmp_path: Path) -> None:
    # 1,079 training samples / 64 = 16 steps an epoch (drop_last); steps 12 and 21 are inside epochs 0 and 1
    saved = _check_resumes(tmp_path, workers=0, resume_steps=[12, 21], every=3)
    checkpoint = torch.load(_checkpoint(saved, 21), weights_only=True)
    (state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (state["epoch"], state["batches"], state["complete"], state["seed"]) == (1, 5, False, 17)
    assert state["samples_per_batch"] == BATCH


def test_resume_at_the_end_of_a_shortened_epoch(tmp_path: Path) -> None:
    # limit_train_batches=6: the checkpoint of step 6 ends epoch 0 although the loader has more batches
    _check_resumes(tmp_path, workers=0, resume_steps=[6, 9], every=3, limit_train_batches=6)


@pytest.mark.slow  # about 40 s on 2 cores: worker processes start for every fit
def test_resume_mid_epoch_with_workers(tmp_path: Path) -> None:
    _check_resumes(tmp_path, workers=2, resume_steps=[12, 21], every=3)
