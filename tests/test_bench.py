"""The benchmarks run end to end (``--quick``) and write their tables; no assertion on speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_overhead.py"


def _rows(table: str) -> dict[str, list[str]]:
    """The table's data rows, keyed by method label."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 9 and cells[0] != "method" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


def test_quick_benchmark_measures_kd_and_a_feature_method(tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    command = [
        sys.executable, str(SCRIPT), "--quick", "--methods", "KD,VID",
        "--pair", "resnet20,resnet8", "--input-size", "16", "--batch-size", "8", "--num-classes", "10",
        "--threads", "1", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = output.read_text()
    assert table in result.stdout  # the same table is printed
    rows = _rows(table)
    assert set(rows) == {"KD", "VID"}, table
    for label, cells in rows.items():
        _, stage, plain, library, ratio, mem_plain, mem_library, faults, same_loss = cells
        assert stage == "main"
        for value in (plain, library, ratio):
            assert re.fullmatch(r"\d+\.\d+", value) and float(value) > 0, (label, cells)
        for value in (mem_plain, mem_library):
            assert re.fullmatch(r"\d+", value) and int(value) > 0, (label, cells)
        assert re.fullmatch(r"\d+ / \d+", faults), (label, cells)
        # both sides start from the same weights and batches: their first losses agree
        assert same_loss == "yes", (label, cells)


def test_unknown_method_is_refused_with_the_known_names(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--methods", "NoSuchMethod", "--output", str(tmp_path / "r.md")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    assert "NoSuchMethod" in result.stderr and "KD" in result.stderr
    assert not (tmp_path / "r.md").exists()


def test_quick_breakdown_runs_every_variant_on_the_same_work(tmp_path: Path) -> None:
    output = tmp_path / "breakdown.md"
    command = [
        sys.executable, str(SCRIPT), "--quick", "--breakdown", "--methods", "KD",
        "--pair", "resnet8,resnet8", "--input-size", "8", "--batch-size", "4", "--num-classes", "10",
        "--threads", "1", "--tuned-malloc", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in output.read_text().splitlines()
        if line.startswith("| KD |")
    ]
    assert len(rows) == 5, output.read_text()  # plain, minimal LightningModule and three library variants
    assert "MALLOC_TRIM_THRESHOLD_=" in output.read_text()
    for _, variant, ms, delta, faults, same in rows:
        assert float(ms) > 0 and re.fullmatch(r"[+-]\d+\.\d+", delta) and int(faults) >= 0, variant
        # every variant starts from the same weights and batches and computes the same loss
        assert same == "yes", variant


def test_quick_data_benchmark_compares_worker_settings(tmp_path: Path) -> None:
    output = tmp_path / "data.md"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--quick", "--workers", "0,1",
        "--pair", "resnet8,resnet8", "--batch-size", "8", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = output.read_text()
    rows = [line.strip("|").split("|") for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(cells[0]) for cells in rows] == [0, 1], table
    for cells in rows:
        values = [c.strip().replace(",", "").rstrip("x") for c in cells[1:6]]  # loader, fit, demand, ratios
        assert all(float(v) > 0 for v in values), cells
    assert rows[0][5].strip() == "1.000"  # the first setting is the reference


def test_data_benchmark_dataset_decodes_like_torchvision_cifar() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_data import InMemoryCIFAR
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from lightning_kd.data.cifar import CIFAR100_MEAN, CIFAR100_STD

    data = InMemoryCIFAR(4, train=False)
    image, label = data[2]
    expected = (torch.from_numpy(data.data[2]).permute(2, 0, 1).float() / 255 - torch.tensor(CIFAR100_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR100_STD)[:, None, None]
    assert image.shape == (3, 32, 32) and 0 <= label < 100
    assert torch.allclose(image, expected, atol=1e-6)
