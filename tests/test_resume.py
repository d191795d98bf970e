"""Exact resume after SIGKILL: a fit killed at an arbitrary step and resumed from its last checkpoint ends
with the same student weights as an uninterrupted fit (KD, and AB killed inside its initialisation stage)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from lightning_kd.models import create_model
from lightning_kd.demo import digits_config_args

CALLBACKS = '''
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the process at the end of a given global step (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveStudent(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        torch.save(module.student.state_dict(), self.path)
'''


def _fit(tmp: Path, env: dict[str, str], config: list[str], run: str, extra_callbacks: str,
         ckpt_path: str | None = None, *overrides: str) -> subprocess.CompletedProcess:
    callbacks = tmp / f"{run}.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp / run}, every_n_train_steps: 1, save_last: true, save_top_k: 0}}\n"
        f"{extra_callbacks}\n"
    )
    args = [sys.executable, "-m", "lightning_kd.cli", "fit", *config, "--config", str(callbacks),
            f"--model.teacher_checkpoint={tmp / 'teacher.pt'}", f"--trainer.default_root_dir={tmp / run}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1",
            "--trainer.deterministic=true", "--data.train_subset=null", *overrides]  # every training image
    if ckpt_path:
        args.append(f"--ckpt_path={ckpt_path}")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about 4 minutes on 2 cores: run with `make test-slow`
@pytest.mark.parametrize(
    ("method", "kill_step", "overrides"),
    [
        ("kd", 8, ["--trainer.max_epochs=2", "--trainer.limit_train_batches=6"]),  # killed inside epoch 2
        # AB: 3 initialisation epochs of 3 batches, then 1 main epoch; killed at step 5, inside the 2nd init epoch
        ("ab", 5, ["--trainer.max_epochs=4", "--trainer.limit_train_batches=3"]),
    ],
)
def test_kill_and_resume_equals_uninterrupted(method: str, kill_step: int, overrides: list[str], tmp_path: Path,
                                              cli_env: dict[str, str]) -> None:
    torch.manual_seed(0)
    torch.save(create_model("resnet56", num_classes=10).state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "kdcallbacks.py").write_text(CALLBACKS)
    cli_env["PYTHONPATH"] = f"{tmp_path}:{cli_env['PYTHONPATH']}"
    config = digits_config_args(method)

    def save(name: str) -> str:
        return (f"    - class_path: kdcallbacks.SaveStudent\n"
                f"      init_args: {{path: {tmp_path / name}}}")

    whole = _fit(tmp_path, cli_env, config, "whole", save("whole.pt"), None, *overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killer = f"    - class_path: kdcallbacks.KillAtStep\n      init_args: {{step: {kill_step}}}"
    killed = _fit(tmp_path, cli_env, config, "killed", killer, None, *overrides)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_step - 1

    resumed = _fit(tmp_path, cli_env, config, "resumed", save("resumed.pt"), str(last), *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = torch.load(tmp_path / "whole.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), f"student tensor {name} differs after kill and resume"
