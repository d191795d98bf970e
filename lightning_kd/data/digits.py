"""The offline default: scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes).

They ship inside scikit-learn, so everything runs without a download. Images are upsampled to ``size``
(default 32, the CIFAR models' input), repeated to three channels and standardised; the training split
gets a light augmentation (a random shift of up to ``size // 8`` pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.base import ClassificationDataModule, DictDataset


class ShiftedImages(Dataset):
    """In-memory images with an optional random shift (zero padding then a random crop).

    Each shift is drawn from a generator seeded by ``(seed, epoch, index)``, not from the global random
    state, so a fit resumed inside an epoch augments exactly as an uninterrupted one (the sampler forwards
    the epoch through :meth:`set_epoch`).
    """

    def __init__(self, images: Tensor, labels: Tensor, max_shift: int = 0, seed: int = 0) -> None:
        self.images, self.labels, self.max_shift, self.seed = images, labels, max_shift, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.max_shift:
            s = self.max_shift
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(index))) & 0x7FFFFFFF)
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            padded = F.pad(image, (s, s, s, s))
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
        return image, self.labels[index]


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a fixed stratified train/validation split (the same for a given seed)."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(len(members) * val_fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's digits as a LightningDataModule (offline; the library's default data).

    Args:
        batch_size: samples per batch.
        size: side of the (square) images fed to the networks.
        val_fraction: share of each class held out for validation (a fixed stratified split).
        seed: seed of the split.
        augment: randomly shift training images by up to ``size // 8`` pixels.
        num_workers: loader processes (0 by default: the data lives in memory).
        return_index: add ``batch["index"]``.
        contrast_negatives: CRD's K: training batches also carry ``index`` and ``contrast_index``
            (B, K + 1); 0 = off. The training split has about 1,440 samples, so K of a few hundred suits it.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
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
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            return_index=return_index,
            contrast_negatives=contrast_negatives,
            contrast_replacement=contrast_replacement,
        )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if size < 8:
            raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
        self.size, self.val_fraction, self.seed, self.augment = size, val_fraction, seed, augment

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        """All images as a (N, 3, size, size) float tensor (standardised) and the labels (N,)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        images = (images - images.mean()) / images.std()
        return images.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
        shift = self.size // 8 if self.augment else 0
        self.train_set = self.wrap_train(
            ShiftedImages(images[train_idx], labels[train_idx], shift, seed=torch.initial_seed())
        )
        self.val_set = DictDataset(ShiftedImages(images[val_idx], labels[val_idx]))
