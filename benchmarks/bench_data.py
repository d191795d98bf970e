"""Data loading on this machine: does the CIFAR-100 pipeline keep up with training, and what do workers buy?

For each ``num_workers`` setting (default: 0, 1 and cores - 1 capped at 8, the library's default on a GPU
machine, see :func:`~lightning_kd.data.base.default_num_workers`) this measures, through
:class:`~lightning_kd.data.CIFAR100DataModule`'s own training loader (the library's sampler,
``persistent_workers``, ``pin_memory`` on CUDA):

- the loader alone: images per second, the first batch (worker start-up) left out;
- a KD fit of resnet56 -> resnet20 (batch 64) through ``DistillationModule`` and a ``Trainer`` fed by that
  loader: training steps per second after a warm-up, and the ratio to ``num_workers=0``.

The settings are alternated round by round; medians are reported. The images are random uint8 arrays held in
memory and go through torchvision's CIFAR path (array -> PIL image -> RandomCrop(32, padding 4) -> flip ->
ToTensor -> Normalize), which is what the real dataset costs per image (torchvision keeps CIFAR in memory
too); nothing is downloaded.

    python benchmarks/bench_data.py                    # 0, 1 and cores - 1 workers
    python benchmarks/bench_data.py --workers 0,1,3 --device cuda
    python benchmarks/bench_data.py --quick            # a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package, and the overhead benchmark's harness beside this script
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from benchmarks.overhead.harness import quiet_and_check_device, training_only_trainer, write_report  # noqa: E402
from lightning_kd.data.base import default_num_workers  # noqa: E402
from lightning_kd.data.cifar import CIFAR100DataModule, cifar100_transforms  # noqa: E402


class InMemoryCIFAR(Dataset):
    """Random 32x32 RGB images and labels in torchvision's CIFAR layout, decoded the way its CIFAR100 does."""

    def __init__(self, samples: int, train: bool, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(samples, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 100, size=samples).tolist()
        self.transform = cifar100_transforms(train)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


class InMemoryCIFAR100DataModule(CIFAR100DataModule):
    """:class:`CIFAR100DataModule` with its datasets replaced by :class:`InMemoryCIFAR` (same loaders)."""

    def __init__(self, samples: int, **kwargs: Any) -> None:
        super().__init__(download=False, **kwargs)
        self.samples = samples

    def make_dataset(self, train: bool) -> Dataset:
        return InMemoryCIFAR(self.samples if train else 64, train)


def loader_images_per_second(workers: int, batch_size: int, batches: int) -> float:
    """Images/s of the training loader alone, after its first batch."""
    data = InMemoryCIFAR100DataModule((batches + 1) * batch_size, batch_size=batch_size, num_workers=workers)
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    next(iterator)  # worker start-up
    start = time.perf_counter()
    seen = sum(batch["image"].shape[0] for batch in iterator)
    return seen / (time.perf_counter() - start)


def fit_steps_per_second(workers: int, cfg: dict[str, Any]) -> float:
    """Steps/s of a KD fit fed by the loader, over the steps after the warm-up."""
    import lightning as L

    from lightning_kd import DistillationModule
    from lightning_kd.distillers import KD

    stamps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == cfg["warmup"]:
                stamps.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if cfg["device"] == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    teacher, student = cfg["pair"]
    torch.manual_seed(0)
    module = DistillationModule(student, teacher, [KD()], task_loss_weight=0.1, num_classes=100)
    steps = cfg["warmup"] + cfg["steps"]
    batch_size = cfg["batch_size"]
    data = InMemoryCIFAR100DataModule(samples=steps * batch_size, batch_size=batch_size, num_workers=workers)
    trainer = training_only_trainer(cfg["device"], steps, [Clock()])
    trainer.fit(module, datamodule=data)
    return cfg["steps"] / (stamps[1] - stamps[0])


def format_table(cfg: dict[str, Any], results: dict[int, dict[str, list[float]]]) -> str:
    base = statistics.median(results[min(results)]["fit"])
    lines = [
        "# Data loading: the CIFAR-100 training pipeline against a KD fit",
        "",
        f"- fit: KD {cfg['pair'][0]} -> {cfg['pair'][1]}, batch {cfg['batch_size']}, device {cfg['device']}, "
        f"{cfg['warmup']} warm-up steps then {cfg['steps']} timed, {cfg['rounds']} alternating rounds (medians)",
        f"- loader alone: {cfg['steps']} batches after the first; random 32x32 images in memory through "
        "torchvision's CIFAR path and the reference augmentation",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads in the training process, library default num_workers "
        f"{default_num_workers(cfg['device'] == 'cuda')} here, load average at the end "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + f", {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "| num_workers | loader alone (images/s) | fit (steps/s) | fit (images/s) | loader / fit demand "
        f"| fit vs num_workers={min(results)} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, measured in results.items():
        loader = statistics.median(measured["loader"])
        fit = statistics.median(measured["fit"])
        demand = fit * cfg["batch_size"]
        lines.append(
            f"| {workers} | {loader:,.0f} | {fit:.2f} | {demand:,.0f} | {loader / demand:.1f}x | {fit / base:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", default=None, help="comma-separated num_workers settings (default: 0, 1 and cores - 1, at most 8)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pair", default="resnet56,resnet20", help="teacher,student (default: resnet56,resnet20)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a measurement)")
    parser.add_argument("--output", default="outputs/bench/data.md", help="markdown file for the table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not quiet_and_check_device(args.device):
        return 2
    if args.workers is None:
        settings = sorted({0, 1, default_num_workers(accelerated=True)})
    else:
        settings = [int(w) for w in args.workers.split(",")]
    if any(w < 0 for w in settings):
        print(f"--workers must be >= 0, got {settings}", file=sys.stderr)  # noqa: T201
        return 2
    cfg = {
        "device": args.device,
        "pair": tuple(args.pair.split(",")),
        "batch_size": args.batch_size,
        "steps": args.steps or (2 if args.quick else 20),
        "warmup": args.warmup if args.warmup is not None else (1 if args.quick else 3),
        "rounds": args.rounds or (1 if args.quick else 3),
    }
    results: dict[int, dict[str, list[float]]] = {w: {"loader": [], "fit": []} for w in settings}
    for round_index in range(cfg["rounds"]):
        order = settings if round_index % 2 == 0 else settings[::-1]
        for workers in order:
            loader = loader_images_per_second(workers, cfg["batch_size"], cfg["steps"])
            fit = fit_steps_per_second(workers, cfg)
            results[workers]["loader"].append(loader)
            results[workers]["fit"].append(fit)
            print(  # noqa: T201
                f"round {round_index + 1}: num_workers={workers}  loader {loader:,.0f} images/s  fit {fit:.2f} steps/s",
                flush=True,
            )
    write_report(format_table(cfg, results), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
