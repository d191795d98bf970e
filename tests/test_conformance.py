"""The conformance suite: every registered method (lightning_kd.distillers.list_distillers()) passes the same checks.

A method joins by its registry entry; its own math (values against a loop or direct re-implementation) is tested
in its own file. Checked here, for every method, on small networks:

- it builds from its defaults and trains: finite terms, gradients reach what the stage trains and nothing else;
- float64 gradcheck of its loss in the student features (fast mode);
- bf16 autocast gives fp32 loss terms;
- a batch of one and all-zero features give finite values and gradients;
- relational methods: the global batch scope on one process equals the device scope;
- a module holding it survives a checkpoint round trip (same loss), and the distiller its config round trip;
- weights must be finite and >= 0;
- its config composes with the digits base and fits one batch through the command line.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from lightning_kd.core import Distillation
from lightning_kd.demo import digits_config_args
from lightning_kd.distillers import Distiller, get_distiller, list_distillers
from lightning_kd.distillers.base import RelationalDistiller
from lightning_kd.hparams import instantiate
from lightning_kd.models import create_model

METHODS = list_distillers()
SIZE = (3, 16, 16)
CLASSES = 10


def _core(name: str, **overrides) -> Distillation:
    torch.manual_seed(0)
    return Distillation("resnet8", "resnet14", [get_distiller(name).build(**overrides)], num_classes=CLASSES,
                        input_size=SIZE)  # fmt: skip


def _batch(core: Distillation, size: int = 8, zeros: bool = False, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    make = (lambda: torch.zeros(size, *SIZE)) if zeros else (lambda: torch.randn(size, *SIZE, generator=generator))
    batch = {"image": make(), "label": torch.arange(size) % CLASSES, "index": torch.arange(size)}
    for view in core.views:
        if view != "image":
            batch[f"image_{view}"] = make()
    return batch


def _student_features(core: Distillation, batch: dict) -> tuple[Distiller, list, list]:
    """The distiller and its two feature lists on ``batch`` (student ones as float64 leaves)."""
    (distiller,) = core.distillers
    prepared = dict(batch)
    student = core._run(core.student, core.student_taps, prepared, core.views)
    teacher = core.teacher_features(prepared, core.views)
    return distiller, [student[t] for t in distiller.student_layers], [teacher[t] for t in distiller.teacher_layers]


def _loss(distiller: Distiller, s: list, t: list, batch: dict, stage: bool) -> torch.Tensor:
    value = distiller.stage_loss(s, t, batch) if stage else distiller(s, t, batch)
    if isinstance(value, dict):
        return sum(distiller.component_weights.get(k, 1.0) * v for k, v in value.items())
    return value


@pytest.mark.parametrize("name", METHODS)
def test_registered_and_documented(name: str) -> None:
    entry = get_distiller(name)
    assert issubclass(entry.cls, Distiller)
    assert (ROOT / entry.config).exists(), f"no config {entry.config}"
    readme = (ROOT / "README.md").read_text()
    assert f"`{name}`" in readme.lower() or entry.cls.__name__ in readme, f"{name} is not in the README"


@pytest.mark.parametrize("name", METHODS)
def test_trains_what_its_stage_trains(name: str) -> None:
    core = _core(name)
    core.train()
    terms = core.compute_losses(_batch(core))
    assert terms.losses, "no loss term"
    for key, value in terms.losses.items():
        assert value.dtype == torch.float32 and value.dim() == 0, key
        assert torch.isfinite(value), f"{key} = {value}"
    terms.total.backward()
    active = {id(p) for p in core.stage_parameters(core.stage)}
    for pname, p in core.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in active:
            assert p.grad is None or not p.grad.any(), f"{pname} is outside stage {core.stage.name} but got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in core.student.parameters()) or (
        not core.stage.is_main and not core.stage.distiller.stage_needs_student
    ), "the student got no gradient"
    assert all(torch.isfinite(p.grad).all() for p in core.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", METHODS)
def test_gradient_matches_finite_differences(name: str) -> None:
    """float64: the analytic derivative of the loss along random directions of the student features equals the
    central finite difference (random Gaussian features, so no ReLU kink sits at the evaluation point)."""
    core = _core(name)
    core.eval()  # fixed BatchNorm statistics in the distiller's parts: a deterministic function
    batch = _batch(core, size=4)
    distiller, s, t = _student_features(core, batch)
    if not s:
        pytest.skip(f"{name}'s first stage does not read the student")
    stage = not core.stage.is_main
    distiller.double()
    generator = torch.Generator().manual_seed(7)
    s = [torch.randn(x.shape, generator=generator, dtype=torch.float64).requires_grad_(True) for x in s]
    t = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in t]

    def f(*student: torch.Tensor) -> torch.Tensor:
        return _loss(distiller, list(student), t, batch, stage)

    grads = torch.autograd.grad(f(*s), s, allow_unused=True)
    eps = 1e-6
    for _ in range(3):
        u = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in s]
        analytic = sum(float((g * v).sum()) for g, v in zip(grads, u) if g is not None)
        with torch.no_grad():
            plus = f(*[x + eps * v for x, v in zip(s, u)])
            minus = f(*[x - eps * v for x, v in zip(s, u)])
        numeric = float(plus - minus) / (2 * eps)
        assert math.isclose(analytic, numeric, rel_tol=1e-4, abs_tol=1e-7), f"{name}: {analytic} vs {numeric}"


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_gives_fp32_terms(name: str) -> None:
    core = _core(name)
    core.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = core.compute_losses(_batch(core))
    for key, value in terms.losses.items():
        assert value.dtype == torch.float32, f"{key} is {value.dtype}"
        assert torch.isfinite(value), key
    terms.total.backward()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("case", ["batch_of_one", "zero_features"])
def test_degenerate_batches_stay_finite(name: str, case: str) -> None:
    core = _core(name)
    core.eval()
    batch = _batch(core, size=1 if case == "batch_of_one" else 4)
    distiller, s, t = _student_features(core, batch)
    if case == "zero_features":
        s = [torch.zeros_like(x) for x in s]
        t = [torch.zeros_like(x) for x in t]
    s = [x.detach().requires_grad_(True) for x in s]
    value = _loss(distiller, s, [x.detach() for x in t], batch, not core.stage.is_main)
    assert torch.isfinite(value), f"{name} {case}: {value}"
    if value.requires_grad:
        value.backward()
        assert all(x.grad is None or torch.isfinite(x.grad).all() for x in s)


@pytest.mark.parametrize("name", [n for n in METHODS if issubclass(get_distiller(n).cls, RelationalDistiller)])
def test_global_scope_on_one_process_equals_device_scope(name: str) -> None:
    values = []
    for scope in ("device", "global"):
        core = _core(name, batch_scope=scope)
        core.train()
        values.append(core.compute_losses(_batch(core)).total)
    torch.testing.assert_close(values[0], values[1])


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_and_config_round_trip(name: str) -> None:
    core = _core(name)
    core.eval()
    batch = _batch(core)
    with torch.no_grad():
        expected = core.compute_losses(batch).total
    (distiller,) = core.distillers
    rebuilt = instantiate(distiller.init_config(), Distiller)
    torch.manual_seed(123)  # other random initial weights: the state dict must carry everything
    other = Distillation("resnet8", "resnet14", [rebuilt], num_classes=CLASSES, input_size=SIZE)
    other.load_state_dict(core.state_dict())
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other.compute_losses(batch).total, expected)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
def test_weights_must_be_finite_and_non_negative(name: str, weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        get_distiller(name).build(weight=weight)


@pytest.fixture(scope="module")
def random_digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random resnet14 (the digits configs' resnet56 costs four times as much and tests nothing more here)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet14", num_classes=CLASSES).state_dict(), path)
    return path


@pytest.mark.parametrize("name", METHODS)
def test_digits_config_fits_through_the_command_line(name: str, random_digits_teacher: Path, tmp_path: Path) -> None:
    from lightning_kd.cli import run_cli

    cli = run_cli(
        ["fit", *digits_config_args(name), "--model.teacher=resnet14", f"--model.teacher_checkpoint={random_digits_teacher}",
         "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--data.batch_size=8"]
    )  # fmt: skip
    assert [type(d) for d in cli.model.distillers] == [get_distiller(name).cls]
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
