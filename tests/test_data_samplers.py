"""Samplers and the training loader: seeded epoch orders, sharding over ranks (training: one permutation, a slice
per rank; evaluation: every sample exactly once), drop_last, the data modules' samplers under a fake trainer and
under two real processes, and the training loader's state_dict / load_state_dict."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_kd.data import (
    DigitsDataModule,
    ResumableDataLoader,
    ResumableRandomSampler,
    UnpaddedDistributedSampler,
)
from lightning_kd.data.sampling import epoch_permutation


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    data = list(range(50))
    a = ResumableRandomSampler(data, seed=3)
    first = list(a)
    assert sorted(first) == data and first == list(ResumableRandomSampler(data, seed=3))
    assert first != list(ResumableRandomSampler(data, seed=4))
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == data
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(a)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used


@pytest.mark.parametrize(("size", "replicas", "drop_last"),
                         [(50, 3, True), (50, 3, False), (48, 4, True), (7, 2, False)])
def test_training_shards_are_slices_of_one_permutation(size: int, replicas: int, drop_last: bool) -> None:
    data = list(range(size))
    shards = []
    for rank in range(replicas):
        sampler = ResumableRandomSampler(data, seed=5, num_replicas=replicas, rank=rank, drop_last=drop_last)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert isinstance(sampler, DistributedSampler) and len(sampler) == len(shards[-1])
    assert len({len(s) for s in shards}) == 1  # every rank the same number of samples (same number of steps)
    order = epoch_permutation(size, 5, 2).tolist()
    # position p of the epoch's order goes to rank p mod R, in order
    interleaved = [shards[p % replicas][p // replicas] for p in range(len(shards[0]) * replicas)]
    if drop_last:
        assert interleaved == order[: size - size % replicas]  # disjoint, only the tail of the permutation left out
        assert len(set(interleaved)) == len(interleaved)
    else:
        assert interleaved[:size] == order and set(interleaved) == set(data)  # padded with the order's first ones


@pytest.mark.parametrize(("size", "replicas"), [(10, 3), (9, 3), (1, 4), (359, 2)])
def test_evaluation_shards_cover_every_sample_exactly_once(size: int, replicas: int) -> None:
    data = list(range(size))
    seen = []
    for rank in range(replicas):
        sampler = UnpaddedDistributedSampler(data, num_replicas=replicas, rank=rank)
        indices = list(sampler)
        assert len(sampler) == len(indices) and indices == sorted(indices)
        seen += indices
    assert sorted(seen) == data  # the union is the whole set, no duplicates, nothing padded
    with pytest.raises(ValueError, match="rank"):
        UnpaddedDistributedSampler(data, num_replicas=2, rank=2)


def test_sampler_yields_keys_and_starts_part_way() -> None:
    data = list(range(20))
    sampler = ResumableRandomSampler(data, seed=1, num_replicas=2, rank=1, keys=True)
    sampler.set_epoch(4)
    keys = list(sampler)
    assert all(k[1:] == (4, 1) for k in keys)
    sampler.start_at(8)  # 8 samples of the global order done: 4 per rank
    assert list(sampler) == keys[4:]
    assert list(sampler) == keys  # start_at applies once


class _FakeTrainer(SimpleNamespace):
    """What the data modules read from a Trainer."""


def _fake_trainer(world_size: int, rank: int) -> _FakeTrainer:
    from lightning.pytorch.accelerators import CPUAccelerator

    return _FakeTrainer(world_size=world_size, global_rank=rank, accelerator=CPUAccelerator(), current_epoch=0,
                        num_training_batches=float("inf"),
                        strategy=SimpleNamespace(broadcast=lambda value, src=0: value))


@pytest.mark.parametrize("drop_last", [True, False])
def test_data_module_shards_under_a_fake_trainer(drop_last: bool) -> None:
    world = 3
    train_seen, val_seen, test_seen, lengths = [], [], [], set()
    for rank in range(world):
        dm = DigitsDataModule(size=8, batch_size=16, return_index=True, drop_last=drop_last, data_seed=2)
        dm.trainer = _fake_trainer(world, rank)  # type: ignore[assignment]
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ResumableRandomSampler)
        assert (loader.sampler.num_replicas, loader.sampler.rank, loader.drop_last) == (world, rank, drop_last)
        lengths.add(len(loader))
        train_seen += [i for batch in loader for i in batch["index"].tolist()]
        val_seen += [tuple(image.flatten()[:20].tolist()) for b in dm.val_dataloader() for image in b["image"]]
        test_seen += [len(b["label"]) for b in dm.test_dataloader()]
        assert isinstance(dm.val_dataloader().sampler, UnpaddedDistributedSampler)
    n = dm.num_samples
    assert len(lengths) == 1  # the same number of steps on every rank
    if drop_last:  # full batches only, no sample twice
        assert len(train_seen) == len(set(train_seen)) and len(train_seen) % (16 * world) == 0
        assert len(train_seen) > n - 16 * world - world
    else:  # every sample, the padding repeats a few
        assert set(train_seen) == set(range(n))
    assert len(val_seen) == len(dm.val_set) and sum(test_seen) == len(dm.test_set)


def test_single_process_loaders() -> None:
    dm = DigitsDataModule(size=8, batch_size=100, data_seed=0)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == dm.num_samples // 100 and all(len(b["label"]) == 100 for b in train)  # drop_last
    keep = DigitsDataModule(size=8, batch_size=100, drop_last=False)
    keep.setup("fit")
    assert sum(len(b["label"]) for b in keep.train_dataloader()) == keep.num_samples
    assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    tiny = DigitsDataModule(size=8, batch_size=5000)
    tiny.setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size=5000"):
        tiny.train_dataloader()


def test_the_loader_does_not_touch_the_global_generator() -> None:
    dm = DigitsDataModule(size=8, batch_size=64, contrast_negatives=8, strong_view=True, data_seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for _ in dm.train_dataloader():
        pass
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------------------
# the loader's state
# ----------------------------------------------------------------------------------------------------------


def _loader(workers: int = 0) -> ResumableDataLoader:
    dm = DigitsDataModule(size=8, batch_size=32, return_index=True, num_workers=workers, data_seed=4)
    dm.setup("fit")
    return dm.train_dataloader()  # type: ignore[return-value]


def _indices(batches: object) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]  # type: ignore[attr-defined]


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_the_same_pass(workers: int) -> None:
    reference = _loader(workers)
    reference.sampler.set_epoch(1)
    whole = _indices(reference)
    iterator = iter(reference)
    seen = [next(iterator)["index"].tolist() for _ in range(5)]
    state = reference.state_dict()
    assert (state["epoch"], state["batches"], state["complete"]) == (1, 5, False) and seen == whole[:5]
    resumed = _loader(workers)
    resumed.load_state_dict(state)
    rest = _indices(resumed)
    assert rest == whole[5:]
    assert resumed.state_dict()["batches"] == len(whole) and resumed.state_dict()["complete"]
    again = _indices(resumed)  # the next pass is a whole epoch again
    assert again == whole


def test_a_complete_pass_resumes_at_the_next_epoch() -> None:
    loader = _loader()
    for _ in loader:
        pass
    state = loader.state_dict()
    assert state["complete"] and state["epoch"] == 0
    resumed = _loader()
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 1
    expected = _loader()
    expected.sampler.set_epoch(1)
    assert _indices(resumed) == _indices(expected)


def test_a_shortened_epoch_counts_as_complete() -> None:
    # limit_train_batches: the Trainer's num_training_batches is below len(loader)
    loader = _loader()
    loader.epoch_length = lambda: 3
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    assert loader.state_dict()["complete"]
    with pytest.raises(KeyError, match="needs"):
        loader.load_state_dict({"epoch": 0})


# ----------------------------------------------------------------------------------------------------------
# two processes (gloo)
# ----------------------------------------------------------------------------------------------------------


class _RankSeededDigits(DigitsDataModule):
    """Digits whose ranks start from different global seeds (no seed_everything): rank 0's seed must win."""

    def setup(self, stage: str | None = None) -> None:
        torch.manual_seed(100 + self.trainer.global_rank)
        super().setup(stage)
        from lightning_kd.data import DictDataset

        self.val_set = DictDataset(self.val_set.dataset, return_index=True)


class _Recorder(L.LightningModule):
    """Writes the training and validation indices each rank saw to ``<out>/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(3 * 8 * 8, 10)
        self.train_indices: list[int] = []
        self.val_indices: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_indices += batch["index"].tolist()
        return torch.nn.functional.cross_entropy(self.layer(batch["image"].flatten(1)), batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_indices += batch["index"].tolist() if "index" in batch else []

    def on_train_end(self) -> None:
        seed = getattr(self.trainer.train_dataloader.sampler, "seed", None)
        record = {"train": self.train_indices, "val": self.val_indices, "seed": seed}
        (Path(self.out) / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow  # two processes start: about 30 s on 2 cores
def test_two_processes_share_one_order_and_see_each_validation_sample_once(tmp_path: Path) -> None:
    from conftest import make_trainer

    dm = _RankSeededDigits(size=8, batch_size=16, return_index=True)
    trainer = make_trainer(max_steps=6, limit_train_batches=3, devices=2, strategy="ddp_spawn")
    trainer.fit(_Recorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seed"] == ranks[1]["seed"] == 100  # rank 0's initial seed, broadcast
    # training: per epoch, the ranks' batches interleave into one permutation (disjoint, no repeats)
    for epoch in range(2):
        a, b = (r["train"][epoch * 48 : (epoch + 1) * 48] for r in ranks)
        assert not set(a) & set(b) and len(set(a) | set(b)) == 96
        order = epoch_permutation(1079, 100, epoch).tolist()  # the digits' training split: 1,079 samples
        assert [x for pair in zip(a, b) for x in pair] == order[:96]
    # validation (after each of the 2 epochs): each sample exactly once over the two ranks, per run
    fresh = DigitsDataModule(size=8)
    fresh.setup("fit")
    n = len(fresh.val_set)
    shares = [len(range(r, n, 2)) for r in range(2)]
    assert [len(r["val"]) for r in ranks] == [2 * shares[0], 2 * shares[1]]
    for k in range(2):
        run = [i for r in range(2) for i in ranks[r]["val"][k * shares[r] : (k + 1) * shares[r]]]
        assert sorted(run) == list(range(n))


def test_overfit_batches_replaces_the_sampler_and_still_trains(tmp_path: Path) -> None:
    # Lightning rebuilds the training loader with a sequential sampler: the loader must accept it
    from conftest import make_trainer

    module = _Recorder(str(tmp_path))
    make_trainer(overfit_batches=2, max_epochs=2, limit_val_batches=0).fit(
        module, datamodule=DigitsDataModule(size=8, batch_size=16, return_index=True))
    assert module.train_indices == list(range(32)) * 2


@pytest.mark.slow  # two processes start: about 30 s on 2 cores
def test_two_process_validation_equals_one_device() -> None:
    """Every validation sample counted once over the ranks, the metrics synchronised: the same top-1, top-5 and loss
    as one device on the same weights (the padded sampler once gave 0.1333 against 0.1309)."""
    from conftest import make_trainer
    from lightning_kd import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule("resnet8", num_classes=10, input_size=(3, 8, 8))
    results = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        trainer = make_trainer(devices=devices, strategy=strategy)
        (metrics,) = trainer.validate(module, DigitsDataModule(size=8, batch_size=16), verbose=False)
        results.append(metrics)
    one, two = results
    assert one.keys() == two.keys() and {"val/acc1", "val/acc5", "val/loss"} <= one.keys()
    assert one["val/acc1"] == two["val/acc1"] and one["val/acc5"] == two["val/acc5"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
