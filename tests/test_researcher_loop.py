"""A researcher's loop, end to end: train, export the student, validate and predict with the exported file,
list a network's layers, distil an outside network, read the progress, and the mistakes that must be clear errors.

Everything runs in this process: ``lightning_kd.cli.main`` (what the ``lightning-kd`` console script runs) and
``run_cli``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from conftest import make_trainer
from lightning_kd import DistillationModule
from lightning_kd.batch import as_batch
from lightning_kd.callbacks import DistillationProgressBar, EpochLines, PredictionWriter, progress_bar, run_dir
from lightning_kd.checkpoints import CheckpointError
from lightning_kd.cli import main, run_cli
from lightning_kd.data import DigitsDataModule
from lightning_kd.demo import digits_config_args
from lightning_kd.distillers import KD, FitNet
from lightning_kd.models import create_model
from lightning_kd.taps import TapError

#: the digits data of configs/digits/base.yaml (validate and predict with it read the same splits)
BASE_DATA = dict(size=16, batch_size=32, train_subset=10)
#: few large batches: fewer steps for the command-line runs
VALIDATE_BATCH, PREDICT_BATCH = 128, 256


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these networks are tiny, and on a shared 2-core machine two threads that wait for each
    other make every small operation tens of times slower (as in tests/test_cache.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data() -> DigitsDataModule:
    return DigitsDataModule(size=16, batch_size=16)


def _images(n: int) -> torch.Tensor:
    """A fixed batch of ``n`` validation images."""
    data = _data()
    data.setup("validate")
    return as_batch(next(iter(data.val_dataloader())))["image"][:n]


def _output_shapes(network: torch.nn.Module, input_size: tuple[int, ...], names: list[str]) -> dict[str, tuple]:
    """The output shape of each named module for a batch of 2, by forward hooks (what ``layers`` reports)."""
    modules = dict(network.named_modules())
    shapes: dict[str, tuple] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(output.shape))

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    with torch.no_grad():
        network.eval()(torch.zeros(2, *input_size))
    for handle in handles:
        handle.remove()
    return shapes


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's one error line (``lightning-kd: error: ...``)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-kd: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# a distillation run's checkpoint, its exported student, and validate / predict on that file
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A resnet8 <- resnet8 KD run of 2 steps and its checkpoint (the same architecture on both sides, so a test
    can tell the student's weights from the teacher's)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = DistillationModule(student="resnet8", teacher="resnet8", distillers=[KD()], num_classes=10,
                                input_size=(3, 16, 16))  # fmt: skip
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, _data())
    trainer.save_checkpoint(folder / "run.ckpt")
    return {"ckpt": folder / "run.ckpt", "module": module.eval(), "folder": folder}


@pytest.fixture(scope="module")
def exported(run: dict) -> Path:
    path = run["folder"] / "student.pt"
    main(["export", str(run["ckpt"]), "--output", str(path)])
    return path


@pytest.fixture(scope="module")
def cli_runs(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``validate`` then ``predict`` on the exported student, both logging under the same root."""
    root = tmp_path_factory.mktemp("cli-runs")
    common = [*digits_config_args("student"), f"--ckpt_path={exported}", f"--trainer.default_root_dir={root}",
              f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    validate = run_cli(["validate", *common, f"--data.batch_size={VALIDATE_BATCH}"])
    predict = run_cli(["predict", *common, f"--data.batch_size={PREDICT_BATCH}"])
    return {"validate": validate, "predict": predict, "root": root}


def _exported_network(path: Path) -> torch.nn.Module:
    network = create_model("resnet8", num_classes=10)
    network.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return network.eval()


def _split(loader) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """All images and labels of an evaluation loader, in order."""
    batches = [as_batch(batch) for batch in loader]
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def test_export_writes_a_state_dict_with_the_students_logits(run: dict, exported: Path) -> None:
    module = run["module"]
    state = torch.load(exported, weights_only=True)
    assert set(state) == set(module.student.state_dict())
    images = _images(16)
    with torch.no_grad():
        logits = _exported_network(exported)(images)
        torch.testing.assert_close(logits, module.student(images), rtol=0, atol=0)
        assert not torch.allclose(logits, module.teacher(images), atol=1e-3)  # the student's, not the teacher's


def test_export_as_a_program_runs_another_batch_size(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = run["folder"] / "student.pt2"
    main(["export", str(run["ckpt"]), "--output", str(path), "--format", "exported"])
    assert capsys.readouterr().out.strip() == f"student written to {path} (exported)"
    program = torch.export.load(path)
    assert isinstance(program, torch.export.ExportedProgram)
    images = _images(5)  # the export's example batch has 2 images
    with torch.no_grad():
        logits = program.module()(images)
        assert logits.shape == (5, 10)
        torch.testing.assert_close(logits, run["module"].student(images), rtol=0, atol=1e-5)


def test_validate_on_an_exported_student_reports_its_accuracy(cli_runs: dict, exported: Path) -> None:
    data = DigitsDataModule(**BASE_DATA)
    data.setup("validate")
    images, labels = _split(data.val_dataloader())
    with torch.no_grad():
        logits = _exported_network(exported)(images)
    metrics = cli_runs["validate"].trainer.callback_metrics
    assert len(labels) == 359
    assert metrics["val/acc1"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["val/loss"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)


def test_predict_on_an_exported_student_writes_one_row_per_test_sample(cli_runs: dict, exported: Path) -> None:
    trainer = cli_runs["predict"].trainer
    path = run_dir(trainer) / "predictions.csv"
    (writer,) = [c for c in trainer.callbacks if isinstance(c, PredictionWriter)]
    assert writer.path == path
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["index", "label", "prediction", *(f"p{c}" for c in range(10))]

    data = DigitsDataModule(**BASE_DATA)
    data.setup("test")
    images, labels = _split(data.test_dataloader())
    with torch.no_grad():
        probabilities = _exported_network(exported)(images).softmax(1)
    assert len(rows) == len(data.test_set) == len(labels) == 359
    assert [int(r[0]) for r in rows] == list(range(len(labels)))
    assert [int(r[1]) for r in rows] == labels.tolist()
    written = torch.tensor([[float(p) for p in r[3:]] for r in rows])
    torch.testing.assert_close(written, probabilities, rtol=0, atol=1e-6)
    top2 = probabilities.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # no near-tie that the batch size could flip
    assert clear.sum() > 300
    assert torch.equal(torch.tensor([int(r[2]) for r in rows])[clear], probabilities.argmax(1)[clear])


def test_each_run_keeps_its_own_config(cli_runs: dict) -> None:
    folders = {name: run_dir(cli_runs[name].trainer) for name in ("validate", "predict")}
    assert folders["validate"] != folders["predict"]
    assert {f.parent for f in folders.values()} == {cli_runs["root"] / "logs"}
    assert sorted(cli_runs["root"].rglob("config.yaml")) == sorted(f / "config.yaml" for f in folders.values())
    configs = {name: yaml.safe_load((f / "config.yaml").read_text()) for name, f in folders.items()}
    assert configs["validate"]["data"]["init_args"]["batch_size"] == VALIDATE_BATCH  # not overwritten by the next run
    assert configs["predict"]["data"]["init_args"]["batch_size"] == PREDICT_BATCH


# ------------------------------------------------------------------------------------------------------------
# lightning-kd layers
# ------------------------------------------------------------------------------------------------------------
def test_layers_lists_resnet8_paths_and_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    (script,) = entry_points(group="console_scripts", name="lightning-kd")
    assert script.value == "lightning_kd.cli:main"  # what `lightning-kd layers ...` runs
    main(["layers", "resnet8", "--input-size", "3", "16", "16"])
    out = capsys.readouterr().out
    shapes = _output_shapes(create_model("resnet8", num_classes=100), (3, 16, 16), ["layer3", "fc"])
    assert shapes["layer3"] == (2, 64, 4, 4)
    assert re.search(rf"^layer3\s+Sequential\s+{re.escape(str(shapes['layer3']))}$", out, re.M), out
    assert re.search(rf"^fc\s+Linear\s+{re.escape(str(shapes['fc']))}$", out, re.M), out
    assert re.search(r"^\s+stage3\s+-> layer3$", out, re.M), out  # the symbolic names too


def test_layers_of_a_torchvision_network(capsys: pytest.CaptureFixture[str]) -> None:
    main(["layers", "torchvision.models.mobilenet_v3_small", "--num-classes", "10", "--input-size", "3", "64", "64"])
    out = capsys.readouterr().out
    network = torchvision.models.mobilenet_v3_small(num_classes=10)
    shapes = _output_shapes(network, (3, 64, 64), ["features.3", "features.12", "classifier"])
    assert shapes["features.12"] == (2, 576, 2, 2) and shapes["classifier"] == (2, 10)
    assert re.search(rf"^features\.3\s+InvertedResidual\s+{re.escape(str(shapes['features.3']))}$", out, re.M), out
    assert re.search(rf"^features\.12\s+Conv2dNormActivation\s+{re.escape(str(shapes['features.12']))}$", out, re.M)
    assert re.search(r"^logits\s+output\s+\(2, 10\)$", out, re.M), out
    assert "symbolic tap names" not in out  # torchvision's networks have none


# ------------------------------------------------------------------------------------------------------------
# an outside network, by config
# ------------------------------------------------------------------------------------------------------------
def _outside_config(folder: Path, layers: bool) -> Path:
    at = "    - class_path: lightning_kd.distillers.AT\n"
    if layers:  # 8x8 and 4x4 maps at 16x16 on both networks
        at += "      init_args: {student_layers: [features.0, features.1], teacher_layers: [layer2, layer3]}\n"
    path = folder / f"outside-{layers}.yaml"
    path.write_text(
        "model:\n  student: torchvision.models.mobilenet_v3_small\n  teacher: resnet8\n  num_classes: 10\n"
        f"  input_size: [3, 16, 16]\n  distillers:\n{at}"
        "data:\n  class_path: lightning_kd.data.DigitsDataModule\n  init_args: {batch_size: 16, size: 16}\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 1\n  limit_val_batches: 0\n  logger: false\n"
        "  enable_checkpointing: false\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        f"  default_root_dir: {folder}\n"
    )
    return path


def test_a_torchvision_student_with_explicit_layers_trains(tmp_path: Path) -> None:
    cli = run_cli(["fit", "--config", str(_outside_config(tmp_path, layers=True))])
    assert isinstance(cli.model.student, torchvision.models.MobileNetV3)
    (at,) = cli.model.distillers
    assert (at.student_layers, at.teacher_layers) == (["features.0", "features.1"], ["layer2", "layer3"])
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/at"].item() > 0


def test_default_layers_on_a_torchvision_student_point_to_the_layers_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = "lightning-kd layers torchvision.models.mobilenet_v3_small --num-classes 10 --input-size 3 16 16"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_outside_config(tmp_path, layers=False))])
    assert exit_info.value.code == 1
    line = _error_line(capsys)
    assert "MobileNetV3" in line and "'stages'" in line and command in line
    # FitNet's default, a symbolic name the network does not have, says the same
    with pytest.raises(TapError, match=r"No module 'stage2' in MobileNetV3.*" + re.escape(command)):
        DistillationModule(student="torchvision.models.mobilenet_v3_small", teacher="resnet8", distillers=[FitNet()],
                           num_classes=10, input_size=(3, 16, 16))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# progress: a rich bar in a terminal, one line per epoch in a file
# ------------------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _LossAtEpochLines(Callback):
    """The epoch mean of the loss at the moments EpochLines writes an epoch's line."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch > 0:
            self.values.append(float(trainer.callback_metrics["train/loss_epoch"]))

    def on_train_end(self, trainer, module) -> None:
        self.values.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_a_file_gets_one_line_per_epoch() -> None:
    bar = progress_bar(io.StringIO())
    assert type(bar) is EpochLines
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)
    losses = _LossAtEpochLines()
    try:
        make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, enable_progress_bar=True,
                     callbacks=[bar, losses]).fit(DistillationModule("resnet8", num_classes=10, input_size=(3, 16, 16)),
                                                  _data())  # fmt: skip
    finally:
        rank_zero.removeHandler(handler)
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and len(losses.values) == 2, stream.getvalue()
    for epoch, (line, loss) in enumerate(zip(lines, losses.values), start=1):
        assert line.startswith(f"epoch {epoch}/2 ")
        assert f" loss={loss:.4g} " in f"{line} "
        assert re.search(r" \(\d+\.\d s\)$", line)
        shown = re.search(r" loss=(\S+)", line).group(1)
        assert len(shown.replace(".", "").lstrip("0")) <= 4  # four significant digits, not the full float


def test_a_terminal_gets_the_rich_bar_without_v_num(tmp_path: Path) -> None:
    bar = progress_bar(_Terminal())
    assert isinstance(bar, DistillationProgressBar)
    module = DistillationModule("resnet8", num_classes=10, input_size=(3, 16, 16))
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, enable_progress_bar=True,
                           callbacks=[bar], logger=CSVLogger(tmp_path))  # fmt: skip
    trainer.fit(module, _data())
    shown = bar.get_metrics(trainer, module)
    assert "train/loss" in shown and "v_num" not in shown
    assert "v_num" in RichProgressBar.get_metrics(bar, trainer, module)  # Lightning's own bar shows it
    assert bar.theme.metrics_format == ".4g"


# ------------------------------------------------------------------------------------------------------------
# the wrong file: one clear line
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a teacher run: a resnet14 trained alone for one step."""
    path = tmp_path_factory.mktemp("teacher-run") / "teacher.ckpt"
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(DistillationModule("resnet14", num_classes=10, input_size=(3, 16, 16)), _data())
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("student", ["resnet8", "resnet14"])  # another network; the teacher run's own network
def test_resuming_a_distillation_from_a_teacher_runs_checkpoint_is_one_clear_line(
    student: str, teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *digits_config_args("kd"), f"--model.student={student}", "--model.teacher=resnet14",
              f"--model.teacher_checkpoint={teacher_run}", f"--ckpt_path={teacher_run}",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
              "--trainer.limit_val_batches=0"])  # fmt: skip
    assert exit_info.value.code == 1
    line = _error_line(capsys)
    assert len(line) < 400, line
    assert str(teacher_run) in line and "trained alone" in line and "model.teacher_checkpoint" in line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))  # nothing was trained


def test_a_text_file_as_teacher_checkpoint_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "teacher.ckpt"
    path.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError) as error:
        DistillationModule(student="resnet8", teacher="resnet8", teacher_checkpoint=str(path), distillers=[KD()],
                           num_classes=10, input_size=(3, 16, 16))  # fmt: skip
    message = str(error.value)
    assert str(path) in message and "is not a PyTorch weights file" in message
    assert "pickle" not in message.lower() and "refused" not in message
