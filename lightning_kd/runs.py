"""The runs of a benchmark table: :class:`Run` (one run's configs, options, folder and state), :func:`build_runs`
(the teachers, the students alone and every pair x method cell, each per seed, from the configs folder) and
:func:`pending` (what is left to run). :mod:`lightning_kd.reproduce` lists them, runs them here or writes them as a
SLURM job array (:mod:`lightning_kd.slurm`); its docstring describes the runs and their folders.
"""

from __future__ import annotations

import difflib
import shlex
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
                files = ((root / "cifar100" / "student.yaml").as_posix(),)
                options = [f"--model.student={student}"]
                if student in SMALL_LR_STUDENTS:
                    options.append(f"--model.optimizer.init_args.lr={SMALL_LR_STUDENTS[student]}")
            else:  # the digits student alone is the digits pair without its teacher and distillers
                files = tuple(p.as_posix() for p in (root / "digits" / "base.yaml", root / "digits" / "student.yaml"))
                options = []
            for seed in seeds:
                where = folder(student, "student", seed)
                runs.append(Run(benchmark, "students", student, "student", seed, files, tuple(options),
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
