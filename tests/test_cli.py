"""The ``lightning-kd`` command: configs run, overrides apply, bad configs give clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from lightning_kd.cli import run_cli
from lightning_kd.models import create_model
from lightning_kd.demo import digits_config_args

CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-kd"


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def digits_teacher(tmp_path: Path) -> str:
    """A (random) resnet56 teacher for the digits configs, as a plain state dict."""
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet56", num_classes=10).state_dict(), path)
    return str(path)


def test_kd_config_fast_dev_run(cli_env: dict[str, str], digits_teacher: str, tmp_path: Path) -> None:
    result = _run(
        [str(CONSOLE_SCRIPT), "fit", *digits_config_args("kd"), "--trainer.fast_dev_run=true",
         f"--model.teacher_checkpoint={digits_teacher}", f"--trainer.default_root_dir={tmp_path}"],
        cli_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Trainer.fit` stopped" in output  # Lightning's own notices still show...
    assert "💡 Tip" not in output and "LeafSpec" not in output  # ...but not its cloud tips or torch deprecations


@pytest.mark.parametrize("config", ["teacher", "student"])
def test_teacher_and_student_configs_fast_dev_run(config: str, cli_env: dict[str, str]) -> None:
    result = _run([sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args(config),
                   "--trainer.fast_dev_run=true"], cli_env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_command_line_overrides_apply() -> None:
    cli = run_cli(
        [*digits_config_args("kd"), "--model.teacher_checkpoint=null",
         "--model.task_loss_weight=0.25", "--model.distillers.init_args.temperature=2", "--data.batch_size=16",
         "--trainer.max_epochs=3", "--trainer.logger=false"],
        run=False,
    )
    assert cli.model.task_loss_weight == 0.25
    assert cli.model.distillers[0].temperature == 2.0
    assert cli.datamodule.batch_size == 16
    assert cli.trainer.max_epochs == 3
    assert type(cli.model.student).__name__ == "CIFARResNet"


def test_unknown_class_key_and_type_are_clear_errors(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad_class = tmp_path / "bad_class.yaml"
    bad_class.write_text(
        "model:\n  student: resnet8\n  num_classes: 10\n  teacher: resnet8\n"
        "  distillers:\n    - class_path: lightning_kd.distillers.NoSuchMethod\n"
    )
    result = _run([sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(bad_class)], cli_env)
    assert result.returncode != 0 and "NoSuchMethod" in result.stderr

    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("model:\n  student: resnet8\n  num_classes: 10\n  temprature: 3\n")
    result = _run([sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(bad_key)], cli_env)
    assert result.returncode != 0 and "temprature" in result.stderr

    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("model:\n  student: resnet8\n  num_classes: ten\n")
    result = _run([sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(bad_type)], cli_env)
    assert result.returncode != 0 and "num_classes" in result.stderr
