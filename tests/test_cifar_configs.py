"""The CIFAR-100 configs parse and build through the CLI, offline."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from lightning_kd import reproduce
from lightning_kd.cli import run_cli
from lightning_kd.data import CIFAR100DataModule
from lightning_kd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "configs" / "cifar100"
TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"]
# the rows of the benchmark table (METHODS.md), with the registered model names
PAIRS = [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
]  # fmt: skip
SMALL_LR = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, with the network and the CIFAR-100 dataset class out of reach."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])  # pytest's own arguments are not the CLI's

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("building a config must not touch the network")

    def no_dataset(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("building a config must not open the dataset (that is setup()'s job)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "__init__", no_dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probe forwards are tiny
    yield tmp_path
    torch.set_num_threads(threads)


def _load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _check_recipe(cli, lr: float, epochs: int = 240) -> None:  # noqa: ANN001
    assert isinstance(cli.datamodule, CIFAR100DataModule)
    assert (cli.datamodule.data_dir, cli.datamodule.batch_size) == ("data", 64)
    assert cli.trainer.max_epochs == epochs
    assert cli.model.input_size == (3, 32, 32) and cli.model.num_classes == 100
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (lr, 0.9, 5e-4)
    scheduler = cli.model.lr_scheduler_factory(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(scheduler.milestones) == [150, 180, 210] and scheduler.gamma == 0.1


def test_the_files_are_the_table() -> None:
    assert sorted(p.stem for p in (CIFAR / "teachers").glob("*.yaml")) == sorted(TEACHERS)
    assert sorted(p.stem for p in (CIFAR / "pairs").glob("*.yaml")) == sorted(f"{t}-{s}" for t, s in PAIRS)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_teacher_config_builds(teacher: str, offline: Path) -> None:
    cli = run_cli(["--config", str(CIFAR / "teachers" / f"{teacher}.yaml"), "--trainer.logger=false"], run=False)
    assert type(cli.model.student) is type(create_model(teacher)) and cli.model.teacher is None
    assert not cli.model.distillers
    _check_recipe(cli, lr=0.05)
    checkpoint = cli.trainer.checkpoint_callback
    assert Path(checkpoint.dirpath) == offline / "outputs" / "cifar100" / "teachers" / teacher
    assert checkpoint.filename == teacher and checkpoint.save_top_k == 1 and checkpoint.monitor is None
    assert not list(offline.iterdir()), "building the config wrote files"


@pytest.mark.parametrize("teacher, student", PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
def test_pair_config_builds(teacher: str, student: str) -> None:
    pair = f"{teacher}-{student}"
    path = CIFAR / "pairs" / f"{pair}.yaml"
    config = _load(path)
    # the pair reads the very file its teacher's config writes
    saved = _load(CIFAR / "teachers" / f"{teacher}.yaml")["trainer"]["callbacks"][0]["init_args"]
    assert config["model"]["teacher_checkpoint"] == f"{saved['dirpath']}/{saved['filename']}.ckpt"
    assert config["trainer"]["default_root_dir"] == f"outputs/cifar100/{pair}"

    cli = run_cli(
        ["--config", str(path), "--model.teacher_checkpoint=null", "--trainer.logger.init_args.name=kd"], run=False
    )
    assert type(cli.model.student) is type(create_model(student))
    assert type(cli.model.teacher) is type(create_model(teacher))
    assert not cli.model.teacher.training and not any(p.requires_grad for p in cli.model.teacher.parameters())
    _check_recipe(cli, lr=0.01 if student in SMALL_LR else 0.05)
    logger = cli.trainer.logger
    assert (Path(logger.save_dir), logger.name) == (Path(f"outputs/cifar100/{pair}"), "kd")
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.save_last and checkpoint.dirpath is None  # into the logger's folder, one per method


def test_pair_loads_the_teacher_checkpoint(offline: Path) -> None:
    """A teacher trained with its config (a Lightning checkpoint, weights under ``student.``) is what the pair
    loads from its default path."""
    torch.manual_seed(3)
    trained = create_model("resnet32x4")
    target = offline / "outputs" / "cifar100" / "teachers" / "resnet32x4" / "resnet32x4.ckpt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"student.{k}": v for k, v in trained.state_dict().items()}}, target)
    cli = run_cli(["--config", str(CIFAR / "pairs" / "resnet32x4-resnet8x4.yaml"), "--trainer.logger=false"], run=False)
    loaded = cli.model.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


def test_pair_composes_with_a_method_config() -> None:
    method = ROOT / "configs" / "methods" / "kd.yaml"
    if not method.is_file():
        pytest.skip("configs/methods/kd.yaml is not there")
    cli = run_cli(
        ["--config", str(CIFAR / "pairs" / "vgg13-vgg8.yaml"), "--config", str(method),
         "--model.teacher_checkpoint=null", "--trainer.logger.init_args.name=kd"],
        run=False,
    )  # fmt: skip
    assert [type(d).__name__ for d in cli.model.distillers] == ["KD"]
    assert cli.model.task_loss_weight == pytest.approx(0.1)
    _check_recipe(cli, lr=0.05)


@pytest.mark.parametrize("student, lr", [("wrn_16_2", 0.05), ("ShuffleV2", 0.01)])
def test_student_config_builds(student: str, lr: float) -> None:
    """The student-alone run of ``lightning_kd.reproduce`` (its tests are in test_reproduce.py) builds."""
    run = next(r for r in reproduce.build_runs(ROOT / "configs", only=["students"], seeds=[0]) if r.pair == student)
    cli = run_cli(run.args()[1:], run=False)
    assert type(cli.model.student) is type(create_model(student)) and cli.model.teacher is None
    _check_recipe(cli, lr=lr)
    assert cli.trainer.logger.save_dir == run.folder and cli.trainer.default_root_dir.endswith(run.folder)
