"""The overhead benchmark's tables, as markdown, from :func:`benchmarks.overhead.harness.run_groups`'s measurements.

- the main table: per row, each side's median steps/s, the ratio library/plain (median of the per-round ratios,
  so a change of load during the run affects both sides of a pair alike), each side's peak memory and minor page
  faults per step, and whether both sides computed the same loss at the first and the last step;
- the logit table: each logit method's library steps/s relative to KD's in the same run (median of the
  per-round ratios when they were measured in the same rounds), with the target for the methods that must cost
  no more than KD (printed, not enforced);
- the breakdown table (``--breakdown``): ms/step of each variant and its difference to the plain loop.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.overhead.harness import LOGIT_TARGET, REFERENCE, SIDES, TARGETED, Row, Workload


def same_loss(a: float | None, b: float | None) -> bool:
    """Whether two sides' losses agree (relative tolerance 1e-3; both must be finite numbers)."""
    return a is not None and b is not None and abs(a - b) <= 1e-3 * max(1.0, abs(a))


def rates(side: dict[str, Any]) -> list[float]:
    """Steps/s of each round."""
    return [1.0 / t for t in side["times"]]


def summarize(measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The main table's numbers for one row's ``{side: measurement}`` (sides ``plain`` and ``library``)."""
    plain, library = measured["plain"], measured["library"]
    return {
        "plain": statistics.median(rates(plain)),
        "library": statistics.median(rates(library)),
        "ratio": statistics.median(lib / base for lib, base in zip(rates(library), rates(plain))),
        "mem_plain": plain["peak"],
        "mem_library": library["peak"],
        "faults_plain": statistics.median(plain["faults"]),
        "faults_library": statistics.median(library["faults"]),
        "same_first": same_loss(plain["first_loss"], library["first_loss"]),
        "same_last": same_loss(plain["last_loss"], library["last_loss"]),
        "first": (plain["first_loss"], library["first_loss"]),
        "last": (plain["last_loss"], library["last_loss"]),
    }


def _loss_cell(same_first: bool, same_last: bool, first: tuple, last: tuple) -> str:
    if same_first and same_last:
        return "yes"
    wrong = []
    if not same_first:
        wrong.append("first %s vs %s" % first)
    if not same_last:
        wrong.append("last %s vs %s" % last)
    return "NO: " + "; ".join(wrong)


def header(work: Workload, title: str) -> list[str]:
    import lightning
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"# {title}",
        "",
        f"- workload: {work.pair[0]} -> {work.pair[1]}, batch {work.batch_size}, {work.input_size}x{work.input_size} "
        f"inputs, {work.num_classes} classes, device {work.device}",
        f"- timing: {work.warmup} warm-up steps, then {work.rounds} alternating rounds of {work.steps} steps per "
        "worker",
        f"- torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {work.threads or torch.get_num_threads()} threads per worker, load average at the "
        f"end {load}, {datetime.datetime.now().isoformat(timespec='seconds')}",
    ]


def memory_name(work: Workload) -> str:
    return "peak CUDA memory allocated" if work.device.startswith("cuda") else "peak RSS growth"


def main_table(work: Workload, rows: Sequence[Row], results: dict[str, dict[str, Any]]) -> list[str]:
    memory = memory_name(work)
    lines = [
        f"| method | stage | plain steps/s | library steps/s | library/plain | {memory} plain (MiB) "
        f"| {memory} library (MiB) | page faults/step plain / library | same loss (first and last step) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.key not in results:
            lines.append(f"| {row.label} | {row.stage} | failed | failed | | | | | |")
            continue
        r = summarize(results[row.key])
        lines.append(
            f"| {row.label} | {row.stage} | {r['plain']:.2f} | {r['library']:.2f} | {r['ratio']:.3f} | "
            f"{r['mem_plain']:.0f} | {r['mem_library']:.0f} | {r['faults_plain']:.0f} / {r['faults_library']:.0f} | "
            f"{_loss_cell(r['same_first'], r['same_last'], r['first'], r['last'])} |"
        )
    return lines


def logit_rows(rows: Sequence[Row], results: dict[str, dict[str, Any]]) -> list[Row]:
    """The rows of the logit table: measured logit methods without speed options, when KD is among them."""
    chosen = [r for r in rows if r.family == "logits" and not r.options and r.key in results]
    return chosen if any(r.key == REFERENCE for r in chosen) and len(chosen) > 1 else []


def relative_to_reference(
    row: Row, side: str, results: dict[str, dict[str, Any]], group_of: dict[str, int]
) -> tuple[float, bool]:
    """``side``'s steps/s of ``row`` over KD's: the median of the per-round ratios when both were measured in the
    same rounds (returns True), else the ratio of the medians (False)."""
    mine, reference = rates(results[row.key][side]), rates(results[REFERENCE][side])
    if group_of.get(row.key) == group_of.get(REFERENCE):
        return statistics.median(a / b for a, b in zip(mine, reference)), True
    return statistics.median(mine) / statistics.median(reference), False


def logit_table(rows: Sequence[Row], results: dict[str, dict[str, Any]], group_of: dict[str, int]) -> list[str]:
    """Each logit method against KD; empty when KD or every other logit method is missing."""
    chosen = logit_rows(rows, results)
    if not chosen:
        return []
    lines = [
        f"| method | library steps/s | library vs KD | plain vs KD | target (library vs KD >= {LOGIT_TARGET}) |",
        "|---|---:|---:|---:|---|",
    ]
    apart = False
    for row in chosen:
        library, together = relative_to_reference(row, "library", results, group_of)
        plain, _ = relative_to_reference(row, "plain", results, group_of)
        apart |= not together
        mark = "" if together else " *"
        if row.key == REFERENCE:
            target = "reference"
        elif row.key in TARGETED:
            target = "met" if library >= LOGIT_TARGET else "NOT met"
        else:
            target = ""
        steps = statistics.median(rates(results[row.key]["library"]))
        lines.append(f"| {row.label} | {steps:.2f} | {library:.3f}{mark} | {plain:.3f}{mark} | {target} |")
    if apart:
        lines += ["", "\\* measured in other rounds than KD: a ratio of medians, exposed to the machine's drift"]
    return lines


def logit_verdicts(rows: Sequence[Row], results: dict[str, dict[str, Any]], group_of: dict[str, int]) -> list[str]:
    """One line per targeted method: its ratio to KD and whether it meets the target."""
    out = []
    for row in logit_rows(rows, results):
        if row.key in TARGETED:
            ratio, _ = relative_to_reference(row, "library", results, group_of)
            verdict = "meets" if ratio >= LOGIT_TARGET else "does NOT meet"
            out.append(f"{row.label}: library steps/s {ratio:.3f} x KD's, {verdict} the target >= {LOGIT_TARGET}")
    return out


def breakdown_table(rows: Sequence[Row], results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| method | variant | ms/step | minus plain (ms/step) | page faults/step | same loss as plain (first and last "
        "step) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        measured = results.get(row.key)
        if measured is None:
            lines.append(f"| {row.label} | failed | | | | |")
            continue
        plain = measured["plain"]
        for side, m in measured.items():
            delta = statistics.median(1000 * (t - p) for t, p in zip(m["times"], plain["times"]))
            first, last = (plain["first_loss"], m["first_loss"]), (plain["last_loss"], m["last_loss"])
            same = _loss_cell(same_loss(*first), same_loss(*last), first, last)
            lines.append(
                f"| {row.label} | {SIDES[side]} | {1000 * statistics.median(m['times']):.2f} | {delta:+.2f} | "
                f"{statistics.median(m['faults']):.0f} | {same} |"
            )
    return lines


def render(
    work: Workload,
    rows: Sequence[Row],
    results: dict[str, dict[str, Any]],
    group_of: dict[str, int],
    notes: Sequence[str] = (),
    breakdown: bool = False,
) -> str:
    """The whole markdown report."""
    if breakdown:
        lines = header(work, "Where the library's time per step goes") + [
            "- each variant runs in its own process; ms/step is the median over the rounds, the difference the "
            "median over rounds of (variant - plain); page faults are minor page faults per step",
            "",
            *breakdown_table(rows, results),
        ]
    else:
        lines = header(work, "DistillationModule + Trainer versus a plain loop over the core") + [
            "- plain: `Distillation` + SGD over `param_groups()`, `compute_losses(batch).total`, zero_grad / backward "
            "/ step; library: `DistillationModule` fitted by a `Trainer`; a method with an initialisation stage is "
            "measured in it",
            "- steps/s: median over the rounds; library/plain: median of the per-round ratios",
            f"- memory: {memory_name(work)} of each side's own process; page faults: minor page faults per step "
            "(allocations served by fresh pages from the kernel)",
            "- option rows (KD + ...) compare against a plain loop with the same option (channels_last networks and "
            "images; torch.compile of both networks; the teacher under bf16 autocast)",
            "",
            *main_table(work, rows, results),
        ]
        logits = logit_table(rows, results, group_of)
        if logits:
            lines += [
                "",
                "## Logit methods against KD",
                "",
                "Library steps/s of each logit method over KD's in this run: the median of the per-round ratios, "
                "the logit methods being measured in the same rounds (unless `--no-group`). Plain vs KD is the same "
                "ratio for the plain loop: the method's own cost, which the library cannot remove.",
                "",
                *logits,
            ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"
