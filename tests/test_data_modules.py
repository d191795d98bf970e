"""The data modules' options: digits' held-out test split and labelled subsets, second views (MLKD) on every
module, CIFAR-100's batches and its offline error, the ImageFolder module's transforms (Python and YAML),
test_dir and its own errors for missing folders, and predict loaders under a Trainer."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from lightning_kd.data import CIFAR100DataModule, DigitsDataModule, ImageFolderDataModule, crop_flip_params

# ----------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------


def _digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target)


def test_digits_splits_are_fixed_stratified_and_disjoint() -> None:
    dm = DigitsDataModule(size=8)
    labels = _digits_labels()
    train, val, test = dm.split_indices(labels)
    assert test is not None
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == len(train) + len(val) + len(test)
    assert len(train) + len(val) + len(test) == len(labels) == 1797
    for c in range(10):  # 20% / 20% / 60% of each class, rounded
        n = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == round(0.2 * n) == int((labels[test] == c).sum())
    again = DigitsDataModule(size=8).split_indices(labels)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))  # fixed for a seed
    other = DigitsDataModule(size=8, seed=1).split_indices(labels)
    assert not torch.equal(val, other[1])
    # the validation split is the one the module had before the test split existed (first 20% of each class)
    from lightning_kd.data.digits import stratified_split

    assert torch.equal(stratified_split(labels, 0.2, 0)[1], val)
    none = DigitsDataModule(size=8, test_fraction=0.0)
    none.setup()
    assert none.test_set is None and len(none.test_dataloader().dataset) == len(none.val_set)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


def test_digits_test_and_predict_loaders_use_the_test_split() -> None:
    dm = DigitsDataModule(size=8, batch_size=50)
    dm.setup()
    labels = _digits_labels()
    _, val_idx, test_idx = dm.split_indices(labels)
    test_labels = torch.cat([b["label"] for b in dm.test_dataloader()])
    predict = list(dm.predict_dataloader())
    assert torch.equal(test_labels, labels[test_idx])
    assert torch.equal(torch.cat([b["label"] for b in predict]), test_labels)
    assert set(predict[0]) == {"image", "label"}
    val_images = torch.cat([b["image"] for b in dm.val_dataloader()])
    test_images = torch.cat([b["image"] for b in predict])
    assert len(val_images) == len(val_idx) and not torch.equal(val_images[:50], test_images[:50])


@pytest.mark.parametrize("subset", [5, 0.1])
def test_digits_train_subset(subset: int | float) -> None:
    dm = DigitsDataModule(size=8, batch_size=10, train_subset=subset)
    dm.setup()
    full = DigitsDataModule(size=8)
    full.setup()
    labels = dm.train_set.dataset.labels
    counts = torch.bincount(labels, minlength=10)
    if isinstance(subset, int):
        assert counts.tolist() == [5] * 10
    else:
        full_counts = torch.bincount(full.train_set.dataset.labels, minlength=10)
        assert counts.tolist() == [max(1, round(0.1 * int(n))) for n in full_counts]
    # drawn from the training split only (never validation or test images), the same draw every time
    full_images = full.train_set.dataset.images.flatten(1)
    for image in dm.train_set.dataset.images.flatten(1)[:20]:
        assert (full_images == image).all(dim=1).any()
    again = DigitsDataModule(size=8, train_subset=subset)
    again.setup()
    assert torch.equal(again.train_set.dataset.images, dm.train_set.dataset.images)
    with pytest.raises(ValueError, match="only"):
        bad = DigitsDataModule(size=8, train_subset=500)
        bad.setup()
    with pytest.raises(ValueError, match="fraction"):
        DigitsDataModule(train_subset=1.5)


def test_digits_shift_and_strong_view() -> None:
    dm = DigitsDataModule(size=16, batch_size=8, strong_view=True, data_seed=1)
    dm.setup()
    data = dm.train_set.dataset
    background = float(data.images.min())
    assert data.fill == background and data.max_shift == 2 and data.strong_shift == 4
    for index in range(40):
        item = dm.train_set[(index, 0, 1)]
        original = data.images[index]
        # the first view is the original moved by at most 2 pixels, the border filled with the background
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(item["image"], torch.nn.functional.pad(original, (2,) * 4, value=background)
                                [:, dy : dy + 16, dx : dx + 16])]
        assert found, index
        # the second view: shifted by up to 4, then a square painted with the background
        strong = item["image_strong"]
        assert strong.shape == (3, 16, 16) and not torch.equal(strong, item["image"])
        shifted = [torch.nn.functional.pad(original, (4,) * 4, value=background)[:, dy : dy + 16, dx : dx + 16]
                   for dy in range(9) for dx in range(9)]
        assert any(bool(((strong == s) | (strong == background)).all()) for s in shifted), index
    batch = next(iter(dm.train_dataloader()))
    view = {"index", "crop_top", "crop_left", "flip"}
    assert set(batch) == {"image", "label", "image_strong"} | view and batch["image_strong"].shape == (8, 3, 16, 16)
    assert set(next(iter(dm.val_dataloader()))) == {"image", "label"}


# ----------------------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------------------


class _FakeArrays:
    def __init__(self, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 100, size=size).tolist()


class _FakeCIFAR(CIFAR100DataModule):
    def make_dataset(self, train: bool) -> Dataset:
        return _FakeArrays(40 if train else 30, seed=0 if train else 1)  # type: ignore[return-value]


def test_cifar_batches_carry_the_view_and_the_strong_view() -> None:
    dm = _FakeCIFAR(batch_size=8, num_workers=0, download=False, strong_view=True, data_seed=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "crop_top", "crop_left", "flip", "image_strong"}
    assert batch["image"].shape == batch["image_strong"].shape == (8, 3, 32, 32)
    for name in ("index", "crop_top", "crop_left", "flip"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (8,)
    for i, index in enumerate(batch["index"].tolist()):
        assert crop_flip_params(3, 0, index) == tuple(int(batch[k][i]) for k in ("crop_top", "crop_left", "flip"))
    assert not torch.equal(batch["image"], batch["image_strong"])
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"image", "label"}
    raw = _FakeArrays(30, seed=1).data[0]
    expected = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - torch.tensor(
        [0.5071, 0.4867, 0.4408])[:, None, None]) / torch.tensor([0.2675, 0.2565, 0.2761])[:, None, None]
    torch.testing.assert_close(val["image"][0], expected, rtol=0, atol=1e-6)
    assert sum(len(b["label"]) for b in dm.predict_dataloader()) == 30  # the test split, every sample


def test_cifar_offline_error_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args: object, **kwargs: object) -> None:
        raise URLError("no route to host")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "could not be downloaded" in message and "URLError" in message
    assert f"{tmp_path}/cifar-100-python/{{train,test,meta}}" in message and "cifar-100-python.tar.gz" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    offline = CIFAR100DataModule(data_dir=str(tmp_path), download=False)
    offline.prepare_data()  # nothing to do, nothing attempted
    with pytest.raises(FileNotFoundError, match="download=False: put the extracted files"):
        offline.setup("fit")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(RuntimeError, match="is not the CIFAR-100 archive"):
        offline.prepare_data()


# ----------------------------------------------------------------------------------------------------------
# ImageNet-style folders
# ----------------------------------------------------------------------------------------------------------


def _write(root: Path, classes: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    _write(tmp_path / "train", {"cat": 4, "dog": 4}, 0)
    _write(tmp_path / "val", {"cat": 2, "dog": 2}, 1)
    _write(tmp_path / "test", {"cat": 3, "dog": 3}, 2)
    return tmp_path


def test_image_folder_missing_folders_get_the_librarys_error(folders: Path) -> None:
    missing = folders / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"train_dir .*nowhere.* does not exist: point it at"):
        ImageFolderDataModule(missing, folders / "val").setup()
    with pytest.raises(FileNotFoundError, match=r"val_dir .*nowhere.* does not exist"):
        ImageFolderDataModule(folders / "train", missing).setup()
    with pytest.raises(FileNotFoundError, match=r"test_dir .*nowhere.* does not exist"):
        ImageFolderDataModule(folders / "train", folders / "val", test_dir=missing).setup()
    (folders / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_dir .* has no class sub-folders"):
        ImageFolderDataModule(folders / "empty", folders / "val").setup()
    (folders / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolderDataModule(folders / "file.txt", folders / "val").setup()


def test_image_folder_transforms_test_dir_and_strong_view(folders: Path) -> None:
    from torchvision import transforms

    train_tf = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])
    eval_tf = transforms.Compose([transforms.Resize(6), transforms.ToTensor()])
    dm = ImageFolderDataModule(folders / "train", folders / "val", test_dir=folders / "test", batch_size=4,
                               num_workers=0, train_transform=train_tf, eval_transform=eval_tf, strong_view=True,
                               strong_transform=transforms.Compose([transforms.Resize(10), transforms.ToTensor()]))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image_strong"].shape == (4, 3, 10, 10)
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 6, 6)
    assert len(dm.test_dataloader().dataset) == 6 and len(dm.predict_dataloader().dataset) == 6
    assert len(dm.val_dataloader().dataset) == 4
    default = ImageFolderDataModule(folders / "train", folders / "val", image_size=16, batch_size=4, num_workers=0,
                                    strong_view=True)
    default.setup("fit")
    batch = next(iter(default.train_dataloader()))
    assert batch["image_strong"].shape == (4, 3, 16, 16) and not torch.equal(batch["image"], batch["image_strong"])
    assert len(default.test_dataloader().dataset) == 4  # no test_dir: the validation folder


def test_image_folder_transforms_from_a_yaml_config(folders: Path) -> None:
    import yaml
    from jsonargparse import ArgumentParser

    config = {"data": {"class_path": "lightning_kd.data.ImageFolderDataModule", "init_args": {
        "train_dir": str(folders / "train"), "val_dir": str(folders / "val"), "batch_size": 2, "num_workers": 0,
        "train_transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [
            {"class_path": "torchvision.transforms.v2.RandomResizedCrop", "init_args": {"size": 8}},
            {"class_path": "torchvision.transforms.v2.PILToTensor"},
            {"class_path": "torchvision.transforms.v2.ToDtype", "init_args": {"dtype": "torch.float32", "scale": True}},
        ]}},
        "strong_view": True,
        "strong_transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [
            {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [8, 8]}},
            {"class_path": "lightning_kd.data.MLKDRandAugment", "init_args": {"num_ops": 1}},
            {"class_path": "torchvision.transforms.v2.PILToTensor"},
        ]}},
    }}}
    parser = ArgumentParser()
    parser.add_argument("--data", type=L.LightningDataModule)
    dm = parser.instantiate(parser.parse_string(yaml.safe_dump(config))).data
    assert isinstance(dm, ImageFolderDataModule)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["image_strong"].dtype == torch.uint8


# ----------------------------------------------------------------------------------------------------------
# predict under a Trainer
# ----------------------------------------------------------------------------------------------------------


class _Predictor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3 * 8 * 8, 10)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return batch["label"]


def test_trainer_predict_runs_on_the_test_split() -> None:
    dm = DigitsDataModule(size=8, batch_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    labels = torch.cat(trainer.predict(_Predictor(), datamodule=dm))
    _, _, test_idx = dm.split_indices(_digits_labels())
    assert torch.equal(labels, _digits_labels()[test_idx])
