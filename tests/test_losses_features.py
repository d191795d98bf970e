"""FitNet, AT, SP, CC, FSP and NST losses against explicit-loop computations, finite differences,
degenerate inputs, bf16 autocast, and NST's memory bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_kd.functional import at_loss, cc_loss, fsp_loss, fsp_matrix, hint_loss, nst_loss, sp_loss

EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------
# independent loop implementations (plain Python floats, no torch ops)
# --------------------------------------------------------------------------------------------------------------
def _nested(x: torch.Tensor) -> list:
    return x.detach().double().tolist()


def _pool(fmap: list, out_h: int, out_w: int) -> list:
    """Adaptive average pooling of one (C, H, W) nested list, bins as floor(i*in/out) .. ceil((i+1)*in/out)."""
    in_h, in_w = len(fmap[0]), len(fmap[0][0])
    pooled = []
    for channel in fmap:
        rows = []
        for i in range(out_h):
            h0, h1 = (i * in_h) // out_h, -((-(i + 1) * in_h) // out_h)
            row = []
            for j in range(out_w):
                w0, w1 = (j * in_w) // out_w, -((-(j + 1) * in_w) // out_w)
                cells = [channel[h][w] for h in range(h0, h1) for w in range(w0, w1)]
                row.append(sum(cells) / len(cells))
            rows.append(row)
        pooled.append(rows)
    return pooled


def _match(s: list, t: list) -> tuple[list, list]:
    """Pool each sample of both (B, C, H, W) nested lists to the smaller height and width."""
    h = min(len(s[0][0]), len(t[0][0]))
    w = min(len(s[0][0][0]), len(t[0][0][0]))
    return [_pool(x, h, w) for x in s], [_pool(x, h, w) for x in t]


def _flat(channel: list) -> list[float]:
    return [v for row in channel for v in row]


def _unit(v: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(x * x for x in v)), EPS)
    return [x / norm for x in v]


def _hint_loop(s: torch.Tensor, t: torch.Tensor) -> float:
    a, b = s.detach().double().flatten().tolist(), t.detach().double().flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _at_loop(s: torch.Tensor, t: torch.Tensor, p: float = 2.0) -> float:
    s_maps, t_maps = _match(_nested(s), _nested(t))
    total, count = 0.0, 0
    for fs, ft in zip(s_maps, t_maps):
        positions = len(_flat(fs[0]))
        a_s = _unit([sum(abs(_flat(c)[k]) ** p for c in fs) / len(fs) for k in range(positions)])
        a_t = _unit([sum(abs(_flat(c)[k]) ** p for c in ft) / len(ft) for k in range(positions)])
        total += sum((x - y) ** 2 for x, y in zip(a_s, a_t))
        count += positions
    return total / count


def _sp_loop(s: torch.Tensor, t: torch.Tensor) -> float:
    fs = [row for row in s.detach().double().reshape(s.shape[0], -1).tolist()]
    ft = [row for row in t.detach().double().reshape(t.shape[0], -1).tolist()]
    n = len(fs)

    def gram(f: list) -> list:
        return [_unit([sum(a * b for a, b in zip(f[i], f[j])) for j in range(n)]) for i in range(n)]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def _cc_loop(es: torch.Tensor, et: torch.Tensor) -> float:
    a, b = _nested(es), _nested(et)
    n, k = len(a), len(a[0])
    if n < 2:
        return 0.0
    d = [[abs(a[i][j] - b[i][j]) for j in range(k)] for i in range(n)]
    return sum(sum(d[i][j] * d[i + 1][j] for j in range(k)) for i in range(n - 1)) / (n - 1)


def _fsp_matrix_loop(bottom: list, top: list) -> list:
    """One sample: G[i][j] = sum over positions of top[i] * bottom[j] / HW."""
    positions = len(_flat(bottom[0]))
    return [
        [sum(x * y for x, y in zip(_flat(ti), _flat(bj))) / positions for bj in bottom]
        for ti in top
    ]


def _fsp_loop(s_maps: list[torch.Tensor], t_maps: list[torch.Tensor]) -> float:
    total = 0.0
    for i in range(len(s_maps) - 1):
        s_bot, s_top = _match(_nested(s_maps[i]), _nested(s_maps[i + 1]))
        t_bot, t_top = _match(_nested(t_maps[i]), _nested(t_maps[i + 1]))
        squares, count = 0.0, 0
        for b in range(len(s_bot)):
            gs, gt = _fsp_matrix_loop(s_bot[b], s_top[b]), _fsp_matrix_loop(t_bot[b], t_top[b])
            for row_s, row_t in zip(gs, gt):
                for x, y in zip(row_s, row_t):
                    squares += (x - y) ** 2
                    count += 1
        total += squares / count
    return total


def _nst_loop(s: torch.Tensor, t: torch.Tensor) -> float:
    s_maps, t_maps = _match(_nested(s), _nested(t))

    def mean_kernel(x: list, y: list) -> float:
        return sum(sum(a * b for a, b in zip(xi, yj)) ** 2 for xi in x for yj in y) / (len(x) * len(y))

    total = 0.0
    for fs, ft in zip(s_maps, t_maps):
        xs = [_unit(_flat(c)) for c in fs]
        xt = [_unit(_flat(c)) for c in ft]
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


def _close(got: torch.Tensor, expected: float) -> None:
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_hint_loss_matches_loop() -> None:
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    _close(hint_loss(s, t), _hint_loop(s, t))


@pytest.mark.parametrize("shapes", MAP_PAIRS)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_loss_matches_loop(shapes: tuple, p: float) -> None:
    s, t = torch.randn(shapes[0]), torch.randn(shapes[1])
    _close(at_loss(s, t, p=p), _at_loop(s, t, p))


@pytest.mark.parametrize("shapes", MAP_PAIRS + [((4, 7), (4, 3, 2))])
def test_sp_loss_matches_loop(shapes: tuple) -> None:
    s, t = torch.randn(shapes[0]), torch.randn(shapes[1])
    _close(sp_loss(s, t), _sp_loop(s, t))


@pytest.mark.parametrize("batch", [2, 5])
def test_cc_loss_matches_loop(batch: int) -> None:
    s, t = torch.randn(batch, 6), torch.randn(batch, 6)
    _close(cc_loss(s, t), _cc_loop(s, t))


def test_cc_loss_depends_on_adjacent_rows_only() -> None:
    # rows 0 and 2 are never adjacent: with d = [a, 0, b] the loss is 0 whatever a and b are
    s = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    assert cc_loss(s, t).item() == 0.0


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
    _close(fsp_loss(s, t), _fsp_loop(s, t))


def test_fsp_matrix_shape_and_values() -> None:
    bottom, top = torch.randn(2, 3, 8, 6), torch.randn(2, 5, 4, 3)
    g = fsp_matrix(bottom, top)
    assert g.shape == (2, 5, 3)  # (B, C_top, C_bottom)
    pooled_bottom, pooled_top = _match(_nested(bottom), _nested(top))
    for b in range(2):
        expected = _fsp_matrix_loop(pooled_bottom[b], pooled_top[b])
        for i in range(5):
            for j in range(3):
                assert g[b, i, j].item() == pytest.approx(expected[i][j], rel=1e-5, abs=1e-8)


def test_fsp_matrix_orientation_matters() -> None:
    # G has shape (C_top, C_bottom): a transposed teacher matrix would not give 0
    bottom, top = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert fsp_loss([bottom, top], [bottom, top]).item() == 0.0
    assert fsp_loss([bottom, top], [top, bottom]).item() > 1e-3


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
    _close(nst_loss(s, t), _nst_loop(s, t))


def test_losses_vanish_on_matching_inputs() -> None:
    f = torch.rand(3, 4, 4, 4) + 0.1
    assert hint_loss(f, f).item() == 0.0
    assert at_loss(f, 2 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert sp_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(f, 4 * f).item() == pytest.approx(0.0, abs=1e-6)
    assert cc_loss(f.flatten(1), f.flatten(1)).item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# gradients against finite differences (fp64 stays fp64 inside the functions)
# --------------------------------------------------------------------------------------------------------------
def _d(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_hint_gradcheck() -> None:
    assert torch.autograd.gradcheck(hint_loss, (_d(2, 2, 3, 3), _d(2, 2, 3, 3)))


@pytest.mark.parametrize("shapes", [((2, 3, 4, 4), (2, 2, 2, 2)), ((2, 2, 3, 2), (2, 3, 3, 4))])
def test_at_gradcheck(shapes: tuple) -> None:
    assert torch.autograd.gradcheck(at_loss, (_d(*shapes[0]), _d(*shapes[1])))
    assert torch.autograd.gradcheck(lambda s, t: at_loss(s, t, p=3.0), (_d(*shapes[0]), _d(*shapes[1])))


def test_sp_gradcheck() -> None:
    assert torch.autograd.gradcheck(sp_loss, (_d(3, 2, 2, 2), _d(3, 5)))


def test_cc_gradcheck() -> None:
    assert torch.autograd.gradcheck(cc_loss, (_d(4, 3), _d(4, 3)))


def test_fsp_gradcheck() -> None:
    s = [_d(2, 2, 4, 4), _d(2, 3, 2, 2), _d(2, 2, 2, 2)]
    t = [_d(2, 2, 2, 2), _d(2, 3, 4, 4), _d(2, 2, 2, 2)]
    assert torch.autograd.gradcheck(lambda *x: fsp_loss(x[:3], x[3:]), (*s, *t))


@pytest.mark.parametrize("shapes", [((2, 3, 4, 4), (2, 2, 2, 2)), ((2, 5, 1, 2), (2, 4, 1, 2))])
def test_nst_gradcheck(shapes: tuple) -> None:
    assert torch.autograd.gradcheck(nst_loss, (_d(*shapes[0]), _d(*shapes[1])))


# --------------------------------------------------------------------------------------------------------------
# degenerate inputs: batch of one, identical rows, all-zero maps
# --------------------------------------------------------------------------------------------------------------
LOSSES = {
    "hint": lambda s, t: hint_loss(s, t),
    "at": lambda s, t: at_loss(s, t),
    "sp": lambda s, t: sp_loss(s, t),
    "cc": lambda s, t: cc_loss(s.flatten(1), t.flatten(1)),
    "fsp": lambda s, t: fsp_loss([s, s * s], [t, t * t]),
    "nst": lambda s, t: nst_loss(s, t),
}


def _finite_with_grad(name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = s.clone().requires_grad_(True)
    loss = LOSSES[name](s, t)
    loss.backward()
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    assert s.grad is not None and torch.isfinite(s.grad).all(), f"{name}: gradient {s.grad}"
    return loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_of_one(name: str) -> None:
    _finite_with_grad(name, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))


def test_batch_of_one_values() -> None:
    # a single sample is perfectly similar to itself on both sides; no adjacent pair for CC
    assert sp_loss(torch.randn(1, 5), torch.randn(1, 7)).item() == pytest.approx(0.0, abs=1e-12)
    assert cc_loss(torch.randn(1, 5), torch.randn(1, 5)).item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_identical_rows(name: str) -> None:
    row = torch.randn(1, 3, 4, 4)
    s, t = row.repeat(4, 1, 1, 1), torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1)
    _finite_with_grad(name, s, t)
    _finite_with_grad(name, s, s.detach())  # coincident student and teacher


def test_identical_rows_values() -> None:
    s = torch.randn(1, 6).repeat(4, 1)
    t = torch.randn(1, 3).repeat(4, 1)
    assert sp_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)  # both sides: every pair equally similar


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("which", ["student", "teacher", "both", "one_row"])
def test_all_zero_maps(name: str, which: str) -> None:
    s, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    if which in ("student", "both"):
        s = torch.zeros_like(s)
    if which in ("teacher", "both"):
        t = torch.zeros_like(t)
    if which == "one_row":
        s[1] = 0.0
        s[2, 1] = 0.0  # and one all-zero channel
    _finite_with_grad(name, s, t)


def test_all_zero_values() -> None:
    z = torch.zeros(3, 2, 4, 4)
    f = torch.randn(3, 2, 4, 4)
    # a zero map has a zero attention map, zero similarity rows, zero normalised channels
    assert at_loss(z, f).item() == pytest.approx(_at_loop(z, f), rel=1e-5)
    assert sp_loss(z, f).item() == pytest.approx(_sp_loop(z, f), rel=1e-5)
    assert nst_loss(z, f).item() == pytest.approx(_nst_loop(z, f), rel=1e-5)
    assert nst_loss(z, z).item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# bf16 autocast on CPU: fp32 results, equal to the fp32 computation for fp32 inputs
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_gives_fp32(name: str) -> None:
    s, t = torch.randn(4, 3, 4, 4) * 10, torch.randn(4, 3, 4, 4) * 10
    reference = LOSSES[name](s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_inputs = LOSSES[name](s, t)
        low_inputs = LOSSES[name](s.bfloat16(), t.bfloat16())
    assert same_inputs.dtype == torch.float32 and low_inputs.dtype == torch.float32
    assert torch.isfinite(low_inputs)
    # the matrix products stay in fp32 under autocast
    assert same_inputs.item() == pytest.approx(reference.item(), rel=1e-5)
    # bf16 inputs only lose their input rounding
    assert low_inputs.item() == pytest.approx(reference.item(), rel=0.1, abs=1e-3)


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------
def test_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        cc_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        sp_loss(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        nst_loss(torch.randn(2, 3, 2, 2), torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match="p >= 1"):
        at_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), p=0.5)
    with pytest.raises(ValueError, match=r"at index 1 .*\(2, 4, 2, 2\).*\(2, 5, 2, 2\)"):
        fsp_loss([torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)], [torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)])
    with pytest.raises(ValueError, match="at least 2"):
        fsp_loss([torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 2, 2)])


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
