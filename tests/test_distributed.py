"""Data parallelism on CPU (gloo): global-batch relational losses equal one process with the whole batch,
and a plain method on 2 processes x batch 8 trains exactly like 1 process x batch 16."""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.distillers import CC, KD, PKT, RKD, SP

WORLD = 2
HALF = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_relational(name: str, scope: str) -> nn.Module:
    torch.manual_seed(0)  # CC's embeddings are learnable: the same initialisation on every rank
    distiller = {"rkd": RKD, "pkt": PKT, "sp": SP, "cc": CC}[name](batch_scope=scope)
    if name == "cc":
        distiller.build([torch.zeros(2, 6)], [torch.zeros(2, 5)])
    return distiller


def data() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear 'student' (so its gradient is easy to compare) and fixed inputs and teacher features."""
    torch.manual_seed(0)
    student = nn.Linear(4, 6).double()
    inputs = torch.randn(WORLD * HALF, 4, dtype=torch.float64)
    teacher = torch.randn(WORLD * HALF, 5, dtype=torch.float64)
    return student, inputs, teacher


def student_features(name: str, student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = student(x)
    return features.reshape(features.shape[0], 6, 1, 1) if name == "sp" else features


def teacher_features(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], 5, 1, 1) if name == "sp" else t


CASES = [(name, "global") for name in ("rkd", "pkt", "sp", "cc")] + [(name, "device") for name in ("rkd", "pkt")]


def _worker(rank: int, port: int, out: str) -> None:
    """Every case on this rank's half of the batch; rank 0 saves each case's losses (all ranks') and averaged
    gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, scope in CASES:
            student, inputs, teacher = data()
            distiller = make_relational(name, scope).double()
            rows = slice(rank * HALF, (rank + 1) * HALF)
            features = student_features(name, student, inputs[rows])
            loss = distiller([features], [teacher_features(name, teacher[rows])], {})
            loss.backward()
            grads = [p.grad for p in [*student.parameters(), *distiller.parameters()]]
            for grad in grads:  # what DDP does with parameter gradients
                dist.all_reduce(grad)
                grad /= WORLD
            losses = [torch.zeros(()) for _ in range(WORLD)]
            dist.all_gather(losses, loss.detach().float())
            results[f"{name}-{scope}"] = {"losses": torch.stack(losses).double(), "grads": grads}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The results of every case on two gloo processes (one spawn for all: starting processes is the cost)."""
    out = str(tmp_path_factory.mktemp("ranks") / "rank0.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _single(name: str, rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student, inputs, teacher = data()
    distiller = make_relational(name, "device").double()
    loss = distiller([student_features(name, student, inputs[rows])], [teacher_features(name, teacher[rows])], {})
    loss.backward()
    return loss.detach(), [p.grad for p in [*student.parameters(), *distiller.parameters()]]


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp", "cc"])
def test_global_batch_scope_equals_one_process_with_the_whole_batch(name: str, two_processes: dict) -> None:
    got = two_processes[f"{name}-global"]
    loss, grads = _single(name, slice(0, WORLD * HALF))
    for rank_loss in got["losses"]:
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-7)
    assert len(got["grads"]) == len(grads)
    for a, b in zip(got["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["rkd", "pkt"])
def test_device_batch_scope_averages_the_halves(name: str, two_processes: dict) -> None:
    got = two_processes[f"{name}-device"]
    halves = [_single(name, slice(r * HALF, (r + 1) * HALF)) for r in range(WORLD)]
    for rank in range(WORLD):
        torch.testing.assert_close(got["losses"][rank], halves[rank][0], rtol=1e-5, atol=1e-7)
    for index, grad in enumerate(got["grads"]):
        torch.testing.assert_close(grad, sum(h[1][index] for h in halves) / WORLD, rtol=1e-5, atol=1e-8)
    whole, _ = _single(name, slice(0, WORLD * HALF))
    assert not torch.allclose(got["losses"].mean(), whole)  # the two scopes really differ


# ------------------------------------------------------------------------------------------------------------
# a plain method through Lightning's DDP: 2 x 8 == 1 x 16
# ------------------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A network without BatchNorm, so data parallelism is exactly a bigger batch."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class FixedData(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        dataset = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
        # rank r reads samples r, r + 2, ...: each global batch of 2 x 8 is the single process's batch of 16
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def _kd_module() -> DistillationModule:
    torch.manual_seed(0)
    student, teacher = TinyNet(8), TinyNet(16)
    return DistillationModule(student, teacher=teacher, distillers=[KD()], task_loss_weight=0.1,
                              num_classes=10, input_size=(3, 8, 8))


def test_kd_on_two_processes_equals_one_process_with_the_double_batch() -> None:
    single = _kd_module()
    make_trainer(max_steps=4, limit_val_batches=0).fit(single, FixedData(batch_size=2 * HALF))
    spawned = _kd_module()
    trainer = make_trainer(max_steps=4, limit_val_batches=0, devices=WORLD, strategy="ddp_spawn",
                           use_distributed_sampler=False)
    trainer.fit(spawned, FixedData(batch_size=HALF))
    for (name, a), b in zip(single.student.state_dict().items(), spawned.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"student tensor {name} differs")
    assert not torch.equal(single.student.conv.weight, _kd_module().student.conv.weight)  # it did train
