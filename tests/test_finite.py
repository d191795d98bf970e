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
