"""ImageNet-style folders (``root/<class>/<image>``) through torchvision's ``ImageFolder``.

Training: ``RandomResizedCrop(image_size)``, horizontal flip, ImageNet normalisation. Validation:
``Resize(image_size * 256 / 224)`` (256 for 224) then ``CenterCrop(image_size)``, the same normalisation.
"""

from __future__ import annotations

import os

from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes

from lightning_kd.data.base import ClassificationDataModule, DictDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, image_size: int = 224) -> transforms.Compose:
    """The standard ImageNet transforms: random resized crop + flip for training, resize + centre crop
    for validation (short side ``image_size * 256 / 224``), then ``ToTensor`` and ImageNet normalisation.
    """
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``root/<class>/<image>`` folder pair (ImageNet's layout) as a LightningDataModule.

    The classes are the sub-folders of ``train_dir`` (sorted by name); ``val_dir`` must have the same ones.

    Args:
        train_dir: folder of the training images, one sub-folder per class.
        val_dir: folder of the validation images, same sub-folders.
        image_size: side of the crops fed to the networks (224 for ImageNet).
        batch_size: samples per batch (per device).
        num_workers: loader processes (default: :func:`~lightning_kd.data.base.default_num_workers`: cores - 1,
            at most 8, when training on a GPU; none on a CPU of up to 4 cores).
        return_index: add each training sample's index to the batch (``batch["index"]``).
        contrast_negatives: CRD's K: training batches also carry ``index`` and ``contrast_index``
            (B, K + 1); 0 = off. See :mod:`lightning_kd.data.contrast`.
        contrast_replacement: draw the negatives with replacement (see :class:`ClassificationDataModule`).
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
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            return_index=return_index,
            contrast_negatives=contrast_negatives,
            contrast_replacement=contrast_replacement,
        )
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.train_dir, self.val_dir, self.image_size = os.fspath(train_dir), os.fspath(val_dir), image_size
        self._classes: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        """The class names: the sub-folders of ``train_dir``, sorted."""
        if self._classes is None:
            if not os.path.isdir(self.train_dir):
                raise FileNotFoundError(
                    f"train_dir {self.train_dir!r} is not a folder: point it at a root/<class>/<image> tree"
                )
            self._classes = find_classes(self.train_dir)[0]
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The number of class sub-folders of ``train_dir``."""
        return len(self.classes)

    def make_dataset(self, train: bool) -> datasets.ImageFolder:
        """The ``ImageFolder`` of one split, with its transforms."""
        root = self.train_dir if train else self.val_dir
        return datasets.ImageFolder(root, transform=imagenet_transforms(train, self.image_size))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self.make_dataset(train=True), self.make_dataset(train=False)
        if val.class_to_idx != train.class_to_idx:
            missing = sorted(set(train.classes) ^ set(val.classes))
            raise ValueError(
                f"train_dir and val_dir must have the same class sub-folders; they differ in {missing[:10]} "
                f"({len(train.classes)} classes in {self.train_dir!r}, {len(val.classes)} in {self.val_dir!r})"
            )
        self._classes = list(train.classes)
        self.train_set = self.wrap_train(train, labels=train.targets)
        self.val_set = DictDataset(val)
