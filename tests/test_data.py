"""Data modules: dictionary batches, CRD's contrastive sampling (other classes only, vectorised, seeded),
the CIFAR-100 module's sampling on fake data (no download) and the ImageNet-style folder module.

More in tests/test_data_*.py: exact views, seeding, samplers, resume, the modules' new options."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import FakeData

from lightning_kd.data import (
    CIFAR100DataModule,
    ContrastiveDataset,
    DigitsDataModule,
    ImageFolderDataModule,
    NegativeSampler,
    labels_of,
)

# ----------------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------------


def _unbalanced_labels() -> torch.Tensor:
    # classes of sizes 1, 5, 2, 7 and an absent class 4, shuffled so dataset order is not class order
    labels = torch.tensor([0] * 1 + [1] * 5 + [2] * 2 + [3] * 7 + [5] * 3)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("replacement", [True, False])
def test_negatives_never_share_the_anchor_class(replacement: bool) -> None:
    labels = _unbalanced_labels()
    k = 8 if replacement else 11  # 11 = the fewest negatives (18 samples - 7 of class 3)
    sampler = NegativeSampler(labels, num_negatives=k, replacement=replacement)
    generator = torch.Generator().manual_seed(0)
    anchors = labels.repeat(200)  # every class many times
    negatives = sampler.sample(anchors, generator)
    assert negatives.shape == (len(anchors), k)
    assert ((negatives >= 0) & (negatives < len(labels))).all()
    neg_labels = labels[negatives]
    for row in range(len(anchors)):  # an explicit loop over anchors: no negative of the anchor's class
        assert all(int(c) != int(anchors[row]) for c in neg_labels[row])
    if not replacement:
        assert all(len(set(row.tolist())) == k for row in negatives)


def test_negatives_are_uniform_over_all_other_samples() -> None:
    # the block-skipping map must reach every other-class sample equally often (chi-square-like check)
    labels = _unbalanced_labels()
    sampler = NegativeSampler(labels, num_negatives=4000)
    generator = torch.Generator().manual_seed(1)
    for anchor_class in (0, 1, 3, 5):
        draws = sampler.sample(torch.tensor(anchor_class), generator)
        counts = Counter(draws.tolist())
        others = [i for i in range(len(labels)) if int(labels[i]) != anchor_class]
        assert sorted(counts) == others  # exactly the other-class samples, all of them
        expected = 4000 / len(others)
        chi2 = sum((counts[i] - expected) ** 2 / expected for i in others)
        assert chi2 < 3 * len(others)  # mean len(others) - 1 under uniformity


def test_more_negatives_than_available_samples_with_replacement() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2])
    sampler = NegativeSampler(labels, num_negatives=50)
    negatives = sampler.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert set(negatives[0].tolist()) == {3, 4}
    assert set(negatives[1].tolist()) == {0, 1, 2, 4}
    with pytest.raises(ValueError, match="distinct negatives"):
        NegativeSampler(labels, num_negatives=3, replacement=False)


def test_sampler_errors() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        NegativeSampler(torch.tensor([2, 2, 2]), num_negatives=4)
    with pytest.raises(ValueError, match="num_negatives"):
        NegativeSampler(torch.tensor([0, 1]), num_negatives=0)


def test_sampling_is_deterministic_for_a_seeded_generator() -> None:
    labels = _unbalanced_labels()
    sampler = NegativeSampler(labels, num_negatives=16)
    anchors = labels[:6]
    a = sampler.sample(anchors, torch.Generator().manual_seed(7))
    b = sampler.sample(anchors, torch.Generator().manual_seed(7))
    c = sampler.sample(anchors, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = sampler.sample(anchors[0], torch.Generator().manual_seed(7))  # the single-anchor path
    assert one.shape == (16,) and torch.equal(one, sampler.sample(anchors[0], torch.Generator().manual_seed(7)))


def test_sampling_time_per_sample(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the per-sample cost of the vectorised sampler against a reference-style loop (CIFAR-100 sized:
    N = 50,000, 100 classes, K = 16,384). No timing assertion: only that both produce valid negatives."""
    n, classes, k, reps = 50_000, 100, 16_384, 20
    labels_np = np.repeat(np.arange(classes), n // classes)
    labels = torch.as_tensor(labels_np)
    sampler = NegativeSampler(labels, num_negatives=k)
    generator = torch.Generator().manual_seed(0)
    anchors = labels[torch.randperm(n, generator=generator)[:reps]]
    def median_time(draw, repeats: int) -> float:  # noqa: ANN001
        draw()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            draw()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    ours = [sampler.sample(anchors[i], generator) for i in range(reps)]
    per_sample = median_time(lambda: sampler.sample(anchors[0], generator), reps)
    batch_anchors = anchors.repeat(64 // reps + 1)[:64]
    batched = sampler.sample(batch_anchors, generator)
    per_sample_batched = median_time(lambda: sampler.sample(batch_anchors, generator), 5) / 64

    # the reference's loader: a per-class list of negatives, np.random.choice per sample
    rng = np.random.RandomState(0)
    cls_negative = [np.where(labels_np != c)[0] for c in range(classes)]
    theirs = [rng.choice(cls_negative[int(anchors[i])], k, replace=True) for i in range(reps)]
    timings = {
        replace: median_time(lambda: rng.choice(cls_negative[int(anchors[0])], k, replace=replace), reps)
        for replace in (True, False)
    }
    with capsys.disabled():
        print(
            f"\ncontrastive sampling per sample (N={n}, K={k}): vectorised {per_sample * 1e3:.3f} ms one at a time, "
            f"{per_sample_batched * 1e3:.3f} ms in a batch of 64; reference-style loop np.random.choice "
            f"{timings[True] * 1e3:.3f} ms with replacement, {timings[False] * 1e3:.3f} ms without"
        )
    for row, anchor in zip(ours, anchors):
        assert (labels[row] != anchor).all()
    assert (labels[batched] != batch_anchors[:, None]).all()
    assert all((labels_np[t] != int(a)).all() for t, a in zip(theirs, anchors))


# ----------------------------------------------------------------------------------------------------------
# the dataset wrapper
# ----------------------------------------------------------------------------------------------------------


class _Tiny(Dataset):
    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), float(index)), int(self.labels[index])


def test_contrastive_dataset_items() -> None:
    labels = _unbalanced_labels()
    dataset = ContrastiveDataset(_Tiny(labels), num_negatives=5)
    torch.manual_seed(0)
    for index in range(len(labels)):
        item = dataset[index]
        assert item["index"] == index and item["label"] == labels[index]
        assert item["image"][0, 0, 0] == index
        assert item["contrast_index"].shape == (6,) and item["contrast_index"][0] == index  # the positive
        assert (labels[item["contrast_index"][1:]] != labels[index]).all()
    with pytest.raises(ValueError, match="labels for a dataset"):
        ContrastiveDataset(_Tiny(labels), num_negatives=5, labels=labels[:3])


def _epoch(dataset: Dataset, workers: int, seed: int) -> torch.Tensor:
    """Every sample's negatives in dataset order, read through a shuffling loader seeded with ``seed``."""
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=6, shuffle=True, num_workers=workers)
    rows = {}
    for batch in loader:
        rows.update(zip(batch["index"].tolist(), batch["contrast_index"]))
    return torch.stack([rows[i] for i in range(len(dataset))])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_negatives_are_a_function_of_the_sample_key(workers: int) -> None:
    # the negatives depend on (data seed, epoch, index) only: not on the loader's order, the global seed or
    # the worker count; another data seed or epoch gives other negatives
    dataset = ContrastiveDataset(_Tiny(_unbalanced_labels()), num_negatives=9, seed=5)
    first = _epoch(dataset, workers, 0)
    assert torch.equal(first, _epoch(dataset, workers, 1))  # another shuffle, same negatives per sample
    assert torch.equal(first, _epoch(dataset, 0, 2))  # in the main process too
    dataset.set_epoch(1)
    assert not torch.equal(first, _epoch(dataset, workers, 0))
    other = ContrastiveDataset(_Tiny(_unbalanced_labels()), num_negatives=9, seed=6)
    assert not torch.equal(first, _epoch(other, workers, 0))


def test_labels_of() -> None:
    labels = _unbalanced_labels()
    assert torch.equal(labels_of(_Tiny(labels)), labels)  # the .labels attribute
    fake = FakeData(size=7, image_size=(3, 4, 4), num_classes=3, transform=transforms.ToTensor())
    assert labels_of(fake).tolist() == [int(fake[i][1]) for i in range(7)]  # read item by item


# ----------------------------------------------------------------------------------------------------------
# the data modules
# ----------------------------------------------------------------------------------------------------------


def test_digits_module_batches() -> None:
    plain = DigitsDataModule(size=16, batch_size=8)
    assert not plain.provides_indices
    plain.setup()
    batch = next(iter(plain.train_dataloader()))
    view = {"index", "crop_top", "crop_left", "flip"}  # every training batch says which view of which image it holds
    assert set(batch) == {"image", "label"} | view and batch["image"].shape == (8, 3, 16, 16)
    # 60% of 1,797 after the validation and test splits (20% each)
    assert plain.num_samples == len(plain.train_set) and 1050 < plain.num_samples < 1110

    indexed = DigitsDataModule(size=16, batch_size=8, return_index=True)
    assert indexed.provides_indices
    indexed.setup()
    assert set(next(iter(indexed.train_dataloader()))) == {"image", "label"} | view

    crd = DigitsDataModule(size=16, batch_size=8, contrast_negatives=32)
    assert crd.provides_indices
    crd.setup()
    batch = next(iter(crd.train_dataloader()))
    assert set(batch) == {"image", "label", "contrast_index"} | view
    assert batch["contrast_index"].shape == (8, 33)
    assert torch.equal(batch["contrast_index"][:, 0], batch["index"])
    train_labels = crd.train_set.dataset.labels
    assert torch.equal(train_labels[batch["index"]], batch["label"])
    assert (train_labels[batch["contrast_index"][:, 1:]] != batch["label"][:, None]).all()
    assert set(next(iter(crd.val_dataloader()))) == {"image", "label"}  # validation is untouched
    with pytest.raises(ValueError, match="contrast_negatives"):
        DigitsDataModule(contrast_negatives=-1)


class _FakeArrays:
    """Random uint8 images in torchvision's CIFAR layout (``data`` (N, 32, 32, 3), ``targets``)."""

    def __init__(self, size: int, classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, classes, size=size).tolist()


class _FakeCIFAR(CIFAR100DataModule):
    """The CIFAR-100 module over random arrays: the module's own pipeline and wrapping, no download."""

    def make_dataset(self, train: bool) -> Dataset:
        return _FakeArrays(60 if train else 20, classes=5, seed=0 if train else 1)  # type: ignore[return-value]


def test_cifar_module_contrastive_sampling_without_download() -> None:
    dm = _FakeCIFAR(data_dir="unused", batch_size=10, num_workers=0, download=False, contrast_negatives=40)
    dm.prepare_data()  # download=False: touches nothing
    dm.setup("fit")
    assert dm.provides_indices and dm.num_samples == 60
    fake_labels = labels_of(dm.train_set.dataset)
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["contrast_index"].shape == (len(batch["label"]), 41)
        assert torch.equal(batch["contrast_index"][:, 0], batch["index"])
        assert torch.equal(fake_labels[batch["index"]], batch["label"])
        assert (fake_labels[batch["contrast_index"][:, 1:]] != batch["label"][:, None]).all()
        seen += len(batch["label"])
    assert seen == 60
    assert _FakeCIFAR(download=False).provides_indices  # CIFAR batches always carry index (and the view)


def _write_pngs(root: Path, classes: dict[str, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.RandomState(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.randint(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_module(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"cat": 3, "dog": 4}, seed=0)
    _write_pngs(tmp_path / "val", {"cat": 2, "dog": 2}, seed=1)
    dm = ImageFolderDataModule(tmp_path / "train", tmp_path / "val", image_size=32, batch_size=4, num_workers=0,
                               contrast_negatives=5)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]  # from the folders, before setup
    dm.setup("fit")
    assert dm.num_samples == 7 and dm.provides_indices
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    labels = torch.tensor(dm.train_set.dataset.targets)
    assert (labels[batch["contrast_index"][:, 1:]] != batch["label"][:, None]).all()
    assert torch.equal(batch["contrast_index"][:, 0], batch["index"])
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32) and set(val) == {"image", "label"}
    assert sorted(val["label"].tolist()) == [0, 0, 1, 1]
    # the validation transform is deterministic: resize + centre crop + ImageNet normalisation
    assert torch.equal(val["image"], next(iter(dm.val_dataloader()))["image"])
    # a constant grey image normalises to (0.5 - mean) / std, approximately (resize interpolation is exact
    # on a constant image; ToTensor quantises to 1/255)
    from PIL import Image

    (tmp_path / "grey" / "cat").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(tmp_path / "grey" / "cat" / "0.png")
    grey = ImageFolderDataModule(tmp_path / "grey", tmp_path / "grey", image_size=32, num_workers=0)
    grey.setup()
    image = grey.val_set[0]["image"]
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, rtol=0, atol=1e-5)


def test_image_folder_module_errors(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"cat": 2, "dog": 2}, seed=0)
    _write_pngs(tmp_path / "val", {"cat": 1, "cow": 1}, seed=1)
    dm = ImageFolderDataModule(tmp_path / "train", tmp_path / "val", image_size=32, num_workers=0)
    with pytest.raises(ValueError, match="same class sub-folders"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="train_dir"):
        _ = ImageFolderDataModule(tmp_path / "missing", tmp_path / "val").num_classes


@pytest.mark.parametrize(
    ("cores", "accelerated", "expected"),
    [(1, False, 0), (2, False, 0), (4, False, 0), (8, False, 1), (16, False, 2), (128, False, 8),
     (1, True, 0), (2, True, 1), (8, True, 7), (64, True, 8)],
)
def test_default_workers_leave_a_cpu_training_its_cores(cores: int, accelerated: bool, expected: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lightning_kd.data.base import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(accelerated) == expected


def test_loaders_pick_their_workers_for_the_trainers_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import lightning as L

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    dm = _FakeCIFAR(data_dir="unused", batch_size=10, download=False)
    dm.setup("fit")
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.pin_memory) == (2, True, False)
    explicit = _FakeCIFAR(data_dir="unused", batch_size=10, download=False, num_workers=0)
    explicit.setup("fit")
    assert explicit.train_dataloader().num_workers == 0
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        _FakeCIFAR(data_dir="unused", download=False, num_workers=-1)
