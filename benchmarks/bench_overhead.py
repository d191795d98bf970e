#!/usr/bin/env python
"""Training speed of :class:`~lightning_kd.DistillationModule` under a Lightning ``Trainer`` against a plain
PyTorch loop over :class:`~lightning_kd.core.Distillation` doing the same work.

Every registered method (:func:`lightning_kd.distillers.list_distillers`), KD+LS, and with ``--options`` KD
with channels_last / torch.compile / a bf16 teacher; each side in its own worker process, in alternating timed
rounds (see :mod:`benchmarks.overhead.harness`). The report (:mod:`benchmarks.overhead.report`) has the main
table and a second one with each logit method's speed relative to KD's.

``--breakdown`` times the steps in between instead, each in its own process: the plain loop, the same step in a
minimal LightningModule (Lightning's own cost), ``DistillationModule`` with ``nan_policy="ignore"``, and as is. On
a small workload, where the fixed cost per step dominates, the differences attribute the overhead.

    python benchmarks/bench_overhead.py                       # every method, resnet56 -> resnet20, CPU
    python benchmarks/bench_overhead.py --device cuda --options
    python benchmarks/bench_overhead.py --quick --methods kd,vid --pair resnet20,resnet8 --input-size 16
    python benchmarks/bench_overhead.py --breakdown --methods kd --pair resnet8,resnet8 --input-size 8 \
        --batch-size 2 --steps 100 --rounds 5 --warmup 20 --threads 1

The report is printed and written as markdown to ``outputs/bench/results.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.overhead import report  # noqa: E402
from benchmarks.overhead.harness import (  # noqa: E402
    MAIN_SIDES,
    SIDES,
    TUNED_MALLOC,
    Row,
    Workload,
    plan_groups,
    plan_rows,
    run_groups,
    training_only_trainer,
)

__all__ = ["main", "parse_args", "training_only_trainer"]  # bench_data.py imports training_only_trainer from here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--pair", default="resnet56,resnet20", help="teacher,student (default: resnet56,resnet20)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32, help="side of the square inputs (default: 32)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per round and worker (default: 10 on CPU, 50 on CUDA; --quick 2)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, >= 1 (default: 3 on CPU, 10 on CUDA; --quick 1)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names, case-insensitive: the registry's (lightning_kd.distillers."
        "list_distillers()) and kd+ls (default: every one)",
    )
    parser.add_argument("--options", action="store_true", help="add KD rows with channels_last, compile, teacher bf16")
    parser.add_argument(
        "--no-group",
        action="store_true",
        help="measure every row on its own, the logit methods too (fewer processes at once; the logit table then "
        "compares rows measured at different times)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the main table, time the steps between the plain loop and the library (plain, minimal "
        "LightningModule, DistillationModule with nan_policy='ignore', as is); use a small workload, where the "
        "fixed cost per step shows, e.g. --pair resnet8,resnet8 --input-size 8 --batch-size 2 --steps 100 "
        "--methods kd",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="Linux/glibc: run the workers with MALLOC_MMAP_THRESHOLD_=32MiB and MALLOC_TRIM_THRESHOLD_=4GiB, so "
        "freed activations are reused instead of returned to the kernel and faulted in again at every step",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a measurement)")
    parser.add_argument("--output", default="outputs/bench/results.md", help="markdown file for the report")
    args = parser.parse_args(argv)
    quick, cuda = args.quick, args.device.startswith("cuda")
    args.steps = args.steps or (2 if quick else 50 if cuda else 10)
    args.rounds = args.rounds or (2 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10 if cuda else 3)
    if min(args.steps, args.rounds, args.warmup) < 1:
        parser.error("--steps, --rounds and --warmup must be >= 1 (the first step's loss is read in the warm-up)")
    args.pair = tuple(p.strip() for p in args.pair.split(","))
    if len(args.pair) != 2:
        parser.error(f"--pair takes teacher,student; got {','.join(args.pair)!r}")
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the clean-up that stops the workers


def _progress(breakdown: bool):  # noqa: ANN202
    def on_group(rows: list[Row], measured: dict[str, Any], seconds: float) -> None:
        for row in rows:
            if breakdown:
                times = {side: 1000 * statistics.median(m["times"]) for side, m in measured[row.key].items()}
                line = "  ".join(f"{side} {t:.2f} ms" for side, t in times.items())
            else:
                r = report.summarize(measured[row.key])
                line = f"plain {r['plain']:8.2f}/s  library {r['library']:8.2f}/s  ratio {r['ratio']:.3f}"
            print(f"{row.label:<32} {line}", flush=True)
        print(f"  ({len(rows)} row{'s' if len(rows) > 1 else ''} in {seconds:.0f} s)", flush=True)

    return on_group


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    work = Workload(
        device=args.device,
        pair=args.pair,
        batch_size=args.batch_size,
        input_size=args.input_size,
        num_classes=args.num_classes,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads,
    )
    try:
        rows, notes = plan_rows(args.methods.split(",") if args.methods else None, args.options)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.tuned_malloc:
        os.environ.update(TUNED_MALLOC)  # read by glibc when each spawned worker starts
        notes.append("workers ran with " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sides = tuple(SIDES) if args.breakdown else MAIN_SIDES
    groups = plan_groups(rows, group_logits=not (args.no_group or args.breakdown))
    failures: list[str] = []

    def on_error(row: Row | None, message: str) -> None:
        lines = message.strip().splitlines()
        if row is not None:
            failures.append(f"{row.label} failed: {lines[0]} {lines[-1].strip()}")
        print(f"{row.label if row else 'group'}: {message}", file=sys.stderr, flush=True)

    results, group_of = run_groups(work, groups, sides, _progress(args.breakdown), on_error)
    notes += failures
    text = report.render(work, rows, results, group_of, notes, breakdown=args.breakdown)
    print()
    print(text)
    if not args.breakdown:
        for line in report.logit_verdicts(rows, results, group_of):
            print(line)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"written to {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
