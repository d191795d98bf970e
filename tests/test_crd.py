"""CRD: the NCE loss and scores against loops, the chance value at initialisation, the memory banks (unit
rows, checkpointed, sized from the data module, identical on every DDP rank), the in-batch variant, the
clear error without contrastive indices, short fits, the method configs after a pair (the digits config fits
through the command line in tests/test_conformance.py)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_trainer
from lightning_kd import DistillationModule
from lightning_kd.cli import run_cli
from lightning_kd.data import DigitsDataModule
from lightning_kd.distillers import CRD, KD
from lightning_kd.functional import contrast_loss, contrast_scores, crd_batch_loss, momentum_update

# ----------------------------------------------------------------------------------------------------------
# the pure functions
# ----------------------------------------------------------------------------------------------------------


def _nce_by_loop(x: list[list[float]], n_data: int) -> float:
    k = len(x[0]) - 1
    noise = k / n_data
    total = 0.0
    for row in x:
        total += math.log(row[0] / (row[0] + noise))
        for value in row[1:]:
            total += math.log(noise / (value + noise))
    return -total / len(x)


def test_contrast_loss_matches_a_loop() -> None:
    torch.manual_seed(0)
    for batch, k, n_data in ((3, 4, 20), (1, 1, 2), (5, 7, 1000)):
        x = torch.rand(batch, k + 1) * 3 + 1e-3
        expected = _nce_by_loop(x.tolist(), n_data)
        assert contrast_loss(x, n_data).item() == pytest.approx(expected, rel=1e-5)


def test_contrast_loss_gradient_matches_finite_differences() -> None:
    x = (torch.rand(3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: contrast_loss(t, 17), (x,))


def test_contrast_loss_degenerate_and_low_precision() -> None:
    zeros = torch.zeros(2, 4, requires_grad=True)  # an all-zero score row: clamped, finite
    loss = contrast_loss(zeros, 10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zeros.grad).all()
    x = torch.rand(4, 9) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = contrast_loss(x.bfloat16(), 100)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(_nce_by_loop(x.bfloat16().float().tolist(), 100), rel=1e-5)
    with pytest.raises(ValueError, match="K >= 1"):
        contrast_loss(torch.rand(3, 1), 10)


def _scores_by_loop(anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor, t: float) -> torch.Tensor:
    out = torch.empty(index.shape, dtype=torch.float64)
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            dot = sum(float(anchor[b, d]) * float(memory[index[b, k], d]) for d in range(anchor.shape[1]))
            out[b, k] = math.exp(dot / t)
    return out


@pytest.mark.parametrize("n_memory", [50, 5])  # rows gathered (B (K+1) < N) / one product with the bank
def test_contrast_scores_match_a_loop_on_both_paths(n_memory: int) -> None:
    torch.manual_seed(1)
    anchor = F.normalize(torch.randn(3, 4), dim=1)
    memory = F.normalize(torch.randn(n_memory, 4), dim=1)
    index = torch.randint(0, n_memory, (3, 6))
    got = contrast_scores(anchor, memory, index, temperature=0.07)
    torch.testing.assert_close(got.double(), _scores_by_loop(anchor, memory, index, 0.07), rtol=1e-5, atol=0)


def test_contrast_scores_gradients_agree_and_allow_in_place_bank_updates() -> None:
    torch.manual_seed(2)
    memory = F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    index = torch.randint(0, 12, (2, 3))
    anchor = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: contrast_scores(a, memory, index, 0.5), (anchor,))  # bank product
    big = torch.cat([memory, torch.randn(100, 4, dtype=torch.float64)])
    assert torch.autograd.gradcheck(lambda a: contrast_scores(a, big, index, 0.5), (anchor,))  # gathered rows
    # the scores must not alias the bank: updating it in place before backward changes nothing
    memory32 = memory.float()
    anchor32 = anchor.detach().float().requires_grad_()
    contrast_scores(anchor32, memory32.clone(), index, 0.5).sum().backward()
    reference = anchor32.grad.clone()
    anchor32.grad = None
    bank = memory32.clone()
    scores = contrast_scores(anchor32, bank, index, 0.5)
    bank.mul_(-1.0)
    scores.sum().backward()
    torch.testing.assert_close(anchor32.grad, reference)


def test_contrast_scores_stay_fp32_under_bf16_autocast() -> None:
    anchor = F.normalize(torch.randn(4, 16), dim=1)
    memory = F.normalize(torch.randn(30, 16), dim=1)
    index = torch.randint(0, 30, (4, 5))
    exact = contrast_scores(anchor, memory, index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = contrast_scores(anchor, memory, index)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact)  # autocast turned off inside: the same fp32 product


def test_momentum_update_matches_a_loop_and_is_unit() -> None:
    torch.manual_seed(3)
    rows, new = torch.randn(4, 3), torch.randn(4, 3)
    got = momentum_update(rows, new, momentum=0.5)
    for i in range(4):
        mixed = [0.5 * float(rows[i, d]) + 0.5 * float(new[i, d]) for d in range(3)]
        norm = math.sqrt(sum(v * v for v in mixed))
        for d in range(3):
            assert float(got[i, d]) == pytest.approx(mixed[d] / norm, rel=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    zero = momentum_update(torch.ones(1, 3), -torch.ones(1, 3))  # cancels out: stays zero, no NaN
    assert torch.equal(zero, torch.zeros(1, 3))


def _infonce_by_loop(s: torch.Tensor, t: torch.Tensor, temp: float, labels: list[int] | None) -> float:
    b = s.shape[0]
    sim = [[float(s[i] @ t[j]) / temp for j in range(b)] for i in range(b)]

    def allowed(i: int, j: int) -> bool:
        return i == j or labels is None or labels[i] != labels[j]

    total = 0.0
    for i in range(b):  # student anchor i against teacher j
        total -= sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(b) if allowed(i, j)))
    for j in range(b):  # teacher anchor j against student i
        total -= sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(b) if allowed(i, j)))
    return total / b


def test_crd_batch_loss_matches_a_loop() -> None:
    torch.manual_seed(4)
    s, t = F.normalize(torch.randn(5, 6), dim=1), F.normalize(torch.randn(5, 6), dim=1)
    labels = [0, 1, 0, 2, 1]
    assert crd_batch_loss(s, t, 0.5).item() == pytest.approx(_infonce_by_loop(s, t, 0.5, None), rel=1e-5)
    masked = crd_batch_loss(s, t, 0.5, labels=torch.tensor(labels))
    assert masked.item() == pytest.approx(_infonce_by_loop(s, t, 0.5, labels), rel=1e-5)
    assert crd_batch_loss(s[:1], t[:1]).item() == 0.0  # batch of one: the positive is the only candidate
    same = torch.zeros(3, 6)
    assert crd_batch_loss(same, same, labels=torch.tensor([1, 1, 1])).item() == 0.0  # all one class, zero rows
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: crd_batch_loss(a, y, 0.5, labels=torch.tensor([0, 1, 0])), (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crd_batch_loss(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)


# ----------------------------------------------------------------------------------------------------------
# the distiller
# ----------------------------------------------------------------------------------------------------------


def _built_crd(num_data: int | None, dim: int = 64, **kwargs) -> CRD:
    crd = CRD(num_data=num_data, **kwargs)
    crd.build([torch.zeros(2, dim)], [torch.zeros(2, dim)])
    return crd


def _crd_batch(labels: torch.Tensor, n_data: int, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    index = torch.randperm(n_data, generator=generator)[: len(labels)]
    negatives = torch.randint(0, n_data, (len(labels), k), generator=generator)
    return {"label": labels, "index": index, "contrast_index": torch.cat([index[:, None], negatives], dim=1)}


def test_crd_defaults_and_banks_in_the_state_dict() -> None:
    crd = _built_crd(num_data=100)
    assert (crd.weight, crd.temperature, crd.momentum, crd.feat_dim) == (0.8, 0.07, 0.5, 128)
    assert crd.student_layers == ["embedding"] and crd.teacher_layers == ["embedding"]
    bound = 1 / math.sqrt(128 / 3)
    for bank in (crd.memory_student, crd.memory_teacher):
        assert bank.shape == (100, 128) and bank.abs().max() <= bound and bank.abs().max() > 0.95 * bound
    assert torch.equal(crd.normalizer, torch.tensor([-1.0, -1.0]))
    state = crd.state_dict()
    assert {"memory_student", "memory_teacher", "normalizer"} <= set(state)
    trainable = {name for name, p in crd.named_parameters() if p.requires_grad}
    assert trainable == {f"embed_{side}.linear.{w}" for side in ("student", "teacher") for w in ("weight", "bias")}
    with pytest.raises(ValueError, match="negatives"):
        CRD(negatives="queue")


def test_crd_loss_at_initialisation_is_near_chance() -> None:
    """Chance value of each direction, with random embeddings against a freshly initialised bank.

    A bank coordinate is uniform in [-a, a], a = 1/sqrt(D/3): variance a^2/3 = 1/D. For a unit anchor v,
    <v, m> is then (nearly) normal with variance 1/D, so the logit z = <v, m>/T ~ N(0, s^2), s^2 = 1/(D T^2),
    and a score exp(z) is log-normal with mean exp(s^2/2). Z = (mean score) N, so x = score/Z = r/N with
    r = exp(z - s^2/2), E[r] = 1, E[log r] = -s^2/2. With noise K/N the N cancels:
        positive:  -log P_pos = log(1 + K/r_0)       -> E = log K - E[log r_0] + O(1/K) = log K + s^2/2
        negatives: -log P_neg = log(1 + r_k/K), summed over K -> E = K E[r]/K + O(1/K) = 1
    so each direction is about log K + 1 + 1/(2 D T^2), and CRD (both directions) twice that. The spread
    comes mostly from the B positives (log r_0 has standard deviation s = 1.26): about 0.08 at B = 512.
    """
    n_data, k, batch, dim = 20_000, 4096, 512, 64
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    crd = _built_crd(num_data=n_data, dim=dim)
    features = [torch.randn(batch, dim, generator=generator)], [torch.randn(batch, dim, generator=generator)]
    data = _crd_batch(torch.zeros(batch, dtype=torch.long), n_data, k, generator)
    loss = crd(*features, data)
    chance = 2 * (math.log(k) + 1 + 1 / (2 * 128 * 0.07**2))  # = 20.23 for K = 4096
    assert loss.item() == pytest.approx(chance, rel=0.02)
    z = crd.normalizer
    assert (z > 0).all()
    expected_z = n_data * math.exp(1 / (2 * 128 * 0.07**2))  # Z = N E[score] = N exp(s^2 / 2)
    torch.testing.assert_close(z, torch.full((2,), expected_z), rtol=0.02, atol=0)


def test_memory_update_rows_unit_and_only_the_batch_rows_change() -> None:
    n_data, dim = 40, 8
    generator = torch.Generator().manual_seed(6)
    crd = _built_crd(num_data=n_data, dim=dim)
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    fs, ft = torch.randn(5, dim, generator=generator), torch.randn(5, dim, generator=generator)
    data = _crd_batch(torch.arange(5), n_data, 7, generator)
    crd([fs], [ft], data)
    idx = data["index"]
    with torch.no_grad():
        v_s, v_t = crd.embed_student(fs), crd.embed_teacher(ft)
    torch.testing.assert_close(crd.memory_student[idx], F.normalize(0.5 * before_s[idx] + 0.5 * v_s, dim=1))
    torch.testing.assert_close(crd.memory_teacher[idx], F.normalize(0.5 * before_t[idx] + 0.5 * v_t, dim=1))
    others = torch.ones(n_data, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(crd.memory_student[others], before_s[others])
    for _ in range(4):
        crd([torch.randn(5, dim)], [torch.randn(5, dim)], _crd_batch(torch.arange(5), n_data, 7, generator))
    changed = (crd.memory_student != before_s).any(dim=1)
    torch.testing.assert_close(crd.memory_student[changed].norm(dim=1), torch.ones(int(changed.sum())))
    torch.testing.assert_close(crd.memory_teacher[changed].norm(dim=1), torch.ones(int(changed.sum())))


def test_repeated_index_keeps_the_last_write() -> None:
    crd = _built_crd(num_data=6, dim=4)
    before = crd.memory_student.clone()
    v = F.normalize(torch.randn(3, 128), dim=1)
    crd._update_memory(torch.tensor([2, 4, 2]), v, v)
    torch.testing.assert_close(crd.memory_student[2], F.normalize(0.5 * before[2] + 0.5 * v[2], dim=0))


def test_normalizer_and_banks_survive_a_state_dict_round_trip() -> None:
    generator = torch.Generator().manual_seed(7)
    crd = _built_crd(num_data=30, dim=8)
    data = _crd_batch(torch.arange(4), 30, 5, generator)
    crd([torch.randn(4, 8)], [torch.randn(4, 8)], data)
    fresh = _built_crd(num_data=None, dim=8)  # banks unknown yet: resized by the load
    assert fresh.num_data == 0
    fresh.load_state_dict(crd.state_dict())
    assert fresh.num_data == 30
    for name in ("memory_student", "memory_teacher", "normalizer"):
        assert torch.equal(getattr(fresh, name), getattr(crd, name))
    fs, ft = torch.randn(4, 8), torch.randn(4, 8)
    fresh.eval(), crd.eval()  # no bank update, so both see the same banks
    torch.testing.assert_close(fresh([fs], [ft], data), crd([fs], [ft], data))
    assert torch.equal(fresh.normalizer, crd.normalizer)  # Z not re-estimated


def test_crd_with_memory_banks_finite_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(8)
    crd = _built_crd(num_data=200, dim=16)
    data = _crd_batch(torch.arange(6), 200, 50, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd([torch.randn(6, 16).bfloat16() * 100], [torch.randn(6, 16).bfloat16() * 100], data)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert crd.memory_student.dtype == torch.float32 and torch.isfinite(crd.memory_student).all()
    # in-batch negatives (the registry's example) under autocast: tests/test_conformance.py


def test_crd_forward_errors() -> None:
    crd = _built_crd(num_data=None)
    with pytest.raises(KeyError, match="contrast_negatives"):
        crd([torch.randn(2, 64)], [torch.randn(2, 64)], {"label": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(RuntimeError, match="not allocated"):
        crd([torch.randn(2, 64)], [torch.randn(2, 64)], _crd_batch(torch.zeros(2), 10, 3, torch.Generator()))


# ----------------------------------------------------------------------------------------------------------
# with the module and the Trainer
# ----------------------------------------------------------------------------------------------------------


def _module(crd: CRD, *extra) -> DistillationModule:  # noqa: ANN002
    return DistillationModule("resnet8", "resnet8", [crd, *extra], num_classes=10, input_size=(3, 16, 16))


def test_missing_contrast_indices_is_a_clear_error_at_setup() -> None:
    model = _module(CRD())
    trainer = make_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"CRD needs .* set data\.contrast_negatives=16384"):
        trainer.fit(model, datamodule=DigitsDataModule(size=16, batch_size=8))


def test_short_fit_on_digits_gives_finite_losses() -> None:
    L.seed_everything(0)
    crd = CRD()
    model = _module(crd, KD(weight=1.0))
    dm = DigitsDataModule(size=16, batch_size=16, contrast_negatives=64)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            losses.append(float(trainer.callback_metrics["train/crd"]))

    make_trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1, callbacks=[Record()]).fit(model, datamodule=dm)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert crd.num_data == dm.num_samples  # the banks were sized from the data module at setup
    assert (crd.normalizer > 0).all()
    changed = (crd.memory_student.abs().sum(dim=1) > 0) & (crd.memory_student.norm(dim=1) - 1).abs().lt(1e-5)
    assert int(changed.sum()) >= 3 * 16  # every sample of the three batches has a unit row now
    assert "distillers.0.memory_student" in model.state_dict() and "distillers.0.normalizer" in model.state_dict()


def test_batch_negatives_need_no_contrast_indices() -> None:
    crd = CRD(negatives="batch")
    model = _module(crd)
    make_trainer(max_steps=2, limit_val_batches=0).fit(model, datamodule=DigitsDataModule(size=16, batch_size=8))
    assert crd.num_data == 0  # no bank


class _SaveBanks(L.Callback):
    """Each rank writes its memory banks at the start and at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _save(self, trainer: L.Trainer, pl_module: DistillationModule, when: str) -> None:
        crd = pl_module.distillers[0]
        state = {name: getattr(crd, name).clone() for name in ("memory_student", "memory_teacher", "normalizer")}
        torch.save(state, Path(self.folder) / f"{when}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        self._save(trainer, pl_module, "end")


def test_ddp_ranks_end_with_identical_memory_banks(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    L.seed_everything(0)
    model = _module(CRD())
    dm = DigitsDataModule(size=16, batch_size=8, contrast_negatives=32)
    # "ddp_spawn" (never plain "ddp" under pytest) with broadcast_buffers=False: DDP does not copy rank 0's
    # buffers over the others before each step, so equal banks can only come from CRD's gathered update
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", broadcast_buffers=False)
    trainer = make_trainer(devices=2, strategy=strategy, max_steps=3, limit_val_batches=0,
                           callbacks=[_SaveBanks(str(tmp_path))])
    trainer.fit(model, datamodule=dm)
    start = [torch.load(tmp_path / f"start_rank{r}.pt", weights_only=True) for r in (0, 1)]
    end = [torch.load(tmp_path / f"end_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ("memory_student", "memory_teacher", "normalizer"):
        assert torch.equal(start[0][name], start[1][name])
        assert torch.equal(end[0][name], end[1][name]), name
    for name in ("memory_student", "memory_teacher"):
        changed = (end[0][name] != start[0][name]).any(dim=1)
        assert int(changed.sum()) == 2 * 3 * 8  # both ranks' samples of all three steps, on each rank
    assert (end[0]["normalizer"] > 0).all()


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["crd", "crd_kd"])
def test_method_configs_compose_after_a_pair_file(method: str, tmp_path: Path) -> None:
    pair = tmp_path / "pair.yaml"
    pair.write_text(
        "model:\n  student: resnet8\n  teacher: resnet8\n  num_classes: 100\n"
        "data:\n  class_path: lightning_kd.data.CIFAR100DataModule\n"
        f"  init_args: {{data_dir: {tmp_path}, batch_size: 32, download: false}}\n"
    )
    cli = run_cli(["--config", str(pair), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
                   "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    assert type(dm).__name__ == "CIFAR100DataModule"
    assert (dm.contrast_negatives, dm.batch_size, dm.data_dir, dm.download) == (16384, 32, str(tmp_path), False)
    assert cli.model.task_loss_weight == 1.0
    crd = cli.model.distillers[0]
    assert isinstance(crd, CRD) and (crd.weight, crd.temperature, crd.feat_dim) == (0.8, 0.07, 128)
    if method == "crd_kd":
        kd = cli.model.distillers[1]
        assert isinstance(kd, KD) and (kd.weight, kd.temperature) == (1.0, 4.0)
    else:
        assert len(cli.model.distillers) == 1
