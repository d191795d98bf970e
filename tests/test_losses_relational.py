"""VID, RKD, PKT, AB and FT losses against loop-by-loop computations, finite differences and degenerate input.

The second computations below work element by element on Python floats (double precision), share no code
with the library, and pool with the definition of adaptive average pooling.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.distillers.ab import ab_layer_weights
from lightning_kd.functional import ab_loss, ft_loss, pkt_loss, rkd_loss, vid_loss

REL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# independent loop implementations
# ----------------------------------------------------------------------------------------------------------
def _pool(x: list, out_h: int, out_w: int) -> list:
    """Adaptive average pooling of a nested ``[B][C][H][W]`` list, by its definition."""
    pooled = []
    for sample in x:
        channels = []
        for grid in sample:
            h, w = len(grid), len(grid[0])
            rows = []
            for i in range(out_h):
                h0, h1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
                row = []
                for j in range(out_w):
                    w0, w1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
                    cells = [grid[a][b] for a in range(h0, h1) for b in range(w0, w1)]
                    row.append(sum(cells) / len(cells))
                rows.append(row)
            channels.append(rows)
        pooled.append(channels)
    return pooled


def _match(a: torch.Tensor, b: torch.Tensor) -> tuple[list, list]:
    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    return _pool(a.tolist(), h, w), _pool(b.tolist(), h, w)


def _flat(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [0.0] * len(v) if n == 0 else [a / n for a in v]


def vid_by_loops(mean: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> float:
    m, t = _match(mean, target)
    v = var.tolist()
    total, count = 0.0, 0
    for b in range(len(m)):
        for c in range(len(m[b])):
            for i in range(len(m[b][c])):
                for j in range(len(m[b][c][i])):
                    total += 0.5 * ((m[b][c][i][j] - t[b][c][i][j]) ** 2 / v[c] + math.log(v[c]))
                    count += 1
    return total / count


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
                    u = _unit([a - b for a, b in zip(e[j], e[i])])
                    v = _unit([a - b for a, b in zip(e[k], e[i])])
                    out.append(sum(a * b for a, b in zip(u, v)))
        return out

    es, et = _flat(s), _flat(t)
    ds, dt = _distances(es), _distances(et)
    n = len(es)
    dist = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(es), angles(et)
    angle = sum(_huber(x - y) for x, y in zip(a_s, a_t)) / n**3
    return wd * dist + wa * angle


def pkt_by_loops(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    def probabilities(e: list[list[float]]) -> list[list[float]]:
        u = [_unit(row) for row in e]
        sim = [[(sum(a * b for a, b in zip(x, y)) + 1) / 2 for y in u] for x in u]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probabilities(_flat(s)), probabilities(_flat(t))
    n = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def ab_by_loops(s: torch.Tensor, t: torch.Tensor, m: float = 1.0) -> float:
    ps, pt = _match(s, t)
    total = 0.0
    for a, b in zip(torch.tensor(ps).flatten().tolist(), torch.tensor(pt).flatten().tolist()):
        if a > -m and b <= 0:
            total += (a + m) ** 2
        if a <= m and b > 0:
            total += (a - m) ** 2
    return total / len(ps)


def ft_by_loops(s: torch.Tensor, t: torch.Tensor, p: float = 1, whole: bool = False) -> float:
    ps, pt = _match(s, t)

    def factor(f: list) -> list[list[float]]:
        out = []
        for sample in f:
            if whole:
                v = [x for grid in sample for row in grid for x in row]
            else:
                h, w = len(sample[0]), len(sample[0][0])
                channels = range(len(sample))
                v = [sum(sample[c][i][j] ** 2 for c in channels) / len(sample) for i in range(h) for j in range(w)]
            out.append(_unit(v))
        return out

    fs, ft = factor(ps), factor(pt)
    diffs = [abs(a - b) ** p for rs, rt in zip(fs, ft) for a, b in zip(rs, rt)]
    return sum(diffs) / len(diffs)


# ----------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------
SPATIAL = [((4, 4), (4, 4)), ((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 6), (4, 3)), ((4, 3), (8, 6)), ((5, 7), (3, 4))]


@pytest.mark.parametrize(("size_s", "size_t"), SPATIAL)
def test_vid_matches_loops(size_s: tuple[int, int], size_t: tuple[int, int]) -> None:
    torch.manual_seed(0)
    mean, target = torch.randn(2, 3, *size_s), torch.randn(2, 3, *size_t)
    var = torch.rand(3) + 0.1
    assert vid_loss(mean, target, var).item() == pytest.approx(vid_by_loops(mean, target, var), rel=REL)


def test_vid_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), torch.ones(4))


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
    ds, dt = _distances(_flat(s)), _distances(_flat(t))
    gaps = [abs(a - b) for rs, rt in zip(ds, dt) for a, b in zip(rs, rt)]
    assert max(gaps) > 1 > min(gaps)


@pytest.mark.parametrize(("shape_s", "shape_t"), [((5, 4), (5, 6)), ((4, 2, 3), (4, 5)), ((3, 7), (3, 7))])
def test_pkt_matches_loops(shape_s: tuple[int, ...], shape_t: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    s, t = torch.randn(shape_s), torch.randn(shape_t)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_loops(s, t), rel=REL)


@pytest.mark.parametrize(("size_s", "size_t"), SPATIAL)
def test_ab_matches_loops(size_s: tuple[int, int], size_t: tuple[int, int]) -> None:
    torch.manual_seed(3)
    s, t = 2 * torch.randn(3, 2, *size_s), torch.randn(3, 2, *size_t)
    t = t * (torch.rand_like(t) > 0.3)  # exact zeros: a teacher neuron at 0 counts as off
    if size_s == size_t:
        t = t.clamp_min(0)  # no pooling: many exact zeros survive
    assert ab_loss(s, t).item() == pytest.approx(ab_by_loops(s, t), rel=REL)
    assert ab_loss(s, t, margin=0.5).item() == pytest.approx(ab_by_loops(s, t, 0.5), rel=REL)


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


def test_batch_sizes_must_agree() -> None:
    for fn in (rkd_loss, pkt_loss):
        with pytest.raises(ValueError, match="batch sizes differ"):
            fn(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ab_loss(torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------
def _double(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()


def test_gradients_match_finite_differences() -> None:
    torch.manual_seed(5)
    t_map = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    mean, var = _double(2, 3, 4, 4), (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: vid_loss(m, t_map, v), (mean, var))

    t_vec = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, t_vec), (_double(4, 3),))
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, t_vec), (_double(4, 3),))

    s_map = _double(2, 3, 4, 4, scale=2.0)
    assert torch.autograd.gradcheck(lambda s: ab_loss(s, t_map), (s_map,))
    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map), (_double(2, 2, 4, 4),))
    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map, p=2), (_double(2, 2, 4, 4),))
    assert torch.autograd.gradcheck(lambda s: ft_loss(s, t_map, form="whole"), (_double(2, 3, 2, 2),))


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


# ----------------------------------------------------------------------------------------------------------
# degenerate input
# ----------------------------------------------------------------------------------------------------------
def _loss_and_grad(fn, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_()
    loss = fn(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss], ids=["rkd", "pkt"])
def test_relational_losses_at_batch_size_one_are_zero_with_zero_gradient(fn) -> None:
    loss, grad = _loss_and_grad(fn, torch.randn(1, 6), torch.randn(1, 4))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss], ids=["rkd", "pkt"])
def test_relational_losses_with_identical_and_zero_rows_are_finite(fn) -> None:
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


def test_rkd_identical_structure_gives_zero_and_coincident_samples_match_loops() -> None:
    e = torch.randn(5, 3)
    assert rkd_loss(e, 2 * e + 1).item() == pytest.approx(0.0, abs=1e-6)  # distances and angles are invariant
    s = torch.cat([torch.randn(1, 3).repeat(2, 1), torch.randn(3, 3)])
    t = torch.randn(5, 4)
    assert rkd_loss(s, t).item() == pytest.approx(rkd_by_loops(s, t), rel=1e-4)


def test_pkt_zero_row_matches_loops() -> None:
    s = torch.cat([torch.zeros(1, 4), torch.randn(3, 4)])
    t = torch.randn(4, 6)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_loops(s, t), rel=REL)


def test_map_losses_with_zero_maps_are_finite() -> None:
    zero, rand = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for fn in (ab_loss, ft_loss, lambda s, t: vid_loss(s, t, torch.full((3,), 5.0))):
        for s, t in ((zero, rand), (rand, zero), (zero, zero)):
            loss, grad = _loss_and_grad(fn, s, t)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert ft_loss(zero, zero).item() == 0.0


def test_vid_loss_can_be_negative_and_has_the_gaussian_minimum() -> None:
    # at mu = f_t the loss is 0.5 * mean(log var): negative for var < 1
    x = torch.randn(2, 3, 2, 2)
    var = torch.tensor([0.5, 0.25, 0.1])
    assert vid_loss(x, x, var).item() == pytest.approx(0.5 * sum(math.log(v) for v in var.tolist()) / 3, rel=REL)


FUNCTIONS = {
    "vid": (lambda s, t: vid_loss(s, t, torch.full((3,), 5.0)), (4, 3, 8, 8), (4, 3, 4, 4)),
    "rkd": (rkd_loss, (4, 16), (4, 8)),
    "pkt": (pkt_loss, (4, 16), (4, 8)),
    "ab": (ab_loss, (4, 3, 8, 6), (4, 3, 4, 3)),
    "ft": (ft_loss, (4, 3, 8, 8), (4, 5, 4, 4)),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bf16_autocast_on_cpu_gives_a_finite_fp32_loss_computed_in_fp32(name: str) -> None:
    fn, shape_s, shape_t = FUNCTIONS[name]
    torch.manual_seed(7)
    s, t = torch.randn(shape_s).bfloat16(), torch.randn(shape_t).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(s, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # the same bf16 inputs outside autocast: no part of the computation may have dropped to bf16
    torch.testing.assert_close(got, fn(s.float(), t.float()), rtol=1e-5, atol=1e-7)


def test_ab_layer_weights() -> None:
    assert ab_layer_weights(3) == [0.25, 0.5, 1.0]
    assert ab_layer_weights(1) == [1.0]
    assert ab_layer_weights(4) == [0.125, 0.25, 0.5, 1.0]
