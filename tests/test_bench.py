"""The benchmarks run end to end (``--quick``) and write their reports; the overhead benchmark's rows come from
the method registry and its report computes what it claims. No assertion on speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_overhead.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_overhead  # noqa: E402
from benchmarks.overhead import harness, report  # noqa: E402
from lightning_kd.distillers import list_distillers  # noqa: E402


def _table_rows(text: str, columns: int) -> dict[str, list[str]]:
    """Data rows of the markdown tables with ``columns`` cells, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == columns and cells[0] != "method" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


# ----------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------
def test_quick_benchmark_measures_a_logit_a_staged_and_a_two_view_method(tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    result = _run([
        str(SCRIPT), "--quick", "--methods", "KD,fsp,MLKD",
        "--pair", "resnet8,resnet8", "--input-size", "8", "--batch-size", "4", "--num-classes", "10",
        "--threads", "1", "--output", str(output),
    ], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert text in result.stdout  # the same report is printed
    rows = _table_rows(text, 9)
    assert set(rows) == {"KD", "FSP", "MLKD"}, text
    # FSP is measured in its initialisation stage; MLKD reads batch["image_strong"]
    assert {label: cells[1] for label, cells in rows.items()} == {"KD": "main", "FSP": "fsp_init", "MLKD": "main"}
    for label, cells in rows.items():
        _, _, plain, library, ratio, mem_plain, mem_library, faults, same_loss = cells
        for value in (plain, library, ratio):
            assert re.fullmatch(r"\d+\.\d+", value) and float(value) > 0, (label, cells)
        for value in (mem_plain, mem_library):
            assert re.fullmatch(r"\d+", value), (label, cells)
        assert re.fullmatch(r"\d+ / \d+", faults), (label, cells)
        # same weights, batches and optimizer on both sides: the losses agree at the first and the last step
        assert same_loss == "yes", (label, cells)
    logits = _table_rows(text.split("## Logit methods against KD")[1], 5)
    assert set(logits) == {"KD", "MLKD"}, text  # FSP is no logit method
    assert logits["KD"][2:] == ["1.000", "1.000", "reference"]
    assert float(logits["MLKD"][2]) > 0 and logits["MLKD"][4] == ""  # no target for MLKD (it runs two views)


def test_unknown_method_is_refused_with_the_known_names(tmp_path: Path) -> None:
    output = tmp_path / "r.md"
    with pytest.raises(SystemExit) as refused:
        bench_overhead.main(["--quick", "--methods", "kd,NoSuchMethod", "--output", str(output)])
    message = str(refused.value.code)
    assert "nosuchmethod" in message and "kd+ls" in message and "mlkd" in message
    assert not output.exists()


@pytest.mark.slow  # four worker processes: about 30 s on a quiet 2-core machine
def test_quick_breakdown_runs_every_variant_on_the_same_work(tmp_path: Path) -> None:
    output = tmp_path / "breakdown.md"
    result = _run([
        str(SCRIPT), "--quick", "--breakdown", "--methods", "kd",
        "--pair", "resnet8,resnet8", "--input-size", "8", "--batch-size", "4", "--num-classes", "10",
        "--threads", "1", "--tuned-malloc", "--output", str(output),
    ], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| KD |")]  # fmt: skip
    assert [row[1] for row in rows] == list(harness.SIDES.values()), text
    assert "MALLOC_TRIM_THRESHOLD_=" in text
    for _, variant, ms, delta, faults, same in rows:
        assert float(ms) > 0 and re.fullmatch(r"[+-]\d+\.\d+", delta) and int(faults) >= 0, variant
        assert same == "yes", variant  # every variant computes the same losses


def test_quick_data_benchmark_compares_worker_settings(tmp_path: Path) -> None:
    output = tmp_path / "data.md"
    result = _run([
        str(ROOT / "benchmarks" / "bench_data.py"), "--quick", "--workers", "0,1",
        "--pair", "resnet8,resnet8", "--batch-size", "8", "--output", str(output),
    ], tmp_path)  # fmt: skip
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
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    expected = (torch.from_numpy(data.data[2]).permute(2, 0, 1).float() / 255 - mean) / std
    assert image.shape == (3, 32, 32) and 0 <= label < 100
    assert torch.allclose(image, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# the rows: every registered method
# ----------------------------------------------------------------------------------------------------------
def test_every_registered_method_gets_a_row_or_a_note() -> None:
    rows, notes = harness.plan_rows(None, with_options=True)
    keys = [row.key for row in rows]
    for name in list_distillers():
        assert name in keys or any(note.startswith(f"{harness.display_name(name)} left out") for note in notes), name
    # KD+LS right after KD, built with logit standardisation; FT also measured in its main stage
    assert keys[keys.index("kd") + 1] == "kd+ls"
    kd_ls = rows[keys.index("kd+ls")]
    assert (kd_ls.method, kd_ls.overrides, kd_ls.label) == ("kd", {"standardize": True}, "KD+LS")
    assert kd_ls.family == "logits"
    assert kd_ls.build_distiller().standardize is True
    assert rows[keys.index("ft")].stage == "ft_init" and rows[keys.index("ft@main")].stage == "main"
    assert rows[keys.index("ft@main")].overrides == {"stage_epochs": 0}  # over the registry's example_kwargs
    assert rows[keys.index("ft@main")].build_distiller().stage_epochs == 0
    assert rows[keys.index("mlkd")].views == ("strong",)
    options = [row for row in rows if row.options]
    assert [(row.method, row.options) for row in options] == [
        ("kd", {"channels_last": True}), ("kd", {"compile": True}), ("kd", {"teacher_precision": "bf16"})
    ]


def test_rows_are_chosen_case_insensitively_in_the_order_given() -> None:
    rows, _ = harness.plan_rows(["MLKD", " kd ", "FitNet", "kd"])
    assert [(row.key, row.label) for row in rows] == [("mlkd", "MLKD"), ("kd", "KD"), ("fitnet", "FitNet")]
    with pytest.raises(ValueError, match="'nope'.*kd, kd\\+ls, fitnet"):
        harness.plan_rows(["kd", "nope"])


def test_logit_methods_are_measured_in_one_group() -> None:
    rows, _ = harness.plan_rows(["at", "kd", "dkd", "ab", "dist"], with_options=True)
    groups = [[row.key for row in group] for group in harness.plan_groups(rows)]
    assert groups == [["at"], ["kd", "dkd", "dist"], ["ab"], ["kd+channels_last"], ["kd+compile"],
                      ["kd+teacher_precision"]]  # fmt: skip
    assert all(len(g) == 1 for g in harness.plan_groups(rows, group_logits=False))


def test_workload_refuses_a_schedule_without_a_warm_up_step() -> None:
    with pytest.raises(ValueError, match="warmup=0"):
        harness.Workload(warmup=0)


# ----------------------------------------------------------------------------------------------------------
# the report, on measurements made up here
# ----------------------------------------------------------------------------------------------------------
def _side(seconds: list[float], first: float = 2.0, last: float = 1.5) -> dict:
    return {"times": seconds, "faults": [10.0] * len(seconds), "peak": 100.0, "first_loss": first, "last_loss": last}


def _row(key: str) -> harness.Row:
    return harness.Row(key, key.upper(), key, "main", "logits")


def test_logit_table_takes_the_median_of_per_round_ratios_within_a_group() -> None:
    # KD: 0.10, 0.20, 0.10 s/step (10, 5, 10 steps/s); DKD: 0.11, 0.20, 0.125 s/step (9.09, 5, 8 steps/s)
    # per-round ratios 0.909, 1.0, 0.8 -> median 0.909; the ratio of medians would be 8 / 10 = 0.8
    results = {
        "kd": {"plain": _side([0.05, 0.05, 0.05]), "library": _side([0.10, 0.20, 0.10])},
        "dkd": {"plain": _side([0.05, 0.10, 0.0625]), "library": _side([0.11, 0.20, 0.125])},
    }
    rows = [_row("kd"), _row("dkd")]
    together, _ = report.relative_to_reference(rows[1], "library", results, {"kd": 0, "dkd": 0})
    assert together == pytest.approx(0.1 / 0.11)
    apart, same_rounds = report.relative_to_reference(rows[1], "library", results, {"kd": 0, "dkd": 1})
    assert (apart, same_rounds) == (pytest.approx(0.8), False)
    table = report.logit_table(rows, results, {"kd": 0, "dkd": 0})
    cells = _table_rows("\n".join(table), 5)
    assert cells["DKD"][1:] == ["8.00", "0.909", "0.800", "NOT met"]  # plain: 20/20, 10/20, 16/20 -> 0.8
    assert report.logit_verdicts(rows, results, {"kd": 0, "dkd": 0}) == [
        "DKD: library steps/s 0.909 x KD's, does NOT meet the target >= 0.97"
    ]
    apart_table = "\n".join(report.logit_table(rows, results, {"kd": 0, "dkd": 1}))
    assert "| 0.800 * |" in apart_table and "measured in other rounds" in apart_table


def test_main_table_flags_sides_whose_losses_disagree() -> None:
    work = harness.Workload(steps=2, rounds=2, warmup=1)
    results = {
        "kd": {"plain": _side([0.5, 0.25]), "library": _side([1.0, 0.25])},
        "dkd": {"plain": _side([0.1, 0.1]), "library": _side([0.1, 0.1], last=1.6)},
    }
    text = report.render(work, [_row("kd"), _row("dkd"), _row("dist")], results, {"kd": 0, "dkd": 0})
    rows = _table_rows(text.split("## Logit")[0], 9)
    # steps/s: plain median(2, 4) = 3, library median(1, 4) = 2.5; ratios 0.5 and 1.0 -> 0.75
    assert rows["KD"][2:5] == ["3.00", "2.50", "0.750"] and rows["KD"][8] == "yes"
    assert rows["DKD"][8] == "NO: last 1.5 vs 1.6"
    assert rows["DIST"][2] == "failed"
    assert "## Logit methods against KD" in text


def test_the_reference_distillers_are_the_registered_ones() -> None:
    assert harness.REFERENCE in list_distillers()
    assert all(harness.VARIANTS[key][0] in list_distillers() if key in harness.VARIANTS else key in list_distillers()
               for key in harness.TARGETED)  # fmt: skip


def test_quick_cache_benchmark_builds_a_cache_and_compares_the_fits(tmp_path: Path) -> None:
    output = tmp_path / "cache.md"
    result = _run([
        str(ROOT / "benchmarks" / "bench_cache.py"), "--quick", "--pair", "resnet8,resnet8", "--threads", "1",
        "--tmp-dir", str(tmp_path), "--output", str(output),
    ], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = output.read_text()
    assert text in result.stdout  # the same report is printed
    assert [p.name for p in tmp_path.iterdir()] == ["cache.md"]  # the cache was built in a folder since removed
    build = _table_rows(text, 3)
    assert build["teacher forwards (images x views)"][1:] == ["1,296", "8,100,000"]  # 8 and 50,000 images x 162
    for row in ("build time", "size on disk"):
        assert re.fullmatch(r"[\d.,]+ (s|min|h|[kMG]B).*", build[row][1]) and build[row][2], build[row]
    fits = _table_rows(text, 6)
    assert list(fits) == ["fit", "live teacher", "teacher cache (fp16)", "student alone (ceiling)"], text
    assert fits["live teacher"][3] == "1.000"
    ratio = fits["teacher cache (fp16)"][3]
    assert re.fullmatch(r"\d+\.\d+", ratio) and float(ratio) > 0, fits["teacher cache (fp16)"]
    assert "first losses are the same" in text  # fp16 logits: the same KD loss within 1e-3
    payoff = _table_rows(text, 2)
    assert re.fullmatch(r"\d+\.\d+|never .*", payoff["runs to pay back the build"][1]), text
    assert payoff["steps per run"][1] == "187,680"
