"""The report: run.json records under folders -> results.md, results.csv, results.png."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from conftest import ROOT

from lightning_kd import published, report
from lightning_kd.records import write_record

PAIR = "resnet32x4-resnet8x4"


def _record(benchmark: str, pair: str, method: str, seed: int, status: str = "finished",
            best: float | None = None, last: float | None = None, teacher: str | None = "resnet32x4",
            student: str = "resnet8x4", updated: str = "2026-01-01T00:00:00+00:00", **more) -> dict:  # fmt: skip
    return {
        "schema": 1, "status": status,
        "labels": {"benchmark": benchmark, "pair": pair, "method": method, "seed": seed, "student": student,
                   "teacher": teacher},
        "epoch": 240 if status == "finished" else 17, "max_epochs": 240,
        "top1_best": best, "top1_last": last, "best_epoch": None if best is None else 200 + seed,
        "updated_at": updated, "error": None, **more,
    }  # fmt: skip


def _write(root: Path, record: dict, where: str | None = None) -> Path:
    labels = record["labels"]
    folder = root / (where or f"{labels['benchmark']}/{labels['pair']}/{labels['method']}/seed{labels['seed']}")
    write_record(folder / "run.json", record)
    return folder


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """The second computation: plain sums."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Synthetic run folders: a teacher over three seeds, a student alone missing a seed, KD complete, CRD with a
    failed seed, a method without a published number with a run in progress, a repeated seed, a broken file."""
    root = tmp_path / "outputs"
    for seed, (best, last) in enumerate([(0.7950, 0.7931), (0.7921, 0.7900), (0.7966, 0.7940)]):
        _write(root, _record("cifar100", "resnet32x4", "teacher", seed, best=best, last=last, teacher=None,
                             student="resnet32x4"))  # fmt: skip
    for seed, (best, last) in enumerate([(0.7250, 0.7231), (0.7302, 0.7290)]):
        _write(root, _record("cifar100", "resnet8x4", "student", seed, best=best, last=last, teacher=None))
    for seed, (best, last) in enumerate([(0.7351, 0.7340), (0.7322, 0.7301), (0.7390, 0.7385)]):
        _write(root, _record("cifar100", PAIR, "kd", seed, best=best, last=last))
    _write(root, _record("cifar100", PAIR, "kd", 0, best=0.10, last=0.10, updated="2025-01-01T00:00:00+00:00"),
           where="old/kd-seed0")  # an older repeat of seed 0: not averaged  # fmt: skip
    _write(root, _record("cifar100", PAIR, "crd", 0, best=0.7560, last=0.7551))
    _write(root, _record("cifar100", PAIR, "crd", 2, best=0.7533, last=0.7522))
    _write(root, _record("cifar100", PAIR, "crd", 1, status="failed", best=0.31, last=0.31,
                         error={"type": "StageDivergedError", "message": "loss | went up\nfast"}))  # fmt: skip
    _write(root, _record("cifar100", PAIR, "mymethod", 0, best=0.7001, last=0.6990))
    _write(root, _record("cifar100", PAIR, "mymethod", 1, status="running", best=0.5, last=0.5))
    _write(root, _record("cifar100", "resnet8x4", "student", 0, status="evaluated", teacher=None,
                         evaluations={"test": {"metrics": {"test/acc1": 0.7311, "test/loss": 1.2}}}),
           where="validated/resnet8x4")  # a test command's record without a fit: listed, not a run  # fmt: skip
    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{half a record")
    return root


def test_rows_statistics_and_published_numbers(runs: Path) -> None:
    built = report.build_report([runs])
    rows = {(r.pair, r.method): r for r in built.rows}
    assert [(r.pair, r.method) for r in built.rows] == [
        (PAIR, "teacher"), (PAIR, "student"), (PAIR, "kd"), (PAIR, "crd"), (PAIR, "mymethod")
    ]  # fmt: skip
    expected = {
        "teacher": ([79.50, 79.21, 79.66], [79.31, 79.00, 79.40], 79.42, []),
        "student": ([72.50, 73.02], [72.31, 72.90], 72.50, [2]),
        "kd": ([73.51, 73.22, 73.90], [73.40, 73.01, 73.85], 73.33, []),
        "crd": ([75.60, 75.33], [75.51, 75.22], 75.51, [1]),
        "mymethod": ([70.01], [69.90], None, [1, 2]),
    }
    for method, (best, last, target, missing) in expected.items():
        row = rows[PAIR, method]
        for which, values in (("best", best), ("last", last)):
            mean, std = _mean_std(values)
            stats = row.stats(which)
            assert stats.n == len(values) and stats.mean == pytest.approx(mean, abs=1e-9)
            assert (stats.std is None) == (std is None) and (std is None or stats.std == pytest.approx(std, abs=1e-9))
            assert row.delta(which) == (None if target is None else pytest.approx(mean - target, abs=1e-9))
        assert row.missing == missing
        assert (row.published.top1 if row.published else None) == target
    assert rows[PAIR, "kd"].best_epochs == [200, 201, 202]
    unfinished = [(r.method, r.seed, r.status) for r in built.unfinished]
    assert unfinished == [("crd", 1, "failed"), ("mymethod", 1, "running")]
    assert [r.path.parent.name for r in built.superseded] == ["kd-seed0"]
    assert [r.path.parent.name for r in built.evaluated] == ["resnet8x4"]
    assert [p.parent.name for p, _ in built.unreadable] == ["broken"]


def test_written_files(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report.main([str(runs), "--output", str(out)]) == 0
    text = (out / "results.md").read_text()
    kd_mean, kd_std = _mean_std([73.51, 73.22, 73.90])
    line = next(line for line in text.splitlines() if line.startswith(f"| {PAIR} | kd |"))
    assert line == (f"| {PAIR} | kd | 3 | {kd_mean:.2f} ± {kd_std:.2f} | 73.42 ± 0.42 | 200, 201, 202 | 73.33 | "
                    f"{kd_mean - 73.33:+.2f} | +0.09 |")  # fmt: skip
    assert f"| {PAIR} | student | 2 (missing seed 2) |" in text
    assert f"| {PAIR} | crd | 2 (missing seed 1) |" in text
    assert f"| {PAIR} | mymethod | 1 (missing seed 1, 2) | 70.01 | 69.90 | 200 | - | - | - |" in text
    unfinished = text.split("## Runs not finished")[1]
    assert "| failed | cifar100 | resnet32x4-resnet8x4 | crd | 1 | 17/240 |" in unfinished
    assert "StageDivergedError: loss \\| went up fast" in unfinished
    assert "| running | cifar100 | resnet32x4-resnet8x4 | mymethod | 1 |" in unfinished
    assert "validated/resnet8x4/run.json` (cifar100 resnet8x4 student): test/acc1 73.11" in text
    assert "kd-seed0" in text.split("## Repeated runs")[1] and "broken" in text.split("## Unreadable records")[1]
    # the failed and running seeds are never averaged: 31 % and 50 % appear nowhere in the tables
    assert "31.00" not in text and "50.00" not in text
    matrix = text.split("mean over seeds")[1]
    assert f"| {PAIR} | 79.46 (+0.04) | 72.76 (+0.26) n=2 | {kd_mean:.2f} ({kd_mean - 73.33:+.2f}) |" in matrix

    with open(out / "results.csv", newline="") as handle:
        rows = {(r["pair"], r["method"]): r for r in csv.DictReader(handle)}
    kd = rows[PAIR, "kd"]
    assert (kd["n"], kd["seeds"], kd["missing_seeds"], kd["published"]) == ("3", "0;1;2", "", "73.3300")
    assert float(kd["best_mean"]) == pytest.approx(kd_mean, abs=1e-4)
    assert float(kd["best_std"]) == pytest.approx(kd_std, abs=1e-4)
    assert float(kd["delta_best"]) == pytest.approx(kd_mean - 73.33, abs=1e-4)
    assert kd["published_source"].startswith("METHODS.md") and kd["published_metric"] == "unclear"
    assert rows[PAIR, "mymethod"]["published"] == "" and rows[PAIR, "mymethod"]["best_std"] == ""
    assert rows[PAIR, "crd"]["missing_seeds"] == "1"
    assert (out / "results.png").stat().st_size > 5_000


def test_the_plot_of_the_full_table_stays_readable(tmp_path: Path) -> None:
    """13 pairs x 20 methods, two seeds: one panel per pair, four columns, a bounded figure."""
    import matplotlib.image

    root = tmp_path / "outputs"
    methods = [f"m{i:02d}" for i in range(18)] + ["kd", "crd"]
    for p, pair in enumerate(published.CRD_TABLE):
        teacher, student = pair.split("-")
        for m, method in enumerate(methods):
            for seed in (0, 1):
                value = 0.6 + 0.01 * ((p + m + seed) % 10)
                _write(root, _record("cifar100", pair, method, seed, best=value, last=value - 0.001, teacher=teacher,
                                     student=student))  # fmt: skip
    built = report.build_report([root])
    assert len(built.rows) == 13 * 20
    report.plot(built, tmp_path / "results.png")
    height, width, _ = matplotlib.image.imread(tmp_path / "results.png").shape
    assert width == 4 * 520 and 1500 < height < 3500  # 4 x 4 panels of 20 bars at 100 dpi


def test_a_real_digits_run_folder(tmp_path: Path) -> None:
    from lightning_kd.cli import run_cli

    folder = tmp_path / "runs" / "student-alone"
    run_cli([
        "fit", "--config", str(ROOT / "configs" / "digits" / "base.yaml"), "--config",
        str(ROOT / "configs" / "digits" / "student.yaml"), "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1",
        "--data.init_args.batch_size=16", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}",
        "--seed_everything=5",
    ])  # fmt: skip
    (record_path,) = (tmp_path / "runs").rglob("run.json")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--output", str(out)]) == 0
    built = report.build_report([tmp_path / "runs"])
    (row,) = built.rows
    assert (row.benchmark, row.pair, row.method, row.seeds) == ("digits", "resnet8", "student", [5])
    with open(record_path.parent / "metrics.csv", newline="") as handle:
        accuracies = [float(r["val/acc1"]) for r in csv.DictReader(handle) if r.get("val/acc1")]
    assert row.stats("best").mean == pytest.approx(100 * max(accuracies))
    assert row.stats("last").mean == pytest.approx(100 * accuracies[-1])
    assert f"| resnet8 | student | 1 | {100 * max(accuracies):.2f} |" in (out / "results.md").read_text()


def test_no_record_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        report.main([str(tmp_path), "--output", str(tmp_path / "out")])
    assert raised.value.code == 1 and "no run.json under" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])


# ------------------------------------------------------------------------------------------------------------
# the published numbers
# ------------------------------------------------------------------------------------------------------------
METHODS_MD = Path("/work/shared/METHODS.md")
MODERN_MD = Path("/work/shared/METHODS-MODERN.md")
NAMES = {"ShuffleNetV1": "ShuffleV1", "ShuffleNetV2": "ShuffleV2", "res32x4": "resnet32x4", "res8x4": "resnet8x4",
         "res56": "resnet56", "res20": "resnet20"}  # fmt: skip


def _markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with ``first_cell``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell}"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]


def _pair(text: str) -> str:
    teacher, student = (NAMES.get(n.strip(), n.strip()) for n in text.split("->"))
    return f"{teacher}-{student}"


@pytest.mark.skipif(not METHODS_MD.is_file(), reason="the method specifications are not on this machine")
def test_the_crd_table_matches_methods_md() -> None:
    header, *rows = _markdown_rows(METHODS_MD.read_text(), "teacher -> student")
    assert [h.lower() for h in header[1:]] == list(published.CRD_COLUMNS)
    table = published.published_table()
    assert len(rows) == 13
    for row in rows:
        pair = _pair(row[0])
        for method, cell in zip(published.CRD_COLUMNS, row[1:], strict=True):
            found = table.get(("cifar100", pair, method))
            assert (found.top1 if found else "n/a") == (float(cell) if cell != "n/a" else "n/a"), (pair, method)


@pytest.mark.skipif(not MODERN_MD.is_file(), reason="the method specifications are not on this machine")
def test_the_modern_table_matches_section_10() -> None:
    section = MODERN_MD.read_text().split("## 10.")[1]
    header, *rows = _markdown_rows(section, "method")
    pairs = [_pair(cell) for cell in header[1:-1]]
    assert tuple(pairs) == published.MODERN_PAIRS
    for row in rows:
        method = published.method_key(row[0].split(" (")[0]).replace("kd_ctkd", "ctkd")
        for pair, cell in zip(pairs, row[1:-1], strict=True):
            found = published.lookup("cifar100", pair, method)
            assert (found.top1 if found else "-") == (float(cell) if cell != "-" else "-"), (pair, method)
    imagenet = section.split("ImageNet ResNet34 -> ResNet18 (top-1):")[1].split("Base recipes")[0]
    found = re.findall(r"([A-Za-z+]+)\s+(\d+\.\d+)", re.sub(r"\([^)]*\)", "", imagenet))
    assert len(found) == 8
    for label, value in found:
        method = published.method_key(label).replace("kd_ctkd", "ctkd")
        assert published.lookup("imagenet", published.IMAGENET_PAIR, method).top1 == float(value), label


def test_lookup_accepts_the_labels_runs_carry() -> None:
    assert published.lookup("cifar100", PAIR, "KD+LS").top1 == 76.62
    assert published.lookup("CIFAR100", PAIR, "kd_ls").top1 == 76.62
    assert published.lookup("cifar100", "wrn_40_2-wrn_16_2", "dist") is None  # "-" in the source
    assert published.lookup("cifar100", "wrn_40_2-wrn_40_1", "fsp") is None  # "n/a" in the source
    assert published.lookup("imagenet", "resnet34-resnet18", "teacher").top1 == 73.31
    assert published.lookup("digits", "resnet56-resnet8", "kd") is None
