"""The main job (``make demo``): distillation on the offline digits, with a measured gain and its spread.

The setting: a resnet56 teacher trained on the whole digits training split, and a resnet8 student that sees only a
few labelled images per class (``configs/digits/base.yaml``). With so few labels the student alone overfits them;
the teacher's soft outputs on the same images say how each digit resembles the others, which is the knowledge
distillation transfers, so the distilled students generalise better.

1. the teacher: ``configs/digits/teacher.yaml``, trained once and cached in ``outputs/digits/teacher/teacher.ckpt``
   (the demo says which file it used and its fingerprint);
2. for every seed: the student alone (``configs/digits/student.yaml``) and one student per method
   (``configs/digits/base.yaml`` + ``configs/methods/<m>.yaml`` + ``configs/digits/overrides/<m>.yaml``);
3. a table of top-1 accuracy, mean +- std over the seeds, against the student alone and the teacher, written with a
   figure (bars with error bars, validation curves, training curves) to the output folder.

Every run is an ordinary ``lightning-kd fit``, so each row can be reproduced alone with the command printed beside it.

    python -m lightning_kd.demo [--methods kd,dkd | all] [--seeds 0,1,2] [--output outputs/demo] [--retrain-teacher]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_kd.checkpoints import fingerprint
from lightning_kd.cli import run_cli
from lightning_kd.distillers import list_distillers

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "digits"
METHOD_CONFIGS = ROOT / "configs" / "methods"
TEACHER_CKPT = Path("outputs/digits/teacher/teacher.ckpt")
#: a logit method, a newer logit method, a feature method, a relational method, the contrastive one
DEFAULT_METHODS = ("kd", "dkd", "reviewkd", "pkt", "crd")
STUDENT = "student"
#: a cached teacher below this validation top-1 is trained again (a trained one scores about 0.97)
MIN_TEACHER_TOP1 = 0.5
TEACHER = "teacher"


def available_methods(configs: Path = METHOD_CONFIGS) -> list[str]:
    """Method names with a config: the registered methods in registry order, then the other configs (kd_ls, ...)."""
    names = {p.stem for p in configs.glob("*.yaml")}
    registered = [m for m in list_distillers() if m in names]
    return registered + sorted(names - set(registered))


def digits_config_args(method: str) -> list[str]:
    """The ``--config`` arguments of one digits run: the teacher's standalone config; otherwise
    ``configs/digits/base.yaml`` composed with ``configs/digits/student.yaml`` (the student alone) or with
    ``configs/methods/<method>.yaml`` and, when it exists, the digits override ``configs/digits/overrides/<method>.yaml``."""
    if method == TEACHER:
        return ["--config", str(CONFIGS / "teacher.yaml")]
    args = ["--config", str(CONFIGS / "base.yaml")]
    if method == STUDENT:
        return args + ["--config", str(CONFIGS / "student.yaml")]
    if not (METHOD_CONFIGS / f"{method}.yaml").exists():
        raise ValueError(f"no method config configs/methods/{method}.yaml; available: {available_methods()}")
    override = CONFIGS / "overrides" / f"{method}.yaml"
    return args + ["--config", str(METHOD_CONFIGS / f"{method}.yaml")] + (
        ["--config", str(override)] if override.exists() else []
    )


def display_name(method: str) -> str:
    """A method config's name as the papers write it.

    >>> [display_name(m) for m in ("kd", "kd_ls", "reviewkd", "crd_kd")]
    ['KD', 'KD+LS', 'ReviewKD', 'CRD+KD']
    """
    special = {"reviewkd": "ReviewKD", "fitnet": "FitNet", "crd_kd": "CRD+KD"}
    return "+".join(special.get(part, part.upper()) for part in ([method] if method in special else method.split("_")))


def command(method: str, seed: int) -> str:
    """The command line that reproduces one row's run (relative paths, from the repository root)."""
    args = [a.replace(str(ROOT) + "/", "") for a in digits_config_args(method)]
    return " ".join(["lightning-kd fit", *args, f"--seed_everything={seed}"])


@dataclass
class Run:
    """One finished fit."""

    method: str
    seed: int
    last: float
    best: float
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch counted from 1, validation top-1)
    train_curve: list[tuple[int, float]] = field(default_factory=list)


def _curves(log_dir: str | Path | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """From a CSV logger's metrics.csv: (epoch counted from 1, validation top-1) at every validation, and (step,
    cross-entropy) in training."""
    if log_dir is None:
        return [], []
    path = Path(log_dir) / "metrics.csv"
    if not path.exists():
        return [], []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    val = [(int(r["epoch"]) + 1, float(r["val/acc1"])) for r in rows if r.get("val/acc1")]
    train = [(int(r["step"]), float(r["train/ce"])) for r in rows if r.get("train/ce")]
    return val, train


def fit(method: str, seed: int, folder: Path, extra: list[str]) -> Run:
    """``lightning-kd fit`` of one row in this process."""
    start = time.perf_counter()
    cli = run_cli(
        ["fit", *digits_config_args(method), f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={folder}",
         "--trainer.logger.name=", "--trainer.logger.version=", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", *extra]
    )  # fmt: skip
    curve, train_curve = _curves(cli.trainer.log_dir)
    last = float(cli.trainer.callback_metrics.get("val/acc1", float("nan")))
    best = max(acc for _, acc in curve) if curve else last
    return Run(method, seed, last, best, time.perf_counter() - start, curve, train_curve)


def teacher(retrain: bool, extra: list[str]) -> tuple[Run, str]:
    """Train the teacher, or measure the cached one; returns its row and a line saying which file it is."""
    if retrain or not TEACHER_CKPT.exists():
        TEACHER_CKPT.unlink(missing_ok=True)
        row = fit(TEACHER, 0, TEACHER_CKPT.parent, extra)
        how = "trained now"
    else:
        start = time.perf_counter()
        cli = run_cli(["validate", *digits_config_args(TEACHER), f"--ckpt_path={TEACHER_CKPT}", "--verbose=false",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false"])  # fmt: skip
        acc = float(cli.trainer.callback_metrics["val/acc1"])
        if acc < MIN_TEACHER_TOP1:  # e.g. random weights saved under that name: every row would mean nothing
            _say(f"{TEACHER_CKPT} scores {100 * acc:.2f} % on the validation split: not a trained teacher; training it")
            return teacher(True, extra)
        row = Run(TEACHER, 0, acc, acc, time.perf_counter() - start)
        how = "cached (--retrain-teacher trains it again)"
    from lightning_kd.checkpoints import extract_state_dict, load_weights_file
    from lightning_kd.models import create_model

    network = create_model("resnet56", num_classes=10)
    network.load_state_dict(extract_state_dict(load_weights_file(TEACHER_CKPT)))
    return row, f"teacher: {TEACHER_CKPT} ({how}; weights sha256 {fingerprint(network)[:12]})"


@dataclass
class Summary:
    """One method over the seeds."""

    method: str
    runs: list[Run]

    def stats(self, key: str) -> tuple[float, float]:
        values = [100 * getattr(r, key) for r in self.runs]
        mean = sum(values) / len(values)  # by hand: NaN (a run that never validated) stays NaN, never an exception
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def format_table(teacher_row: Run, summaries: list[Summary]) -> str:
    """The results as a markdown table: mean +- std over the seeds, and the gain over the student alone."""
    alone = next(s for s in summaries if s.method == STUDENT)
    base, base_std = alone.stats("last")
    seeds = ",".join(str(r.seed) for r in alone.runs)
    lines = [
        f"| run | top-1 last (%), mean +- std over seeds {seeds} | top-1 best (%) | vs student alone | time per run (s) | command |",
        "|---|---:|---:|---:|---:|---|",
        f"| teacher (resnet56, all labels) | {100 * teacher_row.last:.2f} | {100 * teacher_row.best:.2f} | | "
        f"{teacher_row.seconds:.1f} | `lightning-kd fit --config configs/digits/teacher.yaml` |",
    ]
    for summary in summaries:
        mean, std = summary.stats("last")
        best, best_std = summary.stats("best")
        gain = "" if summary.method == STUDENT else f"{mean - base:+.2f}"
        seconds = statistics.mean(r.seconds for r in summary.runs)
        name = "student alone (resnet8)" if summary.method == STUDENT else display_name(summary.method)
        lines.append(
            f"| {name} | {mean:.2f} +- {std:.2f} | {best:.2f} +- {best_std:.2f} | {gain} | {seconds:.1f} | "
            f"`{command(summary.method, summary.runs[0].seed).replace('--seed_everything=0', '--seed_everything=S')}` |"
        )
    return "\n".join(lines)


def plot(teacher_row: Run, summaries: list[Summary], path: Path) -> None:
    """Accuracy per method with error bars (std over seeds), validation curves (mean over seeds), training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves, training) = plt.subplots(1, 3, figsize=(18, 4.8))
    names = ["alone" if s.method == STUDENT else s.method for s in summaries]
    means = [s.stats("last")[0] for s in summaries]
    stds = [s.stats("last")[1] for s in summaries]
    colors = ["tab:red" if s.method == STUDENT else "tab:blue" for s in summaries]
    bars.bar(names, means, yerr=stds, capsize=4, color=colors)
    for i, summary in enumerate(summaries):
        bars.scatter([i] * len(summary.runs), [100 * r.last for r in summary.runs], color="black", s=10, zorder=3)
    bars.axhline(100 * teacher_row.last, color="tab:green", ls="--", label=f"teacher {100 * teacher_row.last:.1f}")
    bars.axhline(means[0], color="tab:red", ls=":", label=f"student alone {means[0]:.1f}")
    low = min(m - s for m, s in zip(means, stds))
    bars.set_ylim(max(0.0, low - 5), 100.5)
    bars.set_ylabel("validation top-1 (%), last epoch")
    bars.set_title(f"Digits, few labels: mean +- std over {len(summaries[0].runs)} seeds (dots: seeds)")
    bars.legend(loc="lower right", fontsize=8)
    for summary in summaries:
        runs = [r for r in summary.runs if r.curve]
        if runs:
            length = min(len(r.curve) for r in runs)
            epochs = [epoch for epoch, _ in runs[0].curve[:length]]
            mean_curve = [100 * statistics.mean(r.curve[e][1] for r in runs) for e in range(length)]
            style = {"lw": 2.5, "color": "black"} if summary.method == STUDENT else {"lw": 1}
            curves.plot(epochs, mean_curve, label=summary.method, **style)
        first = summary.runs[0]
        if first.train_curve:
            steps, values = zip(*first.train_curve)
            style = {"lw": 2.5, "color": "black"} if summary.method == STUDENT else {"lw": 1}
            training.plot(steps, values, label=summary.method, **style)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation top-1 (%), mean over seeds")
    curves.set_title("Validation curves")
    curves.legend(fontsize=7, ncol=2)
    training.set_xlabel("training step")
    training.set_ylabel("cross-entropy with the labels")
    training.set_yscale("log")
    training.set_title("Training curves (train/ce, first seed)")
    training.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Summary]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/demo", help="folder for results.md, results.csv, results.png")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated method configs, or 'all' (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the teacher even when it is cached")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's max_epochs (quick checks)")
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (quick checks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet()

    methods = available_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    missing = [m for m in methods if not (METHOD_CONFIGS / f"{m}.yaml").exists()]
    if missing:
        parser.error(f"no method config for {missing}; available: {available_methods()}")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = []
    if args.epochs is not None:  # validate every epoch, so that the last one is measured
        extra += [f"--trainer.max_epochs={args.epochs}", "--trainer.check_val_every_n_epoch=1"]
    if args.limit_batches is not None:
        extra += [f"--trainer.limit_train_batches={args.limit_batches}", f"--trainer.limit_val_batches={args.limit_batches}"]

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher_row, which = teacher(args.retrain_teacher, extra)
    _say(f"{which}: validation top-1 {100 * teacher_row.last:.2f} % ({teacher_row.seconds:.0f} s)")
    rows: dict[str, list[Run]] = {}
    todo = [(m, s) for s in seeds for m in [STUDENT, *methods]]
    for number, (method, seed) in enumerate(todo, start=1):
        run_extra = [*extra, "--trainer.enable_checkpointing=false"]  # the demo reads the logs, not the weights
        if method != STUDENT:
            run_extra.append(f"--model.teacher_checkpoint={TEACHER_CKPT}")
        run = fit(method, seed, output / "runs" / method / f"seed{seed}", run_extra)
        rows.setdefault(method, []).append(run)
        _say(f"[{number}/{len(todo)}] {method} seed {seed}: top-1 {100 * run.last:.2f} % ({run.seconds:.1f} s)")
    summaries = [Summary(m, rows[m]) for m in [STUDENT, *methods]]
    table = format_table(teacher_row, summaries)
    total = time.perf_counter() - start
    (output / "results.md").write_text(f"{which}\n\n{table}\n\nTotal {total:.0f} s.\n")
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "top1_last", "top1_best", "seconds"])
        writer.writerow([TEACHER, 0, f"{teacher_row.last:.4f}", f"{teacher_row.best:.4f}", f"{teacher_row.seconds:.1f}"])
        for summary in summaries:
            for r in summary.runs:
                writer.writerow([r.method, r.seed, f"{r.last:.4f}", f"{r.best:.4f}", f"{r.seconds:.1f}"])
    plot(teacher_row, summaries, output / "results.png")
    _say(f"\n{which}\n\n{table}\n\nTotal {total:.0f} s. Written: {output}/results.md, results.csv, results.png")
    return summaries


def quiet() -> None:
    """The demo prints one line per run: Lightning's start-up notices and per-run warnings are left out."""
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning_kd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning_kd.core").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(dirpath has changed|smaller than the logging interval|"
                            r"does not have many workers|Checkpoint directory .* exists).*")


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo's own report on the terminal


if __name__ == "__main__":  # pragma: no cover
    main()
