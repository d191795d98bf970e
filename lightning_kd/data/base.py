"""What every data module of the library shares: dictionary batches and the data loaders.

A batch is a dictionary: ``image`` (B, C, H, W), ``label`` (B,), and, when the data module is asked for
them, ``index`` (B,) (each sample's position in the training set; CRD's memory bank needs it) and
``contrast_index`` (B, K + 1) (CRD's positive and K negatives, see :mod:`lightning_kd.data.contrast`).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_kd.data.contrast import ContrastiveDataset
from lightning_kd.data.sampling import ResumableRandomSampler, WrappedDataset


class DictDataset(WrappedDataset):
    """Wrap a dataset of ``(image, label)`` pairs so that it yields dictionaries (optionally with the index)."""

    def __init__(self, dataset: Dataset, return_index: bool = False) -> None:
        super().__init__(dataset)
        self.return_index = return_index

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.dataset[index]
        sample = {"image": image, "label": torch.as_tensor(label, dtype=torch.long)}
        if self.return_index:
            sample["index"] = torch.as_tensor(index, dtype=torch.long)
        return sample


def default_num_workers(accelerated: bool | None = None) -> int:
    """Loader workers that keep the training fed without taking its cores.

    With an accelerator (``accelerated``; default: whether CUDA is available) the cores only prepare batches:
    cores - 1, at most 8. On a CPU the training itself uses every core, and a worker competes with it: on a
    2-core machine a KD fit of resnet56 -> resnet20 ran 6% slower with one worker than with loading in the
    main process, whose share of a step is about 4% (``benchmarks/bench_data.py``). So without an
    accelerator: none up to 4 cores, then one per 8 cores (at most 8).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerated is None:
        accelerated = torch.cuda.is_available()
    if accelerated:
        return max(0, min(8, cores - 1))
    return 0 if cores <= 4 else min(8, cores // 8)


class ClassificationDataModule(L.LightningDataModule):
    """Base of the library's data modules: subclasses set ``train_set``/``val_set`` in ``setup``.

    Args:
        batch_size: samples per batch (per device).
        num_workers: loader processes; ``None`` picks :func:`default_num_workers` for the Trainer's accelerator
            when the loaders are built (pinned memory and persistent workers follow).
        return_index: add each training sample's dataset index to the batch (``batch["index"]``).
        contrast_negatives: CRD's K: when positive, training batches also carry ``index`` (B,) and
            ``contrast_index`` (B, K + 1): column 0 the sample itself, then K samples of other classes
            (reference: 16384). 0 turns the sampling off.
        contrast_replacement: draw the K negatives with replacement (default; required when K exceeds the
            number of samples outside a class). ``False`` gives K distinct negatives per sample.
    """

    num_classes: int = 0

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        return_index: bool = False,
        contrast_negatives: int = 0,
        contrast_replacement: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if contrast_negatives < 0:
            raise ValueError(f"contrast_negatives must be >= 0 (0 = off), got {contrast_negatives}")
        self.batch_size = batch_size
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None for the default), got {num_workers}")
        self.num_workers = num_workers
        self.return_index = return_index
        self.contrast_negatives = int(contrast_negatives)
        self.contrast_replacement = contrast_replacement
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def provides_indices(self) -> bool:
        """Whether training batches carry ``index`` (``return_index`` or ``contrast_negatives > 0``)."""
        return self.return_index or self.contrast_negatives > 0

    @property
    def num_samples(self) -> int:
        """Size of the training set (runs :meth:`setup` first if it has not run)."""
        if self.train_set is None:
            self.setup("fit")
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the training set")
        return len(self.train_set)  # type: ignore[arg-type]

    def wrap_train(self, dataset: Dataset, labels: Tensor | None = None) -> Dataset:
        """The training set as a dictionary dataset: with indices when asked, with CRD's contrastive
        indices when ``contrast_negatives > 0`` (``labels``: the dataset's labels, read from it if omitted).
        """
        if self.contrast_negatives:
            return ContrastiveDataset(
                dataset, self.contrast_negatives, labels=labels, replacement=self.contrast_replacement
            )
        return DictDataset(dataset, return_index=self.return_index)

    def _on_cuda(self) -> bool:
        """Whether the batches go to a CUDA device (the attached Trainer's accelerator, else availability)."""
        trainer = self.trainer
        if trainer is None:
            return torch.cuda.is_available()
        return isinstance(trainer.accelerator, CUDAAccelerator)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        on_cuda = self._on_cuda()
        workers = default_num_workers(on_cuda) if self.num_workers is None else self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ResumableRandomSampler(dataset, seed=torch.initial_seed()) if train else None,
            drop_last=False,
            num_workers=workers,
            pin_memory=on_cuda,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
