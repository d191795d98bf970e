"""The modern logit distillers (KD+LS, DKD, DIST, NKD, CTKD's learnable temperature) and their configs.

The distillers are checked against the pure functions (themselves checked in test_functional_logit.py), so these
tests are about what the distiller adds: DKD's warm-up per epoch, DIST's batch scope, CTKD's temperature as a
trained fp32 parameter that ascends the loss, argument validation, and the CIFAR-100 configs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from lightning_kd.distillers import DIST, DKD, KD, NKD, CurriculumTemperature
from lightning_kd.functional import ctkd_lambda, dist_loss, dkd_loss, kd_loss, nkd_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAIRS = sorted(p.stem for p in (CONFIGS / "cifar100" / "pairs").glob("*.yaml"))
TAU_0 = 1 + 20 / (1 + math.exp(-1))  # CTKD's initial temperature, 15.62


def _logits(b: int = 6, c: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=dtype) * 3
    zt = torch.randn(b, c, generator=g, dtype=dtype) * 3
    return zs, zt, torch.randint(0, c, (b,), generator=g)


# ----------------------------------------------------------------------------------------------------------
# KD + LS
# ----------------------------------------------------------------------------------------------------------
def test_kd_defaults_are_unchanged_and_standardize_is_an_option() -> None:
    zs, zt, _ = _logits()
    kd = KD()
    assert (kd.weight, kd.temperature, kd.standardize) == (0.9, 4.0, False)
    torch.testing.assert_close(kd([zs], [zt], {}), kd_loss(zs, zt, 4.0))
    ls = KD(temperature=2.0, weight=9.0, standardize=True)
    torch.testing.assert_close(ls([zs], [zt], {}), kd_loss(zs, zt, 2.0, standardize=True))
    assert not torch.allclose(ls([zs], [zt], {}), kd_loss(zs, zt, 2.0))
    assert kd.metrics() == {} and kd.current_temperature.item() == 4.0


# ----------------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------------
def test_dkd_warmup_factor_per_epoch() -> None:
    zs, zt, y = _logits()
    dkd = DKD()
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup_epochs, dkd.weight) == (1.0, 8.0, 4.0, 20, 1.0)
    full = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)
    # the reference counts epochs from 1: the first epoch (0-based 0) already weighs 1/20
    expected = {0: 1 / 20, 1: 2 / 20, 9: 10 / 20, 18: 19 / 20, 19: 1.0, 20: 1.0, 239: 1.0}
    for epoch, factor in expected.items():
        dkd.set_epoch(epoch)
        assert dkd.warmup_factor() == pytest.approx(factor)
        torch.testing.assert_close(dkd([zs], [zt], {"label": y}), factor * full)
    assert dkd.warmup_factor() != 0.0
    no_warmup = DKD(warmup_epochs=0)
    one = DKD(warmup_epochs=1)  # ImageNet setting: weight 1 from the first epoch
    for d in (no_warmup, one):
        d.set_epoch(0)
        torch.testing.assert_close(d([zs], [zt], {"label": y}), full)


def test_dkd_options_reach_the_loss() -> None:
    zs, zt, y = _logits()
    dkd = DKD(alpha=9.0, beta=72.0, temperature=2.0, warmup_epochs=20, standardize=True)
    dkd.set_epoch(30)
    torch.testing.assert_close(dkd([zs], [zt], {"label": y}), dkd_loss(zs, zt, y, 9.0, 72.0, 2.0, standardize=True))


def test_dkd_refuses_soft_labels_from_the_batch() -> None:
    zs, zt, y = _logits()
    with pytest.raises(ValueError, match="soft labels"):
        DKD()([zs], [zt], {"label": F.one_hot(y, 10).float()})


def test_dkd_warns_at_setup_with_two_classes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DKD().build([torch.zeros(2, 10)], [torch.zeros(2, 10)])
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        DKD().build([torch.zeros(2, 2)], [torch.zeros(2, 2)])
    assert "NCKD" in caplog.text and "always 0" in caplog.text
    with pytest.raises(ValueError, match="at least 2 classes"):
        DKD().build([torch.zeros(2, 1)], [torch.zeros(2, 1)])


# ----------------------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------------------
def test_dist_defaults_and_values() -> None:
    zs, zt, _ = _logits()
    d = DIST()
    assert (d.beta, d.gamma, d.temperature, d.weight, d.batch_scope) == (1.0, 1.0, 4.0, 2.0, "device")
    torch.testing.assert_close(d([zs], [zt], {}), dist_loss(zs, zt, 1.0, 1.0, 4.0))
    torch.testing.assert_close(DIST(beta=2.0, gamma=0.5, temperature=1.0)([zs], [zt], {}), dist_loss(zs, zt, 2, 0.5))


def test_dist_global_scope_on_one_process_equals_device_scope() -> None:
    zs, zt, _ = _logits()
    grads, values = [], []
    for scope in ("device", "global"):
        s = zs.clone().requires_grad_(True)
        loss = DIST(batch_scope=scope)([s], [zt], {})
        loss.backward()
        values.append(loss.detach())
        grads.append(s.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch_scope"):
        DIST(batch_scope="world")  # type: ignore[arg-type]


WORLD, HALF = 2, 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist_worker(rank: int, port: int, scope: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        zs, zt, _ = _logits(b=WORLD * HALF, dtype=torch.float64)
        rows = slice(rank * HALF, (rank + 1) * HALF)
        s = zs[rows].clone().requires_grad_(True)
        loss = DIST(batch_scope=scope)([s], [zt[rows]], {})
        loss.backward()
        grads = [torch.zeros(WORLD * HALF, zs.shape[1], dtype=torch.float64) for _ in range(WORLD)]
        dist.all_gather(grads, _pad(s.grad, rank))
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"losses": torch.stack(losses), "grad": sum(grads)}, out)
    finally:
        dist.destroy_process_group()


def _pad(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's logit gradient placed in its rows of the whole batch."""
    full = torch.zeros(WORLD * HALF, grad.shape[1], dtype=grad.dtype)
    full[rank * HALF : (rank + 1) * HALF] = grad
    return full


@pytest.mark.slow  # two processes: about 10 s alone, much more on a busy machine
def test_dist_global_scope_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    """Gathered with gradients: each rank's loss is the whole batch's, and each rank's logits get the gradient
    of the whole-batch loss times the world size (DDP then averages the parameter gradients over the ranks)."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_dist_worker, args=(_free_port(), "global", out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    zs, zt, _ = _logits(b=WORLD * HALF, dtype=torch.float64)
    s = zs.clone().requires_grad_(True)
    whole = dist_loss(s, zt, 1.0, 1.0, 4.0)
    whole.backward()
    for rank_loss in got["losses"]:
        torch.testing.assert_close(rank_loss, whole.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["grad"] / WORLD, s.grad, rtol=1e-8, atol=1e-12)
    halves = [dist_loss(zs[r * HALF : (r + 1) * HALF], zt[r * HALF : (r + 1) * HALF], 1.0, 1.0, 4.0) for r in (0, 1)]
    assert abs(sum(halves).item() / 2 - whole.item()) > 1e-4  # the per-device scope really differs


# ----------------------------------------------------------------------------------------------------------
# NKD
# ----------------------------------------------------------------------------------------------------------
def test_nkd_reads_the_labels() -> None:
    zs, zt, y = _logits()
    n = NKD()
    assert (n.temperature, n.gamma, n.weight) == (1.0, 1.5, 1.0)
    torch.testing.assert_close(n([zs], [zt], {"label": y}), nkd_loss(zs, zt, y, 1.0, 1.5))
    torch.testing.assert_close(NKD(temperature=3.0, gamma=3.5)([zs], [zt], {"label": y}), nkd_loss(zs, zt, y, 3, 3.5))


# ----------------------------------------------------------------------------------------------------------
# CTKD
# ----------------------------------------------------------------------------------------------------------
def test_curriculum_temperature_starts_at_15_62_and_is_a_submodule() -> None:
    kd = KD(temperature=CurriculumTemperature())
    module = kd.temperature
    assert module.theta.dtype == torch.float32 and module.theta.item() == 1.0
    assert "temperature.theta" in kd.state_dict() and any(p is module.theta for p in kd.parameters())
    assert any(p is module.theta for p in kd.main_parameters())
    tau = kd.current_temperature
    assert tau.item() == pytest.approx(TAU_0, rel=1e-6) and not tau.requires_grad and tau.dtype == torch.float32
    torch.testing.assert_close(kd.metrics()["temperature"], tau)
    with torch.no_grad():
        module.theta.fill_(-2.0)
    assert kd.current_temperature.item() == pytest.approx(1 + 20 / (1 + math.exp(2)), rel=1e-6)
    assert module.init_config() == {
        "class_path": "lightning_kd.distillers.ctkd.CurriculumTemperature",
        "init_args": {"t_start": 1.0, "t_range": 20.0, "ramp_epochs": 10, "init": 1.0, "instance_wise": False},
    }


def _kd_of_theta(zs: torch.Tensor, zt: torch.Tensor, theta: float) -> float:
    """The KD loss as a function of theta, without any gradient reversal (fp64)."""
    tau = 1 + 20 / (1 + math.exp(-theta))
    return kd_loss(zs, zt, tau).item()


@pytest.mark.parametrize("epoch", [0, 4, 9, 30])
def test_ctkd_theta_gradient_is_lambda_times_the_loss_gradient(epoch: int) -> None:
    """The reversal factor follows the distiller's 0-based epoch (lambda of epoch + 1), and theta's gradient is
    lambda times the true derivative of the loss: with lambda < 0, theta ascends the KD loss."""
    zs, zt, _ = _logits(dtype=torch.float64)
    kd = KD(temperature=CurriculumTemperature())
    kd.set_epoch(epoch)
    kd([zs], [zt], {}).backward()
    eps = 1e-6
    true_derivative = (_kd_of_theta(zs, zt, 1 + eps) - _kd_of_theta(zs, zt, 1 - eps)) / (2 * eps)
    lam = ctkd_lambda(epoch + 1, 10)
    assert lam < 0
    assert kd.temperature.theta.grad.item() == pytest.approx(lam * true_derivative, rel=1e-4)
    assert kd.temperature.theta.grad.item() * true_derivative < 0  # opposite signs: SGD steps up the loss


def test_ctkd_sgd_step_raises_the_distillation_loss() -> None:
    zs, zt, _ = _logits()
    kd = KD(temperature=CurriculumTemperature())
    kd.set_epoch(20)
    optimizer = torch.optim.SGD(kd.parameters(), lr=1.0)
    before = kd([zs], [zt], {})
    before.backward()
    optimizer.step()
    after = kd([zs], [zt], {})
    assert kd.temperature.theta.item() != 1.0
    assert after.item() > before.item()


def test_ctkd_theta_is_fp32_under_bf16_autocast_and_moves_with_sgd() -> None:
    zs, zt, y = _logits()
    for distiller in (KD(temperature=CurriculumTemperature()), DKD(temperature=CurriculumTemperature())):
        distiller.set_epoch(3)
        optimizer = torch.optim.SGD(distiller.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tau = distiller.temperature(distiller.epoch)
            loss = distiller([zs.bfloat16()], [zt.bfloat16()], {"label": y})
        assert tau.dtype == torch.float32 and loss.dtype == torch.float32
        loss.backward()
        theta = distiller.temperature.theta
        assert theta.dtype == torch.float32 and theta.grad.dtype == torch.float32
        assert torch.isfinite(theta.grad) and theta.grad.item() != 0.0
        optimizer.step()
        assert theta.dtype == torch.float32 and theta.item() != 1.0


def test_ctkd_with_dkd_is_finite_on_large_logits() -> None:
    """DKD + a learnable temperature gave NaN in the CTKD issue tracker; the log-space DKD does not."""
    zs, zt, y = _logits()
    dkd = DKD(temperature=CurriculumTemperature(), standardize=False)
    dkd.set_epoch(25)
    s = (zs * 1e4).requires_grad_(True)
    loss = dkd([s], [zt * 1e4], {"label": y})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(dkd.temperature.theta.grad)
    tau = dkd.current_temperature
    torch.testing.assert_close(loss.detach(), dkd_loss(zs * 1e4, zt * 1e4, y, 1.0, 8.0, tau), rtol=1e-5, atol=0)
    assert set(dkd.metrics()) == {"temperature"}


@pytest.mark.slow  # a Lightning fit: about 20 s on a busy machine
def test_ctkd_trains_inside_the_module_under_bf16_mixed() -> None:
    """In a real fit: theta is in the optimizer, moves, and stays fp32 under bf16-mixed precision."""
    import lightning as L

    from conftest import make_trainer
    from lightning_kd import DistillationModule
    from lightning_kd.data import DigitsDataModule

    L.seed_everything(0)
    kd = KD(temperature=CurriculumTemperature(ramp_epochs=1))
    module = DistillationModule(
        "resnet8", teacher="resnet14", distillers=[kd], task_loss_weight=0.1, num_classes=10, input_size=(3, 16, 16)
    )
    data = DigitsDataModule(size=16, batch_size=16)
    trainer = make_trainer(precision="bf16-mixed", max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    theta = kd.temperature.theta
    assert theta.dtype == torch.float32 and theta.item() != 1.0 and math.isfinite(theta.item())
    assert any(p is theta for group in trainer.optimizers[0].param_groups for p in group["params"])


def test_curriculum_temperature_arguments() -> None:
    with pytest.raises(NotImplementedError, match="instance-wise"):
        CurriculumTemperature(instance_wise=True)
    for kwargs, name in (({"t_start": 0.0}, "t_start"), ({"t_range": -1.0}, "t_range"),
                         ({"ramp_epochs": 0}, "ramp_epochs"), ({"init": math.nan}, "init")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            CurriculumTemperature(**kwargs)
    with pytest.raises(TypeError, match="CurriculumTemperature"):
        KD(temperature=torch.nn.Linear(1, 1))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------------------
BAD = [
    (KD, "temperature", [0.0, -1.0, math.nan, math.inf]),
    (KD, "weight", [-0.1, math.nan, math.inf]),
    (DKD, "temperature", [0.0, -2.0, math.nan]),
    (DKD, "alpha", [-1.0, math.nan, math.inf]),
    (DKD, "beta", [-1.0, math.nan]),
    (DKD, "weight", [-1.0, math.inf]),
    (DKD, "warmup_epochs", [-1, 2.5]),
    (DIST, "temperature", [0.0, -1.0, math.inf]),
    (DIST, "beta", [-1.0, math.nan]),
    (DIST, "gamma", [-1.0, math.inf]),
    (DIST, "weight", [-2.0, math.nan]),
    (NKD, "temperature", [0.0, math.nan]),
    (NKD, "gamma", [-1.5, math.inf]),
    (NKD, "weight", [-1.0, math.nan]),
]


@pytest.mark.parametrize(("cls", "argument", "values"), BAD, ids=[f"{c.__name__}-{a}" for c, a, _ in BAD])
def test_constructors_name_the_bad_argument(cls: type, argument: str, values: list) -> None:
    for value in values:
        with pytest.raises(ValueError, match=argument):
            cls(**{argument: value})


def test_zero_factors_are_allowed() -> None:
    DKD(alpha=0.0, beta=0.0, warmup_epochs=0)
    DIST(beta=0.0, gamma=0.0)
    NKD(gamma=0.0)


@pytest.mark.parametrize("cls", [DKD, DIST, NKD])
def test_one_layer_per_side(cls: type) -> None:
    with pytest.raises(ValueError, match="one layer"):
        cls(student_layers=["logits", "embedding"], teacher_layers=["logits", "embedding"])


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _distiller_spec(path: Path) -> dict:
    (spec,) = _load(path)["model"]["distillers"]
    return spec


def _build(spec: dict) -> torch.nn.Module:
    """Build a distiller from a config entry (nested class_path specs too), without the CLI."""
    import importlib

    def build(value):  # noqa: ANN001, ANN202
        if isinstance(value, dict) and "class_path" in value:
            module, _, name = value["class_path"].rpartition(".")
            args = {k: build(v) for k, v in (value.get("init_args") or {}).items()}
            return getattr(importlib.import_module(module), name)(**args)
        return value

    return build(spec)


# (CE weight, distiller class, the attributes of the official res32x4 -> res8x4 setting)
METHODS = {
    "kd_ls": (0.1, KD, {"weight": 9.0, "temperature": 2.0, "standardize": True}),
    "dkd": (1.0, DKD, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20, "weight": 1.0}),
    "dkd_ls": (1.0, DKD, {"alpha": 9.0, "beta": 72.0, "temperature": 2.0, "standardize": True, "weight": 1.0}),
    "dist": (1.0, DIST, {"beta": 1.0, "gamma": 1.0, "temperature": 4.0, "weight": 2.0, "batch_scope": "device"}),
    "nkd": (1.0, NKD, {"temperature": 1.0, "gamma": 1.5, "weight": 1.0}),
    "ctkd": (0.1, KD, {"weight": 0.9, "standardize": False}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_config_holds_the_official_setting(method: str) -> None:
    config = _load(CONFIGS / "methods" / f"{method}.yaml")
    ce, cls, expected = METHODS[method]
    assert config["model"]["task_loss_weight"] == ce
    distiller = _build(_distiller_spec(CONFIGS / "methods" / f"{method}.yaml"))
    assert type(distiller) is cls
    assert {k: getattr(distiller, k) for k in expected} == expected
    if method == "ctkd":
        tau = distiller.temperature
        assert isinstance(tau, CurriculumTemperature)
        assert (tau.t_start, tau.t_range, tau.ramp_epochs) == (1.0, 20.0, 10)


# the per-pair values of the official code (mdistiller configs; names of the LS repository's logs)
OVERRIDES = {
    "dkd": {
        "vgg13-vgg8": {"beta": 6.0}, "vgg13-MobileNetV2": {"beta": 6.0}, "wrn_40_2-wrn_16_2": {"beta": 6.0},
        "wrn_40_2-wrn_40_1": {"beta": 6.0}, "resnet56-resnet20": {"beta": 2.0}, "resnet110-resnet32": {"beta": 2.0},
    },
    "kd_ls": {
        "vgg13-vgg8": {"temperature": 3.0, "weight": 9.0}, "vgg13-MobileNetV2": {"temperature": 3.0, "weight": 9.0},
        "resnet110-resnet20": {"temperature": 4.0, "weight": 12.0},
        "ResNet50-MobileNetV2": {"temperature": 3.0, "weight": 1.0},
    },
    "dkd_ls": {  # (T, kd-weight, DKD beta before the kd-weight multiplies alpha and beta)
        "vgg13-vgg8": (2.0, 15.0, 2.0), "wrn_40_2-wrn_40_1": (2.0, 12.0, 2.0), "wrn_40_2-wrn_16_2": (2.0, 12.0, 2.0),
        "resnet56-resnet20": (3.0, 18.0, 2.0), "resnet110-resnet32": (2.0, 15.0, 2.0),
        "resnet110-resnet20": (2.0, 15.0, 2.0), "vgg13-MobileNetV2": (3.0, 9.0, 2.0),
        "ResNet50-MobileNetV2": (2.0, 15.0, 2.0),
    },
}  # fmt: skip


def test_override_files_are_the_official_per_pair_values() -> None:
    root = CONFIGS / "cifar100" / "overrides"
    for method, pairs in OVERRIDES.items():
        assert sorted(p.stem for p in (root / method).glob("*.yaml")) == sorted(pairs)
        assert (CONFIGS / "methods" / f"{method}.yaml").is_file()
        _, cls, base = METHODS[method]
        for pair, values in pairs.items():
            assert pair in PAIRS, f"{method}/{pair}.yaml names no pair file"
            distiller = _build(_distiller_spec(root / method / f"{pair}.yaml"))
            assert type(distiller) is cls
            if method == "dkd_ls":
                t, w, b = values
                values = {"temperature": t, "alpha": w, "beta": w * b, "standardize": True, "warmup_epochs": 20}
            expected = {**base, **values}
            assert {k: getattr(distiller, k) for k in expected} == expected, f"{method}/{pair}"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("method", "pair"), [("ctkd", "resnet56-resnet20"), ("dkd", "resnet56-resnet20"), ("dkd_ls", "resnet56-resnet20")]
)
def test_configs_compose_through_the_cli(method: str, pair: str, offline: Path) -> None:
    """pair file + method file (+ the pair's override as a third --config, which replaces the distiller)."""
    from lightning_kd.cli import run_cli

    args = ["--config", str(CONFIGS / "cifar100" / "pairs" / f"{pair}.yaml"),
            "--config", str(CONFIGS / "methods" / f"{method}.yaml")]  # fmt: skip
    override = CONFIGS / "cifar100" / "overrides" / method / f"{pair}.yaml"
    if override.is_file():
        args += ["--config", str(override)]
    cli = run_cli([*args, "--model.teacher_checkpoint=null", "--trainer.logger=false"], run=False)
    (distiller,) = cli.model.distillers
    assert cli.model.task_loss_weight == METHODS[method][0]
    if method == "ctkd":
        assert isinstance(distiller.temperature, CurriculumTemperature)
        assert any(p is distiller.temperature.theta for p in cli.model.parameters())
    elif method == "dkd":
        assert (distiller.beta, distiller.temperature) == (2.0, 4.0)
    else:
        got = (distiller.alpha, distiller.beta, distiller.temperature, distiller.standardize)
        assert got == (18.0, 36.0, 3.0, True)
