"""The offline default: scikit-learn's handwritten digits (1,797 grey images of 8x8 pixels, 10 classes).

They ship inside scikit-learn, so everything runs without a download. Images are upsampled to ``size``
(default 32, the CIFAR models' input), repeated to three channels and standardised. Fixed stratified splits
(train / validation / test, 60/20/20 by default) keep ``lightning-kd test`` off the validation images.

Training augmentation: a random shift of up to ``size // 8`` pixels (the picture moves, the uncovered border
takes the background value). Second view (``strong_view``, for MLKD): an independent shift of up to
``size // 4`` pixels, then Cutout, a square of side ``c * size`` (``c ~ U(0, 0.5)``, MLKD's range) with a
centre uniform over the image, painted with the background. No flips or rotations: digits are not symmetric
(a mirrored 2 is no 2). Every draw is a pure function of ``(seed, epoch, index)``. Training batches carry the
first view's parameters, as CIFAR's do: ``index``, ``crop_top``/``crop_left`` (the shift as the crop's corner in
the padded image) and ``flip`` (0), so a teacher-output cache (:mod:`lightning_kd.cache`) can serve them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.base import ClassificationDataModule, DictDataset
from lightning_kd.data.seeding import (
    STREAM_STRONG_AUGMENT,
    STREAM_STRONG_VIEW,
    STREAM_VIEW,
    SampleKey,
    key_uniform,
    sample_key,
    split_key,
)


def shift_image(image: Tensor, dy: int, dx: int, max_shift: int, fill: float) -> Tensor:
    """``image`` (C, H, W) padded by ``max_shift`` with ``fill`` and cropped back at ``(dy, dx)`` of the padded
    image (``dy, dx`` in ``0 .. 2 * max_shift``): the picture moves by ``(max_shift - dy, max_shift - dx)``."""
    if max_shift == 0:
        return image
    h, w = image.shape[1:]
    padded = F.pad(image, (max_shift,) * 4, value=fill)
    return padded[:, dy : dy + h, dx : dx + w]


class ShiftedImages(Dataset):
    """In-memory images with an optional random shift and an optional second view (shift + Cutout).

    Each shift is a pure function of ``(seed, epoch, index)`` (:func:`~lightning_kd.data.seeding.sample_key`):
    the training sampler passes ``(index, epoch, seed)`` keys; a bare index uses :attr:`epoch` (from
    :meth:`set_epoch`) and :attr:`seed`.

    Args:
        images: ``(N, C, H, W)`` float.
        labels: ``(N,)``.
        max_shift: the largest shift of the first view in pixels (0: none).
        seed: the data seed used for a bare index.
        fill: the value of the uncovered border and of Cutout (the images' background).
        strong_view: add ``image_strong``: a shift of up to ``strong_shift`` then Cutout (see the module).
        strong_shift: the largest shift of the second view (default ``2 * max_shift``, at least 1).
        view_params: items carry the first view's parameters (what a teacher-output cache is looked up by):
            ``index``, ``crop_top`` and ``crop_left`` (the crop's corner ``dy, dx`` in the padded image, in
            ``0 .. 2 * max_shift``; see :func:`shift_image`) and ``flip`` (always 0: digits are never mirrored).

    Items: ``(image, label)``; a dictionary ``{"image", "label"}`` plus ``image_strong`` with ``strong_view`` and
    the view parameters with ``view_params``.
    """

    keyed = True

    def __init__(self, images: Tensor, labels: Tensor, max_shift: int = 0, seed: int = 0, fill: float = 0.0,
                 strong_view: bool = False, strong_shift: int | None = None, view_params: bool = False) -> None:
        self.images, self.labels, self.max_shift, self.seed, self.fill = images, labels, max_shift, seed, fill
        self.strong_view, self.view_params = strong_view, view_params
        self.strong_shift = max(1, 2 * max_shift) if strong_shift is None else int(strong_shift)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def shift_params(key: int, max_shift: int) -> tuple[int, int]:
        """``(dy, dx)``, the crop's corner in the padded image, of the shift drawn from ``key``: with
        ``s = 2 * max_shift + 1`` views ``v = key mod s ** 2``, ``dy = v // s``, ``dx = v mod s``."""
        side = 2 * max_shift + 1
        v = key % (side * side)
        return v // side, v % side

    def _shifted(self, image: Tensor, key: int, max_shift: int) -> Tensor:
        return shift_image(image, *self.shift_params(key, max_shift), max_shift, self.fill)

    def strong(self, image: Tensor, index: int, epoch: int, seed: int) -> Tensor:
        """The second view of ``image``: shift, then Cutout painted with :attr:`fill`."""
        image = self._shifted(image, sample_key(seed, epoch, index, STREAM_STRONG_VIEW), self.strong_shift)
        key = sample_key(seed, epoch, index, STREAM_STRONG_AUGMENT)
        h, w = image.shape[1:]
        side = int(key_uniform(key, 1) * 0.5 * w)
        if side > 0:
            cy, cx = int(key_uniform(key, 2) * h), int(key_uniform(key, 3) * w)
            y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
            image = image.clone()
            image[:, y0 : y0 + side, x0 : x0 + side] = self.fill
        return image

    def __getitem__(self, key: SampleKey) -> Any:
        index, epoch, seed = split_key(key, self.epoch, self.seed)
        image = self.images[index]
        top, left = self.shift_params(sample_key(seed, epoch, index, STREAM_VIEW), self.max_shift)
        first = shift_image(image, top, left, self.max_shift, self.fill)
        if not (self.strong_view or self.view_params):
            return first, self.labels[index]
        sample: dict[str, Any] = {"image": first, "label": self.labels[index]}
        if self.view_params:
            sample.update(index=index, crop_top=top, crop_left=left, flip=0)
        if self.strong_view:
            sample["image_strong"] = self.strong(image, index, epoch, seed)
        return sample


def stratified_splits(labels: Tensor, fractions: list[float], seed: int) -> list[Tensor]:
    """Indices of fixed stratified held-out splits and of the rest: ``[rest, split_1, split_2, ...]``.

    In each class (a permutation from ``seed``) split ``k`` takes the next ``max(1, round(n_c * fraction_k))``
    samples (none for a fraction of 0), the rest is what remains; every list is sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            count = max(1, round(len(members) * fraction)) if fraction > 0 else 0
            parts[k].append(members[start : start + count])
            start += count
        if start >= len(members):
            raise ValueError(f"class {label} has {len(members)} samples: the held-out fractions {fractions} "
                             "leave none for training")
        parts[0].append(members[start:])
    return [torch.cat(part).sort().values if part else torch.empty(0, dtype=torch.long) for part in parts]


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a fixed stratified train/validation split (the same for a given seed)."""
    train, val = stratified_splits(labels, [val_fraction], seed)
    return train, val


def stratified_subset(labels: Tensor, size: int | float, seed: int) -> Tensor:
    """Positions (sorted) of a seeded stratified subset: ``size`` samples per class (an int), or that fraction
    of each class (a float in (0, 1], at least one sample per class)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if isinstance(size, int) and not isinstance(size, bool):
            if size > len(members):
                raise ValueError(f"train_subset={size} per class, but class {label} has only {len(members)} "
                                 "training samples: lower it or pass a fraction")
            count = size
        else:
            count = max(1, round(len(members) * float(size)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's digits as a LightningDataModule (offline; the library's default data).

    Splits: fixed and stratified by ``seed``: ``val_fraction`` of each class for validation, the next
    ``test_fraction`` for the test (``lightning-kd test`` and ``predict``), the rest for training (about
    1,080 images with the defaults); ``train_subset`` keeps only part of the training split.

    Args:
        batch_size: samples per batch.
        size: side of the (square) images fed to the networks.
        val_fraction: share of each class held out for validation.
        seed: seed of the splits and of the ``train_subset`` draw.
        augment: randomly shift training images by up to ``size // 8`` pixels.
        num_workers: loader processes (0 by default: the data live in memory).
        return_index: add ``batch["index"]``.
        contrast_negatives: CRD's K: training batches also carry ``index`` and ``contrast_index``
            (B, K + 1); 0 = off. The training split has about 1,080 samples, so K of a few hundred suits it.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
        test_fraction: share of each class held out for the test; 0: no test split (test and predict then
            use the validation split).
        train_subset: labelled training images to keep: an int per class, or a float fraction of each class;
            a seeded stratified draw from the training split (``None``: all of it). ``index`` then counts in
            the subset.
        strong_view: add ``image_strong``, a second view (larger shift + Cutout, see the module docstring).
        drop_last, data_seed: see :class:`~lightning_kd.data.base.ClassificationDataModule`.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        augment: bool = True,
        num_workers: int | None = 0,
        return_index: bool = False,
        contrast_negatives: int = 0,
        contrast_replacement: bool = True,
        test_fraction: float = 0.2,
        train_subset: int | float | None = None,
        strong_view: bool = False,
        drop_last: bool = True,
        data_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            return_index=return_index,
            contrast_negatives=contrast_negatives,
            contrast_replacement=contrast_replacement,
            drop_last=drop_last,
            data_seed=data_seed,
        )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"test_fraction must be in [0, 1) and leave training data with val_fraction "
                             f"({val_fraction}): got {test_fraction}")
        if size < 8:
            raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
        if train_subset is not None and not isinstance(train_subset, bool):
            if isinstance(train_subset, int) and train_subset < 1:
                raise ValueError(f"train_subset as a count per class must be >= 1, got {train_subset}")
            if isinstance(train_subset, float) and not 0 < train_subset <= 1:
                raise ValueError(f"train_subset as a fraction must be in (0, 1], got {train_subset}")
        elif isinstance(train_subset, bool):
            raise ValueError(f"train_subset must be a count per class, a fraction or None, got {train_subset}")
        self.size, self.val_fraction, self.seed, self.augment = size, val_fraction, seed, augment
        self.test_fraction, self.train_subset, self.strong_view = test_fraction, train_subset, strong_view

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        """All images as a (N, 3, size, size) float tensor (standardised) and the labels (N,)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        images = (images - images.mean()) / images.std()
        return images.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)

    def split_indices(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Dataset indices of the training (after ``train_subset``), validation and test splits."""
        train, val, test = stratified_splits(labels, [self.val_fraction, self.test_fraction], self.seed)
        if self.train_subset is not None:
            train = train[stratified_subset(labels[train], self.train_subset, self.seed + 1)]
        return train, val, (test if self.test_fraction > 0 else None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        background = float(images.min())  # blank paper: a pixel of value 0 before standardising
        train_idx, val_idx, test_idx = self.split_indices(labels)
        shift = self.size // 8 if self.augment else 0
        train = ShiftedImages(images[train_idx], labels[train_idx], shift, seed=self.resolved_seed(),
                              fill=background, strong_view=self.strong_view, strong_shift=self.size // 4,
                              view_params=True)
        self.train_set = self.wrap_train(train, labels=labels[train_idx])
        self.val_set = DictDataset(ShiftedImages(images[val_idx], labels[val_idx]))
        self.test_set = DictDataset(ShiftedImages(images[test_idx], labels[test_idx])) if test_idx is not None else None
