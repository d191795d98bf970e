"""Randomness of the training data as a pure function of ``(seed, epoch, index)``.

Every random choice the library's training data make (the order of an epoch, a sample's crop and flip, its
second view, CRD's negatives) is drawn from a key derived from the data seed, the epoch, the sample's dataset
index and a *stream* number that tells the uses apart. Nothing reads a worker's or the main process's global
random state, so the same sample gets the same view in any worker, on any rank, in any number of workers, and
after a fit is resumed from the middle of an epoch.

The key is a counter-based generator: SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014), a bijection of 64-bit integers that mixes every input bit into
every output bit, applied in a chain::

    key(seed, epoch, index, stream) = f(f(f(f(seed) ^ epoch) ^ index) ^ stream),   all modulo 2**64

and a further counter ``c`` gives independent 64-bit words ``f(key ^ c)`` (``c = 1, 2, ...``). It costs about
3 microseconds in Python (numpy's ``SeedSequence`` costs about 19) and has a vectorised twin,
:func:`sample_keys`, that maps arrays of indices at once (a teacher-output cache enumerates views with it).
Python's ``hash()`` is never used (its value for strings changes from process to process).

A *sample key* is what the library's training sampler yields in place of a bare index: the tuple
``(index, epoch, seed)``. The library's datasets accept either (:func:`split_key`); with a bare index they
use their own ``epoch`` (set by ``set_epoch``) and ``seed``.

For transforms that draw from the global generators (torchvision's, and any user callable),
:func:`seeded_global_rng` seeds torch's CPU generator, Python's ``random`` and NumPy's legacy global state
from a key for the duration of one call and puts the previous states back afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

#: stream numbers: one per use of the randomness, so that the uses never share draws
STREAM_ORDER = 0  # the permutation of an epoch (index 0)
STREAM_VIEW = 1  # the (weak) view: crop + flip, digits' shift; stream STREAM_VIEW + v for view v
STREAM_STRONG_VIEW = 2  # the second (strong) view's crop + flip / shift
STREAM_STRONG_AUGMENT = 3  # the second view's RandAugment and Cutout
STREAM_NEGATIVES = 4  # CRD's negatives
STREAM_LOADER = 5  # the training loader's own generator (its workers' base seed)
STREAM_TRANSFORM = 16  # SeededViews: transform number t uses STREAM_TRANSFORM + t

#: what the training sampler yields: ``(index, epoch, seed)``; a bare index is accepted everywhere too
SampleKey = Union[int, tuple[int, int, int]]


def mix64(z: int) -> int:
    """SplitMix64's finaliser of ``z`` (modulo 2**64): a bijection of 64-bit integers, the mixing step."""
    z = (z + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK
    return z ^ (z >> 31)


def sample_key(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """The 64-bit key of one use (``stream``) of one sample's randomness in one epoch.

    ``key = f(f(f(f(seed) ^ epoch) ^ index) ^ stream)`` with ``f`` = :func:`mix64`; negative inputs are taken
    modulo 2**64. Deterministic across processes, platforms and Python versions.
    """
    z = mix64(_epoch_prefix(int(seed), int(epoch)) ^ (int(index) & _MASK))
    return mix64(z ^ (int(stream) & _MASK))


@lru_cache(maxsize=64)
def _epoch_prefix(seed: int, epoch: int) -> int:
    """``f(f(seed) ^ epoch)``: the part of a key shared by every sample of an epoch (computed once)."""
    return mix64(mix64(seed & _MASK) ^ (epoch & _MASK))


def key_word(key: int, counter: int) -> int:
    """The ``counter``-th 64-bit word drawn from ``key`` (``f(key ^ counter)``; counters 1, 2, ...)."""
    return mix64(key ^ (counter & _MASK))


def key_uniform(key: int, counter: int) -> float:
    """A float uniform in [0, 1) (53 random bits) from word ``counter`` of ``key``."""
    return (key_word(key, counter) >> 11) * 2.0**-53


def _mix64_array(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: Any, stream: int = 0) -> np.ndarray:
    """:func:`sample_key` for an array of indices at once (``uint64``, the shape of ``indices``)."""
    with np.errstate(over="ignore"):
        head = np.uint64(_epoch_prefix(int(seed), int(epoch)))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        z = _mix64_array(head ^ idx)
        return _mix64_array(z ^ np.uint64(int(stream) & _MASK))


def split_key(key: SampleKey, epoch: int, seed: int) -> tuple[int, int, int]:
    """``(index, epoch, seed)`` of a sample key; a bare index takes the given ``epoch`` and ``seed``."""
    if isinstance(key, tuple):
        index, epoch, seed = key
        return int(index), int(epoch), int(seed)
    return int(key), int(epoch), int(seed)


@contextmanager
def seeded_global_rng(key: int, restore: bool | None = None) -> Iterator[None]:
    """Seed torch's CPU generator, Python's ``random`` and NumPy's global state from ``key`` for a block.

    Any transform that draws from the global generators (torchvision's random transforms, RandAugment written
    with ``random``, NumPy's ``np.random``) becomes a function of the key inside the block.

    Args:
        key: a 64-bit key (:func:`sample_key`); torch gets it whole, ``random`` too, NumPy its low 32 bits
            mixed with the high ones.
        restore: put the previous three states back after the block. ``None`` (default): restore in the main
            process, where the training's own random streams (dropout, a sampler) must not be disturbed, and
            not in a DataLoader worker, where nothing else draws and every sample seeds afresh (saving and
            restoring the three states costs about 180 microseconds a sample, NumPy's most of it; seeding
            them about 15).
    """
    if restore is None:
        restore = get_worker_info() is None
    if restore:
        torch_state = torch.default_generator.get_state()
        python_state = random.getstate()
        numpy_state = np.random.get_state()
    torch.default_generator.manual_seed(key)
    random.seed(key)
    np.random.seed((key ^ (key >> 32)) & 0xFFFFFFFF)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
