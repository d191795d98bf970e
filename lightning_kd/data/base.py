"""What every data module of the library shares: dictionary batches, samplers and the data loaders.

A batch is a dictionary: ``image`` (B, C, H, W), ``label`` (B,), and, depending on the data module and its
options, ``index`` (B,) (each sample's position in the training set; CRD's memory bank and a teacher-output
cache need it), ``contrast_index`` (B, K + 1) (CRD's positive and K negatives, see
:mod:`lightning_kd.data.contrast`), ``crop_top``, ``crop_left``, ``flip`` (B,) (CIFAR's view parameters) and
``image_strong`` (B, C, H, W) (a second, strongly augmented view, for MLKD).

Randomness. Everything random in the training data (the order, each sample's augmentation, its second view,
CRD's negatives) is a function of ``(data_seed, epoch, index)`` (:mod:`lightning_kd.data.seeding`): the same on
every rank, in any number of workers and after a resume. The training loader (:class:`ResumableDataLoader`)
is stateful in Lightning's sense: checkpoints record its position and a resumed fit continues the epoch
exactly where it stopped.

Several devices. The data modules shard the data themselves from ``trainer.world_size`` and
``trainer.global_rank``: for training every rank takes its slice of the same epoch permutation
(:class:`ResumableRandomSampler`, a ``DistributedSampler``, which Lightning leaves in place); for validation,
test and predict every sample is seen exactly once over all ranks (:class:`UnpaddedDistributedSampler`).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_kd.data.augment import as_sample
from lightning_kd.data.contrast import ContrastiveDataset
from lightning_kd.data.seeding import STREAM_LOADER, SampleKey, sample_key
from lightning_kd.data.sampling import (
    ResumableDataLoader,
    ResumableRandomSampler,
    UnpaddedDistributedSampler,
    WrappedDataset,
    num_batches,
)


class DictDataset(WrappedDataset):
    """Wrap a dataset so that it yields dictionaries (optionally with the index).

    The wrapped dataset may yield ``(image, label)`` pairs or dictionaries (whose extra keys pass through);
    sample keys ``(index, epoch, seed)`` from the training sampler reach it whole when it accepts them
    (``keyed = True``), else as the bare index.
    """

    keyed = True

    def __init__(self, dataset: Dataset, return_index: bool = False) -> None:
        super().__init__(dataset)
        self.return_index = return_index

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        sample = as_sample(self.inner_item(key))
        if self.return_index:
            sample["index"] = torch.as_tensor(key[0] if isinstance(key, tuple) else key, dtype=torch.long)
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
    """Base of the library's data modules: subclasses set ``train_set``/``val_set`` (and ``test_set``, else
    the validation set serves test and predict) in ``setup``.

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
        drop_last: leave out the last, partial training batch of each epoch (default, as the usual recipes;
            BatchNorm and batch-relational losses then always see full batches). ``False`` keeps it.
            Evaluation loaders always keep every sample.
        data_seed: seed of the training order and of every per-sample random draw (augmentation, second
            views, CRD's negatives). ``None``: ``torch.initial_seed()`` when the data are set up (the seed that
            ``seed_everything`` set); under several processes rank 0's value is used by all.
    """

    num_classes: int = 0

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        return_index: bool = False,
        contrast_negatives: int = 0,
        contrast_replacement: bool = True,
        drop_last: bool = True,
        data_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if contrast_negatives < 0:
            raise ValueError(f"contrast_negatives must be >= 0 (0 = off), got {contrast_negatives}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None for the default), got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.return_index = return_index
        self.contrast_negatives = int(contrast_negatives)
        self.contrast_replacement = contrast_replacement
        self.drop_last = drop_last
        self.data_seed = data_seed
        self._seed: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ------------------------------------------------------------------------------------------------------
    # what the data provide
    # ------------------------------------------------------------------------------------------------------
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

    def resolved_seed(self) -> int:
        """The data seed: ``data_seed``, else ``torch.initial_seed()`` read once (at the first call)."""
        if self._seed is None:
            self._seed = int(self.data_seed) if self.data_seed is not None else int(torch.initial_seed())
        return self._seed

    def wrap_train(self, dataset: Dataset, labels: Tensor | None = None) -> Dataset:
        """The training set as a dictionary dataset: with indices when asked, with CRD's contrastive
        indices when ``contrast_negatives > 0`` (``labels``: the dataset's labels, read from it if omitted).
        """
        if self.contrast_negatives:
            return ContrastiveDataset(dataset, self.contrast_negatives, labels=labels,
                                      replacement=self.contrast_replacement, seed=self.resolved_seed())
        return DictDataset(dataset, return_index=self.return_index)

    # ------------------------------------------------------------------------------------------------------
    # the loaders
    # ------------------------------------------------------------------------------------------------------
    def _on_cuda(self) -> bool:
        """Whether the batches go to a CUDA device (the attached Trainer's accelerator, else availability)."""
        trainer = self.trainer
        if trainer is None:
            return torch.cuda.is_available()
        return isinstance(trainer.accelerator, CUDAAccelerator)

    def _replicas(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached Trainer; ``(1, 0)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _shared_seed(self) -> int:
        """The data seed, rank 0's under several processes (every rank must draw the same permutation)."""
        seed = self.resolved_seed()
        world_size, _ = self._replicas()
        if world_size > 1:
            seed = int(self.trainer.strategy.broadcast(seed, src=0))  # type: ignore[union-attr]
            self._seed = seed
        return seed

    def _loader_options(self) -> dict[str, Any]:
        on_cuda = self._on_cuda()
        workers = default_num_workers(on_cuda) if self.num_workers is None else self.num_workers
        return dict(batch_size=self.batch_size, num_workers=workers, pin_memory=on_cuda,
                    persistent_workers=workers > 0)

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        world_size, rank = self._replicas()
        sampler = None
        if world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, world_size, rank)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(sample_key(self.resolved_seed(), 0, 1, STREAM_LOADER))
        return DataLoader(dataset, sampler=sampler, drop_last=False, generator=generator, **self._loader_options())

    def train_dataloader(self) -> DataLoader:
        """The training loader: a :class:`ResumableDataLoader` over this rank's share of a seeded order."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        world_size, rank = self._replicas()
        seed = self._shared_seed()
        dataset = self.train_set
        size = len(dataset)  # type: ignore[arg-type]
        sampler = ResumableRandomSampler(dataset, seed=seed, num_replicas=world_size,  # type: ignore[arg-type]
                                         rank=rank, drop_last=self.drop_last, keys=True)
        if num_batches(len(sampler), self.batch_size, self.drop_last) == 0:
            raise ValueError(
                f"the training set has {size} samples ({len(sampler)} per process over {world_size}), "
                f"fewer than batch_size={self.batch_size}: with drop_last=True no batch is formed; lower "
                "batch_size or set drop_last=False"
            )
        trainer = self.trainer
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)  # a loader rebuilt at a later epoch starts there
        return ResumableDataLoader(
            dataset,
            sampler=sampler,
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(sample_key(seed, 0, 0, STREAM_LOADER)),
            epoch_length=(lambda: trainer.num_training_batches) if trainer is not None else None,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The test split (``test_set``), else the validation split for data without another held-out one."""
        return self._eval_loader(self.test_set if self.test_set is not None else self.val_set)

    def predict_dataloader(self) -> DataLoader:
        """What ``lightning-kd predict`` runs on: the test split (batches of ``image`` and ``label``)."""
        return self.test_dataloader()
