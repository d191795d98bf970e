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
``torch.cuda.max_memory_allocated``), the minor page faults per step, and whether the first step's loss
agrees on both sides (a check that the two sides do the same work). The untrained teacher's BatchNorm
statistics are first calibrated on the batches, so that its features stay in a trained network's range.

``--breakdown`` times the steps in between instead, each in its own process: the plain loop, the same step
in a minimal LightningModule (Lightning's own cost), ``DistillationModule`` with ``self.log`` disabled and
``nan_policy="ignore"``, with ``nan_policy="ignore"`` only, and as is. On a small workload, where the fixed
cost per step dominates, the differences attribute the overhead.

    python benchmarks/bench_overhead.py                       # every method, resnet56 -> resnet20, CPU
    python benchmarks/bench_overhead.py --device cuda --options
    python benchmarks/bench_overhead.py --quick --methods KD,VID --pair resnet20,resnet8 --input-size 16
    python benchmarks/bench_overhead.py --breakdown --methods KD --pair resnet8,resnet8 --input-size 8 \
        --batch-size 2 --steps 100 --rounds 5 --warmup 20 --threads 1

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
#: the sides a worker can run: the two of the main table, and the steps in between for --breakdown
SIDES = {
    "plain": "plain PyTorch loop",
    "lightning": "the plain loop's step as a minimal LightningModule",
    "library-bare": "DistillationModule, self.log disabled, nan_policy='ignore'",
    "library-nocheck": "DistillationModule, nan_policy='ignore'",
    "library": "DistillationModule (defaults)",
}
MAIN_SIDES = ("plain", "library")
#: glibc settings that keep freed memory in the process (see --tuned-malloc)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Rounds:
    """Counts steps, and at round boundaries reports to the parent and waits for its signal to go on."""

    def __init__(self, conn: Any, cfg: dict[str, Any], sync: Any) -> None:
        self.conn, self.sync = conn, sync
        self.warmup, self.steps, self.rounds = cfg["warmup"], cfg["steps"], cfg["rounds"]
        self.step = 0
        self.first_loss: float | None = None
        self.start = 0.0
        self.faults = 0

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
            elapsed = time.perf_counter() - self.start
            self.conn.send(("round", (elapsed, (_minor_faults() - self.faults) / self.steps)))
        if done < self.rounds * self.steps:
            self.conn.recv()  # "go"
            self.faults = _minor_faults()
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
    """Teacher, student, distiller (not yet built) and the batches, identical in every worker."""
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


class _PlainStep:
    """Everything the hand-written loop needs, set up as ``DistillationModule`` would, without it.

    :meth:`loss` is the work of one ``DistillationModule.training_step`` (the forward passes and the loss):
    the student with its taps, the teacher in eval mode under ``no_grad`` (optionally under its own
    autocast), then ``task_loss_weight * CE + weight * distiller(...)``, or the distiller's ``stage_loss``
    when its first stage is an initialisation stage.
    """

    def __init__(self, cfg: dict[str, Any], row: dict[str, Any]) -> None:
        import torch
        from torch import nn

        from lightning_kd.taps import FeatureTaps, expand_taps

        self.options = row["options"]
        teacher, student, distiller, self.batches = _build(cfg, row)
        self.device = torch.device(cfg["device"])
        # tap groups ("stages", "last_stage", ...) name the models' own layers, as in the module
        distiller.student_layers = expand_taps(student, distiller.student_layers)
        distiller.teacher_layers = expand_taps(teacher, distiller.teacher_layers)
        self.student_taps = FeatureTaps(student, distiller.student_layers)
        self.teacher_taps = FeatureTaps(teacher, distiller.teacher_layers)

        # probe forward on zeros, then the distiller builds its parts (as the module does in its constructor)
        probe = torch.zeros(2, 3, cfg["input_size"], cfg["input_size"])
        student.eval()
        teacher.eval()
        with torch.no_grad():
            s_probe = self._run(student, self.student_taps, probe)
            t_probe = self._run(teacher, self.teacher_taps, probe)
        torch.manual_seed(SEED + 2)
        distiller.build([s_probe[t] for t in distiller.student_layers], [t_probe[t] for t in distiller.teacher_layers])

        teacher.requires_grad_(False)
        for network in (student, teacher, distiller):
            network.to(self.device)
        if self.options.get("channels_last"):
            student.to(memory_format=torch.channels_last)
            teacher.to(memory_format=torch.channels_last)
        if self.options.get("compile"):
            student.compile()
            teacher.compile()

        self.in_stage = bool(distiller.stage_epochs)
        distiller.on_stage(f"{distiller.name}_init" if self.in_stage else "main")
        if self.in_stage:
            params = list(distiller.stage_parameters(student))
            self.needs_teacher = distiller.needs_teacher
            self.needs_student = getattr(distiller, "stage_needs_student", True)
        else:
            params = [p for p in student.parameters() if p.requires_grad] + list(distiller.main_parameters())
            self.needs_teacher = distiller.active_in_main and distiller.needs_teacher
            self.needs_student = True
        self.params = list({id(p): p for p in params}.values())
        self.task_weight = cfg["task_loss_weight"]
        self.teacher_precision = self.options.get("teacher_precision", "same")
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.networks = nn.ModuleDict({"student": student, "teacher": teacher, "distiller": distiller})

    @staticmethod
    def _run(network: Any, taps: Any, images: Any) -> dict[str, Any]:
        from lightning_kd.taps import LOGITS

        logits = network(images)
        features = taps.pop()
        features[LOGITS] = logits
        return features

    def optimizer(self) -> Any:
        import torch

        return torch.optim.SGD(self.params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def train_mode(self) -> None:
        self.student.train()
        self.distiller.train()
        self.teacher.eval()

    def loss(self, batch: dict[str, Any]) -> Any:
        import torch
        import torch.nn.functional as F

        from lightning_kd.taps import LOGITS

        images = batch["image"]
        if self.options.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        s_feats = self._run(self.student, self.student_taps, images) if self.needs_student else {}
        t_feats: dict[str, Any] = {}
        if self.needs_teacher:
            with torch.no_grad():
                if self.teacher_precision == "same":
                    t_feats = self._run(self.teacher, self.teacher_taps, images)
                else:
                    dtype = torch.bfloat16 if self.teacher_precision == "bf16" else torch.float16
                    with torch.autocast(self.device.type, dtype=dtype):
                        t_feats = self._run(self.teacher, self.teacher_taps, images)
                    t_feats = {k: v.float() for k, v in t_feats.items()}
        distiller = self.distiller
        s_list = [s_feats[t] for t in distiller.student_layers] if s_feats else []
        t_list = [t_feats[t] for t in distiller.teacher_layers] if t_feats else []
        if self.in_stage:
            return distiller.stage_loss(s_list, t_list, batch)
        loss = self.task_weight * F.cross_entropy(s_feats[LOGITS].float(), batch["label"])
        if distiller.active_in_main and distiller.weight:
            loss = loss + distiller.weight * distiller(s_list, t_list, batch)
        return loss


def _plain(cfg: dict[str, Any], row: dict[str, Any], rounds: _Rounds, side: str) -> None:
    """The hand-written loop: ``_PlainStep.loss`` then ``zero_grad / backward / step``."""
    work = _PlainStep(cfg, row)
    optimizer = work.optimizer()
    work.train_mode()
    for batch in work.batches:
        loss = work.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rounds.after_step(loss)


class _Batches:
    """The in-memory batches as one iterable (a bare list would read as a list of data loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def training_only_trainer(device: str, max_steps: int, callbacks: list[Any]) -> Any:
    """A Trainer that only trains (one device, one epoch at most): no logger, checkpoint, progress bar, model
    summary or validation, so that what is timed is the training steps."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def _fit(cfg: dict[str, Any], module: Any, batches: list[dict[str, Any]], rounds: _Rounds) -> None:
    import lightning as L

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rounds.after_step(outputs["loss"])

    trainer = training_only_trainer(cfg["device"], rounds.total, [Timer()])
    trainer.fit(module, train_dataloaders=_Batches(batches))


def _lightning(cfg: dict[str, Any], row: dict[str, Any], rounds: _Rounds, side: str) -> None:
    """The plain loop's step inside the smallest LightningModule: what Lightning's loop itself costs."""
    import lightning as L

    work = _PlainStep(cfg, row)

    class Minimal(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.networks = work.networks

        def train(self, mode: bool = True) -> Minimal:
            super().train(mode)
            work.teacher.eval()
            return self

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return work.loss(batch)

        def configure_optimizers(self) -> Any:
            return work.optimizer()

    module = Minimal()
    work.train_mode()  # Lightning keeps the modes it is given
    _fit(cfg, module, work.batches, rounds)


def _library(cfg: dict[str, Any], row: dict[str, Any], rounds: _Rounds, side: str) -> None:
    """The same fit through ``DistillationModule`` and a ``Trainer`` (with parts switched off for --breakdown)."""
    import torch

    from lightning_kd import DistillationModule

    teacher, student, distiller, batches = _build(cfg, row)
    torch.manual_seed(SEED + 2)  # the distiller builds its parts inside the constructor
    extra = {"nan_policy": "ignore"} if side in ("library-nocheck", "library-bare") else {}
    module = DistillationModule(
        student,
        teacher,
        [distiller],
        task_loss_weight=cfg["task_loss_weight"],
        num_classes=cfg["num_classes"],
        input_size=(3, cfg["input_size"], cfg["input_size"]),
        **row["options"],
        **extra,
    )
    if side == "library-bare":
        module.log = lambda *args, **kwargs: None
    _fit(cfg, module, batches, rounds)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the parent goes (Lightning traps SIGTERM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn: Any, side: str, cfg: dict[str, Any], row: dict[str, Any]) -> None:
    _die_with_parent()
    try:
        warnings.filterwarnings("ignore")
        import torch

        import lightning  # noqa: F401 - every side pays the same imports before the baseline is read
        import lightning_kd  # noqa: F401

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_kd"):
            logging.getLogger(name).setLevel(logging.ERROR)  # after the imports, which set their own levels
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        cuda = cfg["device"].startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        baseline = _max_rss_mib()
        rounds = _Rounds(conn, cfg, sync)
        run = _plain if side == "plain" else _lightning if side == "lightning" else _library
        run(cfg, row, rounds, side)
        if rounds.step != rounds.total:
            raise RuntimeError(f"the {side} side ran {rounds.step} steps, expected {rounds.total}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mib() - baseline
        conn.send(("done", peak))
    except BaseException:  # noqa: BLE001 - reported to the parent, which notes it in the table
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------------
# the parent: alternate the sides
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


def measure(cfg: dict[str, Any], row: dict[str, Any], sides: tuple[str, ...] = MAIN_SIDES) -> dict[str, Any]:
    """Run one row: one worker per side warms up, then ``rounds`` timed rounds, the order rotating each round.

    Returns, per side, the seconds per step of each round (``"times"``), the minor page faults per step of
    each round, the first step's loss and the peak memory.
    """
    context = mp.get_context("spawn")
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
        faults: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(cfg["rounds"]):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order if r % 2 == 0 else order[::-1]:
                conns[side].send("go")
                elapsed, per_step = _expect(conns[side], "round", side)
                times[side].append(elapsed / cfg["steps"])
                faults[side].append(per_step)
        peak = {side: _expect(conns[side], "done", side) for side in sides}
        finished = True
    finally:
        for proc in procs.values():
            proc.join(timeout=60 if finished else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return {"times": times, "faults": faults, "first_loss": first_loss, "peak": peak}


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(1.0, abs(a))


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The main table's numbers: median steps/s per side, the median per-round ratio, memory, loss check."""
    rate = {side: [1.0 / t for t in raw["times"][side]] for side in MAIN_SIDES}
    a, b = raw["first_loss"]["plain"], raw["first_loss"]["library"]
    return {
        "plain": statistics.median(rate["plain"]),
        "library": statistics.median(rate["library"]),
        "ratio": statistics.median(lib / plain for lib, plain in zip(rate["library"], rate["plain"])),
        "mem_plain": raw["peak"]["plain"],
        "mem_library": raw["peak"]["library"],
        "faults_plain": statistics.median(raw["faults"]["plain"]),
        "faults_library": statistics.median(raw["faults"]["library"]),
        "same_loss": _same(a, b),
        "loss": (a, b),
    }


def _header(cfg: dict[str, Any], title: str) -> list[str]:
    import lightning
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"# {title}",
        "",
        f"- workload: {cfg['pair'][0]} -> {cfg['pair'][1]}, batch {cfg['batch_size']}, "
        f"{cfg['input_size']}x{cfg['input_size']} inputs, {cfg['num_classes']} classes, device {cfg['device']}",
        f"- timing: {cfg['warmup']} warm-up steps, then {cfg['rounds']} alternating rounds of {cfg['steps']} steps "
        "per side",
        f"- torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {cfg['threads'] or torch.get_num_threads()} threads, "
        f"load average at the end {load}, {datetime.datetime.now().isoformat(timespec='seconds')}",
    ]


def format_table(cfg: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    cuda = cfg["device"].startswith("cuda")
    memory = "peak CUDA memory allocated" if cuda else "peak RSS growth"
    lines = _header(cfg, "DistillationModule + Trainer versus a plain PyTorch loop") + [
        "- steps/s: median over the rounds; library/plain: median of the per-round ratios",
        f"- memory: {memory} of each side's own process (MiB); page faults: minor page faults per step "
        "(allocations served by fresh pages from the kernel)",
        "- option rows (KD + ...) compare against a plain loop with the same option (channels_last networks "
        "and images; torch.compile of both networks; the teacher under bf16 autocast)",
        "",
        f"| method | stage | plain steps/s | library steps/s | library/plain | {memory} plain "
        f"| {memory} library | page faults/step plain / library | same first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r = row.get("result")
        if r is None:
            lines.append(f"| {row['label']} | {row['stage']} | failed | failed | | | | | |")
            continue
        lines.append(
            f"| {row['label']} | {row['stage']} | {r['plain']:.2f} | {r['library']:.2f} | {r['ratio']:.3f} | "
            f"{r['mem_plain']:.0f} | {r['mem_library']:.0f} | {r['faults_plain']:.0f} / {r['faults_library']:.0f} | "
            + ("yes |" if r["same_loss"] else "NO: %.6g vs %.6g |" % r["loss"])
        )
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def format_breakdown(cfg: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    lines = _header(cfg, "Where the library's time per step goes") + [
        "- each variant runs in its own process; ms/step is the median over the rounds, the difference the "
        "median over rounds of (variant - plain); page faults are minor page faults per step",
        "",
        "| method | variant | ms/step | minus plain (ms/step) | page faults/step | same first loss |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        raw = row.get("raw")
        if raw is None:
            lines.append(f"| {row['label']} | failed | | | | |")
            continue
        plain = raw["times"]["plain"]
        for side, times in raw["times"].items():
            delta = statistics.median(1000 * (t - p) for t, p in zip(times, plain))
            same = _same(raw["first_loss"]["plain"], raw["first_loss"][side])
            lines.append(
                f"| {row['label']} | {SIDES[side]} | {1000 * statistics.median(times):.2f} | "
                f"{delta:+.2f} | {statistics.median(raw['faults'][side]):.0f} | {'yes' if same else 'NO'} |"
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
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the main table, time the steps between the plain loop and the library (plain, minimal "
        "LightningModule, DistillationModule without self.log and the finiteness check, without the check, as "
        "is); use a small workload, where the fixed cost per step shows, e.g. --pair resnet8,resnet8 "
        "--input-size 8 --batch-size 2 --steps 100 --methods KD",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="Linux/glibc: run the workers with MALLOC_MMAP_THRESHOLD_=32MiB and MALLOC_TRIM_THRESHOLD_=4GiB, so "
        "freed activations are reused instead of returned to the kernel and faulted in again at every step",
    )
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
    if args.tuned_malloc:
        os.environ.update(TUNED_MALLOC)  # read by glibc when each spawned worker starts
    rows, notes = discover(args.methods.split(",") if args.methods else None, args.options)
    if args.tuned_malloc:
        notes.append("workers ran with " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()))
    sides = tuple(SIDES) if args.breakdown else MAIN_SIDES
    failed = 0
    for row in rows:
        started = time.perf_counter()
        try:
            row["raw"] = measure(cfg, row, sides)
        except WorkerError as error:
            failed += 1
            lines = str(error).strip().splitlines()
            notes.append(f"{row['label']} failed: {lines[0]} {lines[-1].strip()}")
            print(f"{row['label']}: {error}", file=sys.stderr, flush=True)
            continue
        took = f"({time.perf_counter() - started:.0f}s)"
        if args.breakdown:
            times = {side: 1000 * statistics.median(t) for side, t in row["raw"]["times"].items()}
            print(f"{row['label']:<32} " + "  ".join(f"{s} {t:.2f} ms" for s, t in times.items()) + f"  {took}")
        else:
            r = row["result"] = summarize(row["raw"])
            print(
                f"{row['label']:<32} plain {r['plain']:8.2f}/s  library {r['library']:8.2f}/s  "
                f"ratio {r['ratio']:.3f}  {took}",
                flush=True,
            )
    table = (format_breakdown if args.breakdown else format_table)(cfg, rows, notes)
    print()
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    print(f"written to {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
