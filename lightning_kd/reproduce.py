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
   the ShuffleNets, lr 0.01; digits: ``configs/digits/student.yaml``), the table's baseline column;
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
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_kd.published import METHOD_ORDER, PAIR_ORDER
from lightning_kd.records import FINISHED, RECORD_NAME, RUNNING, read_record

BENCHMARKS = ("cifar100", "digits")
# cells the reference reports as "n/a": FSP needs equal channel counts at every compared layer
NOT_APPLICABLE = {
    "fsp": {
        "wrn_40_2-wrn_40_1", "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8",
        "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1",
    },
}  # fmt: skip
# the reference recipe's learning rate for these students (0.05 for all others)
SMALL_LR_STUDENTS = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}
SECTIONS = ("teachers", "students", "cells")
LOGGER = "lightning.pytorch.loggers.CSVLogger"
RECORD = "lightning_kd.records.RunRecord"


@dataclass(frozen=True)
class Run:
    """One run of the benchmark: its configs, its options and its own folder.

    Attributes:
        benchmark: ``"cifar100"`` or ``"digits"``.
        section: ``"teachers"``, ``"students"`` or ``"cells"``.
        pair: the pair (``"resnet32x4-resnet8x4"``), or the network a teacher or student run trains alone.
        method: the method config's name, or ``"teacher"`` / ``"student"``.
        seed: the ``seed_everything`` value.
        configs: the config files, in order.
        options: the run's own overrides (the student network, its learning rate, the teacher's weights, where a
            teacher run writes its weights).
        folder: the run folder.
        checkpoint: the final checkpoint (a teacher's weights), whose presence without a record marks the run done.
        resume_from: the checkpoint an unfinished run continues from, when it has one.
        needs: checkpoints the run reads (a cell's teacher).
        extra: options added to every run, last.
    """

    benchmark: str
    section: str
    pair: str
    method: str
    seed: int
    configs: tuple[str, ...]
    options: tuple[str, ...]
    folder: str
    checkpoint: str | None = None
    resume_from: str | None = None
    needs: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.pair} {self.method} seed{self.seed}"

    def args(self, resume: bool = False) -> list[str]:
        """The ``lightning-kd`` arguments (after the program name); ``resume`` adds ``--ckpt_path`` when the run
        has a checkpoint to continue from."""
        folder = self.folder
        args = ["fit"]
        for config in self.configs:
            args += ["--config", config]
        args += [
            *self.options,
            f"--trainer.default_root_dir={folder}",
            f"--trainer.logger={LOGGER}", f"--trainer.logger.save_dir={folder}",
            "--trainer.logger.name=", "--trainer.logger.version=",
            f"--trainer.callbacks+={RECORD}", f"--trainer.callbacks.benchmark={self.benchmark}",
            f"--trainer.callbacks.pair={self.pair}", f"--trainer.callbacks.method={self.method}",
            f"--seed_everything={self.seed}",
            *self.extra,
        ]  # fmt: skip
        if resume and self.resume_from is not None:
            args.append(f"--ckpt_path={self.resume_from}")
        return args

    def shell(self, resume: bool = False) -> str:
        """The command as a user types it."""
        return "lightning-kd " + shlex.join(self.args(resume))

    def argv(self, python: str = sys.executable, resume: bool = False) -> list[str]:
        """The command as ``python`` runs it."""
        return [python, "-m", "lightning_kd.cli", *self.args(resume)]

    def state(self) -> str:
        """``"finished"``, ``"running"``, ``"failed"``, ``"interrupted"``, ``"checkpoint"`` (final weights without a
        record), ``"unreadable"`` (a run.json that is not a record) or ``"missing"`` (nothing yet)."""
        try:
            record = read_record(Path(self.folder) / RECORD_NAME)
        except ValueError:
            return "unreadable"
        if record is not None:
            return str(record["status"])
        if self.checkpoint is not None and Path(self.checkpoint).is_file():
            return "checkpoint"
        return "missing"

    def resumable(self) -> bool:
        """A record exists (the run started here) and so does the checkpoint to continue from."""
        return (
            self.resume_from is not None
            and (Path(self.folder) / RECORD_NAME).is_file()
            and Path(self.resume_from).is_file()
        )


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name.lower(): i for i, name in enumerate(order)}
    return sorted(names, key=lambda name: (rank.get(name.lower(), len(rank)), name.lower()))


def _select(available: list[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    """The ``wanted`` names (case-insensitive) among ``available``, in ``available``'s order."""
    if not wanted:
        return available
    by_key = {name.lower(): name for name in available}
    unknown = [name for name in wanted if name.lower() not in by_key]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown {what} {', '.join(hints)}; available: {', '.join(available) or 'none'}")
    keys = {name.lower() for name in wanted}
    return [name for name in available if name.lower() in keys]


def _load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle) or {}


def _networks(path: Path) -> tuple[str, str]:
    """(teacher, student) named by a pair config."""
    model = _load(path).get("model") or {}
    if not isinstance(model, dict) or not model.get("student") or not model.get("teacher"):
        raise ValueError(f"{path} must set model.student and model.teacher (a pair config)")
    return str(model["teacher"]), str(model["student"])


def _network(path: Path) -> str:
    model = _load(path).get("model") or {}
    if not isinstance(model, dict) or not model.get("student"):
        raise ValueError(f"{path} must set model.student (the network it trains)")
    return str(model["student"])


def _weights_file(path: Path) -> str:
    """The file name a teacher config's checkpoint callback writes (its ``filename`` + ``.ckpt``); it must be the
    config's last callback, the one ``--trainer.callbacks.init_args.dirpath`` points at the run folder."""
    callbacks = (_load(path).get("trainer") or {}).get("callbacks") or []
    last = callbacks[-1] if isinstance(callbacks, list) and callbacks else None
    init_args = (last or {}).get("init_args") or {}
    if not last or not str(last.get("class_path", "")).endswith("ModelCheckpoint") or not init_args.get("filename"):
        raise ValueError(
            f"{path}: a teacher config must end its trainer.callbacks with a ModelCheckpoint that names its file "
            "(init_args.filename), so that the pairs can read the teacher's weights from the run folder"
        )
    return f"{init_args['filename']}.ckpt"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds must be integers separated by commas (e.g. 0,1,2), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers separated by commas (e.g. 0,1,2), got {text!r}")
    return seeds


def build_runs(
    configs: str | Path = "configs",
    benchmark: str = "cifar100",
    pairs: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    teacher_seeds: Sequence[int] | None = None,
    teacher_seed: int | None = None,
    include_na: bool = False,
    outputs: str | Path = "outputs",
    extra: Sequence[str] = (),
) -> list[Run]:
    """The runs of a benchmark table: teachers first, then the students alone, then pair x method cells.

    Args:
        configs: the ``configs`` folder (holding ``cifar100/``, ``digits/`` and ``methods/``).
        benchmark: ``"cifar100"`` or ``"digits"``.
        pairs: pair names (``<teacher>-<student>``, the stems of ``cifar100/pairs/*.yaml``); all by default.
            The digits have one pair, ``configs/digits/base.yaml``.
        methods: method names (stems of ``methods/*.yaml``); all by default.
        only: sections to list, among ``teachers``, ``students``, ``cells``; all by default.
        seeds: the seeds of every run.
        teacher_seeds: the seeds of the teacher runs (default: ``seeds``).
        teacher_seed: the teacher run the cells distil from (default: the first teacher seed).
        include_na: also list the cells the reference marks "n/a".
        outputs: the root of the run folders.
        extra: options added to every run, last.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose among {list(BENCHMARKS)}")
    root, out = Path(configs), Path(outputs) / benchmark
    method_dir = root / "methods"
    sections = list(only) if only else list(SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; choose among {list(SECTIONS)}")
    seeds = list(seeds)
    teacher_seeds = list(teacher_seeds) if teacher_seeds else seeds
    teacher_seed = teacher_seeds[0] if teacher_seed is None else teacher_seed
    if not seeds:
        raise ValueError("give at least one seed")

    if benchmark == "cifar100":
        pair_dir = root / "cifar100" / "pairs"
        if not pair_dir.is_dir():
            raise FileNotFoundError(
                f"no pair configs at {pair_dir}: run from the repository root or pass --configs <path to configs/>"
            )
        available = _ordered([p.stem for p in pair_dir.glob("*.yaml")], PAIR_ORDER)
        pair_configs = {pair: pair_dir / f"{pair}.yaml" for pair in _select(available, pairs, "pair")}
        teacher_configs = {t: root / "cifar100" / "teachers" / f"{t}.yaml" for t in
                           dict.fromkeys(_networks(p)[0] for p in pair_configs.values())}  # fmt: skip
    else:
        base = root / "digits" / "base.yaml"
        if not base.is_file():
            raise FileNotFoundError(f"no digits base config at {base}: run from the repository root or pass --configs")
        teacher, student = _networks(base)
        pair_configs = {f"{teacher}-{student}": base}
        _select(list(pair_configs), pairs, "pair")
        teacher_configs = {teacher: root / "digits" / "teacher.yaml"}
        if _network(teacher_configs[teacher]) != teacher:
            raise ValueError(f"{teacher_configs[teacher]} trains {_network(teacher_configs[teacher])}, but {base} "
                             f"distils from {teacher}")  # fmt: skip
    for teacher, path in teacher_configs.items():
        if not path.is_file():
            raise FileNotFoundError(f"the pairs need teacher {teacher!r} but {path} does not exist")
    available_methods = _ordered([p.stem for p in method_dir.glob("*.yaml")], METHOD_ORDER)
    chosen_methods = _select(available_methods, methods, "method")

    def folder(pair: str, method: str, seed: int) -> str:
        return (out / pair / method / f"seed{seed}").as_posix()

    weights = {teacher: _weights_file(path) for teacher, path in teacher_configs.items()}
    teacher_weights = {t: f"{folder(t, 'teacher', teacher_seed)}/{weights[t]}" for t in teacher_configs}
    extra = tuple(extra)
    runs: list[Run] = []
    if "teachers" in sections:
        for teacher, path in teacher_configs.items():
            for seed in teacher_seeds:
                where = folder(teacher, "teacher", seed)
                final = f"{where}/{weights[teacher]}"
                runs.append(Run(benchmark, "teachers", teacher, "teacher", seed, (path.as_posix(),),
                                (f"--trainer.callbacks.init_args.dirpath={where}",), where, checkpoint=final,
                                resume_from=final, extra=extra))  # fmt: skip
    if "students" in sections:
        students = dict.fromkeys(_networks(p)[1] for p in pair_configs.values())
        for student in students:
            if benchmark == "cifar100":
                path = root / "cifar100" / "student.yaml"
                options = [f"--model.student={student}"]
                if student in SMALL_LR_STUDENTS:
                    options.append(f"--model.optimizer.init_args.lr={SMALL_LR_STUDENTS[student]}")
            else:
                path = root / "digits" / "student.yaml"
                options = []
                if _network(path) != student:
                    options.append(f"--model.student={student}")
            for seed in seeds:
                where = folder(student, "student", seed)
                runs.append(Run(benchmark, "students", student, "student", seed, (path.as_posix(),), tuple(options),
                                where, resume_from=f"{where}/checkpoints/last.ckpt", extra=extra))  # fmt: skip
    if "cells" in sections:
        for pair, path in pair_configs.items():
            teacher = _networks(path)[0]
            for method in chosen_methods:
                if not include_na and pair in NOT_APPLICABLE.get(method.lower(), ()):
                    continue
                files = [path.as_posix(), (method_dir / f"{method}.yaml").as_posix()]
                override = (root / "cifar100" / "overrides" / method / f"{pair}.yaml" if benchmark == "cifar100"
                            else root / "digits" / "overrides" / f"{method}.yaml")  # fmt: skip
                if override.is_file():
                    files.append(override.as_posix())
                for seed in seeds:
                    where = folder(pair, method, seed)
                    runs.append(Run(benchmark, "cells", pair, method, seed, tuple(files),
                                    (f"--model.teacher_checkpoint={teacher_weights[teacher]}",), where,
                                    resume_from=f"{where}/checkpoints/last.ckpt", needs=(teacher_weights[teacher],),
                                    extra=extra))  # fmt: skip
    return runs


# ----------------------------------------------------------------------------------------------------------------
# what is left to run
# ----------------------------------------------------------------------------------------------------------------
DONE = (FINISHED, "checkpoint")


def pending(runs: Sequence[Run], include_running: bool = False) -> list[Run]:
    """The runs still to do: not finished (and, unless ``include_running``, not recorded as running)."""
    skip = DONE if include_running else (*DONE, RUNNING)
    return [run for run in runs if run.state() not in skip]


def _unmet_needs(todo: Sequence[Run]) -> list[str]:
    """Checkpoints the cells to do read that neither exist nor come from a teacher run among ``todo``."""
    produced = {run.checkpoint for run in todo if run.checkpoint}
    return sorted({need for run in todo for need in run.needs if not Path(need).is_file() and need not in produced})


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
