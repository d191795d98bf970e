"""LightningDataModules: digits (offline default), CIFAR-100 and ImageNet-style folders. Batches are
dictionaries; CRD's contrastive indices come from :mod:`lightning_kd.data.contrast`."""

from lightning_kd.data.base import ClassificationDataModule, DictDataset
from lightning_kd.data.cifar import CIFAR100DataModule
from lightning_kd.data.contrast import ContrastiveDataset, NegativeSampler, labels_of
from lightning_kd.data.digits import DigitsDataModule
from lightning_kd.data.imagefolder import ImageFolderDataModule

__all__ = [
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "ContrastiveDataset",
    "DictDataset",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "NegativeSampler",
    "labels_of",
]
