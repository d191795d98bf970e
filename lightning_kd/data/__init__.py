"""LightningDataModules: digits (offline default), CIFAR-100 and ImageNet-style folders. Batches are
dictionaries; every random draw of the training data is a function of ``(seed, epoch, index)``
(:mod:`lightning_kd.data.seeding`); the training loader resumes mid-epoch (:mod:`lightning_kd.data.sampling`);
CRD's contrastive indices come from :mod:`lightning_kd.data.contrast`."""

from lightning_kd.data.augment import (
    MLKDRandAugment,
    SeededViews,
    crop_flip_params,
    crop_flip_params_array,
    render_crop_flip,
    to_normalized_tensor,
)
from lightning_kd.data.base import ClassificationDataModule, DictDataset, default_num_workers
from lightning_kd.data.cifar import CIFAR100DataModule, CIFARViews
from lightning_kd.data.contrast import ContrastiveDataset, NegativeSampler, labels_of
from lightning_kd.data.digits import DigitsDataModule
from lightning_kd.data.imagefolder import ImageFolderDataModule
from lightning_kd.data.sampling import ResumableDataLoader, ResumableRandomSampler, UnpaddedDistributedSampler
from lightning_kd.data.seeding import sample_key, sample_keys, seeded_global_rng

__all__ = [
    "CIFAR100DataModule",
    "CIFARViews",
    "ClassificationDataModule",
    "ContrastiveDataset",
    "DictDataset",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MLKDRandAugment",
    "NegativeSampler",
    "ResumableDataLoader",
    "ResumableRandomSampler",
    "SeededViews",
    "UnpaddedDistributedSampler",
    "crop_flip_params",
    "crop_flip_params_array",
    "default_num_workers",
    "labels_of",
    "render_crop_flip",
    "sample_key",
    "sample_keys",
    "seeded_global_rng",
    "to_normalized_tensor",
]
