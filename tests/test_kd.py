"""KD loss against a hand computation and finite differences; the KD distiller's defaults."""

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


def test_kd_loss_gradient_matches_finite_differences() -> None:
    zs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, dtype=torch.float64)
    loss = kd_loss(zs, zt)  # fp64 inputs stay fp64
    loss.backward()
    eps = 1e-6
    numeric = torch.zeros_like(zs)
    for i in range(3):
        for j in range(4):
            plus, minus = zs.detach().clone(), zs.detach().clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (kd_loss(plus, zt) - kd_loss(minus, zt)) / (2 * eps)
    torch.testing.assert_close(zs.grad, numeric, rtol=1e-6, atol=1e-8)


def test_kd_loss_is_fp32_and_finite_under_bf16_autocast() -> None:
    zs, zt = torch.randn(4, 10) * 50, torch.randn(4, 10) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(zs.bfloat16(), zt.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


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
