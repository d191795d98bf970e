"""ImageNet-style folders (``root/<class>/<image>``) through torchvision's ``ImageFolder``.

Default training view: ``RandomResizedCrop(image_size)``, horizontal flip, ``ToTensor``, ImageNet
normalisation. Evaluation: ``Resize(image_size * 256 / 224)`` (256 for 224) then ``CenterCrop(image_size)``, the
same normalisation. Second view (``strong_view``, MLKD's ImageNet recipe): ``RandomResizedCrop`` + flip +
:class:`~lightning_kd.data.augment.MLKDRandAugment` (2 operations, Cutout) + ``ToTensor`` + normalisation.

Every training transform runs seeded by ``(seed, epoch, index)`` (:class:`~lightning_kd.data.augment.SeededViews`),
so any torchvision transform, or a user's, gives the same image in any worker and after a resume. The
transforms can be replaced, from Python or from a YAML config; in a config use ``torchvision.transforms.v2``
(its classes have typed arguments, which the command line needs)::

    data:
      class_path: lightning_kd.data.ImageFolderDataModule
      init_args:
        train_dir: /data/imagenet/train
        val_dir: /data/imagenet/val
        train_transform:
          class_path: torchvision.transforms.v2.Compose
          init_args:
            transforms:
              - {class_path: torchvision.transforms.v2.RandomResizedCrop, init_args: {size: 224}}
              - class_path: torchvision.transforms.v2.RandomHorizontalFlip
              - class_path: torchvision.transforms.v2.PILToTensor
              - {class_path: torchvision.transforms.v2.ToDtype, init_args: {dtype: torch.float32, scale: true}}
              - {class_path: torchvision.transforms.v2.Normalize,
                 init_args: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes

from lightning_kd.data.augment import MLKDRandAugment, SeededViews
from lightning_kd.data.base import ClassificationDataModule, DictDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, image_size: int = 224) -> transforms.Compose:
    """The standard ImageNet transforms: random resized crop + flip for training, resize + centre crop
    for evaluation (short side ``image_size * 256 / 224``), then ``ToTensor`` and ImageNet normalisation.
    """
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def imagenet_strong_transform(image_size: int = 224) -> transforms.Compose:
    """MLKD's strong ImageNet view: ``RandomResizedCrop`` + flip + RandAugment(2) with Cutout + normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), MLKDRandAugment(num_ops=2),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _check_folder(name: str, path: str) -> None:
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a folder"
        raise FileNotFoundError(
            f"{name} {path!r} {what}: point it at a root/<class>/<image> tree (one sub-folder per class)"
        )
    try:
        find_classes(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{name} {path!r} has no class sub-folders: expected root/<class>/<image> ({error})"
        ) from error


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``root/<class>/<image>`` folders (ImageNet's layout) as a LightningDataModule.

    The classes are the sub-folders of ``train_dir`` (sorted by name); ``val_dir`` (and ``test_dir``) must have
    the same ones.

    Args:
        train_dir: folder of the training images, one sub-folder per class.
        val_dir: folder of the validation images, same sub-folders.
        image_size: side of the crops fed to the networks (224 for ImageNet).
        batch_size: samples per batch (per device).
        num_workers: loader processes (default: :func:`~lightning_kd.data.base.default_num_workers`).
        return_index: add each training sample's index to the batch (``batch["index"]``).
        contrast_negatives: CRD's K: training batches also carry ``index`` and ``contrast_index``
            (B, K + 1); 0 = off. See :mod:`lightning_kd.data.contrast`.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
        test_dir: folder of the test images (``lightning-kd test`` and ``predict``); ``None``: ``val_dir``.
        train_transform: PIL image -> training tensor (default :func:`imagenet_transforms` ``(True)``); run
            seeded per sample.
        eval_transform: PIL image -> evaluation tensor (default :func:`imagenet_transforms` ``(False)``).
        strong_view: add ``image_strong``, a second training view drawn independently of the first.
        strong_transform: the second view's transform (default :func:`imagenet_strong_transform`).
        drop_last, data_seed: see :class:`~lightning_kd.data.base.ClassificationDataModule`.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int | None = None,
        return_index: bool = False,
        contrast_negatives: int = 0,
        contrast_replacement: bool = True,
        test_dir: str | None = None,
        train_transform: Callable[[Any], Any] | None = None,
        eval_transform: Callable[[Any], Any] | None = None,
        strong_view: bool = False,
        strong_transform: Callable[[Any], Any] | None = None,
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
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.train_dir, self.val_dir, self.image_size = os.fspath(train_dir), os.fspath(val_dir), image_size
        self.test_dir = os.fspath(test_dir) if test_dir is not None else None
        self.train_transform = train_transform if train_transform is not None else imagenet_transforms(True, image_size)
        self.eval_transform = eval_transform if eval_transform is not None else imagenet_transforms(False, image_size)
        self.strong_view = strong_view
        self.strong_transform = (strong_transform if strong_transform is not None
                                 else imagenet_strong_transform(image_size))
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        """The class names: the sub-folders of ``train_dir``, sorted."""
        if self._classes is None:
            _check_folder("train_dir", self.train_dir)
            self._classes = find_classes(self.train_dir)[0]
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The number of class sub-folders of ``train_dir``."""
        return len(self.classes)

    def make_dataset(self, train: bool, root: str | None = None) -> datasets.ImageFolder:
        """The ``ImageFolder`` of one split: raw PIL images for training (the views are applied seeded, see
        :class:`~lightning_kd.data.augment.SeededViews`), ``eval_transform`` applied for evaluation."""
        root = root if root is not None else (self.train_dir if train else self.val_dir)
        return datasets.ImageFolder(root, transform=None if train else self.eval_transform)

    def _held_out(self, name: str, root: str, train: datasets.ImageFolder) -> DictDataset:
        _check_folder(name, root)
        dataset = self.make_dataset(train=False, root=root)
        if dataset.class_to_idx != train.class_to_idx:
            differing = sorted(set(train.classes) ^ set(dataset.classes))
            raise ValueError(
                f"train_dir and {name} must have the same class sub-folders; they differ in {differing[:10]} "
                f"({len(train.classes)} classes in {self.train_dir!r}, {len(dataset.classes)} in {root!r})"
            )
        return DictDataset(dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        _check_folder("train_dir", self.train_dir)
        raw = self.make_dataset(train=True)
        views = {"image": self.train_transform}
        if self.strong_view:
            views["image_strong"] = self.strong_transform
        self.val_set = self._held_out("val_dir", self.val_dir, raw)
        self.test_set = self._held_out("test_dir", self.test_dir, raw) if self.test_dir is not None else None
        self._classes = list(raw.classes)
        self.train_set = self.wrap_train(SeededViews(raw, views, seed=self.resolved_seed()), labels=raw.targets)
