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

The gathering is here; the writers of the three files are in :mod:`lightning_kd.report_writers`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kd.published import PAIR_ORDER, Published, lookup, method_key
from lightning_kd.records import EVALUATED, FINISHED, RECORD_NAME, read_record

# the writers live in their own module; their names stay importable from here
from lightning_kd.report_writers import (  # noqa: F401
    ALONE_ROLES,
    CSV_FIELDS,
    _order,
    format_markdown,
    plot,
    write_csv,
    write_report,
)


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
