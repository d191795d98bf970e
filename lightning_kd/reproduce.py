"""The commands that reproduce the CRD benchmark's CIFAR-100 table, in the order they can run.

    python -m lightning_kd.reproduce                      # list every command
    python -m lightning_kd.reproduce --pair resnet32x4-resnet8x4 --method kd --method crd
    python -m lightning_kd.reproduce --only teachers --run

Run from the repository root (or pass ``--configs``). Three sections, each only what the selected pairs need:

1. **teachers**: ``lightning-kd fit --config configs/cifar100/teachers/<teacher>.yaml``; their weights are what
   the pair configs read, so they come first;
2. **students**: each student alone (``configs/cifar100/student.yaml``), the table's baseline column;
3. **cells**: every pair x method, ``--config configs/cifar100/pairs/<pair>.yaml --config
   configs/methods/<method>.yaml``, with the logger named after the method so that every cell of a pair writes
   to its own folder, ``outputs/cifar100/<pair>/<method>/version_<n>/``.

Pairs are read from ``configs/cifar100/pairs/*.yaml`` and methods from ``configs/methods/*.yaml`` when the
command runs; cells the reference marks "n/a" (FSP where the channel counts differ) are left out unless
``--include-na`` is given. ``--run`` executes the commands one after the other (stopping at the first failure
unless ``--keep-going``); the listing uses the ``lightning-kd`` console script, the runs use
``python -m lightning_kd.cli`` with the current interpreter.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

# the reference table's order (METHODS.md); files outside these lists follow, alphabetically
PAIR_ORDER = (
    "wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20", "resnet110-resnet32",
    "resnet32x4-resnet8x4", "vgg13-vgg8", "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8",
    "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1",
)  # fmt: skip
METHOD_ORDER = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")
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


@dataclass(frozen=True)
class Command:
    """One ``lightning-kd`` invocation: ``args`` follow the program name."""

    section: str
    label: str
    args: tuple[str, ...]

    def shell(self) -> str:
        """The command as a user types it."""
        return "lightning-kd " + shlex.join(self.args)

    def argv(self) -> list[str]:
        """The command as this interpreter runs it."""
        return [sys.executable, "-m", "lightning_kd.cli", *self.args]


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


def _read_model_section(path: Path) -> dict:
    with path.open() as handle:
        config = yaml.safe_load(handle) or {}
    model = config.get("model") or {}
    if not isinstance(model, dict) or "student" not in model or "teacher" not in model:
        raise ValueError(f"{path} must set model.student and model.teacher (a CIFAR-100 pair config)")
    return model


def build_commands(
    configs: str | Path = "configs",
    pairs: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    seed: int | None = None,
    include_na: bool = False,
) -> list[Command]:
    """The commands of the CIFAR-100 table, teachers first, then the students alone, then pair x method cells.

    Args:
        configs: the ``configs`` folder (holding ``cifar100/`` and ``methods/``).
        pairs: pair names (``<teacher>-<student>``, the stems of ``cifar100/pairs/*.yaml``); all by default.
        methods: method names (stems of ``methods/*.yaml``); all by default.
        only: sections to list, among ``teachers``, ``students``, ``cells``; all by default.
        seed: adds ``--seed_everything=<seed>`` to every command.
        include_na: also list the cells the reference marks "n/a".
    """
    root = Path(configs)
    pair_dir, teacher_dir, method_dir = root / "cifar100" / "pairs", root / "cifar100" / "teachers", root / "methods"
    if not pair_dir.is_dir():
        raise FileNotFoundError(
            f"no pair configs at {pair_dir}: run from the repository root or pass --configs <path to configs/>"
        )
    sections = list(only) if only else list(SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; choose among {list(SECTIONS)}")

    available_pairs = _ordered([p.stem for p in pair_dir.glob("*.yaml")], PAIR_ORDER)
    chosen_pairs = _select(available_pairs, pairs, "pair")
    available_methods = _ordered([p.stem for p in method_dir.glob("*.yaml")], METHOD_ORDER)
    chosen_methods = _select(available_methods, methods, "method")
    models = {pair: _read_model_section(pair_dir / f"{pair}.yaml") for pair in chosen_pairs}
    seed_args = (f"--seed_everything={seed}",) if seed is not None else ()

    commands: list[Command] = []
    if "teachers" in sections:
        for teacher in dict.fromkeys(str(models[pair]["teacher"]) for pair in chosen_pairs):
            path = teacher_dir / f"{teacher}.yaml"
            if not path.is_file():
                raise FileNotFoundError(f"the pairs need teacher {teacher!r} but {path} does not exist")
            commands.append(Command("teachers", teacher, ("fit", "--config", path.as_posix(), *seed_args)))
    if "students" in sections:
        student_config = root / "cifar100" / "student.yaml"
        for student in dict.fromkeys(str(models[pair]["student"]) for pair in chosen_pairs):
            args = ["fit", "--config", student_config.as_posix(), f"--model.student={student}"]
            if student in SMALL_LR_STUDENTS:
                args.append(f"--model.optimizer.init_args.lr={SMALL_LR_STUDENTS[student]}")
            args.append(f"--trainer.logger.init_args.name={student}")
            commands.append(Command("students", student, (*args, *seed_args)))
    if "cells" in sections:
        for pair in chosen_pairs:
            for method in chosen_methods:
                if not include_na and pair in NOT_APPLICABLE.get(method.lower(), ()):
                    continue
                args = (
                    "fit",
                    "--config", (pair_dir / f"{pair}.yaml").as_posix(),
                    "--config", (method_dir / f"{method}.yaml").as_posix(),
                    f"--trainer.logger.init_args.name={method}",
                )  # fmt: skip
                commands.append(Command("cells", f"{pair} {method}", (*args, *seed_args)))
    return commands


def run_commands(commands: Sequence[Command], keep_going: bool = False) -> int:
    """Run the commands in sequence; returns the number that failed (stops at the first unless ``keep_going``)."""
    failed = 0
    for index, command in enumerate(commands, start=1):
        sys.stdout.write(f"[{index}/{len(commands)}] {command.shell()}\n")
        sys.stdout.flush()
        if subprocess.run(command.argv(), check=False).returncode != 0:
            failed += 1
            sys.stderr.write(f"failed: {command.shell()}\n")
            if not keep_going:
                break
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_kd.reproduce",
        description="List (or run) the commands of the CIFAR-100 benchmark table: teachers, students alone, "
        "then every pair x method.",
    )
    parser.add_argument("--configs", default="configs", help="the configs folder (default: ./configs)")
    parser.add_argument("--pair", action="append", help="only this pair, e.g. resnet32x4-resnet8x4 (repeatable)")
    parser.add_argument("--method", action="append", help="only this method, e.g. kd (repeatable)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="only this section (repeatable)")
    parser.add_argument("--seed", type=int, help="seed every run with this value")
    parser.add_argument("--include-na", action="store_true", help="also list cells the reference marks n/a")
    parser.add_argument("--run", action="store_true", help="run the commands in sequence instead of listing them")
    parser.add_argument("--keep-going", action="store_true", help="with --run, continue after a failed command")
    args = parser.parse_args(argv)
    try:
        commands = build_commands(args.configs, args.pair, args.method, args.only, args.seed, args.include_na)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.run:
        return 1 if run_commands(commands, args.keep_going) else 0
    section = None
    for command in commands:
        if command.section != section:
            section = command.section
            sys.stdout.write(f"# {section}\n")
        sys.stdout.write(command.shell() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
