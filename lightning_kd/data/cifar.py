"""CIFAR-100 (Krizhevsky 2009) with the CRD benchmark's augmentation, exact and reproducible.

Training view: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` with the
CIFAR-100 mean and std, as the reference; but the crop corner and the flip are a pure function of
``(seed, epoch, index)`` (:func:`~lightning_kd.data.augment.crop_flip_params`) instead of draws from a
worker's generator, and the training batch carries them: ``index``, ``crop_top``, ``crop_left`` (0..8, in the
padded image) and ``flip`` (0/1), int64 ``(B,)``. The pixels are bit-identical to torchvision's pipeline
with those parameters, so a teacher-output cache can be looked up by ``(index, crop_top, crop_left, flip)``.

``strong_view=True`` adds MLKD's second view (``image_strong``): its own crop + flip (keyed apart from the
first), :class:`~lightning_kd.data.augment.MLKDRandAugment` (2 of 14 operations, Cutout), ToTensor, Normalize.

The data are read from ``<data_dir>/cifar-100-python/{train,test,meta}`` (torchvision's layout), extracted
from ``<data_dir>/cifar-100-python.tar.gz`` when only the archive is there, or downloaded (``download=True``).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from lightning_kd.data.augment import (
    MLKDRandAugment,
    crop_flip_params,
    normalization,
    render_crop_flip,
    to_normalized_tensor,
)
from lightning_kd.data.base import ClassificationDataModule, DictDataset
from lightning_kd.data.seeding import STREAM_STRONG_AUGMENT, SampleKey, sample_key, split_key

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR_PADDING = 4


def cifar100_transforms(train: bool) -> transforms.Compose:
    """The reference transforms as torchvision writes them (crop + flip for training, normalisation for both).

    The data module does not use them for training (it draws the same views from explicit parameters, see
    :class:`CIFARViews`); they are kept for comparisons and for code that wants torchvision's pipeline.
    """
    steps = [transforms.RandomCrop(32, padding=CIFAR_PADDING), transforms.RandomHorizontalFlip()] if train else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    return transforms.Compose(steps)


class CIFARViews(Dataset):
    """In-memory uint8 images with the CIFAR training views drawn from explicit, keyed parameters.

    Args:
        images: ``(N, H, W, 3)`` uint8 (torchvision's ``CIFAR100.data``).
        labels: ``(N,)`` class indices.
        augment: draw the crop + flip view (training); ``False``: normalise only (evaluation).
        strong_view: add ``image_strong``, MLKD's second view (needs ``augment``).
        seed: the data seed used for a bare index (the training sampler passes ``(index, epoch, seed)`` keys).
        mean, std: the normalisation (default: CIFAR-100's).
        padding: the crop's zero padding (4).

    Items: ``{"image": (3, H, W) float32, "label"}``, plus with ``augment`` ``crop_top``, ``crop_left``, ``flip``
    (ints, batched to int64 ``(B,)``), plus ``image_strong`` with ``strong_view``.
    """

    keyed = True

    def __init__(self, images: np.ndarray, labels: Any, augment: bool = True, strong_view: bool = False,
                 seed: int = 0, mean: tuple[float, ...] = CIFAR100_MEAN, std: tuple[float, ...] = CIFAR100_STD,
                 padding: int = CIFAR_PADDING) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a (N, H, W, C) uint8 array, got {images.dtype} {images.shape}")
        if strong_view and not augment:
            raise ValueError("strong_view needs augment=True (the second view is a training view)")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(self.labels) != len(images):
            raise ValueError(f"got {len(self.labels)} labels for {len(images)} images")
        self.augment, self.strong_view, self.padding = augment, strong_view, padding
        self.mean, self.std = normalization(mean, std)
        self.randaugment = MLKDRandAugment(num_ops=2, max_cutout=0.5)
        self.seed, self.epoch = int(seed), 0

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, epoch, seed = split_key(key, self.epoch, self.seed)
        image = self.images[index]
        sample: dict[str, Any] = {"label": self.labels[index]}
        if not self.augment:
            sample["image"] = to_normalized_tensor(image, self.mean, self.std)
            return sample
        top, left, flip = crop_flip_params(seed, epoch, index, view=0, padding=self.padding)
        sample["image"] = to_normalized_tensor(render_crop_flip(image, top, left, flip, self.padding),
                                               self.mean, self.std)
        sample.update(crop_top=top, crop_left=left, flip=flip)
        if self.strong_view:
            top, left, flip = crop_flip_params(seed, epoch, index, view=1, padding=self.padding)
            strong = Image.fromarray(render_crop_flip(image, top, left, flip, self.padding))
            rng = random.Random(sample_key(seed, epoch, index, STREAM_STRONG_AUGMENT))
            strong = np.asarray(self.randaugment.apply(strong, rng))
            sample["image_strong"] = to_normalized_tensor(strong, self.mean, self.std)
        return sample


def _missing_message(data_dir: str, reason: str) -> str:
    return (f"CIFAR-100 is not in {data_dir!r} and {reason}: put the extracted files in "
            f"{os.path.join(data_dir, 'cifar-100-python')}/{{train,test,meta}} or the archive "
            f"cifar-100-python.tar.gz in {data_dir!r} (from https://www.cs.toronto.edu/~kriz/cifar.html).")


class CIFAR100DataModule(ClassificationDataModule):
    """CIFAR-100 as a LightningDataModule.

    Training batches: ``image``, ``label``, ``index``, ``crop_top``, ``crop_left``, ``flip`` (see the module
    docstring), ``image_strong`` with ``strong_view``, ``contrast_index`` with ``contrast_negatives``.
    Validation, test and predict: the 10,000 test images (CIFAR-100 has no other held-out split; the
    reference benchmark reports accuracy on it).

    Args:
        data_dir: where the dataset is (or will be downloaded).
        batch_size: samples per batch (reference: 64).
        num_workers: loader processes (default: :func:`~lightning_kd.data.base.default_num_workers`).
        return_index: kept for compatibility: CIFAR training batches always carry ``index``.
        download: fetch the data if they are not in ``data_dir``.
        contrast_negatives: CRD's K (reference 16384); 0 = off. See :mod:`lightning_kd.data.contrast`.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
        strong_view: add MLKD's second, strongly augmented view ``image_strong`` to training batches.
        drop_last, data_seed: see :class:`~lightning_kd.data.base.ClassificationDataModule`.
    """

    num_classes = 100

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int | None = None,
        return_index: bool = False,
        download: bool = True,
        contrast_negatives: int = 0,
        contrast_replacement: bool = True,
        strong_view: bool = False,
        drop_last: bool = True,
        data_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            return_index=True,
            contrast_negatives=contrast_negatives,
            contrast_replacement=contrast_replacement,
            drop_last=drop_last,
            data_seed=data_seed,
        )
        self.data_dir, self.download, self.strong_view = os.fspath(data_dir), download, strong_view

    def _archive(self) -> str:
        return os.path.join(self.data_dir, datasets.CIFAR100.filename)

    def _present(self) -> bool:
        folder = os.path.join(self.data_dir, datasets.CIFAR100.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name in ("train", "test", "meta"))

    def prepare_data(self) -> None:
        """Make the extracted files available: extract the archive when only it is there, else download
        (``download=True``); a clear error when neither works."""
        if self._present():
            return
        if os.path.isfile(self._archive()):
            from torchvision.datasets.utils import check_integrity, extract_archive

            if not check_integrity(self._archive(), datasets.CIFAR100.tgz_md5):
                raise RuntimeError(
                    f"{self._archive()!r} is not the CIFAR-100 archive (its md5 differs from "
                    f"{datasets.CIFAR100.tgz_md5}): replace it with cifar-100-python.tar.gz from "
                    "https://www.cs.toronto.edu/~kriz/cifar.html or remove it"
                )
            extract_archive(self._archive(), self.data_dir)
            return
        if not self.download:
            return  # setup() says what is missing
        try:
            datasets.CIFAR100(self.data_dir, train=True, download=True)
        except OSError as error:  # URLError, HTTPError, socket timeouts, a full disk
            raise FileNotFoundError(
                _missing_message(self.data_dir, f"could not be downloaded ({type(error).__name__}: {error})")
            ) from error

    def make_dataset(self, train: bool) -> Dataset:
        """The raw split, a dataset with ``data`` ``(N, 32, 32, 3)`` uint8 and ``targets`` (torchvision's
        ``CIFAR100`` without transforms). Override it to feed other arrays through the same pipeline."""
        if not self._present():
            reason = "download=False" if not self.download else "prepare_data() has not fetched it"
            raise FileNotFoundError(_missing_message(self.data_dir, reason))
        return datasets.CIFAR100(self.data_dir, train=train, download=False)

    def _views(self, train: bool, augment: bool, strong: bool = False) -> CIFARViews:
        raw = self.make_dataset(train)
        images, targets = getattr(raw, "data", None), getattr(raw, "targets", None)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or targets is None:
            raise TypeError(
                f"{type(self).__name__}.make_dataset must return a dataset with 'data', a (N, H, W, 3) uint8 "
                f"array, and 'targets' (torchvision's CIFAR100 layout); got {type(raw).__name__}"
            )
        return CIFARViews(images, targets, augment=augment, strong_view=strong, seed=self.resolved_seed())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._views(train=True, augment=True, strong=self.strong_view)
        self.train_set = self.wrap_train(train, labels=train.labels)
        self.val_set = DictDataset(self._views(train=False, augment=False))
        self.test_set = self.val_set
