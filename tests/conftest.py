"""Shared test set-up: offline wandb in temporary folders, quiet logs, small deterministic runs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_WANDB_TMP = tempfile.mkdtemp(prefix="lkd-wandb-")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_DIR", _WANDB_TMP)
os.environ.setdefault("WANDB_CACHE_DIR", _WANDB_TMP)
os.environ.setdefault("WANDB_CONFIG_DIR", _WANDB_TMP)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running ``lightning-kd`` in a subprocess from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["WANDB_DIR"] = str(tmp_path)
    return env


PYTHON = sys.executable


def make_trainer(**overrides):
    """A quiet single-CPU Trainer for tests (no logger, no checkpoints, no progress bar unless asked)."""
    import lightning as L

    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return L.Trainer(**options)


#: the input size of the distiller tests' small networks (resnet8 students at 16x16, as on the digits)
SIZE = (3, 16, 16)


def small_module(distiller, teacher: str = "resnet14"):  # noqa: ANN001, ANN201
    """A seeded resnet8 student distilled from ``teacher`` with one distiller, for 10 classes at :data:`SIZE`."""
    from lightning_kd import DistillationModule

    torch.manual_seed(0)
    return DistillationModule("resnet8", teacher, [distiller], num_classes=10, input_size=SIZE)


def small_batch(n: int = 8) -> dict[str, torch.Tensor]:
    """A seeded batch of ``n`` random images at :data:`SIZE` with labels."""
    torch.manual_seed(1)
    return {"image": torch.randn(n, *SIZE), "label": torch.randint(0, 10, (n,))}


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_two_steps_train(distiller, positive: bool = True) -> None:  # noqa: ANN001
    """Two training steps of :func:`small_module` on the digits: the distiller's, the cross-entropy's and the total
    loss are logged and finite (the distiller's > 0 when ``positive``), and every learnable part of the distiller
    moved (it is in the optimizer)."""
    from lightning_kd.data import DigitsDataModule

    module = small_module(distiller)
    before = state_snapshot(distiller)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, size=16))
    assert trainer.global_step == 2
    logged = trainer.callback_metrics
    for key in (f"train/{distiller.name}", "train/ce", "train/loss"):
        assert key in logged and torch.isfinite(logged[key]), (key, dict(logged))
    if positive:
        assert logged[f"train/{distiller.name}"] > 0
    for key, value in distiller.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert not torch.equal(value, before[key]), f"{key} did not train"
