"""Feature-map losses (FitNet's hint, VID, AT, NST) against loop-by-loop computations, finite differences,
degenerate maps and bf16 autocast, and NST's memory bound.

The second computations work element by element on Python floats (double precision), share no code with the
library, and pool with the definition of adaptive average pooling. Batches of one through the distillers and bf16
autocast dtypes are checked for every method by tests/test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from degenerate import ZERO_CASES, assert_fp32_under_bf16_autocast, finite_with_grad, identical_rows, zero_maps
from loop_reference import flat, match, unit
from lightning_kd.functional import at_loss, hint_loss, nst_loss, vid_loss

REL = 1e-5


# --------------------------------------------------------------------------------------------------------------
# independent loop implementations
# --------------------------------------------------------------------------------------------------------------
def hint_by_loop(s: torch.Tensor, t: torch.Tensor) -> float:
    a, b = s.detach().double().flatten().tolist(), t.detach().double().flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def vid_by_loops(mean: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> float:
    m, t = match(mean, target)
    v = var.tolist()
    total, count = 0.0, 0
    for b in range(len(m)):
        for c in range(len(m[b])):
            for i in range(len(m[b][c])):
                for j in range(len(m[b][c][i])):
                    total += 0.5 * ((m[b][c][i][j] - t[b][c][i][j]) ** 2 / v[c] + math.log(v[c]))
                    count += 1
    return total / count


def at_by_loop(s: torch.Tensor, t: torch.Tensor, p: float = 2.0) -> float:
    s_maps, t_maps = match(s, t)
    total, count = 0.0, 0
    for fs, ft in zip(s_maps, t_maps):
        positions = len(flat(fs[0]))
        a_s = unit([sum(abs(flat(c)[k]) ** p for c in fs) / len(fs) for k in range(positions)])
        a_t = unit([sum(abs(flat(c)[k]) ** p for c in ft) / len(ft) for k in range(positions)])
        total += sum((x - y) ** 2 for x, y in zip(a_s, a_t))
        count += positions
    return total / count


def nst_by_loop(s: torch.Tensor, t: torch.Tensor) -> float:
    s_maps, t_maps = match(s, t)

    def mean_kernel(x: list, y: list) -> float:
        return sum(sum(a * b for a, b in zip(xi, yj)) ** 2 for xi in x for yj in y) / (len(x) * len(y))

    total = 0.0
    for fs, ft in zip(s_maps, t_maps):
        xs = [unit(flat(c)) for c in fs]
        xt = [unit(flat(c)) for c in ft]
        total += mean_kernel(xt, xt) + mean_kernel(xs, xs) - 2 * mean_kernel(xs, xt)
    return total / len(s_maps)


# --------------------------------------------------------------------------------------------------------------
# values against the loops
# --------------------------------------------------------------------------------------------------------------
# (student shape, teacher shape): equal sizes, 8x8 vs 4x4 both ways, non-square and non-divisible sizes
MAP_PAIRS = [
    ((3, 4, 4, 4), (3, 5, 4, 4)),
    ((3, 4, 8, 8), (3, 6, 4, 4)),
    ((3, 6, 4, 4), (3, 4, 8, 8)),
    ((2, 3, 6, 4), (2, 5, 3, 2)),
    ((2, 3, 5, 7), (2, 4, 3, 4)),
]
SPATIAL = [((4, 4), (4, 4)), ((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 6), (4, 3)), ((4, 3), (8, 6)), ((5, 7), (3, 4))]


def _close(got: torch.Tensor, expected: float) -> None:
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_hint_loss_matches_loop() -> None:
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    _close(hint_loss(s, t), hint_by_loop(s, t))


@pytest.mark.parametrize(("size_s", "size_t"), SPATIAL)
def test_vid_matches_loops(size_s: tuple[int, int], size_t: tuple[int, int]) -> None:
    torch.manual_seed(0)
    mean, target = torch.randn(2, 3, *size_s), torch.randn(2, 3, *size_t)
    var = torch.rand(3) + 0.1
    assert vid_loss(mean, target, var).item() == pytest.approx(vid_by_loops(mean, target, var), rel=REL)


def test_vid_loss_can_be_negative_and_has_the_gaussian_minimum() -> None:
    # at mu = f_t the loss is 0.5 * mean(log var): negative for var < 1
    x = torch.randn(2, 3, 2, 2)
    var = torch.tensor([0.5, 0.25, 0.1])
    assert vid_loss(x, x, var).item() == pytest.approx(0.5 * sum(math.log(v) for v in var.tolist()) / 3, rel=REL)


@pytest.mark.parametrize("shapes", MAP_PAIRS)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_loss_matches_loop(shapes: tuple, p: float) -> None:
    s, t = torch.randn(shapes[0]), torch.randn(shapes[1])
    _close(at_loss(s, t, p=p), at_by_loop(s, t, p))


@pytest.mark.parametrize(
    "shapes",
    MAP_PAIRS
    + [
        ((2, 7, 2, 2), (2, 9, 2, 2)),  # HW^2 < C_s C_t: the (B, HW, HW) route
        ((2, 9, 4, 4), (2, 7, 2, 2)),  # pooled to 2x2, then the (B, HW, HW) route
        ((1, 6, 3, 1), (1, 8, 3, 1)),
    ],
)
def test_nst_loss_matches_loop(shapes: tuple) -> None:
    s, t = torch.randn(shapes[0]), torch.randn(shapes[1])
    _close(nst_loss(s, t), nst_by_loop(s, t))


def test_losses_vanish_on_matching_inputs() -> None:
    f = torch.rand(3, 4, 4, 4) + 0.1
    assert hint_loss(f, f).item() == 0.0
    assert at_loss(f, 2 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(f, 4 * f).item() == pytest.approx(0.0, abs=1e-6)


def test_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        nst_loss(torch.randn(2, 3, 2, 2), torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match="p >= 1"):
        at_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), p=0.5)


# --------------------------------------------------------------------------------------------------------------
# gradients against finite differences in both inputs and the options (fp64 stays fp64 inside the functions)
# --------------------------------------------------------------------------------------------------------------
def _d(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_hint_gradcheck() -> None:
    assert torch.autograd.gradcheck(hint_loss, (_d(2, 2, 3, 3), _d(2, 2, 3, 3)))


def test_vid_gradcheck_in_the_mean_and_the_variance() -> None:
    torch.manual_seed(5)
    t_map = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    mean, var = _d(2, 3, 4, 4), (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: vid_loss(m, t_map, v), (mean, var))


@pytest.mark.parametrize("shapes", [((2, 3, 4, 4), (2, 2, 2, 2)), ((2, 2, 3, 2), (2, 3, 3, 4))])
def test_at_gradcheck(shapes: tuple) -> None:
    assert torch.autograd.gradcheck(at_loss, (_d(*shapes[0]), _d(*shapes[1])))
    assert torch.autograd.gradcheck(lambda s, t: at_loss(s, t, p=3.0), (_d(*shapes[0]), _d(*shapes[1])))


@pytest.mark.parametrize("shapes", [((2, 3, 4, 4), (2, 2, 2, 2)), ((2, 5, 1, 2), (2, 4, 1, 2))])
def test_nst_gradcheck(shapes: tuple) -> None:
    assert torch.autograd.gradcheck(nst_loss, (_d(*shapes[0]), _d(*shapes[1])))


# --------------------------------------------------------------------------------------------------------------
# degenerate inputs: identical rows, all-zero maps
# --------------------------------------------------------------------------------------------------------------
LOSSES = {
    "hint": lambda s, t: hint_loss(s, t),
    "at": lambda s, t: at_loss(s, t),
    "nst": lambda s, t: nst_loss(s, t),
    "vid": lambda s, t: vid_loss(s, t, torch.full((3,), 5.0)),
}


def _finite_with_grad(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return finite_with_grad(LOSSES[name], name, s, t)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_identical_rows(name: str) -> None:
    s, t = identical_rows()
    _finite_with_grad(name, s, t)
    _finite_with_grad(name, s, s.detach())  # coincident student and teacher


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("which", ZERO_CASES)
def test_all_zero_maps(name: str, which: str) -> None:
    _finite_with_grad(name, *zero_maps(which))


def test_all_zero_values() -> None:
    z = torch.zeros(3, 2, 4, 4)
    f = torch.randn(3, 2, 4, 4)
    # a zero map has a zero attention map and zero normalised channels
    assert at_loss(z, f).item() == pytest.approx(at_by_loop(z, f), rel=1e-5)
    assert nst_loss(z, f).item() == pytest.approx(nst_by_loop(z, f), rel=1e-5)
    assert nst_loss(z, z).item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# bf16 autocast on CPU: fp32 results, equal to the fp32 computation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hint", "at", "nst"])
def test_bf16_autocast_keeps_the_matrix_products_in_fp32(name: str) -> None:
    assert_fp32_under_bf16_autocast(LOSSES[name])


def test_vid_under_bf16_autocast_is_computed_in_fp32() -> None:
    torch.manual_seed(7)
    s, t = torch.randn(4, 3, 8, 8).bfloat16(), torch.randn(4, 3, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES["vid"](s, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # the same bf16 inputs outside autocast: no part of the computation may have dropped to bf16
    torch.testing.assert_close(got, LOSSES["vid"](s.float(), t.float()), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# NST memory: never a (B, C, C, HW) tensor
# --------------------------------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def _naive_nst(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The broadcasting kernel the specification forbids: it materialises (B, C, C, HW)."""
    s = torch.nn.functional.normalize(student.flatten(2), dim=2)
    t = torch.nn.functional.normalize(teacher.flatten(2), dim=2)

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(1) * y.unsqueeze(2)).sum(-1).pow(2).mean()

    return kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)


def test_largest_tensor_probe_sees_a_broadcast_kernel() -> None:
    s, t = torch.randn(2, 16, 4, 4, requires_grad=True), torch.randn(2, 16, 4, 4)
    with LargestTensor() as probe:
        _naive_nst(s, t).backward()
    assert probe.largest >= 2 * 16 * 16 * 16 * 4
    # and the library's function agrees with the naive kernel on this small case
    assert nst_loss(s, t).item() == pytest.approx(_naive_nst(s, t).item(), rel=1e-5)


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [((64, 1024, 8, 8), (64, 1024, 8, 8)), ((64, 1280, 4, 4), (64, 2048, 4, 4))],
)
def test_nst_memory_stays_small_at_resnet50_sizes(student_shape: tuple, teacher_shape: tuple) -> None:
    student = torch.randn(student_shape, requires_grad=True)
    teacher = torch.randn(teacher_shape)
    with LargestTensor() as probe:
        loss = nst_loss(student, teacher)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert probe.largest < 2**30, f"largest tensor {probe.largest / 2**20:.0f} MiB"
    # nothing larger than a few copies of the inputs: no (B, C, C) kernel even
    assert probe.largest <= max(student.numel(), teacher.numel()) * 4
