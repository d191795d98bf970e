"""The view space of a training set: every view its augmentation can draw, rendered in bulk, and its identity.

A teacher-output cache is exact only for augmentations with a finite set of views whose parameters travel in the
batch (METHODS-MODERN 9.3):

- ``crop_flip`` (:class:`~lightning_kd.data.CIFARViews`): ``RandomCrop(H, padding=p)`` + horizontal flip,
  ``(2p + 1)^2 * 2`` views per image (162 for CIFAR's padding 4), pixels as
  :func:`~lightning_kd.data.render_crop_flip` then ``ToTensor`` + ``Normalize``
  (:func:`~lightning_kd.data.to_normalized_tensor`);
- ``shift`` (the digits' :class:`~lightning_kd.data.digits.ShiftedImages`): a shift of up to ``m`` pixels,
  ``(2m + 1)^2`` views (25 at size 16), no flip.

A view is ``(index, crop_top, crop_left, flip)``, the keys the training batches carry; the cache stores them in a
dense ``[N, 2p + 1, 2p + 1, flips, C]`` array. :meth:`ViewSpace.render` draws views of many images at once with
the same arithmetic as the datasets draw one, so the pixels are bit-identical (``tests/test_cache.py``).

Continuous augmentations (``RandomResizedCrop``, RandAugment, any transform of
:class:`~lightning_kd.data.SeededViews`, as the ImageFolder data use) have no finite view set: they are refused
(:class:`CacheUnsupportedError`). FKD's approximate mode (a stored pool of sampled crops per image, Shen & Xing
2022) is not built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.checkpoints import CheckpointError

#: the batch keys a cached view is looked up by, in the order of the array's dimensions
VIEW_KEYS = ("index", "crop_top", "crop_left", "flip")


class TeacherCacheError(CheckpointError):
    """A teacher-output cache cannot be built or used: mismatched, incomplete, damaged, or not exact here."""


class CacheUnsupportedError(TeacherCacheError):
    """The data's augmentation has no finite set of views, or its batches do not carry the view parameters."""


@dataclass
class ViewSpace:
    """Every training view of a dataset: the augmentation's spec and a bulk renderer.

    Attributes:
        kind: ``"crop_flip"`` or ``"shift"``.
        padding: ``p``: the crop corner ``(crop_top, crop_left)`` ranges over ``0 .. 2p`` in the padded image.
        flips: 2 when a view may be mirrored, else 1.
        crop_size: ``(H, W)`` of a view.
        mean, std: the normalisation after ``ToTensor`` (``crop_flip``), ``None`` for data stored normalised.
        fill: the padding's value (uint8 0 for ``crop_flip``; the background for ``shift``).
        images: ``(N, H, W, C)`` uint8 (``crop_flip``) or ``(N, C, H, W)`` float (``shift``).
        labels: ``(N,)`` long.
        source: the dataset's class name (informational).
    """

    kind: str
    padding: int
    flips: int
    crop_size: tuple[int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    fill: float
    images: Any
    labels: Tensor
    source: str

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def view_shape(self) -> tuple[int, int, int]:
        """``(tops, lefts, flips)``: the view dimensions of the cache array."""
        side = 2 * self.padding + 1
        return side, side, self.flips

    @property
    def views_per_image(self) -> int:
        return int(np.prod(self.view_shape))

    def spec(self) -> dict[str, Any]:
        """The augmentation as plain data (the manifest's ``augmentation``): what makes a view's pixels."""
        return {
            "kind": self.kind,
            "padding": self.padding,
            "flips": self.flips,
            "crop_size": list(self.crop_size),
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "fill": self.fill,
        }

    def fingerprint(self) -> str:
        """sha256 of the raw training images and labels (dtype, shape and bytes of each)."""
        digest = hashlib.sha256()
        for array in (_as_numpy(self.images), _as_numpy(self.labels.to(torch.int64))):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}:{array.shape};".encode())
            digest.update(memoryview(array.reshape(-1).view(np.uint8)))
        return digest.hexdigest()

    def render(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """Every view of the images ``indices``: ``(len(indices) * V, C, H, W)`` float32, in the cache's order
        (image, then ``crop_top``, ``crop_left``, ``flip``), pixel for pixel what the dataset draws."""
        idx = np.asarray(indices, dtype=np.int64)
        p, (h, w) = self.padding, self.crop_size
        side = 2 * p + 1
        if self.kind == "crop_flip":
            raw = torch.from_numpy(np.ascontiguousarray(self.images[idx])).permute(0, 3, 1, 2)  # (n, C, H, W) uint8
            padded = F.pad(raw, (p, p, p, p))  # zeros, as render_crop_flip
        else:
            padded = F.pad(torch.as_tensor(self.images[torch.as_tensor(idx)]), (p, p, p, p), value=self.fill)
        views = []
        for top in range(side):
            for left in range(side):
                crop = padded[:, :, top : top + h, left : left + w]
                views.append(crop)
                if self.flips == 2:
                    views.append(crop.flip(-1))
        out = torch.stack(views, dim=1).flatten(0, 1)  # (n * V, C, H, W)
        if self.kind == "crop_flip":  # ToTensor then Normalize, in to_normalized_tensor's arithmetic
            mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            out = out.to(torch.float32).div(255).sub_(mean).div_(std)
        return out.contiguous()


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


def training_dataset(source: Any) -> Any:
    """The training dataset of a data module (set up when needed), or ``source`` itself when it is a dataset."""
    if hasattr(source, "train_set") and hasattr(source, "setup"):
        if source.train_set is None:
            source.setup("fit")
        return source.train_set
    return source


def view_space(source: Any) -> ViewSpace:
    """The :class:`ViewSpace` of a data module's (or a dataset's) training views.

    Raises:
        CacheUnsupportedError: continuous augmentations (no exact cache exists), or batches without view
            parameters.
    """
    from lightning_kd.data.augment import SeededViews
    from lightning_kd.data.cifar import CIFARViews
    from lightning_kd.data.digits import ShiftedImages

    dataset = training_dataset(source)
    name = type(source).__name__
    inner = dataset
    while not isinstance(inner, (CIFARViews, ShiftedImages, SeededViews)) and hasattr(inner, "dataset"):
        inner = inner.dataset
    if isinstance(inner, CIFARViews):
        if not inner.augment:
            raise CacheUnsupportedError(f"{name}'s training set has augment=False: its batches carry no view "
                                        "parameters (crop_top, crop_left, flip), so a cache cannot be looked up")
        h, w = inner.images.shape[1:3]
        return ViewSpace("crop_flip", int(inner.padding), 2, (int(h), int(w)),
                         tuple(float(v) for v in inner.mean.flatten()), tuple(float(v) for v in inner.std.flatten()),
                         0.0, inner.images, inner.labels, name)
    if isinstance(inner, ShiftedImages):
        if not inner.view_params:
            raise CacheUnsupportedError(f"{name}'s training set does not put the view parameters in its batches "
                                        "(ShiftedImages(view_params=True)): a cache cannot be looked up")
        h, w = inner.images.shape[2:]
        return ViewSpace("shift", int(inner.max_shift), 1, (int(h), int(w)), None, None, float(inner.fill),
                         inner.images, torch.as_tensor(inner.labels, dtype=torch.long), name)
    if isinstance(inner, SeededViews):
        raise CacheUnsupportedError(
            f"{name} draws its training views with continuous augmentations (transforms such as RandomResizedCrop "
            "or RandAugment, through SeededViews): they have no finite set of views, so no exact teacher-output "
            "cache exists. FKD's approximate mode (a stored pool of sampled crops per image) is not built: "
            "train with the live teacher (leave teacher_cache unset)"
        )
    raise CacheUnsupportedError(
        f"{name}: its training batches carry no view parameters (index, crop_top, crop_left, flip) that a cache "
        "could be looked up by. Supported: CIFAR100DataModule (crop + flip) and DigitsDataModule (shift)"
    )
