"""Augmentations whose randomness is a function of ``(seed, epoch, index)``.

- CIFAR's crop + flip (``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip``) with explicit parameters:
  :func:`crop_flip_params` maps ``(seed, epoch, index)`` to ``(top, left, flip)``, :func:`render_crop_flip`
  draws that view from a uint8 image, :func:`to_normalized_tensor` does ``ToTensor`` + ``Normalize`` in
  torchvision's order. Bit-identical to torchvision's pipeline given the same parameters (see
  ``tests/test_data_views.py``), so a teacher-output cache keyed by ``(index, top, left, flip)`` serves exactly
  the inputs the live teacher would see.
- MLKD's strong view (Jin et al., "Multi-Level Logit Distillation", CVPR 2023, dataset/cifar100.py of the
  official code): :class:`MLKDRandAugment`, two of 14 PIL operations drawn with replacement, each with a
  magnitude uniform in its range, then Cutout.
- :class:`SeededViews`: any transforms (torchvision's, a user's) applied under
  :func:`~lightning_kd.data.seeding.seeded_global_rng`, so that they too are functions of the sample key.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.seeding import (
    STREAM_STRONG_VIEW,
    STREAM_TRANSFORM,
    STREAM_VIEW,
    SampleKey,
    sample_key,
    sample_keys,
    seeded_global_rng,
    split_key,
)

# ----------------------------------------------------------------------------------------------------------
# CIFAR's crop + flip with explicit parameters
# ----------------------------------------------------------------------------------------------------------


def _view_stream(view: int) -> int:
    if view not in (0, 1):
        raise ValueError(f"view must be 0 (the first, weak view) or 1 (the second, strong view), got {view}")
    return STREAM_VIEW if view == 0 else STREAM_STRONG_VIEW


def crop_flip_params(seed: int, epoch: int, index: int, view: int = 0, padding: int = 4) -> tuple[int, int, int]:
    """``(top, left, flip)`` of a sample's random crop and flip: a pure function of its arguments.

    ``RandomCrop(size, padding)`` draws the corner of the crop in the padded image uniformly among
    ``(2 * padding + 1) ** 2`` positions (``top``, ``left`` in ``0 .. 2 * padding``) and the flip is a fair coin:
    here the ``2 * (2 * padding + 1) ** 2`` views (162 for padding 4) are numbered ``v = key mod 162``,
    ``top = v // 18``, ``left = (v // 2) mod 9``, ``flip = v mod 2``, with ``key`` the sample's 64-bit key
    (:func:`~lightning_kd.data.seeding.sample_key`; the modulo's bias is below 1e-17).

    Args:
        seed, epoch, index: the data seed, the epoch and the sample's dataset index.
        view: 0 for the (weak) training view, 1 for MLKD's second view (drawn independently).
        padding: the zero padding on each side (CIFAR: 4).
    """
    side = 2 * padding + 1
    v = sample_key(seed, epoch, index, _view_stream(view)) % (2 * side * side)
    return v // (2 * side), (v // 2) % side, v & 1


def crop_flip_params_array(
    seed: int, epoch: int, indices: Any, view: int = 0, padding: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`crop_flip_params` for an array of indices at once: ``(top, left, flip)`` int64 arrays."""
    side = 2 * padding + 1
    v = (sample_keys(seed, epoch, indices, _view_stream(view)) % np.uint64(2 * side * side)).astype(np.int64)
    return v // (2 * side), (v // 2) % side, v & 1


def render_crop_flip(image: np.ndarray, top: int, left: int, flip: int | bool, padding: int = 4) -> np.ndarray:
    """One view of a uint8 ``(H, W, C)`` image: zero-pad by ``padding``, crop ``(H, W)`` at ``(top, left)`` of
    the padded image, mirror left-right when ``flip``. Returns a new contiguous ``(H, W, C)`` uint8 array.

    The same pixels as torchvision's ``pad(img, padding)``, ``crop(img, top, left, H, W)``, ``hflip(img)``.
    """
    h, w = image.shape[:2]
    side = 2 * padding + 1
    if not (0 <= top < side and 0 <= left < side):
        raise ValueError(f"top and left must be in 0..{side - 1} for padding {padding}, got ({top}, {left})")
    out = np.zeros_like(image)
    dy, dx = top - padding, left - padding  # the crop's origin in the unpadded image
    y0, y1 = max(0, dy), min(h, h + dy)
    x0, x1 = max(0, dx), min(w, w + dx)
    out[y0 - dy : y1 - dy, x0 - dx : x1 - dx] = image[y0:y1, x0:x1]
    if flip:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def to_normalized_tensor(image: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    """``ToTensor`` then ``Normalize`` of a uint8 ``(H, W, C)`` array, in torchvision's order and arithmetic:
    ``x = uint8 / 255`` in float32, then ``(x - mean) / std`` (``mean``, ``std``: float32 ``(C, 1, 1)``).
    Returns ``(C, H, W)`` float32.
    """
    if not image.flags.writeable:  # a PIL image's buffer or a read-only memory map: torch wants writable memory
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)
    return x.sub_(mean).div_(std)


def normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as float32 ``(C, 1, 1)`` tensors, as ``transforms.Normalize`` makes them."""
    return (torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1))


# ----------------------------------------------------------------------------------------------------------
# MLKD's RandAugment + Cutout
# ----------------------------------------------------------------------------------------------------------


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coefficients)


#: MLKD's 14 operations: (name, operation(img, v), low, high); v is drawn uniformly in [low, high).
#: Enhancement factors below 1 only (0.05..0.95); rotation in degrees, counter-clockwise for v > 0;
#: shears and translations (a fraction of the width/height) signed; nearest-neighbour resampling, black fill.
MLKD_OPERATIONS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    ("AutoContrast", lambda img, v: ImageOps.autocontrast(img), 0.0, 1.0),
    ("Brightness", lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    ("Color", lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    ("Contrast", lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    ("Equalize", lambda img, v: ImageOps.equalize(img), 0.0, 1.0),
    ("Identity", lambda img, v: img, 0.0, 1.0),
    ("Posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4.0, 8.0),
    ("Rotate", lambda img, v: img.rotate(v), -30.0, 30.0),
    ("Sharpness", lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    ("ShearX", lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("ShearY", lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0.0, 256.0),
    ("TranslateX", lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    ("TranslateY", lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
)

#: MLKD's Cutout fill (the CIFAR mean in 0..255)
CUTOUT_FILL = (125, 123, 114)


def cutout(img: Image.Image, size: float, centre_x: float, centre_y: float,
           fill: tuple[int, ...] = CUTOUT_FILL) -> Image.Image:
    """MLKD's Cutout: a square of side ``size`` pixels around ``(centre_x, centre_y)`` painted ``fill``.

    As the reference draws it: ``x0 = int(max(0, centre_x - size / 2))``, ``x1 = min(W, x0 + size)`` (same for
    y), and PIL's rectangle covers columns ``x0 .. floor(x1)`` inclusive, clipped to the image, so the
    square is ``floor(size) + 1`` pixels wide away from the borders. ``size <= 0`` leaves the image as is.
    """
    if size <= 0:
        return img
    w, h = img.size
    x0 = int(max(0.0, centre_x - size / 2.0))
    y0 = int(max(0.0, centre_y - size / 2.0))
    x1, y1 = min(w, x0 + size), min(h, y0 + size)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill)
    return img


class MLKDRandAugment:
    """MLKD's RandAugment + Cutout for the strong view, on PIL images (CIFAR and ImageNet alike).

    ``num_ops`` operations drawn with replacement from :data:`MLKD_OPERATIONS` (14), each with a magnitude
    ``v = low + (high - low) * u``, ``u ~ U[0, 1)``, applied in turn; then Cutout (:func:`cutout`) of side
    ``c * W`` with ``c = max_cutout * u`` (MLKD: 0.5) and centre ``(W - (W - 1) u, H - (H - 1) u')``, i.e.
    uniform in ``(1, W] x (1, H]``: the reference draws it as ``np.random.uniform(W)``, which is numpy's
    ``uniform(low=W, high=1.0)``. The reference's ``m`` (10) is unused there and absent here.

    Draw order: the ``num_ops`` choices, each magnitude, the Cutout size, its x then y centre. Called as a
    transform, it draws from Python's global ``random`` (the reference draws the centre from NumPy's: one
    generator here); :meth:`apply` takes a ``random.Random`` of its own.
    """

    def __init__(self, num_ops: int = 2, max_cutout: float = 0.5) -> None:
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if not 0.0 <= max_cutout <= 1.0:
            raise ValueError(f"max_cutout must be in [0, 1] (a fraction of the width), got {max_cutout}")
        self.num_ops, self.max_cutout = int(num_ops), float(max_cutout)

    def apply(self, img: Image.Image, rng: random.Random | Any) -> Image.Image:
        """The augmented image; every random number comes from ``rng`` (``random.Random`` or the module)."""
        for _, operation, low, high in rng.choices(MLKD_OPERATIONS, k=self.num_ops):
            img = operation(img, low + float(high - low) * rng.random())
        size = rng.random() * self.max_cutout * img.size[0]
        w, h = img.size
        centre_x = w + (1.0 - w) * rng.random()
        centre_y = h + (1.0 - h) * rng.random()
        return cutout(img, size, centre_x, centre_y)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.apply(img, random)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, max_cutout={self.max_cutout})"


# ----------------------------------------------------------------------------------------------------------
# any transform as a function of the sample key
# ----------------------------------------------------------------------------------------------------------


def as_sample(item: Any) -> dict[str, Any]:
    """A dataset item as a dictionary: ``(image, label, ...)`` becomes ``{"image", "label"}``, a mapping is
    copied; labels become long tensors."""
    if isinstance(item, Mapping):
        sample = dict(item)
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        sample = {"image": item[0], "label": item[1]}
    else:
        raise TypeError(f"expected an (image, label) pair or a dictionary from the dataset, got {type(item).__name__}")
    label = sample["label"]
    if not (isinstance(label, Tensor) and label.dtype == torch.long):
        sample["label"] = torch.as_tensor(label, dtype=torch.long)
    return sample


class SeededViews(Dataset):
    """Transforms of a dataset's items made functions of ``(seed, epoch, index)``.

    Each transform runs inside :func:`~lightning_kd.data.seeding.seeded_global_rng`, keyed by
    ``(seed, epoch, index, stream)`` with a stream of its own per view: torchvision's random transforms (they
    draw from torch's global generator), ``random``- or NumPy-based ones, all give the same output for the same
    key in any worker, in any number of workers and after a resume; in the main process the global states are
    put back after each call.

    Args:
        dataset: yields ``(image, label)``; with ``views`` the image is the raw input (a PIL image for
            ``ImageFolder(transform=None)``).
        views: output key -> transform, e.g. ``{"image": weak, "image_strong": strong}`` (view ``t`` in order
            uses stream ``STREAM_TRANSFORM + t``); ``None``: the dataset's own ``__getitem__`` (its built-in
            transform) runs seeded and gives ``image``.
        seed: the data seed used for a bare index (the training sampler passes ``(index, epoch, seed)`` keys).

    Items: ``{"image": ..., "label": long tensor, <other view keys>: ...}``.
    """

    keyed = True

    def __init__(self, dataset: Dataset, views: Mapping[str, Callable[[Any], Any]] | None = None,
                 seed: int = 0) -> None:
        self.dataset = dataset
        self.views = dict(views) if views is not None else None
        if self.views is not None and "image" not in self.views:
            raise ValueError(f"views must include the 'image' view, got {sorted(self.views)}")
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def targets(self) -> Any:
        """The wrapped dataset's ``targets`` (torchvision's datasets have them), else ``None``."""
        return getattr(self.dataset, "targets", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, epoch, seed = split_key(key, self.epoch, self.seed)
        if self.views is None:
            with seeded_global_rng(sample_key(seed, epoch, index, STREAM_TRANSFORM)):
                return as_sample(self.dataset[index])
        sample = as_sample(self.dataset[index])
        raw = sample["image"]
        for t, (name, transform) in enumerate(self.views.items()):
            with seeded_global_rng(sample_key(seed, epoch, index, STREAM_TRANSFORM + t)):
                sample[name] = transform(raw)
        return sample
