"""The method configs (configs/methods/<method>.yaml) hold the CRD benchmark's CIFAR-100 settings and compose after a
pair; the digits runs (configs/digits/base.yaml + method config + configs/digits/overrides/<method>.yaml) hold their
digits settings.

That each digits config fits one batch through the command line is checked for every registered method by
tests/test_conformance.py; the logit, ReviewKD, OFD and MLKD configs by their own test files, CRD's by
tests/test_crd.py.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from lightning_kd.cli import run_cli
from lightning_kd.demo import digits_config_args
from lightning_kd.distillers import AT, CC, FSP, KD, NST, SP, FitNet

BASE = ROOT / "configs" / "digits" / "base.yaml"
#: the digits runs' epochs; a staged method's digits override adds its initialisation epochs to them
BASE_EPOCHS = yaml.safe_load(BASE.read_text())["trainer"]["max_epochs"]


@pytest.mark.parametrize("method", ["vid", "rkd", "pkt", "ab", "ft"])
def test_method_configs_hold_the_reference_weights(method: str) -> None:
    cfg = yaml.safe_load((ROOT / f"configs/methods/{method}.yaml").read_text())
    override = ROOT / f"configs/digits/overrides/{method}.yaml"
    digits = yaml.safe_load(override.read_text()) if override.exists() else {}
    (entry,) = cfg["model"]["distillers"]
    assert entry["class_path"] == f"lightning_kd.distillers.{method.upper()}"
    assert cfg["model"]["task_loss_weight"] == 1.0
    expected = {"vid": 1.0, "rkd": 1.0, "pkt": 30000.0, "ft": 200.0}
    if method in expected:
        assert entry["init_args"]["weight"] == expected[method]
    if method == "ft":  # the benchmark trains the plain paraphraser at 0.01 for ResNet students
        assert entry["init_args"]["stage_lr"] == 0.01 == digits["model"]["distillers"][0]["init_args"]["stage_lr"]
    if method in ("ab", "ft"):
        assert entry["init_args"]["stage_epochs"] == 30 and cfg["trainer"]["max_epochs"] == 270
        assert digits["model"]["distillers"][0]["init_args"]["stage_epochs"] == 3
        assert digits["trainer"]["max_epochs"] == 3 + BASE_EPOCHS
    else:
        assert "trainer" not in cfg and "trainer" not in digits


DIGITS_CONFIGS = {
    "fitnet": (FitNet, {"weight": 10.0}),  # measured on the digits' few labels (see the overrides)
    "at": (AT, {"weight": 50.0, "p": 2.0}),
    "sp": (SP, {"weight": 30.0}),
    "cc": (CC, {"weight": 0.02, "dim": 128}),
    "fsp": (FSP, {"stage_epochs": 3, "active_in_main": False}),
    "nst": (NST, {"weight": 50.0}),
}


@pytest.mark.parametrize("method", sorted(DIGITS_CONFIGS))
def test_digits_config_builds(method: str) -> None:
    cls, attributes = DIGITS_CONFIGS[method]
    cli = run_cli([*digits_config_args(method), "--model.teacher_checkpoint=null"], run=False)
    model = cli.model
    assert (model.task_loss_weight, type(model.student).__name__, type(model.teacher).__name__) == (
        1.0, "CIFARResNet", "CIFARResNet",
    )  # fmt: skip
    assert [type(d) for d in model.distillers] == [cls] and model.distillers[0].name == method
    for name, value in attributes.items():
        assert getattr(model.distillers[0], name) == value
    assert cli.trainer.max_epochs == (3 if method == "fsp" else 0) + BASE_EPOCHS
    assert [s.name for s in model.stages] == (["fsp_init", "main"] if method == "fsp" else ["main"])


EXPECTED_METHOD_CONFIGS = {
    "kd": (KD, 0.1, {"weight": 0.9, "temperature": 4.0}),
    "fitnet": (FitNet, 1.0, {"weight": 100.0}),
    "at": (AT, 1.0, {"weight": 1000.0, "p": 2.0}),
    "sp": (SP, 1.0, {"weight": 3000.0}),
    "cc": (CC, 1.0, {"weight": 0.02, "dim": 128}),
    "fsp": (FSP, 1.0, {"stage_epochs": 30, "active_in_main": False}),
    "nst": (NST, 1.0, {"weight": 50.0}),
}


@pytest.mark.parametrize("method", sorted(EXPECTED_METHOD_CONFIGS))
def test_method_config_composes_after_a_pair(method: str) -> None:
    cls, gamma, attributes = EXPECTED_METHOD_CONFIGS[method]
    cli = run_cli(
        ["--config", str(BASE), "--config", str(ROOT / "configs" / "methods" / f"{method}.yaml"),
         "--model.teacher_checkpoint=null", "--trainer.logger=false"],
        run=False,
    )  # fmt: skip
    model = cli.model
    assert model.task_loss_weight == gamma
    assert [type(d) for d in model.distillers] == [cls]
    for name, value in attributes.items():
        assert getattr(model.distillers[0], name) == value
    assert cli.trainer.max_epochs == (270 if method == "fsp" else BASE_EPOCHS)
