"""Degenerate inputs shared by the loss tests of every family (all-zero maps, identical rows) with the check that a
loss and its gradient stay finite on them, and the check that a loss stays fp32 under bf16 autocast."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

#: which side of a (student, teacher) pair of maps is all zero
ZERO_CASES = ["student", "teacher", "both", "one_row"]


def finite_with_grad(loss_fn: Callable, name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``loss_fn(s, t)`` and its gradient in ``s``, both asserted finite."""
    s = s.clone().requires_grad_(True)
    loss = loss_fn(s, t)
    loss.backward()
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    assert s.grad is not None and torch.isfinite(s.grad).all(), f"{name}: gradient {s.grad}"
    return loss


def zero_maps(which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(3, 3, 4, 4)`` student and teacher maps with the side ``which`` names set to zero (``one_row``: one
    student sample and one channel of another)."""
    s, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    if which in ("student", "both"):
        s = torch.zeros_like(s)
    if which in ("teacher", "both"):
        t = torch.zeros_like(t)
    if which == "one_row":
        s[1] = 0.0
        s[2, 1] = 0.0  # and one all-zero channel
    return s, t


def identical_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of four copies of one student map and four copies of one teacher map."""
    return torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1), torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1)


def assert_fp32_under_bf16_autocast(loss_fn: Callable) -> None:
    """Under CPU bf16 autocast ``loss_fn`` returns fp32, equal to the fp32 computation on the same inputs (its matrix
    products stay fp32), and on bf16 inputs only their rounding is lost."""
    s, t = torch.randn(4, 3, 4, 4) * 10, torch.randn(4, 3, 4, 4) * 10
    reference = loss_fn(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_inputs = loss_fn(s, t)
        low_inputs = loss_fn(s.bfloat16(), t.bfloat16())
    assert same_inputs.dtype == torch.float32 and low_inputs.dtype == torch.float32
    assert torch.isfinite(low_inputs)
    assert same_inputs.item() == pytest.approx(reference.item(), rel=1e-5)
    assert low_inputs.item() == pytest.approx(reference.item(), rel=0.1, abs=1e-3)
