"""Building a teacher-output cache: every view of every training image through the teacher, once.

The build renders the views of a chunk of images (:meth:`~lightning_kd.cache.views.ViewSpace.render`), runs the
teacher on them in eval mode, fp32, without autocast and with TF32 off, and writes the logits into the memory-mapped
array; then it flushes the chunk to disk and records it (``chunks/<k>.json`` with its sha256), so an interrupted
build (Ctrl-C, a killed job) resumes where it stopped and never takes an unwritten chunk for a written one. When
every chunk is there the manifest gets ``complete: true``.

Several devices: ``devices=N`` starts N processes (``torch.multiprocessing.spawn``); process ``r`` takes the
``r``-th of N contiguous, disjoint ranges of the chunks still to do (:func:`partition`) on ``cuda:r``, or on the
CPU with a share of the threads. They write disjoint rows of the same file and never communicate.

Cost (METHODS-MODERN 9.3): CIFAR-100 has 50,000 x 162 = 8.1 M views, 0.675 of the 12 M teacher forwards of one
240-epoch run, paid once per teacher and reused by every run and seed with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_kd.cache.store import (
    ARRAY,
    CHUNKS,
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    MANIFEST,
    chunk_range,
    chunk_sha256,
    differences,
    done_chunks,
    open_array,
    read_manifest,
    storage_bytes,
    storage_dtype,
    versions,
    write_json_atomic,
)
from lightning_kd.cache.views import TeacherCacheError, ViewSpace, view_space
from lightning_kd.checkpoints import fingerprint

log = logging.getLogger(__name__)

#: views per chunk when ``chunk_images`` is not given (about 100 MB of rendered 32x32 images)
VIEWS_PER_CHUNK = 8192


@dataclass
class Progress:
    """What a build reports after each chunk (to the ``progress`` callable of :func:`build_cache`)."""

    rank: int
    chunks_done: int
    chunks_total: int
    images_done: int
    seconds: float

    @property
    def fraction(self) -> float:
        return self.chunks_done / max(1, self.chunks_total)


def partition(chunks: list[int], world_size: int, rank: int) -> list[int]:
    """Process ``rank``'s share of ``chunks`` (sorted): the ``rank``-th of ``world_size`` contiguous slices of
    near-equal length. The slices are disjoint and together cover ``chunks``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {world_size} and {rank}")
    chunks = sorted(chunks)
    n = len(chunks)
    return chunks[rank * n // world_size : (rank + 1) * n // world_size]


def plan_manifest(teacher: nn.Module, space: ViewSpace, dtype: str, chunk_images: int | None = None,
                  teacher_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a cache of ``teacher`` over ``space`` (``complete`` false, no chunk done yet)."""
    with torch.no_grad(), _eval(teacher):
        probe = teacher(space.render([0])[:1].to(_device_of(teacher)))
    if probe.dim() != 2:
        raise TeacherCacheError(f"the teacher must return (batch, classes) logits, it returned {tuple(probe.shape)}")
    num_classes = int(probe.shape[1])
    views = space.views_per_image
    chunk_images = int(chunk_images or max(1, VIEWS_PER_CHUNK // views))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": fingerprint(teacher),
        "teacher": dict(teacher_info or {}, network=type(teacher).__name__),
        "teacher_mode": "eval",
        "taps": ["logits"],
        "dataset_fingerprint": space.fingerprint(),
        "dataset": {"source": space.source, "num_images": space.num_images},
        "augmentation": space.spec(),
        "view_keys": ["index", "crop_top", "crop_left", "flip"],
        "dtype": storage_dtype(dtype),
        "num_classes": num_classes,
        "shape": [space.num_images, *space.view_shape, num_classes],
        "bytes": storage_bytes(space.num_images, views, num_classes, dtype),
        "chunk_images": chunk_images,
        "num_chunks": -(-space.num_images // chunk_images),
        "chunks": {},
        "complete": False,
        "versions": versions(),
    }


def build_cache(
    teacher: nn.Module,
    data: Any,
    output: str | os.PathLike,
    dtype: str = "fp16",
    devices: int = 1,
    accelerator: str = "auto",
    batch_size: int = 512,
    chunk_images: int | None = None,
    teacher_info: dict[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[dict[str, Any], list[int]], None] | None = None,
) -> dict[str, Any]:
    """Build (or finish) the cache of ``teacher``'s logits on every training view of ``data`` in ``output``.

    Args:
        teacher: the network, its weights loaded (kept on the CPU here; each process moves a copy).
        data: a data module (set up when needed), a dataset, or a :class:`ViewSpace`.
        output: the cache folder. A folder holding an unfinished build of the same cache is resumed (its finished
            chunks are skipped); one holding another cache is refused.
        dtype: ``"fp16"`` (half the size; relative error <= 2^-11 per logit) or ``"fp32"`` (exact).
        devices: processes to fill the cache with (see the module docstring).
        accelerator: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
        batch_size: views per teacher forward. On a busy CPU with several threads, large batches suffer far less
            from the threads waiting for each other (resnet56 at 16x16, 2 threads on 2 shared cores: 82 views/s at
            512, 11 at 64); on one idle thread 64 is a little faster (363 vs 322).
        chunk_images: images per chunk (the unit of progress and resume; default about 8,192 views).
        teacher_info: recorded in the manifest (e.g. the network's name and checkpoint path).
        progress: called after every chunk with a :class:`Progress` (from each process; a module-level
            function when ``devices > 1``).
        on_start: called once the folder is ready, before any teacher forward, with the manifest (its ``bytes``
            is the storage) and the chunks still to do.

    Returns the manifest of the complete cache.
    """
    space = data if isinstance(data, ViewSpace) else view_space(data)
    teacher = teacher.cpu()
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    device = _device(accelerator)
    if device == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    folder = Path(output)
    manifest = prepare(folder, plan_manifest(teacher, space, dtype, chunk_images, teacher_info))
    done = done_chunks(folder, manifest)
    pending = [] if manifest["complete"] else [k for k in range(manifest["num_chunks"]) if k not in done]
    if on_start is not None:
        on_start(manifest, pending)
    if manifest["complete"]:
        log.info("The teacher-output cache %s is already complete.", folder)
        return manifest
    start = time.perf_counter()
    threads = torch.get_num_threads()
    job = _Job(folder, manifest, teacher, space, pending, batch_size, device, devices, threads, progress)
    if devices == 1:
        _fill(0, job)
    else:
        torch.multiprocessing.spawn(_fill, args=(job,), nprocs=devices, join=True)
    return finish(folder, manifest, time.perf_counter() - start, devices, device)


def prepare(folder: Path, planned: dict[str, Any]) -> dict[str, Any]:
    """Create the folder, the (sparse) array and the manifest, or return the manifest of the unfinished build of
    the same cache found there; another cache there is an error."""
    if (folder / MANIFEST).exists():
        found = read_manifest(folder)
        problems = differences(planned, found, (*IDENTITY_FIELDS,))
        if problems:
            raise TeacherCacheError(
                f"{os.fspath(folder)!r} holds another teacher-output cache (" + "; ".join(problems) + "): choose "
                "another --output, or delete that folder to rebuild"
            )
        open_array(folder, found)  # a damaged array is an error, not a resume
        return found
    folder.mkdir(parents=True, exist_ok=True)
    leftovers = (ARRAY, CHUNKS)  # of a build stopped before its manifest was written
    strangers = sorted(p.name for p in folder.iterdir() if p.name not in leftovers and not p.name.startswith("."))
    if strangers:
        raise TeacherCacheError(f"{os.fspath(folder)!r} is not empty ({strangers[:5]}) and holds no cache: choose an "
                                "empty or new folder for --output")
    free = shutil.disk_usage(folder).free
    if free < planned["bytes"]:
        raise TeacherCacheError(f"the cache needs {planned['bytes']:,} bytes but {os.fspath(folder)!r} has {free:,} "
                                "free: choose another --output or --dtype fp16")
    shutil.rmtree(folder / CHUNKS, ignore_errors=True)  # chunk records belong to the manifest they were made under
    array = np.lib.format.open_memmap(folder / ARRAY, mode="w+", dtype=planned["dtype"],
                                      shape=tuple(planned["shape"]))
    del array
    write_json_atomic(folder / MANIFEST, planned)
    return planned


def finish(folder: Path, manifest: dict[str, Any], seconds: float, devices: int, device: str) -> dict[str, Any]:
    """Gather the chunk records into the manifest; mark it complete when none is missing."""
    done = done_chunks(folder, manifest)
    manifest = dict(manifest, chunks={str(k): done[k] for k in sorted(done)})
    missing = [k for k in range(manifest["num_chunks"]) if k not in done]
    manifest["complete"] = not missing
    manifest["build"] = {"wall_seconds_last_run": round(float(seconds), 3), "devices": devices, "device": device,
                         "chunk_seconds": round(sum(float(c.get("seconds", 0.0)) for c in done.values()), 3)}
    write_json_atomic(folder / MANIFEST, manifest)
    if missing:
        raise TeacherCacheError(f"the build of {os.fspath(folder)!r} ended with {len(missing)} chunks missing "
                                f"(e.g. {missing[:5]}): run the same command again to finish it")
    shutil.rmtree(folder / CHUNKS, ignore_errors=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# the work of one process
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    folder: Path
    manifest: dict[str, Any]
    teacher: nn.Module
    space: ViewSpace
    pending: list[int]
    batch_size: int
    device: str
    world_size: int
    threads: int
    progress: Callable[[Progress], None] | None


def _fill(rank: int, job: _Job) -> None:
    """Process ``rank``: compute, write, flush and record each chunk of its share."""
    manifest, space = job.manifest, job.space
    if job.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if job.world_size > 1:
            torch.set_num_threads(max(1, job.threads // job.world_size))
    teacher = job.teacher.to(device)
    array = open_array(job.folder, manifest, mode="r+")
    (job.folder / CHUNKS).mkdir(exist_ok=True)
    mine = partition(job.pending, job.world_size, rank)
    images_done, start = 0, time.perf_counter()
    view_shape = tuple(manifest["shape"][1:])
    with _exact_fp32(), torch.no_grad(), _eval(teacher):
        for count, chunk in enumerate(mine, start=1):
            begin = time.perf_counter()
            first, stop = chunk_range(chunk, int(manifest["chunk_images"]), space.num_images)
            views = space.render(range(first, stop))
            logits = torch.cat([teacher(views[i : i + job.batch_size].to(device)).float().cpu()
                                for i in range(0, len(views), job.batch_size)])
            rows = logits.numpy().reshape(stop - first, *view_shape).astype(manifest["dtype"])
            array[first:stop] = rows
            array.flush()  # on disk before the chunk is recorded as done
            write_json_atomic(job.folder / CHUNKS / f"{chunk:06d}.json",
                              {"chunk": chunk, "images": [first, stop], "sha256": chunk_sha256(rows), "rank": rank,
                               "seconds": round(time.perf_counter() - begin, 3)})
            images_done += stop - first
            if job.progress is not None:
                job.progress(Progress(rank, count, len(mine), images_done, time.perf_counter() - start))
    del array


def _device(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator not in ("cpu", "cuda"):
        raise ValueError(f"accelerator must be 'auto', 'cpu' or 'cuda', got {accelerator!r}")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("accelerator='cuda' but no CUDA device is available")
    return accelerator


def _device_of(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _eval(network: nn.Module):
    mode = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(mode)


@contextmanager
def _exact_fp32():
    """TF32 off for the block (the cache holds the fp32 teacher's outputs, not TF32's)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
