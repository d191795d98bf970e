"""The runs of a benchmark table, each in its own folder: listed, run here one after the other, or as a SLURM array.

    python -m lightning_kd.reproduce                                    # list every command of the CIFAR-100 table
    python -m lightning_kd.reproduce --pair resnet32x4-resnet8x4 --method kd --method crd --seeds 0,1,2
    python -m lightning_kd.reproduce --slurm --partition gpu --time 24:00:00     # write a job array, print sbatch
    python -m lightning_kd.reproduce --benchmark digits --local --extra --trainer.max_epochs=1
    python -m lightning_kd.report outputs/cifar100 --output outputs/cifar100/report   # the table, once runs finish

Run from the repository root (or pass ``--configs``). The runs, in the order they can run, each once per seed
(``--seeds``, default 0,1,2):

1. **teachers**: ``configs/cifar100/teachers/<teacher>.yaml`` (digits: ``configs/digits/teacher.yaml``); the weights
   land in the run folder (``<teacher>.ckpt``), and the cells distil from the ``--teacher-seed`` one (default: the
   first seed);
2. **students**: each student alone (``configs/cifar100/student.yaml`` with the network and, for MobileNetV2 and
   the ShuffleNets, lr 0.01; digits: ``configs/digits/base.yaml`` + ``configs/digits/student.yaml``), the table's
   baseline column;
3. **cells**: every pair x method, ``--config configs/cifar100/pairs/<pair>.yaml --config configs/methods/<m>.yaml``
   and ``--config configs/cifar100/overrides/<m>/<pair>.yaml`` when that file exists (digits:
   ``configs/digits/base.yaml``, the method, ``configs/digits/overrides/<m>.yaml`` when it exists).

Every run gets its own folder, ``<outputs>/<benchmark>/<pair>/<method>/seed<k>/`` (teachers and students alone:
``<outputs>/<benchmark>/<network>/teacher|student/seed<k>/``), as ``--trainer.default_root_dir`` and as the folder of
a CSV logger; there it writes ``metrics.csv``, ``config.yaml``, its checkpoints and ``run.json``
(:class:`~lightning_kd.records.RunRecord`, given the run's labels), which :mod:`lightning_kd.report` reads. Each run
is seeded with ``--seed_everything=<k>``. Options after ``--extra`` are added to every run, last (so they win).

A run is done when its ``run.json`` says "finished", or, without a ``run.json``, when its final checkpoint exists
(a teacher's weights put there by hand). ``--local`` and ``--slurm`` leave done runs out, and runs whose record
says "running" (still in the queue, or killed without notice: ``--include-running`` takes them); a run that
failed or was interrupted starts again from its last checkpoint when it has one (``--no-resume``: from scratch).
So writing the array again after some tasks failed resubmits only what is missing.

``--slurm`` writes ``<outputs>/<benchmark>/slurm/array-<hash>.sh`` (one array task per run: ``#SBATCH --array``,
GPUs, CPUs, time, partition, account and extra ``#SBATCH`` lines as options, each task's log in
``<outputs>/<benchmark>/slurm/%A_%a.out``) and ``tasks-<hash>.txt`` (one command per line; task i runs line i + 1
with ``srun``), named after their content so that a pending array never reads a newer list, and prints the
``sbatch`` command(s): when cells wait for teachers that are not trained yet, the teachers go first and the rest
follows with ``--dependency=afterok``. Cells the reference marks "n/a" (FSP where the channel counts differ) are
left out unless ``--include-na`` is given.

The runs and their state are built in :mod:`lightning_kd.runs`, the job array written by :mod:`lightning_kd.slurm`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_kd.records import RUNNING

# the runs and the SLURM array live in their own modules; their names stay importable from here
from lightning_kd.runs import (  # noqa: F401
    BENCHMARKS,
    DONE,
    LOGGER,
    NOT_APPLICABLE,
    RECORD,
    SECTIONS,
    SMALL_LR_STUDENTS,
    Run,
    _unmet_needs,
    build_runs,
    pending,
)
from lightning_kd.slurm import SlurmArray, SlurmOptions, task_lines, write_slurm  # noqa: F401


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds must be integers separated by commas (e.g. 0,1,2), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers separated by commas (e.g. 0,1,2), got {text!r}")
    return seeds


def run_local(
    runs: Sequence[Run], keep_going: bool = False, python: str = sys.executable, include_running: bool = False,
    resume: bool = True,
) -> int:  # fmt: skip
    """Run what is left of ``runs`` one after the other; returns the number that failed (stops at the first
    failure unless ``keep_going``)."""
    todo = pending(runs, include_running)
    sys.stdout.write(f"{len(runs) - len(todo)} of {len(runs)} runs are done or running; {len(todo)} to run.\n")
    failed = 0
    for index, run in enumerate(todo, start=1):
        resumed = resume and run.resumable()
        sys.stdout.write(f"[{index}/{len(todo)}] {run.shell(resumed)}\n")
        sys.stdout.flush()
        if subprocess.run(run.argv(python, resumed), check=False).returncode != 0:
            failed += 1
            sys.stderr.write(f"failed: {run.label} (see {run.folder})\n")
            if not keep_going:
                break
    return failed


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_kd.reproduce",
        description="The runs of a benchmark table (teachers, students alone, every pair x method, each per seed), "
        "each in its own folder: list them, run them here (--local) or write a SLURM job array (--slurm).",
        epilog="Everything after --extra is added to every run, e.g. --extra --trainer.max_epochs=1.",
    )
    parser.add_argument("--benchmark", default="cifar100", choices=BENCHMARKS, help="default: %(default)s")
    parser.add_argument("--configs", default="configs", help="the configs folder (default: ./configs)")
    parser.add_argument("--outputs", default="outputs", help="root of the run folders (default: ./outputs)")
    parser.add_argument("--pair", action="append", help="only this pair, e.g. resnet32x4-resnet8x4 (repeatable)")
    parser.add_argument("--method", action="append", help="only this method, e.g. kd (repeatable)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="only this section (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of every run (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="a single seed (the same as --seeds N)")
    parser.add_argument("--teacher-seeds", help="seeds of the teacher runs (default: --seeds)")
    parser.add_argument("--teacher-seed", type=int, help="the teacher run the cells distil from (default: the first)")
    parser.add_argument("--include-na", action="store_true", help="also the cells the reference marks n/a")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", "--run", dest="local", action="store_true",
                      help="run what is left here, one run after the other")  # fmt: skip
    mode.add_argument("--slurm", action="store_true", help="write a SLURM job array for what is left")
    parser.add_argument("--keep-going", action="store_true", help="with --local, continue after a failed run")
    parser.add_argument("--include-running", action="store_true",
                        help="also redo runs whose record says running (killed without notice)")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="restart unfinished runs from scratch")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the runs use (default: this one)")
    slurm = parser.add_argument_group("SLURM (with --slurm)")
    slurm.add_argument("--slurm-dir", help="the folder of the script, task list and logs "
                       "(default: <outputs>/<benchmark>/slurm)")  # fmt: skip
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per run (default: %(default)s)")
    slurm.add_argument("--cpus", type=int, default=8, help="CPU cores per process (default: %(default)s)")
    slurm.add_argument("--time", default="24:00:00", help="time limit of one run (default: %(default)s)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--max-parallel", type=int, help="at most this many tasks at once")
    slurm.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH line, e.g. --sbatch=--qos=high")
    slurm.add_argument("--setup", action="append", default=[], help="a shell line run before each task (repeatable)")
    slurm.add_argument("--requeue", action="store_true",
                       help="requeue a task that reaches its time limit; it resumes from its checkpoint")  # fmt: skip
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options for every run (put it last)")
    args = parser.parse_args(argv)
    try:
        seeds = [args.seed] if args.seed is not None else _seeds(args.seeds)
        teacher_seeds = _seeds(args.teacher_seeds) if args.teacher_seeds else None
        runs = build_runs(args.configs, args.benchmark, args.pair, args.method, args.only, seeds, teacher_seeds,
                          args.teacher_seed, args.include_na, args.outputs, args.extra)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    resume = not args.no_resume

    if args.local or args.slurm:
        todo = pending(runs, args.include_running)
        running = [run for run in runs if run.state() == RUNNING] if not args.include_running else []
        if running:
            sys.stdout.write(f"# {len(running)} runs have a record saying running (still in the queue, or killed "
                             "without notice) and are left out; --include-running takes them\n")  # fmt: skip
        unmet = _unmet_needs(todo)
        if unmet:
            sys.stderr.write("warning: these teacher weights neither exist nor are among the runs to do (train the "
                             f"teachers first, or drop --only): {', '.join(unmet)}\n")  # fmt: skip
    if args.local:
        return 1 if run_local(runs, args.keep_going, args.python, args.include_running, resume) else 0
    if args.slurm:
        options = SlurmOptions(args.gpus, args.cpus, args.time, args.partition, args.account, args.max_parallel,
                               tuple(args.sbatch), tuple(args.setup), args.requeue, args.python)  # fmt: skip
        folder = args.slurm_dir or Path(args.outputs) / args.benchmark / "slurm"
        written = write_slurm(runs, folder, options, args.include_running, resume)
        if written is None:
            sys.stdout.write(f"All {len(runs)} runs are done: nothing to submit.\n")
            return 0
        sys.stdout.write(
            f"{len(written.runs)} of {len(runs)} runs to do ({len(runs) - len(written.runs)} done or running).\n"
            f"Wrote {written.script} and {written.tasks}. Submit with:\n" + "\n".join(written.commands) + "\n"
        )
        return 0
    section = None
    for run in runs:
        if run.section != section:
            section = run.section
            sys.stdout.write(f"# {section}\n")
        state = run.state()
        sys.stdout.write(run.shell() + (f"  # {state}" if state != "missing" else "") + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
