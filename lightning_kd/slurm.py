"""SLURM job arrays for the runs of a benchmark (``python -m lightning_kd.reproduce --slurm``): :class:`SlurmOptions`
(what every array task asks SLURM for), :func:`write_slurm` (the array script and its task list for what is left to
run, teachers first) and :func:`task_lines` (one shell command per run).
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_kd.runs import Run, pending


@dataclass(frozen=True)
class SlurmOptions:
    """What every array task asks SLURM for.

    Attributes:
        gpus: GPUs per run (one process per GPU, ``srun`` starts them; more than one adds ``--trainer.devices``).
        cpus: CPU cores per process.
        time: the time limit of one run (``HH:MM:SS`` or ``D-HH:MM:SS``).
        partition, account: ``--partition`` / ``--account`` when given.
        max_parallel: at most this many tasks at once (``--array=0-N%M``).
        sbatch: extra ``#SBATCH`` lines (e.g. ``--qos=high``, ``--constraint=a100``).
        setup: shell lines run before the task (e.g. ``module load cuda``, ``source .venv/bin/activate``).
        requeue: ask for SIGUSR1 two minutes before the time limit: Lightning then saves a checkpoint into the run
            folder and requeues the task, which resumes from it.
        python: the interpreter the tasks run.
    """

    gpus: int = 1
    cpus: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    max_parallel: int | None = None
    sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    requeue: bool = False
    python: str = sys.executable


@dataclass(frozen=True)
class SlurmArray:
    """The files :func:`write_slurm` wrote and the commands that submit them."""

    script: Path
    tasks: Path
    lines: list[str]
    runs: list[Run]
    commands: list[str]


def task_lines(todo: Sequence[Run], options: SlurmOptions, resume: bool = True) -> list[str]:
    """One shell command per run, as the array's tasks run them."""
    devices = [f"--trainer.devices={options.gpus}"] if options.gpus > 1 else []
    return [shlex.join([*run.argv(options.python, resume and run.resumable()), *devices]) for run in todo]


def write_slurm(
    runs: Sequence[Run], folder: str | Path, options: SlurmOptions = SlurmOptions(), include_running: bool = False,
    resume: bool = True, workdir: str | Path | None = None,
) -> SlurmArray | None:  # fmt: skip
    """Write the job-array script and its task file for what is left of ``runs`` into ``folder``; ``None`` when
    nothing is left. Teachers come first: when cells need a teacher still to train, the commands submit the
    teachers, then the rest with ``--dependency=afterok`` on them."""
    todo = pending(runs, include_running)
    if not todo:
        return None
    needed = {need for run in todo for need in run.needs}
    first = [run for run in todo if run.checkpoint in needed]
    todo = first + [run for run in todo if run not in first]
    lines = task_lines(todo, options, resume)
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1("\n".join(lines).encode()).hexdigest()[:10]
    tasks, script = folder / f"tasks-{digest}.txt", folder / f"array-{digest}.sh"
    tasks.write_text("\n".join(lines) + "\n")

    def array(start: int, stop: int) -> str:
        return f"{start}-{stop}" + (f"%{options.max_parallel}" if options.max_parallel else "")

    name = f"lkd-{todo[0].benchmark}"
    if first and len(first) < len(todo):
        commands = [
            f"jid=$(sbatch --parsable --array={array(0, len(first) - 1)} {shlex.quote(str(script))})",
            f"sbatch --dependency=afterok:${{jid%%;*}} --array={array(len(first), len(todo) - 1)} "
            f"{shlex.quote(str(script))}",
        ]
    else:
        commands = [f"sbatch {shlex.quote(str(script))}"]
    processes = max(1, options.gpus)
    header = [
        "#!/bin/bash",
        f"# lightning-kd: {len(todo)} runs of the {todo[0].benchmark} benchmark as a SLURM job array, one task per",
        f"# run; task i runs line i + 1 of {tasks}. Written by python -m lightning_kd.reproduce --slurm; submit with:",
        *[f"#   {command}" for command in commands],
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array={array(0, len(todo) - 1)}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={processes}",
        f"#SBATCH --cpus-per-task={options.cpus}",
        f"#SBATCH --time={options.time}",
        f"#SBATCH --output={folder}/%A_%a.out",
    ]
    if options.gpus > 0:
        header.append(f"#SBATCH --gres=gpu:{options.gpus}")
    if options.partition:
        header.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        header.append(f"#SBATCH --account={options.account}")
    if options.requeue:
        header += ["#SBATCH --signal=SIGUSR1@120", "#SBATCH --requeue"]
    header += [f"#SBATCH {line.strip()}" for line in options.sbatch]
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path(workdir or Path.cwd()).resolve()))}",
        *options.setup,
        f"TASKS={shlex.quote(str(tasks))}",
        'if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then echo "SLURM_ARRAY_TASK_ID is not set: submit with sbatch" >&2; '
        "exit 2; fi",
        'LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$TASKS")',
        'if [ -z "$LINE" ]; then echo "no line $((SLURM_ARRAY_TASK_ID + 1)) in $TASKS" >&2; exit 2; fi',
        'echo "task ${SLURM_ARRAY_TASK_ID} on $(hostname): $LINE"',
        'eval "srun $LINE"',
    ]
    script.write_text("\n".join(header + ["", *body]) + "\n")
    script.chmod(0o755)
    return SlurmArray(script, tasks, lines, list(todo), commands)
