"""DeferredFiniteCheck: the first non-finite component of many recorded steps, found in one transfer."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_kd.finite import DeferredFiniteCheck


def _first_bad_by_loop(steps: list[dict[str, float]]) -> tuple[int, list[str]] | None:
    for index, values in enumerate(steps):
        bad = [name for name, value in values.items() if math.isnan(value) or math.isinf(value)]
        if bad:
            return index, bad
    return None


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_step_by_step_loop(seed: int) -> None:
    rng = random.Random(seed)
    steps = []
    for _ in range(rng.randint(1, 30)):
        names = rng.sample(["ce", "kd", "vid", "at"], rng.randint(1, 4))
        values = {n: rng.choice([rng.uniform(-5, 5)] * 30 + [float("nan"), float("inf"), -float("inf")])
                  for n in names}
        steps.append(values)
    check = DeferredFiniteCheck()
    for index, values in enumerate(steps):
        check.record(100 + index, 2, "main", {n: torch.tensor(v) for n, v in values.items()})
    assert len(check) == len(steps)
    expected = _first_bad_by_loop(steps)
    if expected is None:
        check.check()
    else:
        with pytest.raises(FloatingPointError) as error:
            check.check()
        index, bad = expected
        assert f"global step {100 + index} (epoch 2, stage 'main') from component(s) {bad}" in str(error.value)
    assert len(check) == 0  # checked steps are forgotten either way


def test_total_is_named_only_when_no_component_is_bad() -> None:
    check = DeferredFiniteCheck()
    check.record(0, 0, "main", {"ce": torch.tensor(3e38), "kd": torch.tensor(3e38), "total": torch.tensor(math.inf)})
    with pytest.raises(FloatingPointError, match=r"\['total'\]"):
        check.check()
    check.record(1, 0, "main", {"ce": torch.tensor(1.0), "kd": torch.tensor(math.nan), "total": torch.tensor(math.nan)})
    with pytest.raises(FloatingPointError, match=r"\['kd'\]: ce=1, kd=nan, total=nan"):
        check.check()


def test_bf16_and_integer_like_values_are_recorded_as_float() -> None:
    check = DeferredFiniteCheck()
    check.record(0, 0, "ab_init", {"ab_init": torch.tensor(2.5, dtype=torch.bfloat16)})
    check.record(1, 0, "ab_init", {"ab_init": torch.tensor([float("inf")], dtype=torch.bfloat16)})
    with pytest.raises(FloatingPointError, match="global step 1 .*ab_init=inf"):
        check.check()


def test_divergence_guard_watches_each_value_against_its_own_best() -> None:
    from lightning_kd.finite import DivergenceGuard, StageDivergedError

    guard = DivergenceGuard(10.0)
    guard.check({"loss": 101.0, "ce": 2.3}, 0, "fsp_init")
    guard.check({"loss": 58.0, "ce": 2.4}, 1, "fsp_init")
    guard.check({"loss": 120.0, "ce": float("nan")}, 2, "fsp_init")  # 120 < 10 x 58; NaN is the finite check's
    with pytest.raises(StageDivergedError, match=r"'fsp_init' diverged: the mean loss in epoch 3 is 771"):
        guard.check({"loss": 771.0, "ce": 2.4}, 3, "fsp_init")
    guard = DivergenceGuard(10.0)
    guard.check({"loss": 1.0, "ce": 2.0}, 0, "ab_init")
    with pytest.raises(StageDivergedError, match="the mean ce in epoch 1 is 25"):
        guard.check({"loss": 0.5, "ce": 25.0}, 1, "ab_init")
    restored = DivergenceGuard(10.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.best == {"loss": 0.5, "ce": 2.0} or restored.best == {"loss": 1.0, "ce": 2.0}
    guard.new_stage()
    guard.check({"loss": 1e6}, 5, "main")  # a new stage starts from nothing
    assert DivergenceGuard(None).check({"loss": 1.0}, 0, "x") is None
    with pytest.raises(ValueError, match="divergence_factor"):
        DivergenceGuard(1.0)


def test_a_diverging_initialisation_stage_stops_the_fit() -> None:
    """An FT paraphraser stage whose loss grows 100x per epoch stops with an error naming the stage and the fix."""
    import lightning as L

    from conftest import make_trainer
    from lightning_kd import DistillationModule
    from lightning_kd.data import DigitsDataModule
    from lightning_kd.distillers import FT
    from lightning_kd.finite import StageDivergedError

    class Exploding(FT):
        calls = 0

        def stage_loss(self, student_features, teacher_features, batch):  # noqa: ANN001, ANN201
            Exploding.calls += 1
            return super().stage_loss(student_features, teacher_features, batch) * 100.0 ** ((Exploding.calls - 1) // 2)

    L.seed_everything(0)
    module = DistillationModule("resnet8", "resnet14", [Exploding(stage_epochs=3)], num_classes=10,
                                input_size=(3, 16, 16))  # fmt: skip
    trainer = make_trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(StageDivergedError, match=r"'exploding_init' diverged: the mean loss in epoch 1 .*stage_lr of exploding"):
        trainer.fit(module, DigitsDataModule(size=16, batch_size=16))
    assert trainer.current_epoch == 1
