"""KD loss against a hand computation; the KD distiller's defaults.

Its gradient (finite differences) and bf16 autocast are checked for every method by tests/test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.distillers import KD
from lightning_kd.functional import kd_loss


def _by_hand(zs: list[list[float]], zt: list[list[float]], T: float) -> float:
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        ps = [math.exp(v / T) for v in s_row]
        pt = [math.exp(v / T) for v in t_row]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return T * T * total / len(zs)


def test_kd_loss_matches_a_hand_computation() -> None:
    zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    zt = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    for T in (1.0, 4.0):
        got = kd_loss(torch.tensor(zs), torch.tensor(zt), temperature=T)
        assert got.item() == pytest.approx(_by_hand(zs, zt, T), rel=1e-5)


def test_kd_loss_is_batchmean_not_elementwise_mean() -> None:
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    one_at_a_time = sum(kd_loss(zs[i : i + 1], zt[i : i + 1]) for i in range(5)) / 5
    torch.testing.assert_close(kd_loss(zs, zt), one_at_a_time)


def test_kd_loss_errors() -> None:
    with pytest.raises(ValueError, match="same number of classes"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        kd_loss(torch.randn(2, 3), torch.randn(3, 3))


def test_kd_distiller_defaults() -> None:
    kd = KD()
    assert (kd.weight, kd.temperature, kd.student_layers, kd.teacher_layers) == (0.9, 4.0, ["logits"], ["logits"])
    zs, zt = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(kd([zs], [zt], {}), kd_loss(zs, zt, 4.0))
    with pytest.raises(ValueError, match="temperature"):
        KD(temperature=0)
