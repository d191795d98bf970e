"""The ImageNet configs (torchvision ResNet-34 -> ResNet-18): each method file composes with the pair file into its
paper's recipe, the symbolic taps read what their names say, and ``lightning-kd fit`` of every method runs end to
end on a tiny generated ImageFolder, offline.

The fits use the full-width torchvision ResNets (11.7 M and 21.8 M parameters) on 32x32 crops, one training and one
validation batch of 4 (``--trainer.fast_dev_run=true``).
"""

from __future__ import annotations

import math
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn

from lightning_kd.cli import run_cli
from lightning_kd.data import ImageFolderDataModule
from lightning_kd.models import build_network
from lightning_kd.published import IMAGENET_PAIR, lookup
from lightning_kd.taps import FeatureTaps, expand_taps

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "configs" / "imagenet"
PAIR = IMAGENET / "pair-resnet34-resnet18.yaml"
METHODS = ["kd", "dkd", "dist", "reviewkd", "crd", "kd_ls"]
CLASSES, PER_CLASS = 4, 6

# the paper recipe of each method file: learning rate, images per device (x 8 devices), Nesterov, CE weight, and
# the distiller's class and settings
RECIPES = {
    "kd": (0.2, 64, False, 0.5, "KD", {"temperature": 1.0, "weight": 0.5, "standardize": False}),
    "dkd": (0.2, 64, False, 1.0, "DKD", {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup_epochs": 1,
                                         "weight": 1.0}),
    "dist": (0.1, 32, True, 1.0, "DIST", {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "weight": 2.0,
                                          "batch_scope": "device"}),
    "reviewkd": (0.1, 32, False, 1.0, "ReviewKD", {"weight": 1.0, "warmup_epochs": 0, "max_mid_channels": 512,
                                                   "teacher_bn_mode": "eval"}),
    "crd": (0.1, 32, False, 1.0, "CRD", {"weight": 0.8, "feat_dim": 128, "temperature": 0.07, "momentum": 0.5,
                                         "negatives": "memory"}),
    "kd_ls": (0.2, 64, False, 1.0, "KD", {"temperature": 2.0, "weight": 9.0, "standardize": True}),
}  # fmt: skip


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in an empty folder (the configs write under outputs/), with the network out of reach, on one thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd"])  # pytest's own arguments are not the CLI's

    def no_network(*args, **kwargs):
        raise AssertionError("an ImageNet config must not touch the network (the teacher weights are a local file)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    threads = torch.get_num_threads()
    # small batches: one thread is as fast, and on a shared 2-core machine two threads wait on each other (a
    # ResNet-34 step took 30 times longer with two under load)
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _load(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _compose(method: str | None, *overrides: str):
    configs = ["--config", str(PAIR)] + (["--config", str(IMAGENET / "methods" / f"{method}.yaml")] if method else [])
    # one CPU device to build the Trainer here; the files' own device count is checked from the YAML
    args = [*configs, "--model.teacher_checkpoint=null", "--trainer.devices=1", "--trainer.accelerator=cpu", *overrides]
    return run_cli(args, run=False)


def _check_optimizer(cli, lr: float, nesterov: bool, milestones: list[int]) -> None:
    optimizer = cli.model.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (lr, 0.9, 1e-4, nesterov)
    scheduler = cli.model.lr_scheduler_factory(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(scheduler.milestones) == milestones and scheduler.gamma == 0.1


def test_the_method_files_are_the_list() -> None:
    assert sorted(p.stem for p in (IMAGENET / "methods").glob("*.yaml")) == sorted(METHODS)


def test_pair_alone_is_torchvisions_recipe_for_the_student(offline: Path) -> None:
    config = _load(PAIR)
    assert config["trainer"]["devices"] * config["data"]["init_args"]["batch_size"] == 256
    cli = _compose(None, "--model.input_size=[3, 64, 64]")
    model = cli.model
    assert isinstance(model.student, torchvision.models.ResNet) and isinstance(model.teacher, torchvision.models.ResNet)
    assert [len(getattr(model.student, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]  # ResNet-18
    assert [len(getattr(model.teacher, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet-34
    assert model.num_classes == 1000 and model.student.fc.out_features == 1000 and not model.distillers
    _check_optimizer(cli, lr=0.1, nesterov=False, milestones=[30, 60])
    assert cli.trainer.max_epochs == 90
    data = cli.datamodule
    assert isinstance(data, ImageFolderDataModule)
    assert (data.image_size, data.batch_size, data.strong_view) == (224, 32, False)
    names = [type(t).__name__ for t in data.train_transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in data.eval_transform.transforms][:2] == ["Resize", "CenterCrop"]
    assert data.eval_transform.transforms[0].size == 256 and data.train_transform.transforms[0].size == (224, 224)
    checkpoint = cli.trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k, checkpoint.save_last) == ("val/acc1", "max", 1,
                                                                                                  True)
    record = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RunRecord")
    assert record.labels == {"benchmark": "imagenet", "pair": IMAGENET_PAIR}
    assert cli.trainer.logger.name == "student" and not list(offline.iterdir()), "building the config wrote files"


@pytest.mark.parametrize("method", METHODS)
def test_method_composes_with_the_pair_into_its_recipe(method: str, offline: Path) -> None:
    lr, per_device, nesterov, ce, cls, settings = RECIPES[method]
    path = IMAGENET / "methods" / f"{method}.yaml"
    # the header's published top-1 is the report's number for this cell
    published = float(re.search(r"^# Published: ([0-9.]+) top-1", path.read_text(), re.MULTILINE).group(1))
    assert lookup("imagenet", IMAGENET_PAIR, method).top1 == published
    assert _load(PAIR)["trainer"]["devices"] * per_device == (512 if lr == 0.2 else 256)  # lr 0.1 per 256 images

    assert _load(PAIR)["model"]["input_size"] == [3, 224, 224]
    cli = _compose(method, "--model.input_size=[3, 64, 64]")  # a smaller probe: the channels do not depend on it
    model = cli.model
    assert model.num_classes == 1000
    assert model.task_loss_weight == ce
    [distiller] = model.distillers
    assert type(distiller).__name__ == cls and distiller.name == method
    for key, value in settings.items():
        assert getattr(distiller, key) == value, f"{method}: {key} = {getattr(distiller, key)!r}, expected {value!r}"
    _check_optimizer(cli, lr=lr, nesterov=nesterov, milestones=[30, 60, 90])
    assert cli.trainer.max_epochs == 100 and cli.datamodule.batch_size == per_device
    assert cli.trainer.logger.name == method
    record = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RunRecord")
    assert record.labels == {"benchmark": "imagenet", "pair": IMAGENET_PAIR}  # the method label: distiller.name
    if method == "crd":
        assert cli.datamodule.contrast_negatives == 16384
    if method == "reviewkd":  # the official ImageNet levels: in/out channels 64..512 + 512, sizes 56..7 + 1
        expected = ["preact1", "preact2", "preact3", "preact4", "embedding"]
        assert distiller.student_layers == expected and distiller.teacher_layers == expected
        assert [f.reduce[0].in_channels for f in distiller.fusions] == [64, 128, 256, 512, 512]
        assert [f.expand[0].out_channels for f in distiller.fusions] == [64, 128, 256, 512, 512]
        assert {f.reduce[0].out_channels for f in distiller.fusions} == {512}


# ---------------------------------------------------------------------------------------------------------------
# the symbolic taps of the pair file
# ---------------------------------------------------------------------------------------------------------------
def _networks() -> dict[str, nn.Module]:
    model = _load(PAIR)["model"]
    torch.manual_seed(0)
    networks = {
        side: build_network(model[side], num_classes=10, feature_paths=model[f"{side}_feature_paths"], who=side)
        for side in ("student", "teacher")
    }
    for network in networks.values():  # BatchNorm statistics away from (0, 1): eval mode then shifts and scales
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(module.bias, -0.5, 0.5)
        network.eval()
    return networks


def _block_preactivation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's residual sum before its final ReLU, from its layers (the block's own formula)."""
    out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    return out + (block.downsample(x) if block.downsample is not None else x)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_stem_stage_and_embedding_taps(side: str) -> None:
    network = _networks()[side]
    names = ["stem", "stage1", "stage2", "stage3", "stage4", "embedding"]
    taps = FeatureTaps(network, names)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = network(x)
        got = taps.pop()
        stem = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        stages = [stem]
        for i in range(1, 5):
            stages.append(getattr(network, f"layer{i}")(stages[-1]))
        embedding = stages[-1].mean(dim=(2, 3))
    taps.remove()
    for name, expected in zip(names, [*stages, embedding]):
        torch.testing.assert_close(got[name], expected, msg=lambda m, n=name: f"tap {n}: {m}")
    torch.testing.assert_close(network.fc(embedding), logits)
    assert [tuple(got[f"stage{i}"].shape[1:]) for i in range(1, 5)] == [(64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                                        (512, 2, 2)]
    assert expand_taps(network, ["preacts"]) == [f"preact{i}" for i in range(1, 5)]
    modules = dict(network.named_modules())
    for i in range(1, 5):  # OFD's margins: the BatchNorm whose output the residual sum adds to the shortcut
        last = len(getattr(network, f"layer{i}")) - 1
        assert network.feature_paths[f"preact{i}_norm"] == f"layer{i}.{last}.bn2"
        assert network.feature_paths[f"preact{i}"] == f"layer{i}.{last}.relu:input"
        assert isinstance(modules[f"layer{i}.{last}.bn2"], nn.BatchNorm2d)


def _check_preact_taps(network: nn.Module) -> None:
    """``preact1..4`` equal the last block's residual sum, recomputed from the block's layers and its input."""
    taps = FeatureTaps(network, [f"preact{i}" for i in range(1, 5)])
    inputs: dict[int, torch.Tensor] = {}  # the last block of each stage: its input, copied before the block runs
    handles = [
        getattr(network, f"layer{i}")[-1].register_forward_pre_hook(
            lambda module, args, i=i: inputs.__setitem__(i, args[0].detach().clone())
        )
        for i in range(1, 5)
    ]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        network(torch.zeros_like(x))  # the probe forward (Distillation makes it at construction): finds in-place taps
        taps.pop()
        network(x)
        got = taps.pop()
        expected = {i: _block_preactivation(getattr(network, f"layer{i}")[-1], inputs[i]) for i in range(1, 5)}
    taps.remove()
    for handle in handles:
        handle.remove()
    for i in range(1, 5):
        assert (expected[i] < 0).float().mean() > 0.1, "the sums must have negative entries for the check to bite"
        torch.testing.assert_close(got[f"preact{i}"], expected[i], msg=lambda m, i=i: f"preact{i}: {m}")


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_preact_taps_read_the_residual_sum_before_the_last_relu(side: str) -> None:
    _check_preact_taps(_networks()[side])


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_preact_taps_read_the_sum_once_the_relus_are_not_in_place(side: str) -> None:
    """The paths and the second-call reading are right: the only difference above is the in-place ReLU."""
    network = _networks()[side]
    for module in network.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    _check_preact_taps(network)


# ---------------------------------------------------------------------------------------------------------------
# lightning-kd fit of every method on a tiny ImageFolder
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 6 random 40x40 RGB images in train/ and val/, and a random ResNet-34 (4 classes) state dict."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(CLASSES):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(num_classes=CLASSES).state_dict(), root / "teacher.pt")
    return root


def _fit(method: str, root: Path) -> object:
    return run_cli([
        "fit", "--config", str(PAIR), "--config", str(IMAGENET / "methods" / f"{method}.yaml"),
        f"--model.teacher_checkpoint={root / 'teacher.pt'}", f"--model.num_classes={CLASSES}",
        "--model.input_size=[3, 32, 32]", f"--data.init_args.train_dir={root / 'train'}",
        f"--data.init_args.val_dir={root / 'val'}", "--data.init_args.image_size=32", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0", "--trainer.devices=1", "--trainer.accelerator=cpu",
        "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])  # fmt: skip


def _check_fit(method: str, root: Path) -> None:
    cli = _fit(method, root)
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 1
    saved = torch.load(root / "teacher.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.teacher.state_dict().items()), "teacher file not loaded"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train/loss", "train/ce", f"train/{method}", "val/loss", "val/acc1", "val/teacher_acc1"):
        assert key in metrics and math.isfinite(metrics[key]), f"{method}: {key} = {metrics.get(key)} in {metrics}"
    ce = RECIPES[method][3]
    weight = model.distillers[0].weight
    assert metrics["train/loss"] == pytest.approx(ce * metrics["train/ce"] + weight * metrics[f"train/{method}"],
                                                  rel=1e-5)
    if method == "crd":  # one memory row per training image, the batch's rows written
        assert model.distillers[0].num_data == CLASSES * PER_CLASS


@pytest.mark.parametrize("method", METHODS)
def test_fit_on_a_tiny_imagefolder(method: str, tiny_imagenet: Path) -> None:
    _check_fit(method, tiny_imagenet)
