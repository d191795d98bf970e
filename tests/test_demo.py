"""The main job in its quick mode: every run goes through the CLI, the table and the plot are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lightning_kd.models import create_model


def test_demo_quick_mode_writes_table_and_plot(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "demo"
    cached = tmp_path / "outputs/digits/teacher/teacher.ckpt"  # random weights under the teacher's name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(create_model("resnet56", num_classes=10).state_dict(), cached)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_kd.demo", "--output", str(out), "--methods", "kd",
         "--epochs", "1", "--limit-batches", "2"],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "results.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip().split(" ")[0] for row in rows] == ["teacher", "student", "KD"]
    assert (out / "results.png").stat().st_size > 10_000
    assert (tmp_path / "outputs/digits/teacher/teacher.ckpt").exists()  # the teacher is cached for next time
    assert "| KD |" in result.stdout
    assert "teacher.ckpt scores " in result.stdout and "not a trained teacher; training it" in result.stdout
    assert "trained now" in result.stdout


def test_curves_are_read_from_the_csv_logger(tmp_path: Path) -> None:
    from lightning_kd.demo import _curves

    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/ce,train/kd,val/acc1\n"
        "0,9,2.25,0.5,\n"
        "0,22,,,0.75\n"
        "1,29,1.5,0.25,\n"
        "1,45,,,0.875\n"
    )
    assert _curves(str(tmp_path)) == ([(1, 0.75), (2, 0.875)], [(9, 2.25), (29, 1.5)])
    assert _curves(str(tmp_path / "missing")) == ([], [])
    assert _curves(None) == ([], [])
