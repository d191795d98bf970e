"""What the overhead benchmark measures and how: the rows, the worker processes, the alternating rounds, the
timing and the memory.

Rows come from the method registry (:func:`lightning_kd.distillers.list_distillers`): every registered method,
built with :meth:`~lightning_kd.distillers.registry.MethodEntry.build` (its ``example_kwargs``, e.g. CRD with
in-batch negatives), plus the variants in :data:`VARIANTS` (KD+LS), a main-stage row for a method that has an
initialisation stage and also trains in the main stage (FT), and with ``options`` the KD rows of
:data:`OPTIONS`. A method that reads extra image views (MLKD's ``strong``) gets them in its batches
(``batch["image_<view>"]``).

Each side of a row runs in its own worker process, from the same seeds (so the same weights, distiller parts and
batches):

- ``plain``: :class:`~lightning_kd.core.Distillation` built from the networks and the distiller, moved to the
  device, :meth:`~lightning_kd.core.Distillation.apply_speed_options`, SGD (lr 0.05, momentum 0.9, wd 5e-4) over
  :meth:`~lightning_kd.core.Distillation.param_groups`, ``core.train()``, ``core.set_epoch(0, optimizer)`` (which
  starts the core's first stage in the optimizer), then per batch ``loss = core.compute_losses(batch).total; zero_grad;
  backward; step``. A method whose first stage is an initialisation stage (AB, FT, FSP) is measured in it;
- ``library``: the same networks and distiller in a :class:`~lightning_kd.DistillationModule` fitted by
  :func:`training_only_trainer` (no logger, checkpointing, progress bar, model summary or validation);
- for ``breakdown`` also ``lightning`` (the plain loop's step in a minimal ``LightningModule``: Lightning's own
  loop) and ``library-nocheck`` (``DistillationModule`` with ``nan_policy="ignore"``).

The workers of a group import in parallel, then set up and warm up one at a time; then the parent makes them
run ``steps`` steps in turn, ``rounds`` times, rotating and alternating the order while the others wait idle; a
round's time is read after a device synchronisation. Both sides' losses at the first and the last step are
reported, to check that they do the same work (optimizer steps included). A group is one row (its two sides),
except the logit methods, which are measured as one group (every side of every logit row in the same rounds) so
that the rows can be compared round by round.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SEED = 0
#: every side a worker can run, and how the tables name it
SIDES = {
    "plain": "plain PyTorch loop over the core",
    "lightning": "the plain loop's step in a minimal LightningModule",
    "library-nocheck": "DistillationModule, nan_policy='ignore'",
    "library": "DistillationModule (defaults)",
}
MAIN_SIDES = ("plain", "library")
#: rows that are a registered method with other constructor arguments: key -> (method, overrides, label)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {"kd+ls": ("kd", {"standardize": True}, "KD+LS")}
#: KD rows with a speed option on both sides (``--options``)
OPTIONS: tuple[tuple[str, Any], ...] = (("channels_last", True), ("compile", True), ("teacher_precision", "bf16"))
#: the logit table's reference row, and the rows expected to cost no more than it
REFERENCE = "kd"
TARGETED = ("kd+ls", "dkd", "dist", "nkd")
#: the target for TARGETED rows: library steps/s at least this fraction of KD's
LOGIT_TARGET = 0.97
#: glibc settings that keep freed memory in the process (``--tuned-malloc``)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


@dataclass(frozen=True)
class Workload:
    """The networks, batches and timing schedule shared by every row."""

    device: str = "cpu"
    pair: tuple[str, str] = ("resnet56", "resnet20")  # teacher, student
    batch_size: int = 64
    input_size: int = 32
    num_classes: int = 100
    steps: int = 10
    rounds: int = 3
    warmup: int = 3
    threads: int = 0  # torch threads per worker; 0 keeps torch's default
    task_loss_weight: float = 1.0
    distinct_batches: int = 4

    def __post_init__(self) -> None:
        if min(self.steps, self.rounds, self.warmup) < 1:
            raise ValueError(
                f"steps, rounds and warmup must be >= 1 (the first step's loss is read in the warm-up), got "
                f"steps={self.steps}, rounds={self.rounds}, warmup={self.warmup}"
            )

    @property
    def total_steps(self) -> int:
        return self.warmup + self.rounds * self.steps


@dataclass(frozen=True)
class Row:
    """One row: the registered ``method`` built with ``overrides``, both sides with the speed ``options``."""

    key: str
    label: str
    method: str
    stage: str
    family: str
    views: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def build_distiller(self) -> Any:
        from lightning_kd.distillers import get_distiller

        return get_distiller(self.method).build(**self.overrides)


def display_name(method: str) -> str:
    """The class name when it spells the registry key (``FitNet``), else the key in capitals (``CTKD``)."""
    from lightning_kd.distillers import get_distiller

    cls = get_distiller(method).cls.__name__
    return cls if cls.lower() == method else method.upper()


def known_methods() -> list[str]:
    """Every name ``plan_rows`` accepts, in table order: the registry's, each variant after its method."""
    from lightning_kd.distillers import list_distillers

    names: list[str] = []
    for name in list_distillers():
        names.append(name)
        names += [key for key, (method, _, _) in VARIANTS.items() if method == name]
    return names


def plan_rows(requested: Sequence[str] | None = None, with_options: bool = False) -> tuple[list[Row], list[str]]:
    """The rows to measure (every known method, or those ``requested``, case-insensitive) and notes on them.

    Raises ``ValueError`` naming the known methods when a requested one is not known. A method whose registry
    example cannot be built is left out with a note.
    """
    from lightning_kd.distillers import get_distiller
    from lightning_kd.stages import plan_stages

    known = known_methods()
    wanted = [m.strip().lower() for m in requested if m.strip()] if requested else known
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose among {', '.join(known)}")
    rows: list[Row] = []
    notes: list[str] = []
    examples: list[str] = []

    def add(key: str, method: str, overrides: dict[str, Any], label: str, options: dict[str, Any]) -> bool:
        entry = get_distiller(method)
        try:
            distiller = entry.build(**overrides)
        except Exception as error:  # noqa: BLE001 - a note in the table, not a crash
            notes.append(f"{label} left out: the registry's example cannot be built ({type(error).__name__}: {error})")
            return False
        stage = plan_stages([distiller])[0].name
        rows.append(Row(key, label, method, stage, entry.family, tuple(entry.views), dict(overrides), dict(options)))
        if distiller.stage_epochs and distiller.active_in_main and not options:
            main = {**overrides, "stage_epochs": 0}
            rows.append(Row(f"{key}@main", f"{label} (stage_epochs=0)", method, "main", entry.family,
                            tuple(entry.views), main, {}))  # fmt: skip
        return True

    for key in dict.fromkeys(wanted):
        method, overrides, label = VARIANTS[key] if key in VARIANTS else (key, {}, display_name(key))
        if add(key, method, overrides, label, {}) and key == method and get_distiller(method).example_kwargs:
            examples.append(f"{label} {get_distiller(method).example_kwargs}")
    if with_options:
        for option, value in OPTIONS:
            label = f"KD + {option}" + (f"={value}" if not isinstance(value, bool) else "")
            add(f"kd+{option}", REFERENCE, {}, label, {option: value})
    if examples:
        notes.insert(0, "built with the registry's example arguments: " + "; ".join(examples))
    return rows, notes


def plan_groups(rows: Sequence[Row], group_logits: bool = True) -> list[list[Row]]:
    """Rows measured together: the logit methods (without speed options) as one group when ``group_logits`` and
    there are two or more, every other row alone; in table order of each group's first row."""
    logits = [r for r in rows if group_logits and r.family == "logits" and not r.options]
    groups: list[list[Row]] = []
    for row in rows:
        if len(logits) > 1 and row in logits:
            if row is logits[0]:
                groups.append(logits)
        else:
            groups.append([row])
    return groups


# ----------------------------------------------------------------------------------------------------------
# inside a worker: the workload, the two loops
# ----------------------------------------------------------------------------------------------------------
def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Rounds:
    """Counts a worker's steps; at round boundaries reports to the parent and waits for its signal to go on."""

    def __init__(self, conn: Any, work: Workload, sync: Callable[[], None]) -> None:
        self.conn, self.work, self.sync = conn, work, sync
        self.step = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.start = 0.0
        self.faults = 0

    def after_step(self, loss: Any) -> None:
        self.step += 1
        if self.step == 1:
            self.first_loss = float(loss.detach())
        if self.step == self.work.total_steps:
            self.last_loss = float(loss.detach())
        done = self.step - self.work.warmup
        if done < 0 or done % self.work.steps:
            return
        self.sync()
        if done == 0:
            self.conn.send(("ready", None))
        else:
            elapsed = time.perf_counter() - self.start
            self.conn.send(("round", (elapsed, (_minor_faults() - self.faults) / self.work.steps)))
        if done < self.work.rounds * self.work.steps:
            self.conn.recv()  # "go"
            self.faults = _minor_faults()
            self.start = time.perf_counter()


def calibrate_batchnorm(network: Any, images: Sequence[Any]) -> None:
    """Set the BatchNorm running statistics to the exact averages over ``images`` (no gradient).

    A freshly initialised network in eval mode normalises with mean 0 and variance 1, so its activations grow
    through a deep residual stack and some losses (CC, FSP) overflow within a few steps; calibrated statistics
    make the untrained teacher behave like a trained one in that respect.
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


def make_inputs(work: Workload, row: Row) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """Teacher, student, distiller (not yet built) and the batches on the device, identical in every worker.

    The global seed is left at ``SEED + 2`` after the distiller's constructor: the caller builds the core (or the
    module) next, whose probe-and-build draws the distiller's parts from it.
    """
    import torch

    from lightning_kd.models import create_model

    teacher_name, student_name = work.pair
    torch.manual_seed(SEED)
    teacher = create_model(teacher_name, num_classes=work.num_classes)
    torch.manual_seed(SEED + 1)
    student = create_model(student_name, num_classes=work.num_classes)
    generator = torch.Generator().manual_seed(SEED + 3)
    shape = (work.batch_size, 3, work.input_size, work.input_size)
    distinct = []
    for _ in range(work.distinct_batches):
        batch = {
            "image": torch.randn(*shape, generator=generator),
            "label": torch.randint(0, work.num_classes, (work.batch_size,), generator=generator),
        }
        for view in row.views:
            batch[f"image_{view}"] = torch.randn(*shape, generator=generator)
        distinct.append(batch)
    calibrate_batchnorm(teacher, [batch["image"] for batch in distinct])
    device = torch.device(work.device)
    distinct = [{key: value.to(device) for key, value in batch.items()} for batch in distinct]
    torch.manual_seed(SEED + 2)
    distiller = row.build_distiller()
    return teacher, student, distiller, [distinct[i % len(distinct)] for i in range(work.total_steps)]


def core_arguments(work: Workload, row: Row) -> dict[str, Any]:
    """Keyword arguments that ``Distillation`` and ``DistillationModule`` share."""
    return {
        "task_loss_weight": work.task_loss_weight,
        "num_classes": work.num_classes,
        "input_size": (3, work.input_size, work.input_size),
        "teacher_precision": row.options.get("teacher_precision", "same"),
    }


def build_core(work: Workload, row: Row) -> tuple[Any, list[dict[str, Any]]]:
    """The plain side's :class:`~lightning_kd.core.Distillation` on the device with its speed options, and the
    batches."""
    from lightning_kd.core import Distillation

    teacher, student, distiller, batches = make_inputs(work, row)
    core = Distillation(student, teacher, [distiller], **core_arguments(work, row))
    core.to(work.device)
    core.apply_speed_options(row.options.get("channels_last", False), row.options.get("compile", False))
    return core, batches


def plain_optimizer(core: Any) -> Any:
    """The module's default optimizer (``reference_sgd``: SGD, lr 0.05, momentum 0.9, wd 5e-4) over the core's
    parameter groups; ``core.set_epoch(epoch, optimizer)`` starts the core's stage in it."""
    from lightning_kd.module import reference_sgd

    return reference_sgd(core.param_groups())


def run_plain(work: Workload, row: Row, rounds: Rounds, side: str) -> None:
    """The plain loop: ``core.compute_losses(batch).total``, then ``zero_grad / backward / step``."""
    core, batches = build_core(work, row)
    optimizer = plain_optimizer(core)
    core.train()
    core.set_epoch(0, optimizer)
    for batch in batches:
        loss = core.compute_losses(batch).total
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


def _fit(work: Workload, module: Any, batches: list[dict[str, Any]], rounds: Rounds) -> None:
    import lightning as L

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rounds.after_step(outputs["loss"])

    trainer = training_only_trainer(work.device, work.total_steps, [Timer()])
    trainer.fit(module, train_dataloaders=_Batches(batches))


def run_lightning(work: Workload, row: Row, rounds: Rounds, side: str) -> None:
    """The plain loop's step in the smallest LightningModule around the core: what Lightning's loop costs."""
    import lightning as L

    core, batches = build_core(work, row)

    class Minimal(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.core = core  # a child: train() reaches the core's own (teacher kept in eval mode)

        def on_train_epoch_start(self) -> None:
            self.core.set_epoch(self.current_epoch, self.trainer.optimizers[0])

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.core.compute_losses(batch).total

        def configure_optimizers(self) -> Any:
            return plain_optimizer(self.core)

    _fit(work, Minimal(), batches, rounds)


def run_library(work: Workload, row: Row, rounds: Rounds, side: str) -> None:
    """The same fit through ``DistillationModule`` and a ``Trainer`` (``library-nocheck``: ``nan_policy="ignore"``)."""
    from lightning_kd import DistillationModule

    teacher, student, distiller, batches = make_inputs(work, row)
    extra = {"nan_policy": "ignore"} if side == "library-nocheck" else {}
    module = DistillationModule(
        student,
        teacher,
        [distiller],
        channels_last=row.options.get("channels_last", False),
        compile=row.options.get("compile", False),
        **core_arguments(work, row),
        **extra,
    )
    _fit(work, module, batches, rounds)


RUNNERS = {"plain": run_plain, "lightning": run_lightning, "library-nocheck": run_library, "library": run_library}


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the parent goes (Lightning traps SIGTERM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn: Any, side: str, work: Workload, row: Row) -> None:
    _die_with_parent()
    try:
        warnings.filterwarnings("ignore")
        import lightning  # noqa: F401 - every side pays the same imports before the baseline is read
        import torch

        import lightning_kd  # noqa: F401

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_kd"):
            logging.getLogger(name).setLevel(logging.ERROR)  # after the imports, which set their own levels
        if work.threads:
            torch.set_num_threads(work.threads)
        cuda = work.device.startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        baseline = _max_rss_mib()
        conn.recv()  # "start": the workers of a group are set up and warmed up one at a time
        rounds = Rounds(conn, work, sync)
        RUNNERS[side](work, row, rounds, side)
        if rounds.step != work.total_steps:
            raise RuntimeError(f"the {side} side ran {rounds.step} steps, expected {work.total_steps}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mib() - baseline
        conn.send(("done", {"peak": peak, "first_loss": rounds.first_loss, "last_loss": rounds.last_loss}))
    except BaseException:  # noqa: BLE001 - reported to the parent, which notes it in the table
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------------
# the parent: alternate the workers of a group
# ----------------------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A worker failed (its traceback is the message) or died."""


def _send(conn: Any, message: str) -> None:
    """Send to a worker; one that has already stopped left its reason in the pipe, for :func:`_expect` to read."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _expect(conn: Any, kind: str, who: str) -> Any:
    try:
        message, value = conn.recv()
    except EOFError as error:
        raise WorkerError(f"the {who} worker died without a word") from error
    if message == "error":
        raise WorkerError(f"the {who} worker failed:\n{value}")
    if message != kind:
        raise WorkerError(f"the {who} worker sent {message!r}, expected {kind!r}")
    return value


def measure(work: Workload, rows: Sequence[Row], sides: Sequence[str] = MAIN_SIDES) -> dict[str, dict[str, Any]]:
    """Measure a group: one worker per row and side sets up and warms up (one at a time), then ``rounds`` timed
    rounds in which each runs ``steps`` steps in turn, the order rotating each round and reversed every other round.

    Returns ``{row.key: {side: {"times": [s/step per round], "faults": [minor faults/step per round], "peak":
    MiB, "first_loss": float, "last_loss": float}}}``. Raises :class:`WorkerError` when a worker fails.
    """
    context = mp.get_context("spawn")
    workers = [(row, side) for row in rows for side in sides]
    conns: dict[int, Any] = {}
    procs: dict[int, Any] = {}
    finished = False

    def who(i: int) -> str:
        return f"{workers[i][0].label} {workers[i][1]}"

    try:
        for i, (row, side) in enumerate(workers):
            parent, child = context.Pipe()
            procs[i] = context.Process(target=_worker, args=(child, side, work, row), daemon=True)
            procs[i].start()
            child.close()
            conns[i] = parent
        for i in conns:  # one at a time: set-up and warm-up at full speed, without oversubscribing the cores
            _send(conns[i], "start")
            _expect(conns[i], "ready", who(i))
        times: dict[int, list[float]] = {i: [] for i in conns}
        faults: dict[int, list[float]] = {i: [] for i in conns}
        indices = list(conns)
        for r in range(work.rounds):
            order = indices[r % len(indices) :] + indices[: r % len(indices)]
            for i in order if r % 2 == 0 else order[::-1]:
                _send(conns[i], "go")
                elapsed, per_step = _expect(conns[i], "round", who(i))
                times[i].append(elapsed / work.steps)
                faults[i].append(per_step)
        done = {i: _expect(conns[i], "done", who(i)) for i in conns}
        finished = True
    finally:
        stop_workers(procs.values(), finished)
    out: dict[str, dict[str, Any]] = {}
    for i, (row, side) in enumerate(workers):
        out.setdefault(row.key, {})[side] = {"times": times[i], "faults": faults[i], **done[i]}
    return out


def run_groups(
    work: Workload,
    groups: Sequence[Sequence[Row]],
    sides: Sequence[str] = MAIN_SIDES,
    on_group: Callable[[list[Row], dict[str, Any], float], None] | None = None,
    on_error: Callable[[Row | None, str], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Measure every group in turn. Returns the measurements by row key (rows that failed are absent) and each
    row's group number. A group of several rows whose measurement fails is measured again one row at a time.

    ``on_group(rows, measurements, seconds)`` is called after each measured group, ``on_error(row, message)``
    after each failure (``row`` is None for a group about to be measured row by row).
    """
    results: dict[str, dict[str, Any]] = {}
    group_of: dict[str, int] = {}
    queue = [(list(g), number) for number, g in enumerate(groups)]
    next_number = len(groups)
    while queue:
        group, number = queue.pop(0)
        started = time.perf_counter()
        try:
            measured = measure(work, group, sides)
        except WorkerError as error:
            if len(group) > 1:
                if on_error:
                    on_error(None, f"the group {[r.label for r in group]} failed, measuring its rows alone: {error}")
                queue[:0] = [([row], next_number + i) for i, row in enumerate(group)]
                next_number += len(group)
            elif on_error:
                on_error(group[0], str(error))
            continue
        results.update(measured)
        group_of.update({row.key: number for row in group})
        if on_group:
            on_group(group, measured, time.perf_counter() - started)
    return results, group_of


def stop_workers(procs: Any, finished: bool) -> None:
    """Join the worker processes (a minute each after a finished measurement, a second after a failure), killing
    any that is still alive."""
    for proc in procs:
        proc.join(timeout=60 if finished else 1)
        if proc.is_alive():
            proc.kill()
            proc.join()


def write_report(text: str, output: str) -> None:
    """Write a benchmark's Markdown report (creating its folder) and print it with where it went."""
    from pathlib import Path

    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print("\n" + text + f"\nwritten to {path}")  # noqa: T201 - the benchmark's own report


def quiet_and_check_device(device: str) -> bool:
    """Silence the libraries' warnings and notices in a benchmark's main process; False (with a message) when
    ``device`` is CUDA and there is none."""
    import logging
    import sys
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_kd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)  # noqa: T201
        return False
    return True
