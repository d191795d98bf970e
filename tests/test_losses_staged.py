"""Losses of the methods with an initialisation stage (AB, FT, FSP) against loop-by-loop computations, finite
differences, degenerate maps and bf16 autocast.

The second computations work element by element on Python floats (double precision), share no code with the
library, and pool with the definition of adaptive average pooling. FT's first stage does not read the student, so
the conformance suite's finite differences do not reach FT's main loss: it is checked here in every form.
"""

from __future__ import annotations

import pytest
import torch

from degenerate import ZERO_CASES, finite_with_grad, zero_maps
from loop_reference import flat, match, nested, unit
from lightning_kd.functional import ab_loss, fsp_loss, fsp_matrix, ft_loss

REL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# independent loop implementations
# ----------------------------------------------------------------------------------------------------------
def _values(x: list) -> list[float]:
    """Every number of a nested list, in order."""
    return [v for item in x for v in _values(item)] if isinstance(x, list) else [x]


def ab_by_loops(s: torch.Tensor, t: torch.Tensor, m: float = 1.0) -> float:
    ps, pt = match(s, t)
    total = 0.0
    for a, b in zip(_values(ps), _values(pt)):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    return total / len(ps)


def ft_by_loops(s: torch.Tensor, t: torch.Tensor, p: float = 1, whole: bool = False) -> float:
    ps, pt = match(s, t)

    def factor(f: list) -> list[list[float]]:
        out = []
        for sample in f:
            if whole:
                v = _values(sample)
            else:
                h, w = len(sample[0]), len(sample[0][0])
                channels = range(len(sample))
                v = [sum(sample[c][i][j] ** 2 for c in channels) / len(sample) for i in range(h) for j in range(w)]
            out.append(unit(v))
        return out

    fs, ft = factor(ps), factor(pt)
    diffs = [abs(a - b) ** p for rs, rt in zip(fs, ft) for a, b in zip(rs, rt)]
    return sum(diffs) / len(diffs)


def fsp_matrix_by_loop(bottom: list, top: list) -> list:
    """One sample: G[i][j] = sum over positions of top[i] * bottom[j] / HW."""
    positions = len(flat(bottom[0]))
    return [[sum(x * y for x, y in zip(flat(ti), flat(bj))) / positions for bj in bottom] for ti in top]


def fsp_by_loop(s_maps: list[torch.Tensor], t_maps: list[torch.Tensor]) -> float:
    total = 0.0
    for i in range(len(s_maps) - 1):
        s_bot, s_top = match(s_maps[i], s_maps[i + 1])
        t_bot, t_top = match(t_maps[i], t_maps[i + 1])
        squares, count = 0.0, 0
        for b in range(len(s_bot)):
            gs, gt = fsp_matrix_by_loop(s_bot[b], s_top[b]), fsp_matrix_by_loop(t_bot[b], t_top[b])
            for row_s, row_t in zip(gs, gt):
                for x, y in zip(row_s, row_t):
                    squares += (x - y) ** 2
                    count += 1
        total += squares / count
    return total


# ----------------------------------------------------------------------------------------------------------
# AB
# ----------------------------------------------------------------------------------------------------------
SPATIAL = [((4, 4), (4, 4)), ((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 6), (4, 3)), ((4, 3), (8, 6)), ((5, 7), (3, 4))]


@pytest.mark.parametrize(("size_s", "size_t"), SPATIAL)
def test_ab_matches_loops(size_s: tuple[int, int], size_t: tuple[int, int]) -> None:
    torch.manual_seed(3)
    s, t = 2 * torch.randn(3, 2, *size_s), torch.randn(3, 2, *size_t)
    t = t * (torch.rand_like(t) > 0.3)  # exact zeros: a teacher neuron at 0 counts as off
    if size_s == size_t:
        t = t.clamp_min(0)  # no pooling: many exact zeros survive
    assert ab_loss(s, t).item() == pytest.approx(ab_by_loops(s, t), rel=REL)
    assert ab_loss(s, t, margin=0.5).item() == pytest.approx(ab_by_loops(s, t, 0.5), rel=REL)


def test_ab_teacher_at_zero_is_off() -> None:
    s = torch.tensor([0.5, 0.5, -1.0, 1.0]).view(1, 4, 1, 1)
    t = torch.tensor([0.0, 1e-3, 0.0, 1.0]).view(1, 4, 1, 1)
    # (0.5 + 1)^2 where t = 0 (off), (0.5 - 1)^2 where t > 0 (on); s = -m when off and s = m when on cost 0
    assert ab_loss(s, t).item() == pytest.approx(1.5**2 + 0.5**2, rel=REL)


def test_ab_gradient_is_the_analytic_one_masks_carry_none() -> None:
    torch.manual_seed(6)
    m = 1.0
    s = (2 * torch.randn(3, 4, 3, 3)).requires_grad_()
    t = torch.randn(3, 4, 3, 3).requires_grad_()
    ab_loss(s, t, margin=m).backward()
    off = (s > -m) & (t <= 0)
    on = (s <= m) & (t > 0)
    expected = (2 * (s + m) * off + 2 * (s - m) * on).detach() / s.shape[0]
    torch.testing.assert_close(s.grad, expected, rtol=1e-6, atol=1e-7)
    assert off.any() and on.any() and (~(off | on)).any()  # every case occurs
    assert t.grad is None  # the teacher enters only through the masks


def test_ab_batch_sizes_must_agree() -> None:
    with pytest.raises(ValueError, match="batch sizes differ"):
        ab_loss(torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# FT
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size_s", "size_t"), SPATIAL)
def test_ft_matches_loops(size_s: tuple[int, int], size_t: tuple[int, int]) -> None:
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, *size_s), torch.randn(2, 5, *size_t)
    assert ft_loss(s, t).item() == pytest.approx(ft_by_loops(s, t), rel=REL)
    assert ft_loss(s, t, p=2).item() == pytest.approx(ft_by_loops(s, t, p=2), rel=REL)
    t_same = torch.randn(2, 3, *size_t)
    assert ft_loss(s, t_same, form="whole").item() == pytest.approx(ft_by_loops(s, t_same, whole=True), rel=REL)


def test_ft_whole_form_needs_equal_channels() -> None:
    with pytest.raises(ValueError, match="equal channels"):
        ft_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), form="whole")
    with pytest.raises(ValueError, match="form"):
        ft_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), form="paper")  # type: ignore[arg-type]


def test_ft_gradients_match_finite_differences() -> None:
    torch.manual_seed(5)
    t_map = torch.randn(2, 3, 2, 2, dtype=torch.float64)

    def student(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64).requires_grad_()

    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map), (student(2, 2, 4, 4),))
    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map, p=2), (student(2, 2, 4, 4),))
    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map, form="whole"), (student(2, 3, 2, 2),))


# ----------------------------------------------------------------------------------------------------------
# FSP
# ----------------------------------------------------------------------------------------------------------
def _close(got: torch.Tensor, expected: float) -> None:
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(
    "student_shapes, teacher_shapes",
    [
        ([(2, 3, 8, 8), (2, 4, 8, 8), (2, 5, 4, 4)], [(2, 3, 8, 8), (2, 4, 8, 8), (2, 5, 4, 4)]),
        ([(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 4, 2)], [(2, 3, 4, 4), (2, 4, 8, 8), (2, 5, 2, 2)]),
        ([(2, 2, 6, 4), (2, 3, 3, 2)], [(2, 2, 5, 7), (2, 3, 5, 7)]),
    ],
)
def test_fsp_loss_matches_loop(student_shapes: list, teacher_shapes: list) -> None:
    s = [torch.randn(shape) for shape in student_shapes]
    t = [torch.randn(shape) for shape in teacher_shapes]
    _close(fsp_loss(s, t), fsp_by_loop(s, t))


def test_fsp_matrix_shape_and_values() -> None:
    bottom, top = torch.randn(2, 3, 8, 6), torch.randn(2, 5, 4, 3)
    g = fsp_matrix(bottom, top)
    assert g.shape == (2, 5, 3)  # (B, C_top, C_bottom)
    pooled_bottom, pooled_top = match(nested(bottom), nested(top))
    for b in range(2):
        expected = fsp_matrix_by_loop(pooled_bottom[b], pooled_top[b])
        for i in range(5):
            for j in range(3):
                assert g[b, i, j].item() == pytest.approx(expected[i][j], rel=1e-5, abs=1e-8)


def test_fsp_matrix_orientation_matters() -> None:
    # G has shape (C_top, C_bottom): a transposed teacher matrix would not give 0
    bottom, top = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert fsp_loss([bottom, top], [bottom, top]).item() == 0.0
    assert fsp_loss([bottom, top], [top, bottom]).item() > 1e-3


def test_fsp_gradcheck_in_both_sides() -> None:
    def d(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    s = [d(2, 2, 4, 4), d(2, 3, 2, 2), d(2, 2, 2, 2)]
    t = [d(2, 2, 2, 2), d(2, 3, 4, 4), d(2, 2, 2, 2)]
    assert torch.autograd.gradcheck(lambda *x: fsp_loss(x[:3], x[3:]), (*s, *t))


def test_fsp_errors() -> None:
    with pytest.raises(ValueError, match=r"at index 1 .*\(2, 4, 2, 2\).*\(2, 5, 2, 2\)"):
        fsp_loss([torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)], [torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)])
    with pytest.raises(ValueError, match="at least 2"):
        fsp_loss([torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 2, 2)])


# ----------------------------------------------------------------------------------------------------------
# degenerate maps
# ----------------------------------------------------------------------------------------------------------
LOSSES = {
    "ab": ab_loss,
    "ft": ft_loss,
    "fsp": lambda s, t: fsp_loss([s, s * s], [t, t * t]),
}


def _finite_with_grad(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return finite_with_grad(LOSSES[name], name, s, t)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("which", ZERO_CASES)
def test_all_zero_maps_are_finite(name: str, which: str) -> None:
    _finite_with_grad(name, *zero_maps(which))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_identical_rows_are_finite(name: str) -> None:
    s, t = torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1), torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1)
    _finite_with_grad(name, s, t)
    _finite_with_grad(name, s, s.detach())  # coincident student and teacher


def test_zero_maps_values() -> None:
    zero = torch.zeros(2, 3, 4, 4)
    assert ft_loss(zero, zero).item() == 0.0
    assert fsp_loss([zero, zero], [zero, zero]).item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# bf16 autocast on CPU: the computation stays in fp32
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape_s", "shape_t"), [("ab", (4, 3, 8, 6), (4, 3, 4, 3)), ("ft", (4, 3, 8, 8), (4, 5, 4, 4))]
)
def test_ab_and_ft_under_bf16_autocast_are_computed_in_fp32(name: str, shape_s: tuple, shape_t: tuple) -> None:
    fn = LOSSES[name]
    torch.manual_seed(7)
    s, t = torch.randn(shape_s).bfloat16(), torch.randn(shape_t).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(s, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # the same bf16 inputs outside autocast: no part of the computation may have dropped to bf16
    torch.testing.assert_close(got, fn(s.float(), t.float()), rtol=1e-5, atol=1e-7)


def test_fsp_under_bf16_autocast_keeps_the_matrix_products_in_fp32() -> None:
    s, t = torch.randn(4, 3, 4, 4) * 10, torch.randn(4, 3, 4, 4) * 10
    reference = LOSSES["fsp"](s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_inputs = LOSSES["fsp"](s, t)
        low_inputs = LOSSES["fsp"](s.bfloat16(), t.bfloat16())
    assert same_inputs.dtype == torch.float32 and low_inputs.dtype == torch.float32
    assert torch.isfinite(low_inputs)
    assert same_inputs.item() == pytest.approx(reference.item(), rel=1e-5)
    # bf16 inputs only lose their input rounding
    assert low_inputs.item() == pytest.approx(reference.item(), rel=0.1, abs=1e-3)
