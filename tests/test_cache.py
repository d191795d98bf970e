"""The teacher-output cache: exact views, exact lookups, exact fits, and every refusal with nothing written.

The teacher is a resnet8 with random weights whose classifier is scaled up (logits of a few units, as a trained
teacher's), on 100 digits (10 per class) at 16x16: 25 shift views per image, 2,500 in all.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, make_trainer
from torch.utils.data import TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.cache import (
    CacheUnsupportedError,
    Progress,
    TeacherCache,
    TeacherCacheError,
    build_cache,
    partition,
    storage_bytes,
    view_space,
)
from lightning_kd.cache.command import main as cache_main
from lightning_kd.cache.command import read_config
from lightning_kd.core import Distillation
from lightning_kd.data import CIFARViews, DigitsDataModule, SeededViews, render_crop_flip, to_normalized_tensor
from lightning_kd.data.augment import normalization
from lightning_kd.data.base import ClassificationDataModule
from lightning_kd.data.digits import ShiftedImages, shift_image
from lightning_kd.data.seeding import STREAM_VIEW, sample_key
from lightning_kd.distillers import AT, DIST, DKD, KD, MLKD, NKD, OFD, CurriculumTemperature, FitNet
from lightning_kd.models import create_model

SUBSET, SEED, BATCH = 10, 3, 16
FP16_STEP = 2.0**-11  # half an fp16 step relative to the value (10 fraction bits, rounding to nearest)


def digits(**options) -> DigitsDataModule:
    values = {"size": 16, "batch_size": BATCH, "train_subset": SUBSET, "data_seed": SEED}
    values.update(options)
    return DigitsDataModule(**values)


def scaled_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10)
    with torch.no_grad():
        teacher.fc.weight.mul_(40.0)
    return teacher.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these networks are tiny, and on a shared 2-core machine two threads that wait for each
    other made a step 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(scaled_teacher().state_dict(), path)
    return path


def _teacher(path: Path) -> torch.nn.Module:
    teacher = create_model("resnet8", num_classes=10)
    teacher.load_state_dict(torch.load(path, weights_only=True))
    return teacher.eval()


@pytest.fixture(scope="module")
def cache32(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "fp32"
    build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", chunk_images=16)
    return folder


@pytest.fixture(scope="module")
def cache16(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "fp16"
    build_cache(_teacher(teacher_file), digits(), folder, dtype="fp16", chunk_images=16)
    return folder


def snapshot(*folders: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under the folders: size, modification time and sha256."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[str(path)] = (0, 0, "dir")
    return out


def core(teacher_file: Path, distillers: list, **options) -> Distillation:
    torch.manual_seed(1)
    values = {"teacher_checkpoint": teacher_file, "num_classes": 10, "input_size": (3, 16, 16), "task_loss_weight": 0.1}
    values.update(options)
    return Distillation("resnet8", "resnet8", distillers, **values)


# ----------------------------------------------------------------------------------------------------------
# views: the digits' batches carry them, the renderer draws them bit for bit
# ----------------------------------------------------------------------------------------------------------


def test_digits_training_batches_carry_their_view_and_the_same_pixels() -> None:
    dm = digits(train_subset=None, data_seed=1)
    dm.setup("fit")
    data = dm.train_set.dataset
    plain = ShiftedImages(data.images, data.labels, data.max_shift, seed=1, fill=data.fill)  # no view parameters
    batch = next(iter(dm.train_dataloader()))
    assert {"index", "crop_top", "crop_left", "flip"} <= set(batch)
    assert all(batch[k].dtype == torch.int64 for k in ("index", "crop_top", "crop_left", "flip"))
    assert (batch["flip"] == 0).all() and batch["crop_top"].max() <= 4 and batch["crop_left"].max() <= 4
    for row, index in enumerate(batch["index"].tolist()):
        # the parameters, re-derived from the key as the module docstring states: v = key mod 25, (v // 5, v mod 5)
        v = sample_key(1, 0, index, STREAM_VIEW) % 25
        assert (batch["crop_top"][row].item(), batch["crop_left"][row].item()) == (v // 5, v % 5)
        padded = F.pad(data.images[index], (2, 2, 2, 2), value=data.fill)
        assert torch.equal(batch["image"][row], padded[:, v // 5 : v // 5 + 16, v % 5 : v % 5 + 16])
        assert torch.equal(batch["image"][row], plain[(index, 0, 1)][0])  # the images of the unchanged path
        assert torch.equal(batch["label"][row], data.labels[index])
    assert set(next(iter(dm.val_dataloader()))) == {"image", "label"}  # evaluation batches unchanged


def test_digits_render_equals_every_view_the_dataset_draws() -> None:
    dm = digits()
    space = view_space(dm)
    assert (space.kind, space.padding, space.flips, space.view_shape) == ("shift", 2, 1, (5, 5, 1))
    data = dm.train_set.dataset
    rendered = space.render([3, 7]).view(2, 5, 5, 1, 3, 16, 16)
    for slot, index in enumerate([3, 7]):
        for top in range(5):
            for left in range(5):
                expected = shift_image(data.images[index], top, left, 2, data.fill)
                assert torch.equal(rendered[slot, top, left, 0], expected)


def test_cifar_render_equals_every_view_the_dataset_draws() -> None:
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    dataset = CIFARViews(images, [0, 1, 2, 3, 4], augment=True, seed=5)
    space = view_space(dataset)
    assert (space.kind, space.padding, space.flips, space.views_per_image) == ("crop_flip", 4, 2, 162)
    rendered = space.render([1, 4]).view(2, 9, 9, 2, 3, 32, 32)
    mean, std = normalization(dataset.mean.flatten().tolist(), dataset.std.flatten().tolist())
    for slot, index in enumerate([1, 4]):
        for top in range(9):
            for left in range(9):
                for flip in range(2):
                    own = to_normalized_tensor(render_crop_flip(images[index], top, left, flip), mean, std)
                    assert torch.equal(rendered[slot, top, left, flip], own), (index, top, left, flip)
    for epoch in range(4):  # and the dataset's items, looked up by the parameters they carry
        item = dataset[(2, epoch, 5)]
        slot = space.render([2]).view(9, 9, 2, 3, 32, 32)[item["crop_top"], item["crop_left"], item["flip"]]
        assert torch.equal(item["image"], slot)


def test_continuous_augmentations_and_data_without_views_are_refused() -> None:
    from torchvision import transforms
    from torchvision.datasets import FakeData

    seeded = SeededViews(FakeData(size=4, image_size=(3, 8, 8)), {"image": transforms.RandomResizedCrop(8)})
    with pytest.raises(CacheUnsupportedError, match="continuous augmentations.*FKD.*not built"):
        view_space(seeded)
    with pytest.raises(CacheUnsupportedError, match="augment=False"):
        view_space(CIFARViews(np.zeros((2, 32, 32, 3), np.uint8), [0, 1], augment=False))
    with pytest.raises(CacheUnsupportedError, match="no view parameters"):
        view_space(TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)))


# ----------------------------------------------------------------------------------------------------------
# building: exact, resumable, partitioned
# ----------------------------------------------------------------------------------------------------------


def test_fp32_cache_equals_the_live_teacher_on_the_views_the_data_draw(cache32: Path, teacher_file: Path) -> None:
    teacher = _teacher(teacher_file)
    cache = TeacherCache(cache32)
    manifest = cache.manifest
    assert manifest["complete"] and manifest["shape"] == [100, 5, 5, 1, 10] and manifest["dtype"] == "float32"
    assert manifest["num_chunks"] == 7 and sorted(manifest["chunks"], key=int) == [str(k) for k in range(7)]
    assert (cache32 / "logits.npy").stat().st_size == 128 + storage_bytes(100, 25, 10, "fp32")
    assert not (cache32 / "chunks").exists() and cache.verify_checksums() == []
    dm = digits()
    dm.setup("fit")
    worst = 0.0
    for epoch in range(3):
        items = [dm.train_set[(index, epoch, SEED)] for index in range(0, 100, 3)]
        batch = {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}
        with torch.no_grad():
            live = teacher(batch["image"])
        cached = cache.lookup(batch["index"], batch["crop_top"], batch["crop_left"], batch["flip"])
        worst = max(worst, (live - cached).abs().max().item())
    assert worst <= 1e-5
    assert live.abs().max() > 2.0  # logits of a realistic size, for the fp16 test below


def test_fp16_error_bound(cache16: Path, cache32: Path) -> None:
    """fp16 stores each fp32 logit rounded to nearest: |error| <= 2^-11 |z| (half a step; logits here are normal
    fp16 numbers). Measured on this teacher and, in the report, on the trained digits teacher."""
    exact = np.load(cache32 / "logits.npy", mmap_mode="r").astype(np.float64)
    half = np.load(cache16 / "logits.npy", mmap_mode="r")
    assert half.dtype == np.float16 and TeacherCache(cache16).manifest["bytes"] * 2 == TeacherCache(cache32).manifest[
        "bytes"]
    error = np.abs(half.astype(np.float64) - exact)
    assert np.all(error <= FP16_STEP * np.abs(exact) + 2.0**-25)  # 2^-25: half the step of fp16's subnormals
    assert np.array_equal(half, exact.astype(np.float32).astype(np.float16))  # exactly the rounding, nothing else
    relative = error / np.maximum(np.abs(exact), 1e-3)
    assert 0 < error.max() <= FP16_STEP * np.abs(exact).max() and relative.max() <= FP16_STEP * 1.0001


def test_interrupted_build_resumes_and_skips_finished_chunks(tmp_path: Path, teacher_file: Path,
                                                             cache32: Path) -> None:
    calls: list[Progress] = []

    def interrupt(event: Progress) -> None:
        calls.append(event)
        if len(calls) == 3:
            raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", chunk_images=16, progress=interrupt)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is False and len(list((folder / "chunks").glob("*.json"))) == 3
    incomplete = r"incomplete .*'complete' is False; 4 of 7 chunks missing, e.g. \[3, 4"
    with pytest.raises(TeacherCacheError, match=incomplete):
        TeacherCache(folder)  # unwritten rows are zeros on disk: never served
    resumed: list[Progress] = []
    announced = []
    build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", chunk_images=4, progress=resumed.append,
                on_start=lambda m, pending: announced.append(pending))
    assert announced == [[3, 4, 5, 6]] and len(resumed) == 4  # chunks 0-2 skipped; the stored chunk size kept
    assert np.array_equal(np.load(folder / "logits.npy"), np.load(cache32 / "logits.npy"))
    assert TeacherCache(folder).manifest["complete"]
    # the same command once more: nothing to do, nothing rewritten
    before = snapshot(folder)
    build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", progress=resumed.append)
    assert snapshot(folder) == before and len(resumed) == 4


def test_chunk_records_without_their_manifest_are_not_trusted(tmp_path: Path, teacher_file: Path) -> None:
    events: list[Progress] = []

    def interrupt(event: Progress) -> None:
        events.append(event)
        if len(events) == 2:
            raise KeyboardInterrupt

    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", chunk_images=16, progress=interrupt)
    (folder / "manifest.json").unlink()  # the records of chunks 0 and 1 stay behind, their manifest is gone
    fresh: list[Progress] = []
    build_cache(scaled_teacher().half().float(), digits(), folder, dtype="fp32", chunk_images=16,
                progress=fresh.append)
    assert len(fresh) == 7  # every chunk computed again, for the new manifest


def test_partition_gives_each_process_a_disjoint_contiguous_range() -> None:
    for n in (0, 1, 5, 7, 100):
        chunks = list(range(3, 3 + n))
        for world in (1, 2, 3, 8):
            parts = [partition(chunks[::-1], world, rank) for rank in range(world)]
            assert [c for part in parts for c in part] == chunks  # disjoint, in order, covering everything
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        partition([1], 2, 2)


@pytest.mark.slow  # two spawned processes each import the library: about 30 s on 2 cores
def test_two_processes_fill_disjoint_ranges(tmp_path: Path, teacher_file: Path, cache32: Path) -> None:
    folder = tmp_path / "cache"
    manifest = build_cache(_teacher(teacher_file), digits(), folder, dtype="fp32", devices=2, accelerator="cpu",
                           chunk_images=16)
    ranks = [manifest["chunks"][str(k)]["rank"] for k in range(7)]
    assert ranks == [0, 0, 0, 1, 1, 1, 1]
    assert np.allclose(np.load(folder / "logits.npy"), np.load(cache32 / "logits.npy"), rtol=1e-6, atol=1e-6)
    assert TeacherCache(folder).verify_checksums() == []


def test_build_refuses_another_cache_or_a_foreign_folder(tmp_path: Path, teacher_file: Path, cache32: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cache32, copy)
    before = snapshot(copy)
    with pytest.raises(TeacherCacheError, match="holds another teacher-output cache.*dtype"):
        build_cache(_teacher(teacher_file), digits(), copy, dtype="fp16")
    with pytest.raises(TeacherCacheError, match="holds another.*dataset_fingerprint"):
        build_cache(_teacher(teacher_file), digits(train_subset=9), copy, dtype="fp32")
    assert snapshot(copy) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match="not empty"):
        build_cache(_teacher(teacher_file), digits(), foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_checksums_find_a_damaged_chunk(tmp_path: Path, cache16: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cache16, copy)
    array = np.load(copy / "logits.npy", mmap_mode="r+")
    array[40, 2, 3, 0, 5] += 1  # image 40: chunk 2 of 16 images each
    array.flush()
    del array
    assert TeacherCache(copy).verify_checksums() == [2]


def test_command_builds_from_a_fit_config(tmp_path: Path, teacher_file: Path, cache16: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cache.yaml"
    config.write_text(f"model:\n  teacher: resnet8\n  teacher_cache: {tmp_path / 'built'}\n")
    argv = ["--config", str(ROOT / "configs/digits/base.yaml"), "--config", str(config),
            f"--model.teacher_checkpoint={teacher_file}", "--data.train_subset", "10", "--data.data_seed=3",
            "--chunk-images", "16"]
    base = yaml.safe_load((ROOT / "configs/digits/base.yaml").read_text())["data"]["init_args"]
    merged = read_config([argv[1], argv[3]], argv[4:8])
    assert merged["data"]["init_args"] == {**base, "train_subset": 10, "data_seed": 3}
    assert merged["model"]["teacher"] == "resnet8" and merged["model"]["num_classes"] == 10
    cache_main(argv)
    out = capsys.readouterr()
    assert "100 images x 25 views (shift, padding 2, 1 flip state) x 10 classes, float16: 50,000 bytes" in out.out
    assert "2,500 teacher forwards in 7 chunks" in out.out and "7/7 chunks (100%)" in out.err
    assert np.array_equal(np.load(tmp_path / "built" / "logits.npy"), np.load(cache16 / "logits.npy"))
    cache_main(argv)
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(TeacherCacheError, match="unknown option"):
        cache_main([*argv, "--trainer.max_epochs=1"])


# ----------------------------------------------------------------------------------------------------------
# using it: the same losses and the same fits as the live teacher
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: KD(),
        lambda: KD(temperature=2.0, weight=9.0, standardize=True),  # KD+LS
        lambda: KD(temperature=CurriculumTemperature()),  # CTKD
        lambda: DKD(warmup_epochs=1),
        lambda: DIST(),
        lambda: NKD(),
    ],
    ids=["kd", "kd_ls", "ctkd", "dkd", "dist", "nkd"],
)
def test_served_methods_compute_the_live_losses_without_the_teacher(make, teacher_file: Path, cache32: Path) -> None:
    dm = digits()
    dm.setup("fit")
    live, cached = core(teacher_file, [make()]), core(teacher_file, [make()], teacher_cache=cache32)
    cached.teacher_cache.check_data(dm)
    calls = []
    cached.teacher.register_forward_hook(lambda *args: calls.append(1))
    for batch in list(dm.train_dataloader())[:2]:
        expected, got = live.compute_losses(batch), cached.compute_losses(batch)
        assert set(expected.losses) == set(got.losses)
        for name, value in expected.losses.items():
            assert torch.allclose(value, got.losses[name], rtol=1e-6, atol=1e-7), name
    assert calls == []  # the teacher never ran


def test_mlkd_weak_view_from_the_cache_strong_view_live(teacher_file: Path, cache32: Path) -> None:
    dm = digits(strong_view=True)
    dm.setup("fit")
    live, cached = core(teacher_file, [MLKD()]), core(teacher_file, [MLKD()], teacher_cache=cache32)
    cached.teacher_cache.check_data(dm)
    inputs = []
    cached.teacher.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    batch = next(iter(dm.train_dataloader()))
    expected, got = live.compute_losses(batch), cached.compute_losses(batch)
    for name, value in expected.losses.items():
        assert torch.allclose(value, got.losses[name], rtol=1e-6, atol=1e-7), name
    assert len(inputs) == 1 and torch.equal(inputs[0], batch["image_strong"])  # one forward: the strong view


def test_verification_measures_the_cache_against_the_live_teacher(teacher_file: Path, cache16: Path) -> None:
    dm = digits()
    dm.setup("fit")
    model = core(teacher_file, [KD()], teacher_cache=cache16, cache_verify_fraction=1.0)
    model.teacher_cache.check_data(dm)
    batch = next(iter(dm.train_dataloader()))
    model.compute_losses(batch)
    error = model.teacher_cache.pop_max_abs_error()
    with torch.no_grad():
        live = model.teacher(batch["image"])
    assert 0 < error.item() <= FP16_STEP * live.abs().max().item() + 1e-6 and model.teacher_cache.verified == BATCH
    assert model.teacher_cache.pop_max_abs_error() is None


def test_under_autocast_the_cache_says_it_serves_fp32_logits(teacher_file: Path, cache32: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    dm = digits()
    dm.setup("fit")
    model = core(teacher_file, [KD()], teacher_cache=cache32)
    model.teacher_cache.check_data(dm)
    batch = next(iter(dm.train_dataloader()))
    with caplog.at_level("WARNING", logger="lightning_kd.cache.serve"), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            model.compute_losses(batch)
    said = [r.getMessage() for r in caplog.records if r.name == "lightning_kd.cache.serve"]
    assert len(said) == 1 and "not bit-equal to a live one" in said[0]  # once


def _fit(teacher_file: Path, cache: Path | None, **options) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A seeded 3-epoch KD fit (18 steps): the student's weights at the start and at the end (the trainer's last
    metrics in ``_fit.metrics``)."""
    import lightning as L

    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet8", [KD()], task_loss_weight=0.1, num_classes=10,
                                teacher_checkpoint=str(teacher_file), input_size=(3, 16, 16),
                                teacher_cache=str(cache) if cache else None, **options)
    start = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(max_epochs=3, limit_val_batches=0, deterministic=True)
    trainer.fit(module, datamodule=digits())
    _fit.metrics = dict(trainer.callback_metrics)
    return start, {k: v.detach().clone() for k, v in module.student.state_dict().items()}


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, value in a.items():
        if value.is_floating_point():
            scale = value.double().abs().max().clamp_min(1e-12)
            worst = max(worst, ((value.double() - b[name].double()).abs().max() / scale).item())
    return worst


def test_a_kd_fit_with_the_fp32_cache_ends_with_the_live_fits_weights(teacher_file: Path, cache32: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    start, live = _fit(teacher_file, None)
    with caplog.at_level("INFO", logger="lightning_kd.cache.serve"):
        _, cached = _fit(teacher_file, cache32, cache_verify_fraction=0.25)
    assert _max_relative_difference(live, cached) <= 1e-6
    assert 0 <= _fit.metrics["train/cache_max_abs_error"] <= 1e-5  # the verification ran and was logged
    assert _max_relative_difference(start, live) > 1e-2  # the fit moved the weights: the comparison can fail
    said = [r.getMessage() for r in caplog.records if "serves the teacher's logits" in r.getMessage()]
    assert len(said) == 1 and "makes no forward in training" in said[0]  # said once


# ----------------------------------------------------------------------------------------------------------
# refusals: each with a clear error and nothing written
# ----------------------------------------------------------------------------------------------------------


def _refused(tmp_path: Path, cache: Path, match: str, make, error=TeacherCacheError) -> None:
    before = snapshot(tmp_path, cache)
    with pytest.raises(error, match=match):
        make()
    assert snapshot(tmp_path, cache) == before


def test_other_teacher_weights_are_refused(tmp_path: Path, cache32: Path) -> None:
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(create_model("resnet8", num_classes=10).state_dict(), other)
    sha = r"'[0-9a-f]{16}\.\.\.'"
    _refused(tmp_path, cache32, f"built for another run: teacher_fingerprint: expected {sha}, the cache has {sha}",
             lambda: core(other, [KD()], teacher_cache=cache32))
    _refused(tmp_path, cache32, "teacher_fingerprint", lambda: Distillation(
        "resnet8", "resnet14", [KD()], num_classes=10, input_size=(3, 16, 16), teacher_cache=cache32))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"train_subset": 9}, "dataset_fingerprint"),  # other images
        ({"seed": 1}, "dataset_fingerprint"),  # another split of the same images
        ({"augment": False}, r"augmentation.padding: expected 0, the cache has 2"),
        ({"size": 24}, "augmentation.crop_size"),
    ],
    ids=["subset", "split", "no-shift", "size"],
)
def test_other_data_or_augmentation_are_refused(options: dict, field: str, tmp_path: Path, teacher_file: Path,
                                                cache32: Path) -> None:
    model = core(teacher_file, [KD()], teacher_cache=cache32)
    _refused(tmp_path, cache32, field, lambda: model.teacher_cache.check_data(digits(**options)))
    # through a fit: refused in setup, before any step, nothing written in the run's folder either
    module = DistillationModule("resnet8", "resnet8", [KD()], teacher_checkpoint=str(teacher_file), num_classes=10,
                                input_size=(3, 16, 16), teacher_cache=str(cache32))
    trainer = make_trainer(max_epochs=1, default_root_dir=str(tmp_path / "run"))
    _refused(tmp_path, cache32, field, lambda: trainer.fit(module, datamodule=digits(**options)))
    assert trainer.global_step == 0


def test_a_truncated_incomplete_or_mislabelled_cache_is_refused(tmp_path: Path, teacher_file: Path,
                                                                cache16: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(cache16, truncated)
    with open(truncated / "logits.npy", "r+b") as handle:
        handle.truncate((truncated / "logits.npy").stat().st_size - 20)
    _refused(tmp_path, cache16, "truncated or damaged: its header needs 50128 bytes, the file has 50108",
             lambda: core(teacher_file, [KD()], teacher_cache=truncated))

    incomplete = tmp_path / "incomplete"
    shutil.copytree(cache16, incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    del manifest["chunks"]["4"]
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    _refused(tmp_path, cache16, r"incomplete .*1 of 7 chunks missing, e.g. \[4\]",
             lambda: core(teacher_file, [KD()], teacher_cache=incomplete))

    mislabelled = tmp_path / "dtype"
    shutil.copytree(cache16, mislabelled)
    manifest = json.loads((mislabelled / "manifest.json").read_text())
    manifest["dtype"] = "float32"  # an fp16 array under an fp32 manifest: the files do not belong together
    (mislabelled / "manifest.json").write_text(json.dumps(manifest))
    _refused(tmp_path, cache16, "field 'dtype': the manifest says float32, the array holds float16",
             lambda: core(teacher_file, [KD()], teacher_cache=mislabelled))

    _refused(tmp_path, cache16, "not a teacher-output cache",
             lambda: core(teacher_file, [KD()], teacher_cache=tmp_path))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [KD(), AT()], r"distiller 'at' \(AT\) reads the teacher tap 'stage1' on the default view"),
        (lambda: [FitNet()], r"distiller 'fitnet' \(FitNet\) reads the teacher tap 'stage2'"),
        (lambda: [KD(teacher_layers=["embedding"], student_layers=["embedding"])], "reads the teacher tap 'embedding'"),
        (lambda: [OFD(teacher_bn="train")], r"distiller 'ofd' \(OFD\) puts the teacher's BatchNorm in train mode"),
    ],
    ids=["at", "fitnet", "kd-on-features", "ofd-bn-train"],
)
def test_distillers_the_cache_cannot_serve_are_refused(make, match: str, tmp_path: Path, teacher_file: Path,
                                                       cache32: Path) -> None:
    _refused(tmp_path, cache32, match, lambda: core(teacher_file, make(), teacher_cache=cache32))


def test_other_settings_the_cache_cannot_serve_are_refused(tmp_path: Path, teacher_file: Path, cache32: Path) -> None:
    _refused(tmp_path, cache32, "teacher_precision='bf16'",
             lambda: core(teacher_file, [KD()], teacher_cache=cache32, teacher_precision="bf16"))
    _refused(tmp_path, cache32, "needs the teacher",
             lambda: Distillation("resnet8", None, [], num_classes=10, input_size=(3, 16, 16), teacher_cache=cache32))
    _refused(tmp_path, cache32, "cache_verify_fraction", error=ValueError,
             make=lambda: core(teacher_file, [KD()], teacher_cache=cache32, cache_verify_fraction=1.5))


class _NoViews(ClassificationDataModule):
    """Digits images without augmentation parameters in their batches."""

    num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.val_set = TensorDataset(torch.zeros(32, 3, 16, 16), torch.zeros(32, dtype=torch.long))


def test_data_without_view_parameters_is_refused(tmp_path: Path, teacher_file: Path, cache32: Path) -> None:
    model = core(teacher_file, [KD()], teacher_cache=cache32)
    _refused(tmp_path, cache32, "carry no view parameters", lambda: model.teacher_cache.check_data(_NoViews()),
             error=CacheUnsupportedError)
    _refused(tmp_path, cache32, "needs the data module", lambda: model.teacher_cache.check_data(None))
    batch = {"image": torch.zeros(2, 3, 16, 16), "label": torch.zeros(2, dtype=torch.long)}
    _refused(tmp_path, cache32, "data were not checked", lambda: model.compute_losses(batch))
    model.teacher_cache.check_data(digits())
    _refused(tmp_path, cache32, r"batch has no \['index', 'crop_top', 'crop_left', 'flip'\]",
             lambda: model.compute_losses(batch), error=CacheUnsupportedError)
    views = {"index": torch.tensor([0, 100]), "crop_top": torch.tensor([0, 0]), "crop_left": torch.tensor([0, 0]),
             "flip": torch.tensor([0, 0])}
    _refused(tmp_path, cache32, r"batch\['index'\] holds 0..100, outside the cache's 0..99",
             lambda: model.compute_losses({**batch, **views}))


def test_the_cache_pickles_without_its_memory_map(teacher_file: Path, cache32: Path) -> None:
    cache = TeacherCache(cache32)
    row = cache.lookup([5], [1], [2], [0])
    assert cache._array is not None
    payload = pickle.dumps(cache)
    assert len(payload) < 4000  # the manifest, not the 100,000-byte array
    assert torch.equal(pickle.loads(payload).lookup([5], [1], [2], [0]), row)
    assert np.array_equal(row.numpy(), np.load(cache32 / "logits.npy")[5, 1, 2, 0][None])


# ----------------------------------------------------------------------------------------------------------
# through the command line: SIGKILL and resume, two DDP processes
# ----------------------------------------------------------------------------------------------------------

CALLBACKS = '''
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveStudent(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank == 0:
            torch.save(module.student.state_dict(), self.path)
'''


def _cli_fit(tmp: Path, env: dict[str, str], run: str, callbacks: list[str], cache: Path | None, *extra: str,
             ckpt_path: str | None = None) -> subprocess.CompletedProcess:
    config = tmp / f"{run}.yaml"
    lines = ["trainer:", "  callbacks:"] + [f"    - {c}" for c in callbacks]
    config.write_text("\n".join(lines) + "\n")
    args = [sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(ROOT / "configs/digits/base.yaml"),
            "--config", str(ROOT / "configs/methods/kd.yaml"), "--config", str(config), "--model.teacher=resnet8",
            f"--model.teacher_checkpoint={tmp / 'teacher.pt'}", f"--data.train_subset={SUBSET}",
            f"--data.data_seed={SEED}", f"--data.batch_size={BATCH}", f"--trainer.default_root_dir={tmp / run}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            "--trainer.deterministic=true", "--trainer.max_epochs=2", "--trainer.accelerator=cpu", *extra]
    if cache is not None:
        args.append(f"--model.teacher_cache={cache}")
    if ckpt_path:
        args.append(f"--ckpt_path={ckpt_path}")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def _save(path: Path) -> str:
    return f"{{class_path: kdcallbacks.SaveStudent, init_args: {{path: {path}}}}}"


@pytest.fixture
def cli_setup(tmp_path: Path, cli_env: dict[str, str], teacher_file: Path, cache32: Path) -> dict[str, str]:
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    (tmp_path / "kdcallbacks.py").write_text(CALLBACKS)
    cli_env["PYTHONPATH"] = f"{tmp_path}:{cli_env['PYTHONPATH']}"
    cli_env["PYTHONWARNINGS"] = "ignore"
    cli_env["OMP_NUM_THREADS"] = "1"  # see one_thread
    return cli_env


@pytest.mark.slow  # three command-line fits: about a minute on 2 cores
def test_sigkill_and_resume_with_the_cache_equals_the_live_fit(tmp_path: Path, cli_setup: dict[str, str],
                                                               cache32: Path) -> None:
    live = _cli_fit(tmp_path, cli_setup, "live", [_save(tmp_path / "live.pt")], None)
    assert live.returncode == 0, live.stderr[-3000:]
    checkpoints = ("{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: "
                   f"{tmp_path / 'ckpt'}, every_n_train_steps: 1, save_last: true, save_top_k: 0}}}}")
    killer = "{class_path: kdcallbacks.KillAtStep, init_args: {step: 8}}"  # inside epoch 2 (6 steps an epoch)
    killed = _cli_fit(tmp_path, cli_setup, "killed", [checkpoints, killer], cache32)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 7
    resumed = _cli_fit(tmp_path, cli_setup, "resumed", [checkpoints, _save(tmp_path / "resumed.pt")], cache32,
                       ckpt_path=str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "live.pt", weights_only=True)
    assert _max_relative_difference(expected, torch.load(tmp_path / "resumed.pt", weights_only=True)) <= 1e-6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two command-line fits on two DDP processes each: about a minute on 2 cores
def test_two_ddp_processes_with_the_cache_equal_the_live_fit(tmp_path: Path, cli_setup: dict[str, str],
                                                             cache32: Path) -> None:
    results = {}
    for name, cache in (("live", None), ("cached", cache32)):
        env = dict(cli_setup, MASTER_PORT=str(_free_port()))
        run = _cli_fit(tmp_path, env, name, [_save(tmp_path / f"{name}.pt")], cache, "--trainer.strategy=ddp",
                       "--trainer.devices=2")
        assert run.returncode == 0, run.stderr[-4000:]
        results[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert _max_relative_difference(results["live"], results["cached"]) <= 1e-6
    single = _cli_fit(tmp_path, cli_setup, "single", [_save(tmp_path / "single.pt")], cache32)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _max_relative_difference(results["cached"], torch.load(tmp_path / "single.pt", weights_only=True)) > 1e-6
