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
