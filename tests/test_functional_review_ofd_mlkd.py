"""ReviewKD's HCL, OFD's margin and partial L2, and MLKD's terms against independent computations.

The second computations work element by element on Python floats (double precision) from the formulas of
METHODS-MODERN sections 5, 7 and 8, share no code with the library, pool with the definition of adaptive average
pooling, evaluate the normal distribution with ``math.erf``, and take MLKD's medians with ``numpy.percentile`` as
the official code does. They include the quirks the published numbers depend on: HCL's weights halving with each
pooled term used, OFD's -3 sigma cut-off, MLKD's masks acting as scalar factors and its "strong" sum reusing the
weak view.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from lightning_kd.functional import (
    batch_correlation_loss,
    class_correlation_loss,
    confidence_masks,
    hcl_level_weights,
    hcl_loss,
    mlkd_loss,
    ofd_loss,
    ofd_margin,
)

REL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# independent implementations
# ----------------------------------------------------------------------------------------------------------
def _pool(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Adaptive average pooling of one ``[H][W]`` grid, by its definition."""
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
    return rows


def _pool_map(x: list, size: int) -> list:
    return [[_pool(grid, size, size) for grid in sample] for sample in x]


def _values(x: list) -> list[float]:
    return [v for sample in x for grid in sample for row in grid for v in row]


def _mse(a: list, b: list) -> float:
    va, vb = _values(a), _values(b)
    return sum((p - q) ** 2 for p, q in zip(va, vb)) / len(va)


def hcl_by_loops(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    """Per level: [MSE + sum_j (1/2)^(j+1) MSE(pool_{k_j})] / (1 + sum_j (1/2)^(j+1)), k_j the sizes of 4, 2, 1
    below the level's height, in that order; summed over levels."""
    total = 0.0
    for s, t in zip(student, teacher):
        s_list, t_list = s.tolist(), t.tolist()
        sizes = [k for k in (4, 2, 1) if k < s.shape[2]]
        weights = [0.5 ** (j + 1) for j in range(len(sizes))]
        level = _mse(s_list, t_list)
        for k, w in zip(sizes, weights):
            level += w * _mse(_pool_map(s_list, k), _pool_map(t_list, k))
        total += level / (1 + sum(weights))
    return total


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def margin_by_formula(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    if _cdf(-m / s) > 0.001:
        return m - s * _phi(m / s) / _cdf(-m / s)
    return -3 * s


def ofd_by_loops(s: torch.Tensor, t: torch.Tensor, margin: list[float]) -> float:
    total = 0.0
    for b, sample in enumerate(s.tolist()):
        for c, grid in enumerate(sample):
            for i, row in enumerate(grid):
                for j, x in enumerate(row):
                    y = t[b, c, i, j].item()
                    target = max(y, margin[c])
                    if x > target or y > 0:
                        total += (x - target) ** 2
    return total / s.shape[0]


def ofd_mdistiller_form(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mdistiller's three-case form of the same loss (mean over the batch, sum over the rest)."""
    m = margin.view(1, -1, 1, 1)
    loss = (
        (s - m) ** 2 * ((s > m) & (t <= m))
        + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
        + (s - t) ** 2 * (t > 0)
    )
    return loss.mean(dim=0).sum()


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / temperature) for v in row]
    total = sum(e)
    return [v / total for v in e]


def _standardize(row: list[float]) -> list[float]:
    mean, std = statistics.fmean(row), statistics.stdev(row)  # Bessel-corrected, as LS
    return [(v - mean) / (std + 1e-7) for v in row]


def kd_rows(s: list[list[float]], t: list[list[float]], temperature: float) -> list[float]:
    out = []
    for zs, zt in zip(s, t):
        ps, pt = _softmax(zs, temperature), _softmax(zt, temperature)
        out.append(temperature**2 * sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt) if q > 0))
    return out


def bc_by_loops(s: list[list[float]], t: list[list[float]], temperature: float, weights=None) -> float:
    ps, pt = [_softmax(r, temperature) for r in s], [_softmax(r, temperature) for r in t]
    n = len(ps)
    weights = weights or [1.0] * n
    total = 0.0
    for i in range(n):
        for j in range(n):
            gs = sum(a * b for a, b in zip(ps[i], ps[j]))
            gt = sum(a * b for a, b in zip(pt[i], pt[j]))
            total += weights[i] * (gs - gt) ** 2
    return total / n


def cc_by_loops(s: list[list[float]], t: list[list[float]], temperature: float, weights=None) -> float:
    ps, pt = [_softmax(r, temperature) for r in s], [_softmax(r, temperature) for r in t]
    classes = len(ps[0])
    weights = weights or [1.0] * classes
    total = 0.0
    for a in range(classes):
        for b in range(classes):
            ms = sum(row[a] * row[b] for row in ps)
            mt = sum(row[a] * row[b] for row in pt)
            total += weights[a] * (ms - mt) ** 2
    return total / classes


def masks_by_numpy(t: list[list[float]]) -> tuple[list[float], list[float]]:
    """As the official code: numpy's 50th percentile (linear) of the teacher's confidences, ``<=``."""
    p = [_softmax(r) for r in t]
    confidence = np.array([max(r) for r in p])
    class_confidence = np.array([sum(r[c] for r in p) for c in range(len(p[0]))])
    sample = [float(v <= np.percentile(confidence, 50)) for v in confidence]
    cls = [float(v <= np.percentile(class_confidence, 50)) for v in class_confidence]
    return sample, cls


def mlkd_by_loops(s_w, t_w, s_s, t_s, t0=4.0, per_sample=False, standardize=False) -> float:
    """The official sum, term by term: weak KD (masked), the "strong" KD sum (T0, 3, 5 on the strong view, 2 and 6
    on the weak one), weak CC (class mask), weak BC (sample mask); no strong CC/BC."""
    s_w, t_w, s_s, t_s = (z.tolist() for z in (s_w, t_w, s_s, t_s))
    temps = [t0, 3.0, 5.0, 2.0, 6.0]
    mask, cmask = masks_by_numpy(t_w)
    m, k = sum(mask) / len(mask), sum(cmask) / len(cmask)
    std = (lambda z: [_standardize(r) for r in z]) if standardize else (lambda z: z)
    kw_s, kw_t, ks_s, ks_t = std(s_w), std(t_w), std(s_s), std(t_s)
    total = 0.0
    for temp in temps:
        rows = kd_rows(kw_s, kw_t, temp)
        if per_sample:
            total += sum(a * b for a, b in zip(mask, rows)) / len(rows)
        else:
            total += m * sum(rows) / len(rows)
    for temp in temps[:3]:
        rows = kd_rows(ks_s, ks_t, temp)
        total += sum(rows) / len(rows)
    for temp in (2.0, 6.0):
        rows = kd_rows(kw_s, kw_t, temp)
        total += sum(rows) / len(rows)
    for temp in temps:
        if per_sample:
            total += cc_by_loops(s_w, t_w, temp, cmask) + bc_by_loops(s_w, t_w, temp, mask)
        else:
            total += k * cc_by_loops(s_w, t_w, temp) + m * bc_by_loops(s_w, t_w, temp)
    return total


# ----------------------------------------------------------------------------------------------------------
# ReviewKD: HCL
# ----------------------------------------------------------------------------------------------------------
def test_hcl_level_weights_halve_with_each_pooled_term_used() -> None:
    assert hcl_level_weights(1) == []
    assert hcl_level_weights(2) == [(1, 0.5)]
    assert hcl_level_weights(4) == [(2, 0.5), (1, 0.25)]  # pool 4 skipped: pool 2 gets the first weight
    assert hcl_level_weights(8) == [(4, 0.5), (2, 0.25), (1, 0.125)]
    assert hcl_level_weights(32) == [(4, 0.5), (2, 0.25), (1, 0.125)]


def test_hcl_hand_case_checkerboard() -> None:
    # a +-1 checkerboard against zeros: MSE 1 at full size, 0 after any pooling to an even grid, so a level is
    # 1 / (1 + sum of its weights): 1/1.75 for 4x4 (weights 1/2, 1/4), 1/1.875 for 8x8, 1/1.5 for 2x2
    def board(n: int) -> torch.Tensor:
        i = torch.arange(n)
        return (((i[:, None] + i[None, :]) % 2) * 2.0 - 1.0).view(1, 1, n, n)

    for n, norm in ((2, 1.5), (4, 1.75), (8, 1.875)):
        assert hcl_loss([board(n)], [torch.zeros(1, 1, n, n)]).item() == pytest.approx(1 / norm, rel=1e-6)
    one = torch.full((1, 1, 1, 1), 3.0)
    levels = [board(8), board(4), one]
    zeros = [torch.zeros_like(x) for x in levels]
    assert hcl_loss(levels, zeros).item() == pytest.approx(1 / 1.875 + 1 / 1.75 + 9.0, rel=1e-6)  # summed


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (1, 1)], [(16, 16), (2, 2)], [(5, 5), (3, 3)], [(6, 4)]])
def test_hcl_matches_loops(sizes: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    s = [torch.randn(2, 3, h, w) for h, w in sizes]
    t = [torch.randn(2, 3, h, w) for h, w in sizes]
    assert hcl_loss(s, t).item() == pytest.approx(hcl_by_loops(s, t), rel=REL)


def test_hcl_gradient_matches_finite_differences() -> None:
    torch.manual_seed(1)
    s = [torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)]  # fmt: skip
    t = [torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 3, 1, 1, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: hcl_loss([a, b], t), tuple(s))


def test_hcl_rejects_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hcl_loss([torch.zeros(2, 3, 4, 4)], [torch.zeros(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="as many"):
        hcl_loss([torch.zeros(2, 3, 4, 4)], [])


# ----------------------------------------------------------------------------------------------------------
# OFD: margin and partial L2
# ----------------------------------------------------------------------------------------------------------
def test_ofd_margin_matches_the_formula_in_python_floats() -> None:
    gammas = [1.0, 0.5, -0.7, 2.0, 0.3, 1.0, 1.0, 1.0, 0.01, 4.0, -1.5]
    betas = [0.0, -0.2, 0.4, 1.0, -1.0, 3.0, 3.2, 5.0, 0.02, -3.0, 2.9]
    got = ofd_margin(torch.tensor(gammas), torch.tensor(betas)).tolist()
    # the values the inputs take in fp32, as the reference reads them with .item()
    g32, b32 = torch.tensor(gammas).tolist(), torch.tensor(betas).tolist()
    for value, g, b in zip(got, g32, b32):
        assert value == pytest.approx(margin_by_formula(g, b), rel=REL, abs=1e-7)
        assert value <= 0


def test_ofd_margin_cut_off_at_three_sigma() -> None:
    # Phi(-3.0) = 0.00135 > 0.001: the truncated mean; Phi(-3.2) = 0.00069: -3 sigma
    assert _cdf(-3.0) > 0.001 > _cdf(-3.2)
    above, below = ofd_margin(torch.tensor([2.0, 2.0]), torch.tensor([6.0, 6.4])).tolist()
    assert above == pytest.approx(6.0 - 2.0 * _phi(3.0) / _cdf(-3.0), rel=REL)
    assert below == pytest.approx(-6.0, rel=REL)
    assert above != pytest.approx(-6.0, rel=0.01)  # the two branches differ: the test separates them


def test_ofd_margin_zero_gamma_gets_the_limit_and_everything_stays_finite() -> None:
    gamma = torch.tensor([0.0, 0.0, 0.0, 1e-30, 1e30, 1.0, 1.0], requires_grad=True)
    beta = torch.tensor([-2.0, 0.0, 2.0, 1.0, 1.0, 1e30, -1e30], requires_grad=True)
    margin = ofd_margin(gamma, beta)
    assert margin[:3].tolist() == [-2.0, 0.0, 0.0]  # min(beta, 0)
    assert torch.isfinite(margin).all()
    gamma_grad, beta_grad = torch.autograd.grad(margin.sum(), (gamma, beta))
    assert torch.isfinite(gamma_grad).all() and torch.isfinite(beta_grad).all()
    bf16 = ofd_margin(torch.tensor([1.0, 0.5]).bfloat16(), torch.tensor([0.0, 1.0]).bfloat16())
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 3, 5), (3, 4, 1, 1)])
def test_ofd_loss_matches_loops_and_the_mdistiller_form(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    s, t = torch.randn(shape), torch.randn(shape)
    margin = ofd_margin(torch.rand(shape[1]) + 0.2, torch.randn(shape[1]))
    expected = ofd_by_loops(s, t, margin.tolist())
    assert ofd_loss(s, t, margin).item() == pytest.approx(expected, rel=REL)
    assert ofd_mdistiller_form(s, t, margin).item() == pytest.approx(expected, rel=REL)
    assert ofd_loss(s, t, margin.view(1, -1, 1, 1)).item() == pytest.approx(expected, rel=REL)


def test_ofd_loss_hand_case() -> None:
    margin = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    s = torch.tensor([0.5, -2.0, 0.0, -0.5]).view(1, 4, 1, 1)
    t = torch.tensor([1.0, -3.0, -3.0, -0.2]).view(1, 4, 1, 1)
    # active teacher: (0.5 - 1)^2; below the margin and under it: 0; above the margin: (0 + 1)^2;
    # teacher inactive above the margin, student below it: 0
    assert ofd_loss(s, t, margin).item() == pytest.approx(0.25 + 1.0, rel=REL)
    assert ofd_loss(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), margin).item() == pytest.approx(1.25, rel=REL)


def test_ofd_loss_gradient() -> None:
    torch.manual_seed(3)
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    margin = torch.tensor([-0.5, -1.0, -0.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ofd_loss(x, t, margin), (s,))
    (grad,) = torch.autograd.grad(ofd_loss(s, t, margin), s)
    target = torch.maximum(t, margin.view(1, -1, 1, 1))
    keep = (s > target) | (t > 0)
    torch.testing.assert_close(grad, (2 * (s - target) * keep / 2).detach())


def test_ofd_loss_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ofd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="one margin per channel"):
        ofd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------
# MLKD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "classes"), [(5, 7), (6, 8), (6, 7), (5, 8)])  # odd and even counts: the
def test_confidence_masks_match_numpy_percentile(batch: int, classes: int) -> None:  # median is one or two values
    torch.manual_seed(4)
    t = 3 * torch.randn(batch, classes)
    sample, cls = confidence_masks(t)
    expected_sample, expected_cls = masks_by_numpy(t.tolist())
    assert sample.tolist() == expected_sample and cls.tolist() == expected_cls
    assert 0 < sample.sum() < batch and 0 < cls.sum() < classes


def test_confidence_masks_ties_keep_everyone() -> None:
    sample, cls = confidence_masks(torch.zeros(4, 3))  # all confidences equal: <= median holds for all
    assert sample.tolist() == [1.0] * 4 and cls.tolist() == [1.0] * 3


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_correlation_losses_match_loops(temperature: float) -> None:
    torch.manual_seed(5)
    s, t = 2 * torch.randn(5, 6), 2 * torch.randn(5, 6)
    s_list, t_list = s.tolist(), t.tolist()
    assert batch_correlation_loss(s, t, temperature).item() == pytest.approx(
        bc_by_loops(s_list, t_list, temperature), rel=REL
    )
    assert class_correlation_loss(s, t, temperature).item() == pytest.approx(
        cc_by_loops(s_list, t_list, temperature), rel=REL
    )
    w_b, w_c = [1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert batch_correlation_loss(s, t, temperature, torch.tensor(w_b)).item() == pytest.approx(
        bc_by_loops(s_list, t_list, temperature, w_b), rel=REL
    )
    assert class_correlation_loss(s, t, temperature, torch.tensor(w_c)).item() == pytest.approx(
        cc_by_loops(s_list, t_list, temperature, w_c), rel=REL
    )


def _four(batch: int = 6, classes: int = 5, seed: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [3 * torch.randn(batch, classes) for _ in range(4)]


@pytest.mark.parametrize("temperature", [4.0, 2.0])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per_sample"])
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "ls"])
def test_mlkd_loss_matches_the_official_sum_by_loops(temperature: float, per_sample: bool, standardize: bool) -> None:
    s_w, t_w, s_s, t_s = _four()
    got = mlkd_loss(s_w, t_w, s_s, t_s, temperature, "per_sample" if per_sample else "scalar", standardize)
    expected = mlkd_by_loops(s_w, t_w, s_s, t_s, temperature, per_sample, standardize)
    assert got.item() == pytest.approx(expected, rel=REL)


def test_mlkd_quirks_change_the_value() -> None:
    """The oracle's quirks matter: a per-sample mask, or the strong view in the last two "strong" terms, or the
    strong-view CC/BC added, would each give another number, so the test above can tell them apart."""
    s_w, t_w, s_s, t_s = _four()
    official = mlkd_by_loops(s_w, t_w, s_s, t_s)
    assert mlkd_by_loops(s_w, t_w, s_s, t_s, per_sample=True) != pytest.approx(official, rel=1e-3)
    strong_rows = sum(sum(kd_rows(s_s.tolist(), t_s.tolist(), temp)) / 6 for temp in (2.0, 6.0))
    weak_rows = sum(sum(kd_rows(s_w.tolist(), t_w.tolist(), temp)) / 6 for temp in (2.0, 6.0))
    assert strong_rows != pytest.approx(weak_rows, rel=1e-3)
    mask, _ = masks_by_numpy(t_w.tolist())
    assert 0 < sum(mask) < len(mask)  # the masks are not all ones: m = mean(mask) is a real factor


def test_mlkd_all_ones_masks_make_the_per_sample_mode_equal_the_scalar_one() -> None:
    s_w, s_s, t_s = (torch.randn(4, 5) for _ in range(3))
    t_w = torch.zeros(4, 5)  # equal confidences: every mask is 1
    assert mlkd_loss(s_w, t_w, s_s, t_s, mask="per_sample").item() == pytest.approx(
        mlkd_loss(s_w, t_w, s_s, t_s).item(), rel=1e-6
    )


def test_mlkd_gradients_match_finite_differences() -> None:
    s_w, t_w, s_s, t_s = (z.double() for z in _four(batch=4, classes=3, seed=7))
    s_w.requires_grad_()
    s_s.requires_grad_()
    for mask in ("scalar", "per_sample"):
        for standardize in (False, True):
            assert torch.autograd.gradcheck(lambda a, b: mlkd_loss(a, t_w, b, t_s, 4.0, mask, standardize), (s_w, s_s))
    t = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: batch_correlation_loss(a, t, 2.0), (s_w,))
    assert torch.autograd.gradcheck(lambda a: class_correlation_loss(a, t, 2.0), (s_w,))


def test_mlkd_rejects_bad_arguments() -> None:
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="mask"):
        mlkd_loss(z, z, z, z, mask="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        batch_correlation_loss(z, z, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        class_correlation_loss(z, torch.randn(4, 6))
    with pytest.raises(ValueError, match="same shape"):
        mlkd_loss(z, z, torch.randn(3, 5), torch.randn(3, 5))


# ----------------------------------------------------------------------------------------------------------
# degenerate input: finite value and finite gradient for every new function
# ----------------------------------------------------------------------------------------------------------
def _onehot(batch: int, classes: int, scale: float) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(torch.arange(batch) % classes, classes).float()


LOGIT_CASES = {
    "magnitude 1e4": lambda: (1e4 * torch.randn(4, 5), 1e4 * torch.randn(4, 5)),
    "batch of one": lambda: (torch.randn(1, 5), torch.randn(1, 5)),
    "two classes": lambda: (torch.randn(4, 2), torch.randn(4, 2)),
    "constant logits": lambda: (torch.full((4, 5), 3.0), torch.full((4, 5), -2.0)),
    "one-hot teacher": lambda: (torch.randn(4, 5), _onehot(4, 5, 1.0)),
    "saturated one-hot teacher": lambda: (torch.randn(4, 5), _onehot(4, 5, 1e4)),
    "bf16": lambda: (torch.randn(4, 5).bfloat16(), torch.randn(4, 5).bfloat16()),
}

LOGIT_FUNCTIONS = {
    "bc": lambda s, t: batch_correlation_loss(s, t),
    "cc": lambda s, t: class_correlation_loss(s, t),
    "mlkd": lambda s, t: mlkd_loss(s, t, s * 0.5, t),
    "mlkd per_sample": lambda s, t: mlkd_loss(s, t, s * 0.5, t, mask="per_sample"),
    "mlkd ls": lambda s, t: mlkd_loss(s, t, s * 0.5, t, temperature=2.0, standardize=True),
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
@pytest.mark.parametrize("name", list(LOGIT_FUNCTIONS))
def test_logit_functions_on_degenerate_input_are_finite(name: str, case: str) -> None:
    s, t = LOGIT_CASES[case]()
    s = s.clone().requires_grad_()
    loss = LOGIT_FUNCTIONS[name](s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(grad).all()
    sample, cls = confidence_masks(t)
    assert torch.isfinite(sample).all() and sample.sum() >= 1 and cls.sum() >= 1


MAP_CASES = {
    "all-zero maps": lambda: (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
    "zero student": lambda: (torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4)),
    "zero teacher": lambda: (torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
    "magnitude 1e4": lambda: (1e4 * torch.randn(2, 3, 4, 4), 1e4 * torch.randn(2, 3, 4, 4)),
    "batch of one": lambda: (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)),
    "bf16": lambda: (torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()),
}

MAP_FUNCTIONS = {
    "hcl": lambda s, t: hcl_loss([s, s[:, :, :1, :1]], [t, t[:, :, :1, :1]]),  # a full-size and a 1x1 level
    "ofd": lambda s, t: ofd_loss(s, t, ofd_margin(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, -1.0, 9.0]))),
}


@pytest.mark.parametrize("case", list(MAP_CASES))
@pytest.mark.parametrize("name", list(MAP_FUNCTIONS))
def test_map_functions_on_degenerate_input_are_finite(name: str, case: str) -> None:
    s, t = MAP_CASES[case]()
    s = s.clone().requires_grad_()
    loss = MAP_FUNCTIONS[name](s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(grad).all()
    if case == "all-zero maps":
        assert loss.item() == 0.0


BF16_FUNCTIONS = {
    **{name: fn for name, fn in LOGIT_FUNCTIONS.items()},
    "hcl": (MAP_FUNCTIONS["hcl"], (2, 3, 8, 8)),
    "ofd": (MAP_FUNCTIONS["ofd"], (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", list(BF16_FUNCTIONS))
def test_bf16_autocast_gives_the_fp32_computation(name: str) -> None:
    entry = BF16_FUNCTIONS[name]
    fn, shape = entry if isinstance(entry, tuple) else (entry, (6, 5))
    torch.manual_seed(8)
    s, t = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(s, t)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, fn(s.float(), t.float()), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mlkd_loss_does_not_synchronise_with_the_host() -> None:
    s_w, t_w, s_s, t_s = (z.cuda() for z in _four())
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = mlkd_loss(s_w, t_w, s_s, t_s, mask="per_sample")
        loss = loss + mlkd_loss(s_w, t_w, s_s, t_s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.item() == pytest.approx(
        (mlkd_loss(*(z.cpu() for z in (s_w, t_w, s_s, t_s)), mask="per_sample")
         + mlkd_loss(*(z.cpu() for z in (s_w, t_w, s_s, t_s)))).item(), rel=1e-4
    )  # fmt: skip
