"""A shuffling sampler that a fit can resume from the middle of an epoch.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone (not from the global random state),
and :meth:`ResumableRandomSampler.skip` starts the next epoch part-way through, so a fit killed after k
batches and resumed from its checkpoint sees exactly the batches it would have seen. The
:class:`~lightning_kd.DistillationModule` calls ``skip`` itself when Lightning restores a fit inside an
epoch. Lightning calls :meth:`set_epoch` at the start of every epoch; it is forwarded to the dataset (when it
has ``set_epoch``) so that per-sample augmentation can be seeded by epoch and index too; the library's
wrapping datasets (:class:`WrappedDataset`) pass it on to the dataset they wrap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Dataset, Sampler

_EPOCH_STRIDE = 1_000_003


class ResumableRandomSampler(Sampler[int]):
    """Random order per epoch from ``(seed, epoch)``; can start at any position of an epoch.

    Args:
        data_source: the dataset (its length, and its ``set_epoch`` if it has one).
        seed: base seed of the permutations (the data modules pass ``torch.initial_seed()``, which
            ``seed_everything`` sets).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        set_epoch = getattr(self.data_source, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)

    def skip(self, num_samples: int) -> None:
        """Start the next iteration after the first ``num_samples`` samples of the current epoch's order."""
        self._skip = max(0, int(num_samples))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + _EPOCH_STRIDE * self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator)[self._skip :]
        self._skip = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.data_source)


class WrappedDataset(Dataset):
    """Base of the datasets that wrap another one: its length, and :meth:`set_epoch` passed on to it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset (for per-sample seeded augmentation)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
