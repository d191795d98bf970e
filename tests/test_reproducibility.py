"""Seeded fits reproduce bit for bit on the same machine: in one process, and as two separate command-line runs.

(Across machines, thread counts or GPUs the floating-point sums differ in their last bits and a long fit drifts:
that is why the demo reports the spread over seeds rather than one run.)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from conftest import ROOT, make_trainer
from lightning_kd import DistillationModule
from lightning_kd.data import DigitsDataModule
from lightning_kd.demo import digits_config_args
from lightning_kd.distillers import AB, KD
from lightning_kd.models import create_model


def _fit(distillers, max_epochs: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    L.seed_everything(3)
    module = DistillationModule("resnet8", "resnet14", distillers, num_classes=10, input_size=(3, 16, 16))
    make_trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1).fit(
        module, DigitsDataModule(size=16, batch_size=16)
    )
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_the_same_seeded_fit_twice_gives_the_same_weights() -> None:
    first, second = _fit([KD()], 2), _fit([KD()], 2)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two seeded fits"


def test_a_staged_fit_is_reproducible_too() -> None:
    first, second = _fit([AB(stage_epochs=1)], 2), _fit([AB(stage_epochs=1)], 2)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two seeded fits"


def _digest(path: Path) -> str:
    state = torch.load(path, weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


def test_two_command_line_runs_give_the_same_student(tmp_path: Path, cli_env: dict[str, str]) -> None:
    torch.manual_seed(0)
    torch.save(create_model("resnet14", num_classes=10).state_dict(), tmp_path / "teacher.pt")
    digests = []
    for run in ("a", "b"):
        folder = tmp_path / run
        result = subprocess.run(
            [sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args("kd"), "--model.teacher=resnet14",
             f"--model.teacher_checkpoint={tmp_path / 'teacher.pt'}", "--trainer.max_epochs=2",
             "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
             f"--trainer.default_root_dir={folder}",
             f"--trainer.logger.init_args.save_dir={folder}", "--trainer.enable_progress_bar=false"],
            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (checkpoint,) = folder.rglob("*.ckpt")
        export = subprocess.run(
            [sys.executable, "-m", "lightning_kd.cli", "export", str(checkpoint), "--output", str(folder / "s.pt")],
            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr[-3000:]
        digests.append(_digest(folder / "s.pt"))
    assert digests[0] == digests[1]
