#!/usr/bin/env python
"""Training speed of :class:`~lightning_kd.DistillationModule` under a Lightning ``Trainer`` against a plain
PyTorch loop that does the same work.

For every distiller exported by :mod:`lightning_kd.distillers` (or those named with ``--methods``), two
worker processes are started:

- **plain**: the student and the teacher (same seeds, so the same weights), the distiller built from a probe
  forward, :class:`~lightning_kd.taps.FeatureTaps` for the features, the teacher in eval mode under
  ``no_grad``, the loss ``task_loss_weight * CE + weight * distiller(...)`` (or the distiller's
  ``stage_loss`` when its first stage is an initialisation stage), SGD (lr 0.05, momentum 0.9, wd 5e-4),
  ``zero_grad / backward / step``;
- **library**: the same networks, distiller and batches in a ``DistillationModule`` fitted by a ``Trainer``
  (no logger, no checkpointing, no progress bar, no model summary, no validation, ``max_steps``).

Both iterate over the same list of dictionary batches already in memory (on the device). After a warm-up,
the parent process makes the two workers run ``--steps`` steps in turn, ``--rounds`` times, alternating
which goes first, while the other waits idle; a round's time is read after a device synchronisation. The
table gives each side's median steps/s over the rounds, the ratio library/plain (median of the per-round
ratios, so a change of load during the run affects both sides of a pair alike), the peak memory of each
worker (CPU: growth of the process's maximum resident set since its imports; CUDA:
``torch.cuda.max_memory_allocated``) and whether the first step's loss agrees on both sides (a check that
the two sides do the same work).

    python benchmarks/bench_overhead.py                       # every method, resnet56 -> resnet20, CPU
    python benchmarks/bench_overhead.py --device cuda --options
    python benchmarks/bench_overhead.py --quick --methods KD,VID --pair resnet20,resnet8 --input-size 16

The table is printed and written as markdown to ``outputs/bench/results.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: constructor arguments for distillers whose defaults need something the benchmark's batches lack
OVERRIDES: dict[str, dict[str, Any]] = {
    # the memory-bank variant needs batch["index"] / batch["contrast_index"] from a data module
    "CRD": {"negatives": "batch"},
}
SEED = 0


# ----------------------------------------------------------------------------------------------------------
# what to measure
# ----------------------------------------------------------------------------------------------------------
def _label(name: str, kwargs: dict[str, Any]) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


def discover(requested: list[str] | None, with_options: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows to measure and notes on the methods left out.

    Every :class:`Distiller` subclass exported by :mod:`lightning_kd.distillers` is built with its defaults
    (plus :data:`OVERRIDES`). A method whose first stage is an initialisation stage is measured in that stage;
    when it also trains in the main stage (FT), a second row measures the main stage (``stage_epochs=0``).
    """
    import lightning_kd.distillers as distillers
    from lightning_kd.distillers.base import Distiller

    classes = {
        name: getattr(distillers, name)
        for name in distillers.__all__
        if isinstance(getattr(distillers, name), type)
        and issubclass(getattr(distillers, name), Distiller)
        and getattr(distillers, name) is not Distiller
    }
    wanted = [m.strip() for m in requested if m.strip()] if requested else list(classes)
    lookup = {name.lower(): name for name in classes}
    unknown = [m for m in wanted if m.lower() not in lookup]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose among {sorted(classes)}")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for requested_name in wanted:
        name = lookup[requested_name.lower()]
        kwargs = dict(OVERRIDES.get(name, {}))
        try:
            distiller = classes[name](**kwargs)
        except Exception as error:  # noqa: BLE001 - a note in the table, not a crash
            notes.append(f"{name} left out: cannot be built with its defaults ({error})")
            continue
        if kwargs:
            notes.append(f"{name} is measured with {kwargs} (its default needs indices from a data module)")
        stage = f"{distiller.name}_init" if distiller.stage_epochs else "main"
        rows.append({"label": _label(name, kwargs), "cls": name, "kwargs": kwargs, "stage": stage, "options": {}})
        if distiller.stage_epochs and distiller.active_in_main:
            try:
                classes[name](**{**kwargs, "stage_epochs": 0})
            except Exception:  # noqa: BLE001
                continue
            main_kwargs = {**kwargs, "stage_epochs": 0}
            label = _label(name, main_kwargs)
            rows.append({"label": label, "cls": name, "kwargs": main_kwargs, "stage": "main", "options": {}})
    if with_options and "KD" in classes:
        for option, value in (("channels_last", True), ("compile", True), ("teacher_precision", "bf16")):
            label = f"KD + {option}" + (f"={value}" if not isinstance(value, bool) else "")
            rows.append({"label": label, "cls": "KD", "kwargs": {}, "stage": "main", "options": {option: value}})
    return rows, notes


# ----------------------------------------------------------------------------------------------------------
# the worker processes
# ----------------------------------------------------------------------------------------------------------
def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class _Rounds:
    """Counts steps, and at round boundaries reports to the parent and waits for its signal to go on."""

    def __init__(self, conn: Any, cfg: dict[str, Any], sync: Any) -> None:
        self.conn, self.sync = conn, sync
        self.warmup, self.steps, self.rounds = cfg["warmup"], cfg["steps"], cfg["rounds"]
        self.step = 0
        self.first_loss: float | None = None
        self.start = 0.0

    @property
    def total(self) -> int:
        return self.warmup + self.rounds * self.steps

    def after_step(self, loss: Any) -> None:
        self.step += 1
        if self.step == 1:
            self.first_loss = float(loss.detach())
        done = self.step - self.warmup
        if done < 0 or done % self.steps:
            return
        self.sync()
        if done == 0:
            self.conn.send(("ready", self.first_loss))
        else:
            self.conn.send(("round", time.perf_counter() - self.start))
        if done < self.rounds * self.steps:
            self.conn.recv()  # "go"
            self.start = time.perf_counter()


def _calibrate_batchnorm(network: Any, images: list[Any]) -> None:
    """Set the BatchNorm running statistics to the exact averages over ``images`` (no gradient).

    A freshly initialised network in eval mode normalises with mean 0 and variance 1, so its activations grow
    through a deep residual stack, and some losses (CC, FSP) then overflow within a few steps. Calibrated
    statistics make the untrained teacher behave like a trained one in that respect.
    """
    import torch
    from torch import nn

    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    network.train()
    with torch.no_grad():
        for image in images:
            network(image)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    network.eval()


def _build(cfg: dict[str, Any], row: dict[str, Any]) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """Teacher, student, distiller (not yet built) and the batches, identical in both workers."""
    import torch

    import lightning_kd.distillers as distillers
    from lightning_kd.models import create_model

    teacher_name, student_name = cfg["pair"]
    torch.manual_seed(SEED)
    teacher = create_model(teacher_name, num_classes=cfg["num_classes"])
    torch.manual_seed(SEED + 1)
    student = create_model(student_name, num_classes=cfg["num_classes"])
    distiller = getattr(distillers, row["cls"])(**row["kwargs"])
    generator = torch.Generator().manual_seed(SEED + 3)
    size = cfg["input_size"]
    distinct = [
        {
            "image": torch.randn(cfg["batch_size"], 3, size, size, generator=generator),
            "label": torch.randint(0, cfg["num_classes"], (cfg["batch_size"],), generator=generator),
        }
        for _ in range(cfg["distinct_batches"])
    ]
    _calibrate_batchnorm(teacher, [batch["image"] for batch in distinct])
    device = torch.device(cfg["device"])
    distinct = [{key: value.to(device) for key, value in batch.items()} for batch in distinct]
    steps = cfg["warmup"] + cfg["rounds"] * cfg["steps"]
    return teacher, student, distiller, [distinct[i % len(distinct)] for i in range(steps)]


def _plain(conn: Any, cfg: dict[str, Any], row: dict[str, Any], rounds: _Rounds) -> None:
    """The hand-written loop: the same work as one ``DistillationModule.training_step`` plus the optimizer."""
    import torch
    import torch.nn.functional as F

    from lightning_kd.taps import LOGITS, FeatureTaps, expand_taps

    options = row["options"]
    teacher, student, distiller, batches = _build(cfg, row)
    device = torch.device(cfg["device"])
    # tap groups ("stages", "last_stage", ...) name the models' own layers, as in the module
    distiller.student_layers = expand_taps(student, distiller.student_layers)
    distiller.teacher_layers = expand_taps(teacher, distiller.teacher_layers)
    student_taps = FeatureTaps(student, distiller.student_layers)
    teacher_taps = FeatureTaps(teacher, distiller.teacher_layers)

    def run(network: Any, taps: FeatureTaps, images: Any) -> dict[str, Any]:
        logits = network(images)
        features = taps.pop()
        features[LOGITS] = logits
        return features

    # probe forward on zeros, then the distiller builds its parts (as the module does in its constructor)
    probe = torch.zeros(2, 3, cfg["input_size"], cfg["input_size"])
    student.eval()
    teacher.eval()
    with torch.no_grad():
        s_probe, t_probe = run(student, student_taps, probe), run(teacher, teacher_taps, probe)
    torch.manual_seed(SEED + 2)
    distiller.build([s_probe[t] for t in distiller.student_layers], [t_probe[t] for t in distiller.teacher_layers])

    teacher.requires_grad_(False)
    student.to(device)
    teacher.to(device)
    distiller.to(device)
    if options.get("channels_last"):
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if options.get("compile"):
        student.compile()
        teacher.compile()

    in_stage = bool(distiller.stage_epochs)
    distiller.on_stage(f"{distiller.name}_init" if in_stage else "main")
    if in_stage:
        params = list(distiller.stage_parameters(student))
        needs_teacher = distiller.needs_teacher
        needs_student = getattr(distiller, "stage_needs_student", True)
    else:
        params = [p for p in student.parameters() if p.requires_grad] + list(distiller.main_parameters())
        needs_teacher = distiller.active_in_main and distiller.needs_teacher
        needs_student = True
    params = list({id(p): p for p in params}.values())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    task_weight = cfg["task_loss_weight"]
    teacher_precision = options.get("teacher_precision", "same")

    student.train()
    distiller.train()
    teacher.eval()
    for batch in batches:
        images = batch["image"]
        if options.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        s_feats = run(student, student_taps, images) if needs_student else {}
        t_feats: dict[str, Any] = {}
        if needs_teacher:
            with torch.no_grad():
                if teacher_precision == "same":
                    t_feats = run(teacher, teacher_taps, images)
                else:
                    dtype = torch.bfloat16 if teacher_precision == "bf16" else torch.float16
                    with torch.autocast(device.type, dtype=dtype):
                        t_feats = run(teacher, teacher_taps, images)
                    t_feats = {k: v.float() for k, v in t_feats.items()}
        s_list = [s_feats[t] for t in distiller.student_layers] if s_feats else []
        t_list = [t_feats[t] for t in distiller.teacher_layers] if t_feats else []
        if in_stage:
            loss = distiller.stage_loss(s_list, t_list, batch)
        else:
            loss = task_weight * F.cross_entropy(s_feats[LOGITS].float(), batch["label"])
            if distiller.active_in_main and distiller.weight:
                loss = loss + distiller.weight * distiller(s_list, t_list, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rounds.after_step(loss)


def _library(conn: Any, cfg: dict[str, Any], row: dict[str, Any], rounds: _Rounds) -> None:
    """The same fit through ``DistillationModule`` and a ``Trainer``."""
    import lightning as L
    import torch

    from lightning_kd import DistillationModule

    teacher, student, distiller, batches = _build(cfg, row)
    torch.manual_seed(SEED + 2)  # the distiller builds its parts inside the constructor
    module = DistillationModule(
        student,
        teacher,
        [distiller],
        task_loss_weight=cfg["task_loss_weight"],
        num_classes=cfg["num_classes"],
        input_size=(3, cfg["input_size"], cfg["input_size"]),
        **row["options"],
    )

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rounds.after_step(outputs["loss"])

    trainer = L.Trainer(
        accelerator="gpu" if cfg["device"].startswith("cuda") else "cpu",
        devices=1,
        max_steps=rounds.total,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, train_dataloaders=_Batches(batches))


class _Batches:
    """The in-memory batches as one iterable (a bare list would read as a list of data loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the parent goes (Lightning traps SIGTERM)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn: Any, side: str, cfg: dict[str, Any], row: dict[str, Any]) -> None:
    _die_with_parent()
    try:
        warnings.filterwarnings("ignore")
        import torch

        import lightning  # noqa: F401 - both sides pay the same imports before the baseline is read
        import lightning_kd  # noqa: F401

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_kd"):
            logging.getLogger(name).setLevel(logging.ERROR)  # after the imports, which set their own levels
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        cuda = cfg["device"].startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        baseline = _max_rss_mib()
        rounds = _Rounds(conn, cfg, sync)
        (_plain if side == "plain" else _library)(conn, cfg, row, rounds)
        if rounds.step != rounds.total:
            raise RuntimeError(f"the {side} side ran {rounds.step} steps, expected {rounds.total}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mib() - baseline
        conn.send(("done", peak))
    except BaseException:  # noqa: BLE001 - reported to the parent, which notes it in the table
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------------
# the parent: alternate the two sides
# ----------------------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


def _expect(conn: Any, kind: str, side: str) -> Any:
    try:
        message, value = conn.recv()
    except EOFError as error:
        raise WorkerError(f"the {side} worker died without a word") from error
    if message == "error":
        raise WorkerError(f"the {side} worker failed:\n{value}")
    if message != kind:
        raise WorkerError(f"the {side} worker sent {message!r}, expected {kind!r}")
    return value


def measure(cfg: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Run one row: both workers warm up, then ``rounds`` alternating timed rounds."""
    context = mp.get_context("spawn")
    sides = ("plain", "library")
    conns, procs = {}, {}
    finished = False
    try:
        for side in sides:
            parent, child = context.Pipe()
            procs[side] = context.Process(target=_worker, args=(child, side, cfg, row), daemon=True)
            procs[side].start()
            child.close()
            conns[side] = parent
        first_loss = {side: _expect(conns[side], "ready", side) for side in sides}
        times: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(cfg["rounds"]):
            for side in sides if r % 2 == 0 else sides[::-1]:
                conns[side].send("go")
                times[side].append(_expect(conns[side], "round", side))
        peak = {side: _expect(conns[side], "done", side) for side in sides}
        finished = True
    finally:
        for proc in procs.values():
            proc.join(timeout=60 if finished else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    rate = {side: [cfg["steps"] / t for t in times[side]] for side in sides}
    ratios = [lib / plain for lib, plain in zip(rate["library"], rate["plain"])]
    a, b = first_loss["plain"], first_loss["library"]
    return {
        "plain": statistics.median(rate["plain"]),
        "library": statistics.median(rate["library"]),
        "ratio": statistics.median(ratios),
        "mem_plain": peak["plain"],
        "mem_library": peak["library"],
        "same_loss": abs(a - b) <= 1e-3 * max(1.0, abs(a)),
        "loss": (a, b),
    }


def format_table(cfg: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    memory = "peak CUDA memory allocated" if cfg["device"].startswith("cuda") else "peak RSS growth"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    import lightning
    import torch

    lines = [
        "# DistillationModule + Trainer versus a plain PyTorch loop",
        "",
        f"- workload: {cfg['pair'][0]} -> {cfg['pair'][1]}, batch {cfg['batch_size']}, "
        f"{cfg['input_size']}x{cfg['input_size']} inputs, {cfg['num_classes']} classes, device {cfg['device']}",
        f"- timing: {cfg['warmup']} warm-up steps, then {cfg['rounds']} alternating rounds of {cfg['steps']} steps "
        "per side; steps/s is the median over rounds, the ratio the median of the per-round ratios",
        f"- memory: {memory} of each side's own process (MiB)",
        f"- torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {cfg['threads'] or torch.get_num_threads()} threads, "
        f"load average at the end {load}, {datetime.datetime.now().isoformat(timespec='seconds')}",
        "- option rows (KD + ...) compare against a plain loop with the same option (channels_last networks "
        "and images; torch.compile of both networks; the teacher under bf16 autocast)",
        "",
        f"| method | stage | plain steps/s | library steps/s | library/plain | {memory} plain "
        f"| {memory} library | same loss |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r = row.get("result")
        if r is None:
            lines.append(f"| {row['label']} | {row['stage']} | failed | failed | | | | |")
            continue
        lines.append(
            f"| {row['label']} | {row['stage']} | {r['plain']:.2f} | {r['library']:.2f} | {r['ratio']:.3f} | "
            f"{r['mem_plain']:.0f} | {r['mem_library']:.0f} | "
            + ("yes |" if r["same_loss"] else "NO: %.6g vs %.6g |" % r["loss"])
        )
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


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
        "--steps", type=int, default=None, help="steps per round and side (default: 10 on CPU, 50 on CUDA; --quick 2)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per side (default 3; --quick 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 3 on CPU, 10 on CUDA; --quick 1)"
    )
    parser.add_argument("--methods", default=None, help="comma-separated distiller names (default: every one)")
    parser.add_argument("--options", action="store_true", help="add KD rows with channels_last, compile, teacher bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a measurement)")
    parser.add_argument("--output", default="outputs/bench/results.md", help="markdown file for the table")
    args = parser.parse_args(argv)
    quick, cuda = args.quick, args.device.startswith("cuda")
    args.steps = args.steps or (2 if quick else 50 if cuda else 10)
    args.rounds = args.rounds or (2 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10 if cuda else 3)
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the clean-up that stops the workers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    pair = [p.strip() for p in args.pair.split(",")]
    if len(pair) != 2:
        raise SystemExit(f"--pair takes teacher,student; got {args.pair!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    cfg = {
        "device": args.device,
        "pair": pair,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "num_classes": args.num_classes,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "task_loss_weight": 1.0,
        "distinct_batches": 4,
    }
    rows, notes = discover(args.methods.split(",") if args.methods else None, args.options)
    failed = 0
    for row in rows:
        started = time.perf_counter()
        try:
            row["result"] = measure(cfg, row)
            r = row["result"]
            print(
                f"{row['label']:<32} plain {r['plain']:8.2f}/s  library {r['library']:8.2f}/s  ratio {r['ratio']:.3f}"
                f"  ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
        except WorkerError as error:
            failed += 1
            lines = str(error).strip().splitlines()
            notes.append(f"{row['label']} failed: {lines[0]} {lines[-1].strip()}")
            print(f"{row['label']}: {error}", file=sys.stderr, flush=True)
    table = format_table(cfg, rows, notes)
    print()
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    print(f"written to {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
