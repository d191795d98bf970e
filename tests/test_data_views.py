"""Per-sample randomness as a function of (seed, epoch, index): the counter-based keys, CIFAR's exact crop + flip
against torchvision, the uniformity of the 162 views, MLKD's RandAugment + Cutout, and seeded torchvision
transforms (same output in any worker, global random states untouched in the main process)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from lightning_kd.data import (
    CIFARViews,
    MLKDRandAugment,
    SeededViews,
    crop_flip_params,
    crop_flip_params_array,
    render_crop_flip,
    sample_key,
    sample_keys,
    seeded_global_rng,
    to_normalized_tensor,
)
from lightning_kd.data.augment import MLKD_OPERATIONS, cutout, normalization
from lightning_kd.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from lightning_kd.data.seeding import key_uniform, mix64

# ----------------------------------------------------------------------------------------------------------
# the keys
# ----------------------------------------------------------------------------------------------------------


def test_mix64_is_splitmix64() -> None:
    # SplitMix64 seeded with 0 yields mix64(k * golden) ... : its published first outputs (Vigna's splitmix64.c)
    state, outputs = 0, []
    for _ in range(3):
        outputs.append(mix64(state))
        state = (state + 0x9E3779B97F4A7C15) & (2**64 - 1)
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_keys_are_stable_distinct_and_vectorised() -> None:
    key = sample_key(7, 3, 12345, 1)
    assert key == sample_key(7, 3, 12345, 1) and 0 <= key < 2**64
    neighbours = {sample_key(s, e, i, v) for s in (0, 1) for e in (0, 1) for i in range(50) for v in (0, 1, 2)}
    assert len(neighbours) == 2 * 2 * 50 * 3  # no collisions among neighbouring inputs
    indices = np.arange(-3, 2000)
    vector = sample_keys(7, 3, indices, 1)
    assert vector.dtype == np.uint64
    assert [int(v) for v in vector] == [sample_key(7, 3, int(i), 1) for i in indices]
    # bits look uniform: each of the 64 bits is set about half the time over 2,000 keys
    bits = np.unpackbits(vector[3:].view(np.uint8)).reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.06)
    u = [key_uniform(key, c) for c in range(1, 2001)]
    assert 0 <= min(u) and max(u) < 1 and abs(np.mean(u) - 0.5) < 0.03


# ----------------------------------------------------------------------------------------------------------
# CIFAR's crop + flip
# ----------------------------------------------------------------------------------------------------------


def _torchvision_view(image: np.ndarray, top: int, left: int, flip: int) -> torch.Tensor:
    pil = TF.pad(Image.fromarray(image), 4)
    pil = TF.crop(pil, top, left, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), CIFAR100_MEAN, CIFAR100_STD)


def test_view_is_bit_identical_to_torchvision() -> None:
    rng = np.random.default_rng(0)
    mean, std = normalization(CIFAR100_MEAN, CIFAR100_STD)
    corners = [(0, 0, 0), (8, 8, 1), (0, 8, 1), (8, 0, 0), (4, 4, 0), (4, 4, 1)]
    corners += [tuple(int(v) for v in rng.integers(0, [9, 9, 2])) for _ in range(200)]
    for top, left, flip in corners:
        image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        ours = to_normalized_tensor(render_crop_flip(image, top, left, flip), mean, std)
        assert ours.dtype == torch.float32 and ours.shape == (3, 32, 32)
        assert torch.equal(ours, _torchvision_view(image, top, left, flip)), (top, left, flip)
    with pytest.raises(ValueError, match="top and left"):
        render_crop_flip(np.zeros((32, 32, 3), np.uint8), 9, 0, 0)


def test_render_by_hand() -> None:
    # a 2x2 image, padding 1: the padded 4x4 has the image at rows/cols 1..2
    image = np.arange(1, 5, dtype=np.uint8).reshape(2, 2, 1)
    assert render_crop_flip(image, 0, 0, 0, padding=1)[..., 0].tolist() == [[0, 0], [0, 1]]
    assert render_crop_flip(image, 2, 2, 0, padding=1)[..., 0].tolist() == [[4, 0], [0, 0]]
    assert render_crop_flip(image, 1, 2, 1, padding=1)[..., 0].tolist() == [[0, 2], [0, 4]]


def test_parameters_are_uniform_over_the_162_views() -> None:
    n = 162 * 200
    top, left, flip = crop_flip_params_array(3, 1, np.arange(n))
    counts = np.bincount((top * 9 + left) * 2 + flip, minlength=162)
    assert counts.shape == (162,) and counts.min() > 0
    expected = n / 162
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 161 + 5 * np.sqrt(2 * 161)  # chi-square with 161 degrees of freedom: mean 161, sd 18
    # marginals too, and the scalar function agrees with the vectorised one
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9)) and set(flip.tolist()) == {0, 1}
    assert all(crop_flip_params(3, 1, i) == (top[i], left[i], flip[i]) for i in range(0, n, 97))
    # the second view is drawn independently of the first
    top2, left2, flip2 = crop_flip_params_array(3, 1, np.arange(n), view=1)
    same = np.mean((top == top2) & (left == left2) & (flip == flip2))
    assert same < 3 / 162


def test_parameters_change_with_seed_and_epoch() -> None:
    base = crop_flip_params_array(0, 0, np.arange(500))
    for seed, epoch in [(1, 0), (0, 1)]:
        other = crop_flip_params_array(seed, epoch, np.arange(500))
        assert np.mean(base[0] == other[0]) < 0.25


class _Dataset(Dataset):
    def __init__(self, dataset: CIFARViews, epoch: int, seed: int) -> None:
        self.dataset, self.epoch, self.seed = dataset, epoch, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[(index, self.epoch, self.seed)]


def test_cifar_views_same_in_workers_and_main_process() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    views = CIFARViews(images, rng.integers(0, 5, 24), strong_view=True, seed=11)
    keyed = _Dataset(views, epoch=2, seed=11)
    main = next(iter(DataLoader(keyed, batch_size=24)))
    torch.manual_seed(123)  # workers' global seeds differ from the main process's: irrelevant
    workers = next(iter(DataLoader(keyed, batch_size=24, num_workers=2)))
    for name in ("image", "image_strong", "crop_top", "crop_left", "flip", "label"):
        assert torch.equal(main[name], workers[name]), name
    assert main["crop_top"].dtype == torch.int64 and main["flip"].dtype == torch.int64
    for i in range(24):  # the batch's parameters are the pure function's, and give the batch's pixels
        top, left, flip = crop_flip_params(11, 2, i)
        assert (int(main["crop_top"][i]), int(main["crop_left"][i]), int(main["flip"][i])) == (top, left, flip)
        assert torch.equal(main["image"][i], _torchvision_view(images[i], top, left, flip))
    views.set_epoch(2)  # a bare index uses the dataset's epoch and seed
    assert torch.equal(views[5]["image"], main["image"][5]) and torch.equal(views[5]["image_strong"],
                                                                              main["image_strong"][5])


# ----------------------------------------------------------------------------------------------------------
# MLKD's RandAugment + Cutout
# ----------------------------------------------------------------------------------------------------------


def test_operation_table_matches_the_reference_ranges() -> None:
    ranges = {name: (low, high) for name, _, low, high in MLKD_OPERATIONS}
    assert ranges == {
        "AutoContrast": (0, 1), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95), "Contrast": (0.05, 0.95),
        "Equalize": (0, 1), "Identity": (0, 1), "Posterize": (4, 8), "Rotate": (-30, 30),
        "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "Solarize": (0, 256),
        "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
    }
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ops = {name: op for name, op, _, _ in MLKD_OPERATIONS}
    # each operation against PIL called directly with the same magnitude
    brighter = ImageEnhance.Brightness(img).enhance(0.3)
    assert np.array_equal(np.asarray(ops["Brightness"](img, 0.3)), np.asarray(brighter))
    assert np.array_equal(np.asarray(ops["Posterize"](img, 5.7)), np.asarray(ImageOps.posterize(img, 5)))
    assert np.array_equal(np.asarray(ops["Solarize"](img, 100.5)), np.asarray(ImageOps.solarize(img, 100.5)))
    assert np.array_equal(np.asarray(ops["Identity"](img, 0.5)), np.asarray(img))
    # TranslateX by +0.25 of the width: output column x reads input column x + 8 (nearest, black fill)
    moved = np.asarray(ops["TranslateX"](img, 0.25))
    assert np.array_equal(moved[:, :24], np.asarray(img)[:, 8:]) and not moved[:, 24:].any()
    # Rotate by 90 degrees counter-clockwise on a square image is np.rot90
    assert np.array_equal(np.asarray(ops["Rotate"](img, 90.0)), np.rot90(np.asarray(img)))


def test_cutout_box_follows_the_reference_arithmetic() -> None:
    img = Image.new("RGB", (32, 32))
    rng = np.random.default_rng(3)
    for _ in range(300):
        size = float(rng.uniform(0, 16))
        cx, cy = float(rng.uniform(1, 32)), float(rng.uniform(1, 32))
        out = np.asarray(cutout(img, size, cx, cy))
        painted = np.all(out == (125, 123, 114), axis=-1)
        # independently: x0 = int(max(0, cx - s/2)), last column = floor(min(32, x0 + s)) inclusive, clipped
        x0, y0 = int(max(0, cx - size / 2)), int(max(0, cy - size / 2))
        x_last, y_last = min(31, int(np.floor(min(32, x0 + size)))), min(31, int(np.floor(min(32, y0 + size))))
        expected = np.zeros((32, 32), bool)
        if size > 0:
            expected[y0 : y_last + 1, x0 : x_last + 1] = True
        assert np.array_equal(painted, expected), (size, cx, cy)
    assert cutout(img, 0.0, 5, 5) is img


class _Recorder(random.Random):
    """A random.Random that records its draws."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[float] = []

    def random(self) -> float:
        value = super().random()
        self.draws.append(value)
        return value


def test_randaugment_draws_and_applies_like_the_reference() -> None:
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    augment = MLKDRandAugment(num_ops=2)
    for seed in range(40):
        recorder = _Recorder(seed)
        ours = np.asarray(augment.apply(img, recorder))
        u = recorder.draws
        assert len(u) == 2 + 2 + 3  # two choices, two magnitudes, Cutout's size, x and y
        # re-do it by hand from the same numbers: choices use u[0], u[1]; magnitudes u[2], u[3]
        chosen = [MLKD_OPERATIONS[int(u[k] * 14)] for k in (0, 1)]
        expected = img
        for (name, op, low, high), v in zip(chosen, (u[2], u[3])):
            expected = op(expected, low + (high - low) * v)
        size = u[4] * 0.5 * 32
        expected = cutout(expected, size, 32 - 31 * u[5], 32 - 31 * u[6])
        assert np.array_equal(ours, np.asarray(expected)), seed
    again = np.asarray(augment.apply(img, random.Random(5)))
    assert np.array_equal(again, np.asarray(augment.apply(img, random.Random(5))))
    assert repr(augment) == "MLKDRandAugment(num_ops=2, max_cutout=0.5)"


def test_randaugment_covers_every_operation_and_cutout_sizes() -> None:
    # over many draws every operation is picked, with replacement (the same one twice happens), and the
    # Cutout side c * 32 has c uniform in [0, 0.5)
    picks, sizes, doubles = Counter(), [], 0
    for seed in range(3000):
        recorder = _Recorder(seed)
        chosen = recorder.choices(range(14), k=2)
        picks.update(chosen)
        doubles += chosen[0] == chosen[1]
        recorder.random()
        recorder.random()
        sizes.append(recorder.random() * 0.5)
    assert set(picks) == set(range(14)) and doubles > 100  # 3000 / 14 ~ 214 expected
    assert 0.23 < np.mean(sizes) < 0.27 and max(sizes) < 0.5


# ----------------------------------------------------------------------------------------------------------
# any transform, seeded per sample
# ----------------------------------------------------------------------------------------------------------


class _Pictures(Dataset):
    """Random PIL images and labels (what ImageFolder(transform=None) yields)."""

    def __init__(self, size: int = 12) -> None:
        rng = np.random.default_rng(6)
        self.images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(size)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], index % 3


def _torchvision_and_friends() -> transforms.Compose:
    """A transform drawing from torch's, Python's and NumPy's global generators."""
    noise = transforms.Lambda(lambda t: t + float(np.random.uniform()) + random.random())
    return transforms.Compose([transforms.RandomResizedCrop(24), transforms.RandomHorizontalFlip(),
                               transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor(), noise])


class _Keyed(Dataset):
    def __init__(self, views: SeededViews, epoch: int) -> None:
        self.views, self.epoch = views, epoch

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict:
        return self.views[(index, self.epoch, 9)]


@pytest.mark.parametrize("workers", [1, 2])
def test_seeded_views_are_the_same_whatever_the_worker_count(workers: int) -> None:
    views = SeededViews(_Pictures(), {"image": _torchvision_and_friends(),
                                      "image_strong": transforms.Compose([MLKDRandAugment(), transforms.ToTensor()])})
    main = next(iter(DataLoader(_Keyed(views, 3), batch_size=12)))
    other = next(iter(DataLoader(_Keyed(views, 3), batch_size=12, num_workers=workers)))
    assert torch.equal(main["image"], other["image"]) and torch.equal(main["image_strong"], other["image_strong"])
    assert main["label"].tolist() == [i % 3 for i in range(12)]
    # the two views of a sample are drawn independently; another epoch gives other views
    later = next(iter(DataLoader(_Keyed(views, 4), batch_size=12)))
    assert not torch.equal(main["image"], later["image"])


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _global_draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), random.random(), float(np.random.uniform())


def test_seeded_views_leave_the_global_states_alone() -> None:
    views = SeededViews(_Pictures(), {"image": _torchvision_and_friends()})
    _reseed(0)
    expected = _global_draws()
    _reseed(0)
    first = views[(4, 1, 2)]["image"]  # draws from all three global generators inside
    got = _global_draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    _reseed(5)  # whatever the global states were before, the same key gives the same image
    assert torch.equal(views[(4, 1, 2)]["image"], first)
    # a bare index uses the dataset's seed and epoch
    views.seed = 2
    views.set_epoch(1)
    assert torch.equal(views[4]["image"], first)


def test_seeded_dataset_without_views_seeds_its_own_transform() -> None:
    from torchvision.datasets import FakeData

    fake = FakeData(size=6, image_size=(3, 20, 20), num_classes=2,
                    transform=transforms.Compose([transforms.RandomCrop(12), transforms.ToTensor()]))
    views = SeededViews(fake, seed=1)
    a, b = views[(3, 0, 1)], views[(3, 0, 1)]
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 12, 12)
    assert any(not torch.equal(a["image"], views[(3, e, 1)]["image"]) for e in range(1, 5))


def test_seeded_global_rng_restores_only_in_the_main_process() -> None:
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with seeded_global_rng(sample_key(0, 0, 0)):
        inside = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_global_rng(sample_key(0, 0, 0), restore=False):
        assert torch.equal(torch.rand(2), inside)
    assert not torch.equal(torch.get_rng_state(), state)


def test_image_folder_views_identical_with_any_worker_count(tmp_path: Path) -> None:
    from lightning_kd.data import ImageFolderDataModule

    rng = np.random.default_rng(7)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(5):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")

    def epoch_images(workers: int) -> dict[int, torch.Tensor]:
        dm = ImageFolderDataModule(tmp_path / "train", tmp_path / "val", image_size=16, batch_size=5,
                                   num_workers=workers, return_index=True, strong_view=True, data_seed=3)
        dm.setup("fit")
        out = {}
        for batch in dm.train_dataloader():
            for i, index in enumerate(batch["index"].tolist()):
                out[index] = torch.cat([batch["image"][i], batch["image_strong"][i]])
        return out

    main, two = epoch_images(0), epoch_images(2)
    assert sorted(main) == list(range(10)) and sorted(two) == list(range(10))
    assert all(torch.equal(main[i], two[i]) for i in range(10))
