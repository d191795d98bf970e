"""The writers of the results table (:mod:`lightning_kd.report` gathers it): :func:`format_markdown`
(``results.md``), :func:`write_csv` (``results.csv``, columns :data:`CSV_FIELDS`), :func:`plot` (``results.png``) and
:func:`write_report` (all three into a folder); also the table's order of the methods and the roles of the networks
trained alone, which the gathering uses too.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_kd.published import METHOD_ORDER, method_key

if TYPE_CHECKING:
    from lightning_kd.report import Report, Row, Stats

# shared with the gathering (lightning_kd.report imports them from here: this module needs its classes for type
# hints only, so the modules import one way)
ALONE_ROLES = ("teacher", "student")


def _order(method: str) -> tuple[int, str]:
    """Methods in the tables' order (:data:`~lightning_kd.published.METHOD_ORDER`), others alphabetically after."""
    key = method_key(method)
    return (METHOD_ORDER.index(key) if key in METHOD_ORDER else len(METHOD_ORDER), key)


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
