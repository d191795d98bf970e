"""Relational losses (RKD, PKT, SP, CC), which compare the samples of a batch with each other, against loop-by-loop
computations, finite differences and degenerate batches.

The second computations work element by element on Python floats (double precision) and share no code with the
library. Gradients of the default losses in the student features, batches of one through the distillers and bf16
autocast dtypes are checked for every method by tests/test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from degenerate import ZERO_CASES, assert_fp32_under_bf16_autocast, finite_with_grad, identical_rows, zero_maps
from loop_reference import nested, rows, unit
from lightning_kd.functional import cc_loss, pkt_loss, rkd_loss, sp_loss

REL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# independent loop implementations
# ----------------------------------------------------------------------------------------------------------
def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _distances(e: list[list[float]]) -> list[list[float]]:
    """Pairwise distances divided by the mean off-diagonal one."""
    n = len(e)
    d = [[math.dist(e[i], e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    positive = [d[i][j] for i in range(n) for j in range(n) if i != j]
    mean = sum(positive) / len(positive)
    return [[x / mean for x in row] for row in d]


def rkd_by_loops(s: torch.Tensor, t: torch.Tensor, wd: float = 25.0, wa: float = 50.0) -> float:
    def angles(e: list[list[float]]) -> list[float]:
        n, out = len(e), []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = unit([a - b for a, b in zip(e[j], e[i])])
                    v = unit([a - b for a, b in zip(e[k], e[i])])
                    out.append(sum(a * b for a, b in zip(u, v)))
        return out

    es, et = rows(s), rows(t)
    ds, dt = _distances(es), _distances(et)
    n = len(es)
    dist = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(es), angles(et)
    angle = sum(_huber(x - y) for x, y in zip(a_s, a_t)) / n**3
    return wd * dist + wa * angle


def pkt_by_loops(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    def probabilities(e: list[list[float]]) -> list[list[float]]:
        u = [unit(row) for row in e]
        sim = [[(sum(a * b for a, b in zip(x, y)) + 1) / 2 for y in u] for x in u]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probabilities(rows(s)), probabilities(rows(t))
    n = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def sp_by_loops(s: torch.Tensor, t: torch.Tensor) -> float:
    fs, ft = rows(s), rows(t)
    n = len(fs)

    def gram(f: list) -> list:
        return [unit([sum(a * b for a, b in zip(f[i], f[j])) for j in range(n)]) for i in range(n)]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def cc_by_loops(es: torch.Tensor, et: torch.Tensor) -> float:
    a, b = nested(es), nested(et)
    n, k = len(a), len(a[0])
    if n < 2:
        return 0.0
    d = [[abs(a[i][j] - b[i][j]) for j in range(k)] for i in range(n)]
    return sum(sum(d[i][j] * d[i + 1][j] for j in range(k)) for i in range(n - 1)) / (n - 1)


# ----------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape_s", "shape_t"), [((5, 4), (5, 6)), ((4, 2, 3), (4, 5)), ((6, 3, 2, 2), (6, 8)), ((2, 3), (2, 3))]
)
def test_rkd_matches_loops(shape_s: tuple[int, ...], shape_t: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    s, t = torch.randn(shape_s), torch.randn(shape_t)
    assert rkd_loss(s, t).item() == pytest.approx(rkd_by_loops(s, t), rel=REL)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(rkd_by_loops(s, t, 1.0, 0.0), rel=REL)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(rkd_by_loops(s, t, 0.0, 1.0), rel=REL)


def test_rkd_huber_branch_above_one_is_covered() -> None:
    # spread-out teacher, clustered student: normalised distance gaps exceed 1, so both Huber branches run
    s = torch.tensor([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [10.0, 10.0]])
    t = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    assert rkd_loss(s, t).item() == pytest.approx(rkd_by_loops(s, t), rel=REL)
    ds, dt = _distances(rows(s)), _distances(rows(t))
    gaps = [abs(a - b) for rs, rt in zip(ds, dt) for a, b in zip(rs, rt)]
    assert max(gaps) > 1 > min(gaps)


@pytest.mark.parametrize(("shape_s", "shape_t"), [((5, 4), (5, 6)), ((4, 2, 3), (4, 5)), ((3, 7), (3, 7))])
def test_pkt_matches_loops(shape_s: tuple[int, ...], shape_t: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    s, t = torch.randn(shape_s), torch.randn(shape_t)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_loops(s, t), rel=REL)


MAP_PAIRS = [
    ((3, 4, 4, 4), (3, 5, 4, 4)),
    ((3, 4, 8, 8), (3, 6, 4, 4)),
    ((3, 6, 4, 4), (3, 4, 8, 8)),
    ((2, 3, 6, 4), (2, 5, 3, 2)),
    ((2, 3, 5, 7), (2, 4, 3, 4)),
]


def _close(got: torch.Tensor, expected: float) -> None:
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("shapes", MAP_PAIRS + [((4, 7), (4, 3, 2))])
def test_sp_loss_matches_loop(shapes: tuple) -> None:
    s, t = torch.randn(shapes[0]), torch.randn(shapes[1])
    _close(sp_loss(s, t), sp_by_loops(s, t))


@pytest.mark.parametrize("batch", [2, 5])
def test_cc_loss_matches_loop(batch: int) -> None:
    s, t = torch.randn(batch, 6), torch.randn(batch, 6)
    _close(cc_loss(s, t), cc_by_loops(s, t))


def test_cc_loss_depends_on_adjacent_rows_only() -> None:
    # rows 0 and 2 are never adjacent: with d = [a, 0, b] the loss is 0 whatever a and b are
    s = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    assert cc_loss(s, t).item() == 0.0


def test_losses_vanish_on_matching_inputs() -> None:
    f = torch.rand(3, 4, 4, 4) + 0.1
    assert sp_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert cc_loss(f.flatten(1), f.flatten(1)).item() == 0.0
    e = torch.randn(5, 3)
    assert rkd_loss(e, 2 * e + 1).item() == pytest.approx(0.0, abs=1e-6)  # distances and angles are invariant


def test_errors() -> None:
    for fn in (rkd_loss, pkt_loss):
        with pytest.raises(ValueError, match="batch sizes differ"):
            fn(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        sp_loss(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="same shape"):
        cc_loss(torch.randn(2, 3), torch.randn(2, 4))


# ----------------------------------------------------------------------------------------------------------
# gradients in both inputs (CC's teacher side trains its teacher embedding)
# ----------------------------------------------------------------------------------------------------------
def _d(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_sp_gradcheck() -> None:
    assert torch.autograd.gradcheck(sp_loss, (_d(3, 2, 2, 2), _d(3, 5)))


def test_cc_gradcheck() -> None:
    assert torch.autograd.gradcheck(cc_loss, (_d(4, 3), _d(4, 3)))


# ----------------------------------------------------------------------------------------------------------
# degenerate batches: one sample, identical rows, zero rows
# ----------------------------------------------------------------------------------------------------------
def _loss_and_grad(fn, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_()
    loss = fn(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss], ids=["rkd", "pkt"])
def test_rkd_and_pkt_at_batch_size_one_are_zero_with_zero_gradient(fn) -> None:
    loss, grad = _loss_and_grad(fn, torch.randn(1, 6), torch.randn(1, 4))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_sp_and_cc_batch_of_one_values() -> None:
    # a single sample is perfectly similar to itself on both sides; no adjacent pair for CC
    assert sp_loss(torch.randn(1, 5), torch.randn(1, 7)).item() == pytest.approx(0.0, abs=1e-12)
    assert cc_loss(torch.randn(1, 5), torch.randn(1, 5)).item() == 0.0


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss], ids=["rkd", "pkt"])
def test_rkd_and_pkt_with_identical_and_zero_rows_are_finite(fn) -> None:
    t = torch.randn(4, 5)
    cases = {
        "identical rows": torch.randn(1, 6).repeat(4, 1),
        "two coincident samples": torch.cat([torch.randn(1, 6).repeat(2, 1), torch.randn(2, 6)]),
        "all-zero row": torch.cat([torch.zeros(1, 6), torch.randn(3, 6)]),
        "all zeros": torch.zeros(4, 6),
    }
    for name, s in cases.items():
        for student, teacher in ((s, t), (t, s)):
            loss, grad = _loss_and_grad(fn, student, teacher)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


def test_rkd_coincident_samples_match_loops() -> None:
    s = torch.cat([torch.randn(1, 3).repeat(2, 1), torch.randn(3, 3)])
    t = torch.randn(5, 4)
    assert rkd_loss(s, t).item() == pytest.approx(rkd_by_loops(s, t), rel=1e-4)


def test_pkt_zero_row_matches_loops() -> None:
    s = torch.cat([torch.zeros(1, 4), torch.randn(3, 4)])
    t = torch.randn(4, 6)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_loops(s, t), rel=REL)


MAP_LOSSES = {
    "sp": lambda s, t: sp_loss(s, t),
    "cc": lambda s, t: cc_loss(s.flatten(1), t.flatten(1)),
}


def _finite_with_grad(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return finite_with_grad(MAP_LOSSES[name], name, s, t)


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_sp_and_cc_with_identical_rows_are_finite(name: str) -> None:
    s, t = identical_rows()
    _finite_with_grad(name, s, t)
    _finite_with_grad(name, s, s.detach())  # coincident student and teacher


def test_sp_identical_rows_value() -> None:
    s = torch.randn(1, 6).repeat(4, 1)
    t = torch.randn(1, 3).repeat(4, 1)
    assert sp_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)  # both sides: every pair equally similar


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
@pytest.mark.parametrize("which", ZERO_CASES)
def test_sp_and_cc_with_all_zero_maps_are_finite(name: str, which: str) -> None:
    _finite_with_grad(name, *zero_maps(which))


def test_sp_all_zero_value() -> None:
    z, f = torch.zeros(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert sp_loss(z, f).item() == pytest.approx(sp_by_loops(z, f), rel=1e-5)  # zero similarity rows


# ----------------------------------------------------------------------------------------------------------
# bf16 autocast on CPU: the computation stays in fp32
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss], ids=["rkd", "pkt"])
def test_rkd_and_pkt_under_bf16_autocast_are_computed_in_fp32(fn) -> None:
    torch.manual_seed(7)
    s, t = torch.randn(4, 16).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(s, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # the same bf16 inputs outside autocast: no part of the computation may have dropped to bf16
    torch.testing.assert_close(got, fn(s.float(), t.float()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_sp_and_cc_under_bf16_autocast_are_computed_in_fp32(name: str) -> None:
    assert_fp32_under_bf16_autocast(MAP_LOSSES[name])
