"""The cache on disk: one ``.npy`` array of teacher logits, its JSON manifest, and the checks before any read.

Layout of a cache folder::

    manifest.json    what the array holds (below), written atomically (a temporary file, then a rename)
    logits.npy       [N, tops, lefts, flips, C] float16 or float32 (np.lib.format.open_memmap; never pickle)
    chunks/00012.json  one per finished chunk (a range of images) while the build runs: a resumed build skips them

The manifest records the teacher's weights (sha256 of its state dict, :func:`~lightning_kd.checkpoints.fingerprint`),
the dataset (sha256 of the raw training images and labels), the augmentation (kind, padding, flips, crop size,
mean/std, fill), the storage dtype, the number of classes, the teacher's mode (eval), the versions of the library,
torch and numpy, the chunks and their sha256, and ``complete``. :class:`TeacherCache` refuses, naming the field,
any mismatch with the run that reads it, and any cache that is incomplete (a chunk missing, ``complete`` false) or
damaged (file size not matching the ``.npy`` header, header not matching the manifest): unwritten parts of a
memory-mapped file read as zeros, so they must never be read. Reads go through a read-only memory map, a batch of
rows at a time; nothing is loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_kd.cache.views import VIEW_KEYS, TeacherCacheError

log = logging.getLogger(__name__)

FORMAT = "lightning-kd teacher-output cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAY = "logits.npy"
CHUNKS = "chunks"
DTYPES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}

#: fields that must agree between a cache and the run reading it, or a build resuming it
IDENTITY_FIELDS = ("teacher_fingerprint", "dataset_fingerprint", "augmentation", "dtype", "num_classes", "shape",
                   "teacher_mode", "taps")


def storage_dtype(name: str) -> str:
    """``"fp16"``/``"float16"`` -> ``"float16"``, ``"fp32"``/``"float32"`` -> ``"float32"``."""
    if name not in DTYPES:
        raise TeacherCacheError(f"cache dtype must be fp16 or fp32 (float16 / float32), got {name!r}")
    return DTYPES[name]


def storage_bytes(num_images: int, views_per_image: int, num_classes: int, dtype: str) -> int:
    """Bytes of the logits array (the ``.npy`` header, 128 bytes or so, aside)."""
    return int(num_images) * int(views_per_image) * int(num_classes) * np.dtype(storage_dtype(dtype)).itemsize


def versions() -> dict[str, str]:
    import lightning_kd

    return {"lightning_kd": lightning_kd.__version__, "torch": torch.__version__, "numpy": np.__version__}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # the permissions of a file opened normally (mkstemp's are 0600)
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(
            f"{os.fspath(folder)!r} is not a teacher-output cache (no {MANIFEST}): build one with "
            "`lightning-kd cache --config <fit config> --output <folder>`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TeacherCacheError(f"cannot read {os.fspath(path)!r}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{os.fspath(path)!r} is not a manifest of a {FORMAT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{os.fspath(path)!r}: field 'format_version' is {manifest.get('format_version')!r}, "
                                f"this library reads version {FORMAT_VERSION}: rebuild the cache")
    return manifest


def differences(expected: dict[str, Any], found: dict[str, Any], fields: tuple[str, ...] = IDENTITY_FIELDS
                ) -> list[str]:
    """Human-readable differences on ``fields`` (``augmentation`` compared key by key)."""
    out = []
    for field in fields:
        a, b = expected.get(field), found.get(field)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{field}.{key}: expected {a.get(key)!r}, the cache has {b.get(key)!r}")
        elif a != b:
            out.append(f"{field}: expected {_short(a)}, the cache has {_short(b)}")
    return out


def _short(value: Any) -> str:
    """A sha256 as its first 16 hex digits, anything else as its repr."""
    return f"'{value[:16]}...'" if isinstance(value, str) and len(value) == 64 else repr(value)


def done_chunks(folder: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The finished chunks: those in the manifest and those recorded in ``chunks/`` by a running build."""
    done = {int(k): v for k, v in manifest.get("chunks", {}).items()}
    for path in sorted((Path(folder) / CHUNKS).glob("*.json")) if (Path(folder) / CHUNKS).is_dir() else []:
        record = json.loads(path.read_text())
        done[int(record["chunk"])] = {k: record[k] for k in ("images", "sha256", "seconds", "rank")}
    return done


def missing_chunks(folder: Path, manifest: dict[str, Any]) -> list[int]:
    done = done_chunks(folder, manifest)
    return [k for k in range(int(manifest.get("num_chunks", 0))) if k not in done]


def chunk_sha256(rows: np.ndarray) -> str:
    """sha256 of a block of the array's rows (their bytes in C order)."""
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


def chunk_range(chunk: int, chunk_images: int, num_images: int) -> tuple[int, int]:
    """The images ``[start, stop)`` of a chunk."""
    return chunk * chunk_images, min(num_images, (chunk + 1) * chunk_images)


def open_array(folder: Path, manifest: dict[str, Any], mode: str = "r") -> np.memmap:
    """The logits array as a memory map, after checking its header against the manifest and its size against the
    header (a truncated file is refused, never read)."""
    path = Path(folder) / ARRAY
    if not path.is_file():
        raise TeacherCacheError(f"{os.fspath(path)!r} is missing: the cache is incomplete; rebuild it")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
            offset = handle.tell()
    except (ValueError, OSError) as error:
        raise TeacherCacheError(f"{os.fspath(path)!r} is not a readable .npy file ({error}): rebuild it") from None
    expected_shape = tuple(int(v) for v in manifest["shape"])
    if str(dtype) != manifest["dtype"]:
        raise TeacherCacheError(f"{os.fspath(path)!r}: field 'dtype': the manifest says {manifest['dtype']}, the "
                                f"array holds {dtype}: the files do not belong together; rebuild the cache")
    if tuple(shape) != expected_shape or fortran:
        raise TeacherCacheError(f"{os.fspath(path)!r}: field 'shape': the manifest says {expected_shape}, the array "
                                f"is {tuple(shape)}{' (Fortran order)' if fortran else ''}; rebuild the cache")
    size, needed = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size != needed:
        raise TeacherCacheError(f"{os.fspath(path)!r} is truncated or damaged: its header needs {needed} bytes, the "
                                f"file has {size}; rebuild the cache (or resume its build)")
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=tuple(shape), order="C")


class TeacherCache:
    """A finished cache, opened for lookups: checked at once (manifest complete, every chunk present, the array's
    header and size), memory-mapped lazily per process (a pickled or spawned copy maps the file again).

    Args:
        path: the cache folder (``manifest.json`` + ``logits.npy``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        missing = missing_chunks(self.path, self.manifest)
        if not self.manifest.get("complete") or missing:
            raise TeacherCacheError(
                f"the teacher-output cache {os.fspath(self.path)!r} is incomplete (field 'complete' is "
                f"{self.manifest.get('complete')!r}; {len(missing)} of {self.manifest.get('num_chunks')} chunks "
                f"missing, e.g. {missing[:5]}): finish it by running the same `lightning-kd cache` command again"
            )
        open_array(self.path, self.manifest)  # header and size, now rather than at the first batch
        self._array: np.memmap | None = None

    # the memory map stays out of pickles (DDP spawn, deepcopy): each process maps the file itself
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = open_array(self.path, self.manifest)
        return self._array

    @property
    def num_images(self) -> int:
        return int(self.manifest["shape"][0])

    def check(self, expected: dict[str, Any], fields: tuple[str, ...]) -> None:
        """Raise :class:`TeacherCacheError` naming every field of ``expected`` the cache disagrees with."""
        problems = differences(expected, self.manifest, fields)
        if problems:
            raise TeacherCacheError(
                f"the teacher-output cache {os.fspath(self.path)!r} was built for another run: "
                + "; ".join(problems) + ". Build a cache for this teacher and data (`lightning-kd cache`), or point "
                "teacher_cache at the right one"
            )
        mine, theirs = versions(), self.manifest.get("versions", {})
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            log.warning("The teacher-output cache %s was built with other versions %s (built, now): the logits "
                        "may differ from the live teacher's in their last bits.", self.path, changed)

    def lookup(self, index: Any, crop_top: Any, crop_left: Any, flip: Any) -> torch.Tensor:
        """The cached logits of a batch of views: ``(B, C)`` float32 on the CPU (one gather from the map)."""
        keys = [np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.int64).reshape(-1)
                for v in (index, crop_top, crop_left, flip)]
        shape = self.manifest["shape"]
        for name, values, bound in zip(VIEW_KEYS, keys, shape):
            if values.size and (values.min() < 0 or values.max() >= bound):
                raise TeacherCacheError(f"batch[{name!r}] holds {int(values.min())}..{int(values.max())}, outside the "
                                        f"cache's 0..{bound - 1}: the data do not match the cache")
        rows = self.array[keys[0], keys[1], keys[2], keys[3]]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def verify_checksums(self) -> list[int]:
        """Re-hash every chunk (reading the file once, a chunk at a time) against the manifest's sha256: the
        chunks that differ (empty when the file is intact)."""
        bad = []
        chunk_images, n = int(self.manifest["chunk_images"]), self.num_images
        for key, info in sorted(self.manifest["chunks"].items(), key=lambda kv: int(kv[0])):
            start, stop = chunk_range(int(key), chunk_images, n)
            digest = chunk_sha256(self.array[start:stop])
            if digest != info["sha256"]:
                bad.append(int(key))
        return bad
