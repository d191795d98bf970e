"""The results table from run records: ``python -m lightning_kd.report RUN_DIRS... --output DIR``.

    python -m lightning_kd.report outputs/cifar100 --output outputs/report
    lightning-kd report outputs/ --output outputs/report

Finds every ``run.json`` (written by :class:`~lightning_kd.records.RunRecord`) under the given folders, groups the
finished runs by ``(benchmark, pair, method)`` and writes to the output folder:

- ``results.md``: per benchmark, one row per pair x method with the best-epoch and last-epoch top-1 as
  mean ± standard deviation over seeds (sample standard deviation, n - 1), ``n`` (and the seeds missing against the
  other runs of the benchmark), the best epochs, the published number where :mod:`lightning_kd.published` has one
  and the differences; then a pair x method matrix of the best-epoch means; then the runs that did not finish
  (running, failed, interrupted), listed, never averaged;
- ``results.csv``: the rows, one per pair x method, in percent;
- ``results.png``: one panel per pair, the methods' best-epoch top-1 with error bars (standard deviation over
  seeds), the last-epoch mean, the published number, and the teacher and the student trained alone as lines.

The networks trained alone (a teacher run, a student-alone run: records without a teacher) are the ``teacher`` and
``student`` rows of every pair that names their network. Two finished records of the same benchmark, pair, method
and seed (a run repeated in another folder) count once: the newest is kept, the others are listed.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kd.published import METHOD_ORDER, PAIR_ORDER, Published, lookup, method_key
from lightning_kd.records import EVALUATED, FINISHED, RECORD_NAME, read_record

ALONE_ROLES = ("teacher", "student")


@dataclass
class Run:
    """One record found under the report's folders."""

    path: Path
    record: dict[str, Any]

    @property
    def labels(self) -> dict[str, Any]:
        return self.record.get("labels") or {}

    @property
    def benchmark(self) -> str:
        return str(self.labels.get("benchmark") or "unknown")

    @property
    def pair(self) -> str:
        return str(self.labels.get("pair") or self.labels.get("student") or "unknown")

    @property
    def method(self) -> str:
        return str(self.labels.get("method") or "unknown")

    @property
    def seed(self) -> int | None:
        return self.labels.get("seed")

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    @property
    def alone(self) -> bool:
        """A network trained alone (no teacher): a teacher run or a student-alone run."""
        return not self.labels.get("teacher")

    @property
    def network(self) -> str:
        """The network trained (the student of a distillation run)."""
        return str(self.labels.get("student") or self.pair)

    def top1(self, which: str) -> float | None:
        """``which`` = ``"best"`` or ``"last"``: top-1 in percent, ``None`` when the run validated nothing."""
        value = self.record.get(f"top1_{which}")
        return None if value is None else 100.0 * float(value)


@dataclass
class Stats:
    """Mean and sample standard deviation (``None`` for fewer than two values) of the values given."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Row:
    """One line of the table: the finished runs of one (benchmark, pair, method)."""

    benchmark: str
    pair: str
    method: str
    runs: list[Run]
    missing: list[int] = field(default_factory=list)
    published: Published | None = None

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    def stats(self, which: str) -> Stats:
        return Stats([v for v in (run.top1(which) for run in self.runs) if v is not None])

    @property
    def best_epochs(self) -> list[Any]:
        return [run.record.get("best_epoch") for run in self.runs]

    def delta(self, which: str) -> float | None:
        mean = self.stats(which).mean
        return None if mean is None or self.published is None else mean - self.published.top1


@dataclass
class Report:
    """What the report found: the rows per benchmark, the runs not finished, duplicates, records of validate/test
    commands without a fit, and unreadable files."""

    rows: list[Row]
    unfinished: list[Run]
    superseded: list[Run]
    unreadable: list[tuple[Path, str]]
    folders: list[Path]
    evaluated: list[Run] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# finding and grouping
# ----------------------------------------------------------------------------------------------------------------
def find_runs(folders: Iterable[str | Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every ``run.json`` under ``folders`` (recursively): the records, and the files that are not records."""
    runs, unreadable, seen = [], [], set()
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist: give folders that hold run folders (e.g. outputs/)")
        paths = [folder] if folder.is_file() else sorted(folder.rglob(RECORD_NAME))
        for path in paths:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                record = read_record(path)
            except ValueError as error:
                unreadable.append((path, str(error)))
                continue
            if record is not None:
                runs.append(Run(path, record))
    return runs, unreadable


def _order(method: str) -> tuple[int, str]:
    """Methods in the tables' order (:data:`~lightning_kd.published.METHOD_ORDER`), others alphabetically after."""
    key = method_key(method)
    return (METHOD_ORDER.index(key) if key in METHOD_ORDER else len(METHOD_ORDER), key)


def _pair_order(pair: str) -> tuple[int, str]:
    return (PAIR_ORDER.index(pair) if pair in PAIR_ORDER else len(PAIR_ORDER), pair.lower())


def _newest(runs: list[Run], key) -> tuple[list[Run], list[Run]]:  # noqa: ANN001
    """One run per ``key(run)`` (the most recently updated), and the others."""
    kept: dict[Any, Run] = {}
    superseded = []
    for run in sorted(runs, key=lambda r: str(r.record.get("updated_at") or "")):
        k = key(run)
        if k in kept:
            superseded.append(kept[k])
        kept[k] = run
    return list(kept.values()), superseded


def build_report(folders: Sequence[str | Path]) -> Report:
    """Read the records under ``folders`` and group them into the table's rows."""
    runs, unreadable = find_runs(folders)
    finished = [r for r in runs if r.status == FINISHED]
    unfinished = [r for r in runs if r.status not in (FINISHED, EVALUATED)]
    evaluated = [r for r in runs if r.status == EVALUATED]
    alone, superseded_alone = _newest(
        [r for r in finished if r.alone], lambda r: (r.benchmark, r.network, r.seed if r.seed is not None else r.path)
    )
    distilled, superseded = _newest(
        [r for r in finished if not r.alone],
        lambda r: (r.benchmark, r.pair, method_key(r.method), r.seed if r.seed is not None else r.path),
    )
    superseded += superseded_alone

    seeds_per_benchmark: dict[str, set[int]] = {}
    for run in runs:
        if isinstance(run.seed, int):
            seeds_per_benchmark.setdefault(run.benchmark, set()).add(run.seed)

    # pairs: from the distillation runs, with the networks they name
    pairs: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    for run in distilled + [r for r in unfinished if not r.alone]:
        pairs.setdefault((run.benchmark, run.pair), (run.labels.get("teacher"), run.labels.get("student")))
    alone_by_network: dict[tuple[str, str], list[Run]] = {}
    for run in alone:
        alone_by_network.setdefault((run.benchmark, run.network), []).append(run)

    rows: list[Row] = []
    used: set[tuple[str, str]] = set()
    for benchmark, pair in sorted(pairs, key=lambda k: (k[0], _pair_order(k[1]))):
        teacher, student = pairs[benchmark, pair]
        for role, network in (("teacher", teacher), ("student", student)):
            found = alone_by_network.get((benchmark, str(network)), [])
            if found:
                used.add((benchmark, str(network)))
                rows.append(Row(benchmark, pair, role, found))
        methods: dict[str, list[Run]] = {}
        for run in distilled:
            if (run.benchmark, run.pair) == (benchmark, pair):
                methods.setdefault(method_key(run.method), []).append(run)
        for method in sorted(methods, key=_order):
            rows.append(Row(benchmark, pair, method, methods[method]))
    for (benchmark, network), found in sorted(alone_by_network.items()):
        if (benchmark, network) not in used:  # a network trained alone that no pair of these runs names
            role = found[0].method if found[0].method in ALONE_ROLES else "student"
            rows.append(Row(benchmark, network, role, found))

    for row in rows:
        row.runs.sort(key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0))
        have = {s for s in row.seeds if isinstance(s, int)}
        row.missing = sorted(seeds_per_benchmark.get(row.benchmark, set()) - have)
        row.published = lookup(row.benchmark, row.pair, row.method)
    unfinished.sort(key=lambda r: (r.benchmark, _pair_order(r.pair), _order(r.method), str(r.seed)))
    return Report(rows, unfinished, superseded, unreadable, [Path(f) for f in folders], evaluated)


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
def _pm(stats: Stats) -> str:
    if stats.mean is None:
        return "-"
    return f"{stats.mean:.2f}" + (f" ± {stats.std:.2f}" if stats.std is not None else "")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _n(row: Row) -> str:
    return f"{row.stats('best').n}" + (f" (missing seed {', '.join(map(str, row.missing))})" if row.missing else "")


def format_markdown(report: Report) -> str:
    """``results.md``: the table per benchmark, the pair x method matrix, the runs not finished, the sources."""
    lines = [
        "# Results",
        "",
        f"Run records under {', '.join(f'`{f}`' for f in report.folders)}: {sum(len(r.runs) for r in report.rows)} "
        f"finished runs averaged, {len(report.unfinished)} not finished (listed at the end, never averaged).",
        "Top-1 on the validation set (%), mean ± sample standard deviation over seeds; n = finished seeds (missing: "
        "seeds other runs of the benchmark have). Best: the best epoch of each run; last: its last epoch. "
        "Δ = mean − published. Epochs count from 0.",
    ]
    for benchmark in dict.fromkeys(row.benchmark for row in report.rows):
        rows = [row for row in report.rows if row.benchmark == benchmark]
        lines += ["", f"## {benchmark}", "",
                  "| pair | method | n | best top-1 | last top-1 | best epoch | published | Δ best | Δ last |",
                  "|---|---|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
        for row in rows:
            published = "-" if row.published is None else f"{row.published.top1:.2f}"
            epochs = ", ".join("-" if e is None else str(e) for e in row.best_epochs)
            lines.append(
                f"| {row.pair} | {row.method} | {_n(row)} | {_pm(row.stats('best'))} | {_pm(row.stats('last'))} | "
                f"{epochs} | {published} | {_signed(row.delta('best'))} | {_signed(row.delta('last'))} |"
            )
        lines += ["", *_matrix(rows)]
    lines += ["", "## Runs not finished (not averaged)", ""]
    if report.unfinished:
        lines += ["| status | benchmark | pair | method | seed | epoch | updated | error | record |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for run in report.unfinished:
            error = run.record.get("error") or {}
            message = f"{error.get('type', '')}: {error.get('message', '')}".strip(": ") if error else ""
            message = message.replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(
                f"| {run.status} | {run.benchmark} | {run.pair} | {run.method} | {run.seed} | "
                f"{run.record.get('epoch')}/{run.record.get('max_epochs')} | {run.record.get('updated_at', '')} | "
                f"{message} | `{run.path}` |"
            )
    else:
        lines.append("None.")
    if report.superseded:
        lines += ["", "## Repeated runs (the newest record of each seed is used)", ""]
        lines += [f"- `{r.path}` ({r.benchmark} {r.pair} {r.method} seed {r.seed})" for r in report.superseded]
    if report.evaluated:
        lines += ["", "## Records of validate/test commands without a fit", ""]
        for run in report.evaluated:
            evaluations = (run.record.get("evaluations") or {}).values()
            metrics = {k: v for e in evaluations for k, v in (e.get("metrics") or {}).items()}
            shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k.endswith("acc1") and v is not None)
            lines.append(f"- `{run.path}` ({run.benchmark} {run.pair} {run.method}){': ' + shown if shown else ''}")
    if report.unreadable:
        lines += ["", "## Unreadable records", ""]
        lines += [f"- `{path}`: {why}" for path, why in report.unreadable]
    sources = {}
    for row in report.rows:
        if row.published is not None:
            sources.setdefault(row.published.source, set()).add(row.published.metric)
    if sources:
        lines += ["", "## Published numbers", ""]
        for source, metrics in sources.items():
            lines.append(f"- {source}; epoch reported: {', '.join(sorted(metrics))}")
        lines.append("- \"unclear\": METHODS.md calls the CRD benchmark's numbers last-epoch accuracies, "
                     "METHODS-MODERN.md section 10 best-epoch ones; compare with both.")  # fmt: skip
        notes = {f"{r.published.label}: {r.published.note}" for r in report.rows if r.published and r.published.note}
        lines += [f"- {note}" for note in sorted(notes)]
    return "\n".join(lines) + "\n"


def _matrix(rows: list[Row]) -> list[str]:
    """The pair x method matrix of best-epoch means, with the difference to the published number."""
    methods = sorted({row.method for row in rows}, key=_order)
    pairs = list(dict.fromkeys(row.pair for row in rows))
    cells = {(row.pair, row.method): row for row in rows}
    lines = ["Best-epoch top-1 (%), mean over seeds (difference to the published number; n when seeds are missing):",
             "", "| pair | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]  # fmt: skip
    for pair in pairs:
        values = []
        for method in methods:
            row = cells.get((pair, method))
            mean = row.stats("best").mean if row else None
            if mean is None:
                values.append("")
                continue
            text = f"{mean:.2f}"
            if row.delta("best") is not None:
                text += f" ({_signed(row.delta('best'))})"
            if row.missing:
                text += f" n={row.stats('best').n}"
            values.append(text)
        lines.append(f"| {pair} | " + " | ".join(values) + " |")
    return lines


CSV_FIELDS = ("benchmark", "pair", "method", "n", "seeds", "missing_seeds", "best_mean", "best_std", "last_mean",
              "last_std", "best_epochs", "published", "published_label", "published_metric", "published_source",
              "delta_best", "delta_last")  # fmt: skip


def write_csv(report: Report, path: Path) -> None:
    """``results.csv``: one line per row of the table, accuracies in percent."""

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for row in report.rows:
            best, last, published = row.stats("best"), row.stats("last"), row.published
            writer.writerow([
                row.benchmark, row.pair, row.method, best.n, ";".join(map(str, row.seeds)),
                ";".join(map(str, row.missing)), number(best.mean), number(best.std), number(last.mean),
                number(last.std), ";".join("" if e is None else str(e) for e in row.best_epochs),
                number(published.top1 if published else None), published.label if published else "",
                published.metric if published else "", published.source if published else "",
                number(row.delta("best")), number(row.delta("last")),
            ])  # fmt: skip


def plot(report: Report, path: Path) -> None:
    """``results.png``: one panel per pair (a grid of up to four columns); in each, one horizontal bar per method
    (best-epoch mean, standard deviation as the error bar), the last-epoch mean (circle), the published number
    (black diamond), the teacher and the student trained alone (green dashed and red dotted lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks: dict[tuple[str, str], list[Row]] = {}
    for row in report.rows:
        blocks.setdefault((row.benchmark, row.pair), []).append(row)
    several = len({b for b, _ in blocks}) > 1
    panels = list(blocks.items())
    if not panels:
        fig, axis = plt.subplots(figsize=(6, 2))
        axis.text(0.5, 0.5, "no finished run", ha="center", va="center")
        axis.set_axis_off()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    bars_per_panel = [max(1, len([r for r in rows if r.method not in ALONE_ROLES]) or len(rows)) for _, rows in panels]
    columns = min(4, len(panels))
    lines_of_panels = math.ceil(len(panels) / columns)
    height = 0.28 * max(bars_per_panel) + 1.6
    fig, axes = plt.subplots(lines_of_panels, columns, figsize=(5.2 * columns, height * lines_of_panels), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_axis_off()
    for axis, ((benchmark, pair), rows) in zip(axes.flat, panels):
        roles = {row.method: row for row in rows if row.method in ALONE_ROLES}
        bars = [row for row in rows if row.method not in ALONE_ROLES] or rows
        if bars is rows:
            roles = {}
        y = list(range(len(bars)))[::-1]
        best = [row.stats("best") for row in bars]
        means = [s.mean if s.mean is not None else math.nan for s in best]
        errors = [s.std or 0.0 for s in best]
        axis.barh(y, means, xerr=errors, color="tab:blue", alpha=0.75, capsize=2, label="best epoch (± std)")
        last = [row.stats("last").mean for row in bars]
        axis.plot([v if v is not None else math.nan for v in last], y, "o", mfc="none", mec="black", ms=4,
                  label="last epoch")  # fmt: skip
        published = [row.published.top1 if row.published else math.nan for row in bars]
        axis.plot(published, y, "D", color="black", ms=3.5, label="published")
        values = [v for v in means + published + [v for v in last if v is not None] if not math.isnan(v)]
        values += [s.mean + sign * s.std for s in best if s.std is not None for sign in (-1, 1)]
        styles = {"teacher": ("tab:green", "--"), "student": ("tab:red", ":")}
        for role, row in roles.items():
            mean = row.stats("best").mean
            if mean is not None:
                axis.axvline(mean, color=styles[role][0], ls=styles[role][1], lw=1.2, label=f"{role} alone")
                values.append(mean)
        for i, row in zip(y, bars):
            if row.missing:
                axis.text(0.99, i, f"n={row.stats('best').n}", transform=axis.get_yaxis_transform(), ha="right",
                          va="center", fontsize=7, color="tab:red")  # fmt: skip
        if values:
            axis.set_xlim(max(0.0, min(values) - 3.0), min(100.0, max(values) + 1.5))
        axis.set_yticks(y, [row.method for row in bars], fontsize=8)
        axis.set_title(f"{benchmark}: {pair}" if several else pair, fontsize=10)
        axis.set_xlabel("top-1 (%)", fontsize=8)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", alpha=0.3)
    handles = {}
    for axis in axes.flat[: len(panels)]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend_columns = min(len(handles), 2 * columns + 1)
    legend_height = 0.25 * math.ceil(len(handles) / max(1, legend_columns)) + 0.15  # inches
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=legend_columns, fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, output: str | Path) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``results.png`` into ``output``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "results.md", output / "results.csv", output / "results.png"]
    paths[0].write_text(format_markdown(report))
    write_csv(report, paths[1])
    plot(report, paths[2])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_kd.report RUN_DIRS... --output DIR`` (also ``lightning-kd report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-kd report",
        description="Build the results table (results.md, results.csv, results.png) from the run.json records "
        "under the given folders.",
    )
    parser.add_argument("folders", nargs="+", help="folders to search for run.json records (recursively)")
    parser.add_argument("--output", default="outputs/report", help="where to write the table (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.folders)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not (report.rows or report.unfinished or report.evaluated or report.unreadable):
        parser.exit(1, f"lightning-kd report: no {RECORD_NAME} under {', '.join(args.folders)}: the runs write one "
                       "into their log folder (lightning-kd adds the RunRecord callback)\n")  # fmt: skip
    paths = write_report(report, args.output)
    sys.stdout.write(
        f"{sum(len(row.runs) for row in report.rows)} finished runs in {len(report.rows)} rows, "
        f"{len(report.unfinished)} not finished. Written: {', '.join(map(str, paths))}\n"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
