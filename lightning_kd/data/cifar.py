"""CIFAR-100 (Krizhevsky 2009) through torchvision, with the CRD benchmark's augmentation.

Downloads into ``data_dir`` on first use (``download=True``); the reference augmentation is a random crop
of 32 with padding 4 and a horizontal flip, then normalisation with the CIFAR-100 mean and std.
"""

from __future__ import annotations

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from lightning_kd.data.base import ClassificationDataModule, DictDataset

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def cifar100_transforms(train: bool) -> transforms.Compose:
    """The reference transforms: crop + flip for training, normalisation for both splits."""
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    return transforms.Compose(steps)


class CIFAR100DataModule(ClassificationDataModule):
    """CIFAR-100 as a LightningDataModule.

    Args:
        data_dir: where the dataset is (or will be downloaded).
        batch_size: samples per batch (reference: 64).
        num_workers: loader processes (default: :func:`~lightning_kd.data.base.default_num_workers`: cores - 1,
            at most 8, when training on a GPU; none on a CPU of up to 4 cores).
        return_index: add each training sample's index to the batch (``batch["index"]``).
        download: fetch the data if it is not in ``data_dir``.
        contrast_negatives: CRD's K (reference 16384): training batches also carry ``index`` and
            ``contrast_index`` (B, K + 1); 0 = off. See :mod:`lightning_kd.data.contrast`.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
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
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            return_index=return_index,
            contrast_negatives=contrast_negatives,
            contrast_replacement=contrast_replacement,
        )
        self.data_dir, self.download = data_dir, download

    def prepare_data(self) -> None:
        if self.download:
            datasets.CIFAR100(self.data_dir, train=True, download=True)
            datasets.CIFAR100(self.data_dir, train=False, download=True)

    def make_dataset(self, train: bool) -> Dataset:
        """The raw torchvision dataset of one split, with its transforms."""
        return datasets.CIFAR100(self.data_dir, train=train, transform=cifar100_transforms(train), download=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self.wrap_train(self.make_dataset(train=True))
        self.val_set = DictDataset(self.make_dataset(train=False))
