"""``lightning-kd cache``: build the teacher-output cache of a fit config's teacher and training data.

    lightning-kd cache --config configs/digits/base.yaml --output outputs/digits/teacher-cache
    lightning-kd cache --config configs/cifar100/pairs/res56_res20.yaml --output outputs/cache/res56 --dtype fp32 \\
        --devices 4
    lightning-kd cache --config ... --model.teacher_checkpoint=other.ckpt --data.train_subset=20   # overrides

It reads, from the configs (YAML files merged in order, as ``lightning-kd fit`` merges them) and the overrides,
``model.teacher``, ``model.teacher_checkpoint``, ``model.num_classes`` and ``data`` (``class_path`` and
``init_args``; default the digits); ``--output`` defaults to ``model.teacher_cache``. Everything else of a fit config
is ignored. It prints the storage before it starts and a progress line now and then; Ctrl-C (or a killed job)
keeps the finished chunks, and the same command resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_kd.cache.build import Progress, build_cache
from lightning_kd.cache.views import TeacherCacheError

DEFAULT_DATA = "lightning_kd.data.DigitsDataModule"


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, dictionaries merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config(paths: Sequence[str], overrides: Sequence[str]) -> dict[str, Any]:
    """The merged configs with ``--model.key=value`` / ``--data.key=value`` overrides applied (values read as
    YAML; ``--data.key`` is short for ``--data.init_args.key``, as in ``lightning-kd fit``)."""
    config: dict[str, Any] = {}
    for path in paths:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise TeacherCacheError(f"cannot read the config {path!r}: {error}") from None
        if not isinstance(loaded, dict):
            raise TeacherCacheError(f"the config {path!r} is not a mapping of options")
        config = merge(config, loaded)
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith(("--model.", "--data.")):
            raise TeacherCacheError(f"unknown option {item!r}: lightning-kd cache takes --config, --output, --dtype, "
                                    "--devices, --accelerator, --batch-size, --chunk-images and --model.*/--data.* "
                                    "overrides")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if not items:
                raise TeacherCacheError(f"{item} needs a value")
            value = items.pop(0)
        parts = key.split(".")
        if parts[0] == "data" and parts[1] not in ("class_path", "init_args"):
            parts = ["data", "init_args", *parts[1:]]
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


def model_options(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model") or {}
    return dict(model.get("init_args") or {}) if "class_path" in model else dict(model)


def load_teacher(config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The teacher network of a fit config with its weights, and what the manifest records of it."""
    from lightning_kd.checkpoints import load_into
    from lightning_kd.models import build_network

    model = model_options(config)
    teacher, checkpoint = model.get("teacher"), model.get("teacher_checkpoint")
    if teacher is None:
        raise TeacherCacheError("the config names no model.teacher: a cache holds a teacher's outputs")
    if checkpoint is None:
        raise TeacherCacheError("the config gives no model.teacher_checkpoint: caching a teacher with random weights "
                                "makes no sense; set --model.teacher_checkpoint=PATH")
    network = build_network(teacher, int(model.get("num_classes", 100)), model.get("teacher_feature_paths"), "teacher")
    load_into(network, checkpoint, what="teacher")
    return network, {"name": teacher if isinstance(teacher, str) else str(teacher), "checkpoint": os.fspath(checkpoint)}


def load_data(config: dict[str, Any]) -> Any:
    """The data module of a fit config, prepared and set up for training."""
    import lightning as L

    from lightning_kd.hparams import instantiate

    data = config.get("data") or {}
    if "class_path" not in data:
        data = {"class_path": DEFAULT_DATA, "init_args": data}
    datamodule = instantiate(data, L.LightningDataModule, "data module")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class _Announce:
    def __init__(self, output: str, devices: int, accelerator: str) -> None:
        self.output, self.devices, self.accelerator = output, devices, accelerator

    def __call__(self, manifest: dict[str, Any], pending: list[int]) -> None:
        n, *views, classes = manifest["shape"]
        per_image = views[0] * views[1] * views[2]
        aug = manifest["augmentation"]
        total = int(manifest["num_chunks"])
        lines = [
            f"teacher-output cache {self.output}",
            (f"  teacher {manifest['teacher'].get('name')} (sha256 {manifest['teacher_fingerprint'][:12]}...), data "
             f"{manifest['dataset']['source']} (sha256 {manifest['dataset_fingerprint'][:12]}...)"),
            (f"  {n:,} images x {per_image} views ({aug['kind']}, padding {aug['padding']}, {aug['flips']} flip "
             f"state{'s' if aug['flips'] > 1 else ''}) x {classes} classes, {manifest['dtype']}: "
             f"{manifest['bytes']:,} bytes ({_size(manifest['bytes'])})"),
            (f"  {n * per_image:,} teacher forwards in {total} chunk{'s' if total != 1 else ''} of at most "
             f"{manifest['chunk_images']} images"),
        ]
        if manifest["complete"]:
            lines.append("  already complete: nothing to do")
        else:
            if len(pending) < total:
                lines.append(f"  resuming: {total - len(pending)} of {total} chunks already done")
            lines.append(f"  on {self.devices} process{'es' if self.devices > 1 else ''} ({self.accelerator})")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


_last_report: dict[int, float] = {}


def report_progress(event: Progress) -> None:
    """A progress line on stderr per process, at most every 10 seconds and at its last chunk."""
    now = time.monotonic()
    if event.chunks_done < event.chunks_total and now - _last_report.get(event.rank, 0.0) < 10.0:
        return
    _last_report[event.rank] = now
    rate = event.images_done / max(event.seconds, 1e-9)
    left = (event.chunks_total - event.chunks_done) / max(event.chunks_done, 1) * event.seconds
    sys.stderr.write(f"[process {event.rank}] {event.chunks_done}/{event.chunks_total} chunks ({event.fraction:.0%}), "
                     f"{rate:.1f} images/s, {event.seconds:.0f} s elapsed, about {left:.0f} s left\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-kd cache",
        description="Build the teacher-output cache of a fit config (every training view through the teacher once).",
    )
    parser.add_argument("--config", "-c", action="append", default=[], help="a fit config (repeat to merge)")
    parser.add_argument("--output", "-o", default=None, help="the cache folder (default: model.teacher_cache)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"),
                        help="fp16 (default, half the size, relative error <= 2^-11) or fp32 (exact)")
    parser.add_argument("--devices", type=int, default=1, help="processes filling disjoint ranges of images")
    parser.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=512, help="views per teacher forward (default 512)")
    parser.add_argument("--chunk-images", type=int, default=None,
                        help="images per chunk, the unit of resume (default: about 8,192 views)")
    args, overrides = parser.parse_known_args(argv)
    config = read_config(args.config, overrides)
    output = args.output or model_options(config).get("teacher_cache")
    if not output:
        raise TeacherCacheError("no --output given and the config sets no model.teacher_cache")
    teacher, info = load_teacher(config)
    datamodule = load_data(config)
    accelerator = args.accelerator if args.accelerator != "auto" else ("cuda" if _cuda() else "cpu")
    start = time.perf_counter()
    try:
        manifest = build_cache(teacher, datamodule, output, args.dtype, args.devices, accelerator, args.batch_size,
                               args.chunk_images, info, report_progress, _Announce(output, args.devices, accelerator))
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: the finished chunks are kept in {output}; run the same command to resume\n")
        raise SystemExit(130) from None
    sys.stdout.write(f"done: {output} complete ({_size(manifest['bytes'])}, {time.perf_counter() - start:.1f} s); "
                     f"use it with --model.teacher_cache={output}\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
