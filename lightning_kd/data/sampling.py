"""Samplers and the training DataLoader: seeded by epoch, sharded across ranks, resumable mid-epoch.

- :class:`ResumableRandomSampler`: the training order. Epoch ``e``'s permutation is drawn from ``(seed, e)``
  alone; every rank draws the same one and takes every ``num_replicas``-th sample from position ``rank``
  (a subclass of ``DistributedSampler``, so Lightning keeps it under DDP instead of putting its own). It
  yields sample keys ``(index, epoch, seed)``, so that the datasets' per-sample randomness follows the epoch
  even in persistent workers, which never see a ``set_epoch`` made in the main process.
- :class:`UnpaddedDistributedSampler`: evaluation order. Each sample exactly once over all ranks (no padding,
  no duplicates), so accuracies over several devices equal one device's.
- :class:`ResumableDataLoader`: the training DataLoader, stateful in Lightning's sense: it has ``state_dict``
  and ``load_state_dict``, which Lightning saves in every checkpoint (``loops["fit_loop"]["state_dict"]
  ["combined_loader"]``) and restores before it iterates on a resume. The state is the epoch, the number of
  batches yielded in the current pass and the seed; after a restore the next pass skips those batches (in the
  sampler, without loading them), or starts the next epoch when the pass was complete. A fit resumed from a
  mid-epoch checkpoint therefore sees exactly the batches an uninterrupted fit sees, whatever ``num_workers``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_kd.data.seeding import STREAM_ORDER, sample_key

_STATE_VERSION = 1

log = logging.getLogger(__name__)


class WrappedDataset(Dataset):
    """Base of the datasets that wrap another one: its length, and :meth:`set_epoch` passed on to it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset (for per-sample seeded augmentation by bare index)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def inner_item(self, key: Any) -> Any:
        """The wrapped dataset's item: the whole sample key when it accepts keys (``keyed``), else the index."""
        if getattr(self.dataset, "keyed", False):
            return self.dataset[key]
        return self.dataset[key[0] if isinstance(key, tuple) else key]


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of an epoch: a permutation of ``range(size)`` drawn from ``(seed, epoch)`` alone."""
    generator = torch.Generator().manual_seed(sample_key(seed, epoch, 0, STREAM_ORDER))
    return torch.randperm(size, generator=generator)


class ResumableRandomSampler(DistributedSampler):
    """Random order per epoch from ``(seed, epoch)``, this rank's share of it, from any position.

    Every rank computes the same permutation of the dataset (:func:`epoch_permutation`), cut to a multiple of
    ``num_replicas`` (``drop_last=True``: the last ``N mod num_replicas`` samples of the permutation, different
    ones each epoch, are left out) or padded with its first samples (``drop_last=False``, as
    ``DistributedSampler``), and takes positions ``rank, rank + num_replicas, ...``. :meth:`start_at` makes the
    next pass begin after the first ``n`` samples of the (global) permutation: that is how a resumed fit skips
    what it has seen.

    Args:
        data_source: the dataset (its length, and its ``set_epoch`` if it has one).
        seed: base seed of the permutations.
        num_replicas, rank: the number of processes sharing the data and this one's rank (1 and 0 alone; the
            data modules read ``trainer.world_size`` and ``trainer.global_rank``). Never read from
            ``torch.distributed`` here.
        drop_last: cut (True) or pad (False) the permutation to a multiple of ``num_replicas``.
        keys: yield ``(index, epoch, seed)`` sample keys (the library's datasets accept them) instead of bare
            indices (default, for any dataset).
    """

    def __init__(self, data_source: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False, keys: bool = False) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
        super().__init__(data_source, num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                         shuffle=True, seed=int(seed), drop_last=drop_last)
        self.data_source = data_source
        self.keys = keys
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        set_epoch = getattr(self.data_source, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)

    def start_at(self, num_samples: int) -> None:
        """Begin the next pass after the first ``num_samples`` samples of the epoch's global order (all ranks'
        together: ``batches * batch_size * num_replicas``). Applies once."""
        self._start = max(0, int(num_samples))

    def global_order(self) -> list[int]:
        """The epoch's permutation cut or padded to ``total_size`` (every rank's share interleaved)."""
        n = len(self.data_source)
        order = epoch_permutation(n, self.seed, self.epoch).tolist()
        if self.drop_last:
            return order[: self.total_size]
        padding = self.total_size - n
        while padding > 0:
            order += order[:padding]
            padding = self.total_size - len(order)
        return order

    def __iter__(self) -> Iterator[Any]:
        start, self._start = self._start, 0
        order = self.global_order()[start + self.rank :: self.num_replicas]
        if not self.keys:
            return iter(order)
        epoch, seed = self.epoch, self.seed
        return iter([(index, epoch, seed) for index in order])

    def __len__(self) -> int:
        return self.num_samples


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation order under several processes: rank ``r`` takes samples ``r, r + R, r + 2R, ...`` in order.

    Unlike ``DistributedSampler`` nothing is padded: every sample is evaluated exactly once over all ranks (the
    ranks' shares differ by at most one sample), so metrics summed over ranks equal one device's.
    """

    def __init__(self, data_source: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.data_source = data_source
        self.num_samples = len(range(rank, len(data_source), num_replicas))
        self.total_size = len(data_source)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.data_source), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class _CountingIterator:
    """Yields the batches of a DataLoader iterator and counts them on the loader (main process)."""

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator[Any]) -> None:
        self.loader, self.iterator = loader, iterator

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader._batches_yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # e.g. _shutdown_workers
        return getattr(self.iterator, name)


class ResumableDataLoader(DataLoader):
    """The training DataLoader of the library's data modules: Lightning saves and restores its position.

    Its sampler is a :class:`ResumableRandomSampler` (with another one, e.g. the sequential sampler that
    Lightning puts in for ``overfit_batches``, it iterates normally and a restore cannot skip).
    ``state_dict()`` records the epoch of the current pass, the batches it has yielded (counted in the main
    process as they are handed out, so prefetching workers do not count), whether the pass is complete and the
    seed. ``load_state_dict()`` sets the sampler's seed and epoch and makes the next pass skip the batches
    already yielded, or start the next epoch when the pass was complete. Lightning calls ``load_state_dict``
    before it creates the iterator of the resumed epoch (``FitLoop.setup_data``) and ``set_epoch`` only after,
    so the epoch must come from here.

    Args:
        dataset, **kwargs: as ``DataLoader`` (``sampler`` a :class:`ResumableRandomSampler`).
        epoch_length: returns the number of batches that make a complete epoch when it is fewer than
            ``len(self)`` (the data modules pass the Trainer's ``num_training_batches``, which
            ``limit_train_batches`` shortens); ``None``: ``len(self)``.
    """

    def __init__(self, dataset: Dataset, *args: Any, epoch_length: Callable[[], float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch_length = epoch_length
        self._batches_yielded = 0
        self._pass_epoch = int(getattr(self.sampler, "epoch", 0))
        self._resume_batches = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._pass_epoch = int(getattr(self.sampler, "epoch", 0))
        self._batches_yielded, self._resume_batches = self._resume_batches, 0
        return _CountingIterator(self, super().__iter__())

    def _complete_length(self) -> int:
        length = len(self)
        if self.epoch_length is not None:
            limit = self.epoch_length()
            if limit is not None and limit != float("inf") and limit >= 0:
                length = min(length, int(limit))
        return length

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches", "complete", "seed", "samples_per_batch", "version"}`` of the current pass."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._pass_epoch,
            "batches": self._batches_yielded,
            "complete": self._batches_yielded >= self._complete_length(),
            "seed": getattr(self.sampler, "seed", None),
            "samples_per_batch": (self.batch_size or 1) * int(getattr(self.sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where :meth:`state_dict` was taken: the same pass after its yielded batches, or the next
        epoch from its start when that pass was complete."""
        missing = {"epoch", "batches", "complete", "seed", "samples_per_batch"} - set(state)
        if missing:
            raise KeyError(f"a training loader state needs {sorted(missing)}; found keys {sorted(state)}")
        sampler = self.sampler
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if state["complete"]:
            epoch, batches = epoch + 1, 0
        if not isinstance(sampler, ResumableRandomSampler):
            if batches:
                log.warning("The training loader's sampler (%s) cannot start part-way: the epoch restarts.",
                            type(sampler).__name__)
            return
        if state["seed"] is not None:
            sampler.seed = int(state["seed"])
        sampler.set_epoch(epoch)
        sampler.start_at(batches * int(state["samples_per_batch"]))
        self._pass_epoch = epoch
        self._resume_batches = self._batches_yielded = batches


def num_batches(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of a loader over ``samples`` samples."""
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)
