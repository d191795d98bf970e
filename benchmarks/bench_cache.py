"""What the teacher-output cache costs to build and what it buys in training: KD resnet56 -> resnet20, batch 64.

Three measurements, on a CIFAR-like training set of ``--images`` random 32x32 images (default 64) in
:class:`~lightning_kd.data.CIFAR100DataModule`'s own training set (crop + flip: 162 views per image, each view's
``index``, ``crop_top``, ``crop_left`` and ``flip`` in the batch; the images come from ``bench_data.py``'s
``InMemoryCIFAR100DataModule``, so nothing is downloaded):

1. build: :func:`lightning_kd.cache.build_cache`, what ``lightning-kd cache`` runs, with its defaults (fp16,
   512 views per teacher forward), timed once, and the cache's size on disk; both extrapolated per image to
   CIFAR-100's 50,000 training images (the measured and the extrapolated figures are in separate columns);
2. training speed: steps/s of a KD fit (``DistillationModule`` fitted by a Lightning ``Trainer``: no logger,
   checkpoint, progress bar or validation) with the live teacher, with the cache (``teacher_cache=``), and of the
   student alone (no teacher, no distillers: the ceiling). Each side runs in its own worker process from the same
   seeds, on the same batches: collected beforehand from the data module's own training loader (epochs 0, 1, ...,
   so the views differ from epoch to epoch) and replayed from memory, so that what is timed is the training step
   (the loader's cost, the same on every side, is ``bench_data.py``'s subject). The workers set up and warm up one
   at a time, then run ``--steps`` steps in turn, ``--rounds`` times, the order rotating and alternating
   (``benchmarks/overhead/harness.py``'s scheme and its ``Rounds``); reported: the median steps/s per side and the
   median of the per-round ratios to the live teacher;
3. pay-off: how many CIFAR-100 student runs (240 epochs x 782 steps) pay back the extrapolated build through the
   per-step saving: ``build_time_cifar / (steps_per_run * (1 / live - 1 / cached))``. Below 1 when the build
   (50,000 x 162 = 8.1 M teacher forwards) costs less than the 12 M forwards of one run.

The teacher has random weights, its BatchNorm statistics calibrated on a few training batches (so that its
logits stay in a trained network's range; a cache is as fast for any weights). KD as ``configs/methods/kd.yaml``:
weight 0.9, temperature 4, task loss weight 0.1.

    python benchmarks/bench_cache.py                      # 64 images, CPU
    python benchmarks/bench_cache.py --device cuda --images 512
    python benchmarks/bench_cache.py --quick              # 8 images, batch 8: a smoke test, not a measurement

The report is printed and written as markdown to ``outputs/bench/cache.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package, and the other benchmarks beside this script
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_data import InMemoryCIFAR100DataModule  # noqa: E402
from benchmarks.overhead import harness, report  # noqa: E402
from benchmarks.overhead.harness import Rounds, WorkerError, Workload, calibrate_batchnorm  # noqa: E402
from lightning_kd.cache import build_cache  # noqa: E402

SEED = 0
DATA_SEED = 0
CIFAR100_IMAGES = 50_000
RUN_EPOCHS, RUN_STEPS_PER_EPOCH = 240, 782  # one CIFAR-100 student run of the CRD benchmark
KD_ARGUMENTS = {"weight": 0.9, "temperature": 4.0}  # configs/methods/kd.yaml
KD_TASK_LOSS_WEIGHT = 0.1
#: the sides of the training measurement, in table order (the first is the reference of the ratios)
SIDES = ("live", "cache", "student")
CALIBRATION_BATCHES = 4


@dataclass(frozen=True)
class Setup:
    """What every worker needs: the workload, the data's size, the teacher's weights and the cache."""

    work: Workload
    images: int
    teacher_file: str
    cache: str
    dtype: str


# ----------------------------------------------------------------------------------------------------------
# the data: the library's CIFAR training set over random images, its batches replayed from memory
# ----------------------------------------------------------------------------------------------------------
class ReplayedCIFAR(InMemoryCIFAR100DataModule):
    """``CIFAR100DataModule`` over ``images`` random images whose training loader replays ``steps`` batches
    collected from its own loader (epoch 0, then 1, ...) at the first ``setup``. Its training set is untouched, so
    the cache checks it (dataset fingerprint, augmentation) as it checks the real data module."""

    def __init__(self, images: int, batch_size: int, steps: int) -> None:
        super().__init__(images, batch_size=batch_size, num_workers=0, data_seed=DATA_SEED)
        self.steps = steps
        self.batches: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not self.batches:
            loader = super().train_dataloader()
            epoch = 0
            while len(self.batches) < self.steps:
                loader.sampler.set_epoch(epoch)
                self.batches += list(loader)[: self.steps - len(self.batches)]
                epoch += 1

    def train_dataloader(self) -> Any:
        return harness._Batches(self.batches)


def make_teacher(work: Workload, images: int) -> torch.nn.Module:
    """The teacher with random weights, its BatchNorm statistics calibrated on the first training batches."""
    from lightning_kd.models import create_model

    torch.manual_seed(SEED)
    teacher = create_model(work.pair[0], num_classes=work.num_classes)
    data = ReplayedCIFAR(images, work.batch_size, CALIBRATION_BATCHES)
    data.setup("fit")
    calibrate_batchnorm(teacher, [batch["image"] for batch in data.batches])
    return teacher


# ----------------------------------------------------------------------------------------------------------
# 1. the build
# ----------------------------------------------------------------------------------------------------------
def measure_build(setup: Setup, teacher: torch.nn.Module) -> dict[str, Any]:
    """Build the cache of ``teacher`` on the training set in ``setup.cache`` through ``build_cache``; its
    manifest, wall time and size on disk (every file of the folder)."""
    data = InMemoryCIFAR100DataModule(
        setup.images, batch_size=setup.work.batch_size, num_workers=0, data_seed=DATA_SEED
    )
    data.setup("fit")
    start = time.perf_counter()
    manifest = build_cache(
        teacher,
        data,
        setup.cache,
        dtype=setup.dtype,
        accelerator="cuda" if setup.work.device.startswith("cuda") else "cpu",
    )
    seconds = time.perf_counter() - start
    disk = sum(path.stat().st_size for path in Path(setup.cache).rglob("*") if path.is_file())
    return {"manifest": manifest, "seconds": seconds, "disk": disk}


# ----------------------------------------------------------------------------------------------------------
# 2. the training speed: one worker process per side
# ----------------------------------------------------------------------------------------------------------
def make_module(side: str, setup: Setup) -> Any:
    """The side's ``DistillationModule``: KD with the live teacher (``live``) or with the cache (``cache``), or the
    student alone (``student``); the same student weights on every side."""
    from lightning_kd import DistillationModule
    from lightning_kd.distillers import KD
    from lightning_kd.models import create_model

    work = setup.work
    teacher = None
    if side != "student":
        teacher = create_model(work.pair[0], num_classes=work.num_classes)
        teacher.load_state_dict(torch.load(setup.teacher_file, weights_only=True))
    torch.manual_seed(SEED + 1)
    student = create_model(work.pair[1], num_classes=work.num_classes)
    options: dict[str, Any] = {"num_classes": work.num_classes, "input_size": (3, work.input_size, work.input_size)}
    if side == "student":
        return DistillationModule(student, None, [], task_loss_weight=1.0, **options)
    cache = setup.cache if side == "cache" else None
    return DistillationModule(
        student, teacher, [KD(**KD_ARGUMENTS)], task_loss_weight=KD_TASK_LOSS_WEIGHT, teacher_cache=cache, **options
    )


def run_side(side: str, setup: Setup, rounds: Rounds) -> None:
    import lightning as L

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rounds.after_step(outputs["loss"])

    data = ReplayedCIFAR(setup.images, setup.work.batch_size, setup.work.total_steps)
    data.setup("fit")  # the batches, before anything is timed
    module = make_module(side, setup)
    trainer = harness.training_only_trainer(setup.work.device, setup.work.total_steps, [Timer()])
    trainer.fit(module, datamodule=data)


def _worker(conn: Any, side: str, setup: Setup) -> None:
    harness._die_with_parent()
    try:
        warnings.filterwarnings("ignore")
        import lightning  # noqa: F401 - every side pays the same imports before the baseline is read

        import lightning_kd  # noqa: F401

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_kd"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if setup.work.threads:
            torch.set_num_threads(setup.work.threads)
        cuda = setup.work.device.startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        baseline = harness._max_rss_mib()
        conn.recv()  # "start": one worker at a time sets up and warms up
        rounds = Rounds(conn, setup.work, sync)
        run_side(side, setup, rounds)
        if rounds.step != setup.work.total_steps:
            raise RuntimeError(f"the {side} side ran {rounds.step} steps, expected {setup.work.total_steps}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else harness._max_rss_mib() - baseline
        conn.send(("done", {"peak": peak, "first_loss": rounds.first_loss, "last_loss": rounds.last_loss}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def measure_fits(setup: Setup) -> dict[str, dict[str, Any]]:
    """Every side in its own process: set-up and warm-up one at a time, then ``rounds`` rounds in which each runs
    ``steps`` steps in turn, the order rotating each round and reversed every other round.

    Returns ``{side: {"times": [s/step per round], "peak": MiB, "first_loss": float, "last_loss": float}}``.
    """
    work = setup.work
    context = mp.get_context("spawn")
    conns: dict[str, Any] = {}
    procs: dict[str, Any] = {}
    finished = False
    try:
        for side in SIDES:
            parent, child = context.Pipe()
            procs[side] = context.Process(target=_worker, args=(child, side, setup), daemon=True)
            procs[side].start()
            child.close()
            conns[side] = parent
        for side in SIDES:
            harness._send(conns[side], "start")
            harness._expect(conns[side], "ready", side)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(work.rounds):
            order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
            for side in order if r % 2 == 0 else order[::-1]:
                harness._send(conns[side], "go")
                elapsed, _ = harness._expect(conns[side], "round", side)
                times[side].append(elapsed / work.steps)
            print(f"round {r + 1}/{work.rounds}: " + "  ".join(f"{side} {1 / times[side][-1]:.2f} steps/s"
                                                               for side in SIDES), flush=True)  # fmt: skip
        done = {side: harness._expect(conns[side], "done", side) for side in SIDES}
        finished = True
    finally:
        harness.stop_workers(procs.values(), finished)
    return {side: {"times": times[side], **done[side]} for side in SIDES}


# ----------------------------------------------------------------------------------------------------------
# 3. the report
# ----------------------------------------------------------------------------------------------------------
def summarize(setup: Setup, build: dict[str, Any], fits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the report: measured, extrapolated to CIFAR-100, and the pay-off."""
    manifest = build["manifest"]
    _, tops, lefts, flips, _ = manifest["shape"]
    views = tops * lefts * flips
    scale = CIFAR100_IMAGES / setup.images
    fixed = build["disk"] - int(manifest["bytes"])  # the .npy header and the manifest
    rates = {side: statistics.median(report.rates(fits[side])) for side in SIDES}
    ratios = {side: statistics.median(a / b for a, b in zip(report.rates(fits[side]), report.rates(fits["live"])))
              for side in SIDES}  # fmt: skip
    steps_per_run = RUN_EPOCHS * RUN_STEPS_PER_EPOCH
    saving = 1 / rates["live"] - 1 / rates["cache"]  # seconds per step
    build_cifar = build["seconds"] * scale
    return {
        "views": views,
        "forwards": setup.images * views,
        "forwards_cifar": CIFAR100_IMAGES * views,
        "forwards_run": steps_per_run * setup.work.batch_size,
        "build_seconds": build["seconds"],
        "build_seconds_cifar": build_cifar,
        "views_per_second": setup.images * views / build["seconds"],
        "disk": build["disk"],
        "disk_cifar": round(int(manifest["bytes"]) * scale) + fixed,
        "rates": rates,
        "ratios": ratios,
        "steps_per_run": steps_per_run,
        "saving": saving,
        "payoff": build_cifar / (steps_per_run * saving) if saving > 0 else None,
        "same_first_loss": report.same_loss(fits["live"]["first_loss"], fits["cache"]["first_loss"]),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    unit, scale = ("min", 60) if seconds < 7200 else ("h", 3600)
    return f"{seconds / scale:.2f} {unit} ({seconds:,.0f} s)"


def _bytes(n: float) -> str:
    for unit, decimal, binary in (("G", 1e9, 2**30), ("M", 1e6, 2**20), ("k", 1e3, 2**10)):
        if n >= decimal:
            return f"{n / decimal:.2f} {unit}B ({n / binary:.2f} {unit.upper()}iB)"
    return f"{n:.0f} B"


def render(setup: Setup, s: dict[str, Any], fits: dict[str, dict[str, Any]]) -> str:
    work, n, dtype = setup.work, setup.images, setup.dtype
    labels = {"live": "live teacher", "cache": f"teacher cache ({dtype})", "student": "student alone (ceiling)"}
    memory = "peak CUDA memory (MiB)" if work.device.startswith("cuda") else "peak RSS growth (MiB)"
    lines = report.header(work, "Teacher-output cache: build cost and training speed")
    lines += [
        (
            f"- data: {n} random 32x32 images in CIFAR100DataModule's training set ({s['views']} crop + flip views "
            "each), batches collected from its own training loader and replayed from memory; KD weight "
            f"{KD_ARGUMENTS['weight']}, temperature {KD_ARGUMENTS['temperature']}, task loss weight "
            f"{KD_TASK_LOSS_WEIGHT}; teacher with random weights and calibrated BatchNorm"
        ),
        "",
        f"## Build ({dtype}, `lightning_kd.cache.build_cache` as `lightning-kd cache` runs it, timed once)",
        "",
        f"| build | measured: {n} images | extrapolated: CIFAR-100, {CIFAR100_IMAGES:,} images |",
        "|---|---:|---:|",
        f"| teacher forwards (images x views) | {s['forwards']:,} | {s['forwards_cifar']:,} |",
        f"| build time | {_duration(s['build_seconds'])} | {_duration(s['build_seconds_cifar'])} |",
        f"| build throughput (views/s) | {s['views_per_second']:,.0f} | (the same, assumed) |",
        f"| size on disk | {_bytes(s['disk'])} | {_bytes(s['disk_cifar'])} |",
        "",
        f"## Training speed ({work.rounds} rounds of {work.steps} steps per side, medians)",
        "",
        f"| fit | steps/s | ms/step | vs live teacher (median per-round ratio) | {memory} | first loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        rate, first = s["rates"][side], fits[side]["first_loss"]
        lines.append(
            f"| {labels[side]} | {rate:.2f} | {1000 / rate:.1f} | {s['ratios'][side]:.3f} | "
            f"{fits[side]['peak']:.0f} | {first:.6f} |"
        )
    same = "the same (within 1e-3)" if s["same_first_loss"] else "NOT the same"
    lines += [
        "",
        f"The live teacher's and the cache's first losses are {same}"
        + (" (fp16 logits: within 2^-11 of the teacher's)." if dtype == "fp16" else "."),
        "",
        f"## Pay-off (CIFAR-100: {RUN_EPOCHS} epochs x {RUN_STEPS_PER_EPOCH} steps per student run)",
        "",
        "| pay-off | value |",
        "|---|---:|",
        f"| steps per run | {s['steps_per_run']:,} |",
        (
            f"| teacher forwards: build (extrapolated) / one run | {s['forwards_cifar']:,} / {s['forwards_run']:,} "
            f"= {s['forwards_cifar'] / s['forwards_run']:.3f} |"
        ),
        (
            f"| time per run: live teacher / cache | {_duration(s['steps_per_run'] / s['rates']['live'])} / "
            f"{_duration(s['steps_per_run'] / s['rates']['cache'])} |"
        ),
        f"| saved per step / per run | {1000 * s['saving']:.1f} ms / {_duration(s['steps_per_run'] * s['saving'])} |",
        f"| build time (extrapolated) | {_duration(s['build_seconds_cifar'])} |",
        "| runs to pay back the build | "
        + (f"{s['payoff']:.3f}" if s["payoff"] is not None else "never (the cache was not faster here)")
        + " |",
        "",
        (
            "Runs to pay back the build = build time (extrapolated) / (steps per run x (1 / live steps/s - 1 / cache "
            "steps/s))."
        ),
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pair", default="resnet56,resnet20", help="teacher,student (default: resnet56,resnet20)")
    parser.add_argument("--images", type=int, default=None, help="training images (default 64; --quick 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--quick 8)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"], help="the cache's storage (default fp16)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per round and side (default: 20 on CPU, 50 on CUDA; --quick 3)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, >= 1 (default: 3 on CPU, 10 on CUDA; --quick 1)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    parser.add_argument("--tmp-dir", default=None, help="where the cache is built (default: the system's temp folder)")
    parser.add_argument("--quick", action="store_true", help="8 images, batch 8, 2 rounds of 3 steps: a smoke test")
    parser.add_argument("--output", default="outputs/bench/cache.md", help="markdown file for the report")
    args = parser.parse_args(argv)
    quick, cuda = args.quick, args.device == "cuda"
    args.images = args.images or (8 if quick else 64)
    args.batch_size = args.batch_size or (8 if quick else 64)
    args.steps = args.steps or (3 if quick else 50 if cuda else 20)
    args.rounds = args.rounds or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10 if cuda else 3)
    if min(args.steps, args.rounds, args.warmup) < 1:
        parser.error("--steps, --rounds and --warmup must be >= 1 (the first step's loss is read in the warm-up)")
    if args.batch_size > args.images:
        parser.error(f"--batch-size {args.batch_size} is more than --images {args.images}: no full batch")
    args.pair = tuple(p.strip() for p in args.pair.split(","))
    if len(args.pair) != 2:
        parser.error(f"--pair takes teacher,student; got {','.join(args.pair)!r}")
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the clean-up that stops the workers and removes the cache


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not harness.quiet_and_check_device(args.device):
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = Workload(
        device=args.device,
        pair=args.pair,
        batch_size=args.batch_size,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads,
        task_loss_weight=KD_TASK_LOSS_WEIGHT,
    )
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=args.tmp_dir) as folder:
        setup = Setup(work, args.images, str(Path(folder) / "teacher.pt"), str(Path(folder) / "cache"), args.dtype)
        teacher = make_teacher(work, args.images)
        torch.save(teacher.state_dict(), setup.teacher_file)
        print(f"building the {args.dtype} cache of {args.images} images ...", flush=True)  # noqa: T201
        build = measure_build(setup, teacher)
        print(f"built in {build['seconds']:.1f} s, {build['disk']:,} bytes on disk", flush=True)  # noqa: T201
        try:
            fits = measure_fits(setup)
        except WorkerError as error:
            print(error, file=sys.stderr)  # noqa: T201
            return 1
    harness.write_report(render(setup, summarize(setup, build, fits), fits), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
