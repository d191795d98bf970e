"""The main job (``make demo``): distil a student on the offline digits data with every method.

1. trains the teacher with ``configs/digits/teacher.yaml`` (or reuses ``outputs/digits/teacher/teacher.ckpt``);
2. trains the student alone with ``configs/digits/student.yaml``;
3. trains the student with each method's ``configs/digits/<method>.yaml`` from that teacher;
4. prints a table (top-1 accuracy at the last and the best epoch, parameters, epochs, time), and writes it
   with a plot (accuracy per method against the student alone and the teacher, validation curves) to the
   output folder.

Every run is an ordinary ``lightning-kd fit`` of a config, so each row can be reproduced alone:
``lightning-kd fit --config configs/digits/<method>.yaml``.

    python -m lightning_kd.demo --output outputs/demo [--methods kd,vid] [--retrain-teacher]
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_kd.cli import run_cli

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "digits"
METHOD_CONFIGS = ROOT / "configs" / "methods"
TEACHER_CKPT = Path("outputs/digits/teacher/teacher.ckpt")
STANDALONE = ("teacher", "student")


def digits_config_args(method: str) -> list[str]:
    """The ``--config`` arguments of one digits run: ``teacher`` and ``student`` are standalone configs; a method
    composes ``configs/digits/base.yaml`` with ``configs/methods/<method>.yaml`` and, when it exists, the method's
    digits override ``configs/digits/overrides/<method>.yaml``."""
    if method in STANDALONE:
        return ["--config", str(CONFIGS / f"{method}.yaml")]
    if not (METHOD_CONFIGS / f"{method}.yaml").exists():
        raise ValueError(f"no method config configs/methods/{method}.yaml; available: {available_methods()}")
    args = ["--config", str(CONFIGS / "base.yaml"), "--config", str(METHOD_CONFIGS / f"{method}.yaml")]
    override = CONFIGS / "overrides" / f"{method}.yaml"
    return args + (["--config", str(override)] if override.exists() else [])


@dataclass
class Row:
    """One line of the results table."""

    name: str
    params: int
    epochs: int
    seconds: float
    last_acc1: float
    best_acc1: float
    curve: list[float]
    train_curve: list[tuple[int, float]]


def available_methods(configs: Path = METHOD_CONFIGS) -> list[str]:
    """Method names with a method config, KD first, then alphabetical."""
    names = sorted(p.stem for p in configs.glob("*.yaml"))
    return sorted(names, key=lambda n: (n != "kd", n))


def _curves(log_dir: str | None) -> tuple[list[float], list[tuple[int, float]]]:
    """From a CSVLogger's metrics.csv: validation top-1 per epoch, and (step, cross-entropy) in training.

    The cross-entropy with the labels (``train/ce``, the task loss every method keeps) is the training curve
    the runs share; staged methods log it in their main stage only.
    """
    if not log_dir or not (Path(log_dir) / "metrics.csv").exists():
        return [], []
    with open(Path(log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    val = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    train = [(int(r["step"]), float(r["train/ce"])) for r in rows if r.get("train/ce")]
    return val, train


def run_config(name: str, config_args: list[str], extra: list[str]) -> Row:
    """``lightning-kd fit <config_args>`` in this process; returns its results."""
    start = time.perf_counter()
    cli = run_cli(["fit", *config_args, *extra])
    seconds = time.perf_counter() - start
    trainer, module = cli.trainer, cli.model
    curve, train_curve = _curves(trainer.logger.log_dir if trainer.logger else None)
    last = float(trainer.callback_metrics.get("val/acc1", float("nan")))
    return Row(
        name=name,
        params=sum(p.numel() for p in module.student.parameters()),
        epochs=trainer.current_epoch,
        seconds=seconds,
        last_acc1=last,
        best_acc1=max(curve) if curve else last,
        curve=curve,
        train_curve=train_curve,
    )


def teacher_row(retrain: bool, extra: list[str]) -> Row:
    """Train the teacher, or measure the cached one with ``lightning-kd validate``."""
    if retrain or not TEACHER_CKPT.exists():
        TEACHER_CKPT.unlink(missing_ok=True)
        return run_config("teacher", digits_config_args("teacher"), extra)
    start = time.perf_counter()
    cli = run_cli(
        ["validate", "--config", str(CONFIGS / "teacher.yaml"), f"--ckpt_path={TEACHER_CKPT}", "--trainer.logger=false"]
    )
    acc = float(cli.trainer.callback_metrics["val/acc1"])
    params = sum(p.numel() for p in cli.model.student.parameters())
    return Row("teacher (cached)", params, 0, time.perf_counter() - start, acc, acc, [], [])


def format_table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    lines = [
        "| run | top-1 last (%) | top-1 best (%) | student params | epochs | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {100 * r.last_acc1:.2f} | {100 * r.best_acc1:.2f} | {r.params:,} | {r.epochs} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Final accuracy per run (teacher and student alone as lines), validation curves, training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next((r for r in rows if r.name.startswith("teacher")), None)
    student = next((r for r in rows if r.name == "student alone"), None)
    methods = [r for r in rows if not r.name.startswith("teacher") and r.name != "student alone"]
    fig, (bars, curves, training) = plt.subplots(1, 3, figsize=(18, 4.8))
    names = [r.name for r in methods]
    bars.bar(names, [100 * r.last_acc1 for r in methods], color="tab:blue", label="distilled student")
    if teacher:
        bars.axhline(100 * teacher.last_acc1, color="tab:green", ls="--", label=f"teacher {100 * teacher.last_acc1:.1f}")
    if student:
        bars.axhline(100 * student.last_acc1, color="tab:red", ls=":", label=f"student alone {100 * student.last_acc1:.1f}")
    accs = [100 * r.last_acc1 for r in rows]
    bars.set_ylim(max(0.0, min(accs) - 5), 100.5)
    bars.set_ylabel("validation top-1 (%)")
    bars.set_title("Digits: last-epoch accuracy per method")
    bars.tick_params(axis="x", rotation=45)
    bars.legend(loc="lower right", fontsize=8)
    for r in rows:
        style = {"lw": 2.5, "color": "black"} if r.name == "student alone" else {"lw": 1}
        if r.curve:
            curves.plot(range(1, len(r.curve) + 1), [100 * a for a in r.curve], label=r.name, **style)
        if r.train_curve:
            steps, values = zip(*r.train_curve)
            training.plot(steps, values, label=r.name, **style)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation top-1 (%)")
    curves.set_title("Validation curves")
    curves.legend(fontsize=7, ncol=2)
    training.set_xlabel("training step")
    training.set_ylabel("cross-entropy with the labels")
    training.set_yscale("log")
    training.set_title("Training curves (train/ce)")
    training.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/demo", help="folder for results.md, results.csv, results.png")
    parser.add_argument("--methods", default="all", help="comma-separated method names (default: every digits config)")
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore the cached teacher")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's max_epochs (quick checks)")
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (quick checks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    methods = available_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    missing = [m for m in methods if not (METHOD_CONFIGS / f"{m}.yaml").exists()]
    if missing:
        parser.error(f"no method config for {missing}; available: {available_methods()}")
    extra = ["--trainer.enable_model_summary=false"]
    if args.epochs is not None:
        extra.append(f"--trainer.max_epochs={args.epochs}")
    if args.limit_batches is not None:
        extra += [f"--trainer.limit_train_batches={args.limit_batches}", f"--trainer.limit_val_batches={args.limit_batches}"]

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = [teacher_row(args.retrain_teacher, extra)]
    rows.append(run_config("student alone", digits_config_args("student"), extra))
    for method in methods:
        # staged methods (AB, FT, FSP) set their own max_epochs; --epochs applies to them as well
        rows.append(run_config(method, digits_config_args(method), [*extra, f"--model.teacher_checkpoint={TEACHER_CKPT}"]))

    table = format_table(rows)
    (output / "results.md").write_text(table + "\n")
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "top1_last", "top1_best", "params", "epochs", "seconds"])
        for r in rows:
            writer.writerow([r.name, f"{r.last_acc1:.4f}", f"{r.best_acc1:.4f}", r.params, r.epochs, f"{r.seconds:.1f}"])
    plot(rows, output / "results.png")
    total = sum(r.seconds for r in rows)
    print(f"\n{table}\n\nTotal {total:.0f} s. Written: {output}/results.md, results.csv, results.png")  # noqa: T201
    return rows


if __name__ == "__main__":  # pragma: no cover
    main()
