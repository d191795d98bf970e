"""The modern logit losses (LS, DKD, DIST, NKD, CTKD's pieces) against second computations.

Two independent computations per loss: loops on Python floats (double precision) for the values, and a direct
torch re-implementation of the published formulas, written here in the most literal way (softmax, then log;
the reference's ``-1000`` trick for DKD; masks for the non-target classes), for the values and the gradients in
fp64. The quirks the published numbers depend on are tested by name: the Bessel std of LS, DIST's ``tau^2``,
NKD's cross-entropy (not a KL), CTKD's ramp values and the sign of its reversed gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.functional import (
    ctkd_lambda,
    dist_loss,
    dkd_loss,
    gradient_reversal,
    kd_loss,
    nkd_loss,
    standardize_logits,
)

REL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# loops on Python floats
# ----------------------------------------------------------------------------------------------------------
def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / t) for v in row]
    return [v / sum(e) for v in e]


def _standardize(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))  # Bessel: divisor C - 1
    return [(v - mean) / (std + 1e-7) for v in row]


def _kl(q: list[float], p: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(q, p) if a > 0)


def kd_by_loops(zs: torch.Tensor, zt: torch.Tensor, t: float, standardize: bool = False) -> float:
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        if standardize:
            s_row, t_row = _standardize(s_row), _standardize(t_row)
        total += _kl(_softmax(t_row, t), _softmax(s_row, t))
    return t * t * total / zs.shape[0]


def dkd_by_loops(
    zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, t: float, standardize: bool = False
) -> float:
    tckd = nckd = 0.0
    for s_row, t_row, label in zip(zs.tolist(), zt.tolist(), y.tolist()):
        if standardize:
            s_row, t_row = _standardize(s_row), _standardize(t_row)
        ps, pt = _softmax(s_row, t), _softmax(t_row, t)
        tckd += _kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
        others = [c for c in range(len(s_row)) if c != label]
        nckd += _kl(_softmax([t_row[c] for c in others], t), _softmax([s_row[c] for c in others], t))
    n = zs.shape[0]
    return t * t * (alpha * tckd + beta * nckd) / n


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    na, nb = math.sqrt(sum(v * v for v in ca)), math.sqrt(sum(v * v for v in cb))
    return sum(x * z for x, z in zip(ca, cb)) / (na * nb + 1e-8)


def dist_by_loops(zs: torch.Tensor, zt: torch.Tensor, beta: float, gamma: float, tau: float) -> float:
    ys = [_softmax(r, tau) for r in zs.tolist()]
    yt = [_softmax(r, tau) for r in zt.tolist()]
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(_pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(_pearson([ys[i][k] for i in range(n)], [yt[i][k] for i in range(n)]) for k in range(c)) / c
    return tau * tau * (beta * inter + gamma * intra)


def nkd_by_loops(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, t: float, gamma: float) -> float:
    target = non_target = 0.0
    for s_row, t_row, label in zip(zs.tolist(), zt.tolist(), y.tolist()):
        target -= _softmax(t_row)[label] * math.log(_softmax(s_row)[label])
        others = [c for c in range(len(s_row)) if c != label]
        qs = _softmax([s_row[c] for c in others], t)
        qt = _softmax([t_row[c] for c in others], t)
        non_target -= sum(a * math.log(b) for a, b in zip(qt, qs))  # a cross-entropy: no log(qt) term
    n = zs.shape[0]
    return target / n + gamma * t * t * non_target / n


# ----------------------------------------------------------------------------------------------------------
# literal torch re-implementations of the published formulas (the way the reference code writes them)
# ----------------------------------------------------------------------------------------------------------
def literal_standardize(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-7)  # torch.std: Bessel


def literal_kd(zs: torch.Tensor, zt: torch.Tensor, t: float, standardize: bool = False) -> torch.Tensor:
    if standardize:
        zs, zt = literal_standardize(zs), literal_standardize(zt)
    return F.kl_div(F.log_softmax(zs / t, dim=1), F.softmax(zt / t, dim=1), reduction="batchmean") * t * t


def literal_dkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, t: float,
                standardize: bool = False) -> torch.Tensor:  # fmt: skip
    """The reference's formulation: binary split by summing masked probabilities, plain log, -1000 trick."""
    if standardize:
        zs, zt = literal_standardize(zs), literal_standardize(zt)
    gt = F.one_hot(y, zs.shape[1]).to(zs.dtype)
    ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * t * t / zs.shape[0]
    qt = F.softmax(zt / t - 1000.0 * gt, dim=1)
    log_qs = F.log_softmax(zs / t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_qs, qt, reduction="sum") * t * t / zs.shape[0]
    return alpha * tckd + beta * nckd


def literal_dist(zs: torch.Tensor, zt: torch.Tensor, beta: float, gamma: float, tau: float) -> torch.Tensor:
    def rho(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    ys, yt = F.softmax(zs / tau, dim=1), F.softmax(zt / tau, dim=1)
    inter = 1 - rho(ys, yt).mean()
    intra = 1 - rho(ys.t(), yt.t()).mean()
    return tau * tau * (beta * inter + gamma * intra)


def literal_nkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, t: float, gamma: float) -> torch.Tensor:
    n, c = zs.shape
    target = -(F.softmax(zt, 1)[torch.arange(n), y].detach() * F.log_softmax(zs, 1)[torch.arange(n), y]).mean()
    keep = ~F.one_hot(y, c).bool()
    log_qs = F.log_softmax(zs[keep].reshape(n, c - 1) / t, dim=1)
    qt = F.softmax(zt[keep].reshape(n, c - 1) / t, dim=1)
    return target - gamma * t * t * (qt * log_qs).sum(1).mean()


Logits = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _logits(b: int = 5, c: int = 7, scale: float = 3.0, seed: int = 0) -> Logits:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return zs, zt, y


def _grad(fn, zs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    zs = zs.detach().clone().requires_grad_(True)
    fn(zs).backward()
    return zs.grad


# ----------------------------------------------------------------------------------------------------------
# LS: logit standardisation
# ----------------------------------------------------------------------------------------------------------
def test_standardize_matches_loops_and_uses_the_bessel_std() -> None:
    zs, _, _ = _logits()
    got = standardize_logits(zs)
    expected = torch.tensor([_standardize(r) for r in zs.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=REL, atol=1e-9)
    c = zs.shape[1]
    assert torch.allclose(got.std(dim=1, unbiased=True), torch.ones(5, dtype=torch.float64), atol=1e-6)
    population = got.std(dim=1, unbiased=False)  # a population std would make this 1 instead
    assert torch.allclose(population, torch.full((5,), math.sqrt((c - 1) / c), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kd_ls_matches_loops_and_the_literal_formula(t: float) -> None:
    zs, zt, _ = _logits()
    got = kd_loss(zs, zt, t, standardize=True)
    assert got.item() == pytest.approx(kd_by_loops(zs, zt, t, standardize=True), rel=REL)
    torch.testing.assert_close(got, literal_kd(zs, zt, t, standardize=True), rtol=REL, atol=1e-9)
    torch.testing.assert_close(
        _grad(lambda s: kd_loss(s, zt, t, standardize=True), zs),
        _grad(lambda s: literal_kd(s, zt, t, standardize=True), zs),
        rtol=REL, atol=1e-9,
    )  # fmt: skip
    # standardisation is not the identity: the plain KD value differs
    assert abs(kd_loss(zs, zt, t).item() - got.item()) > 1e-3


def test_kd_ls_with_a_population_std_would_differ() -> None:
    """The test above can fail: a population std gives another effective temperature."""
    zs, zt, _ = _logits()

    def population(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(1, keepdim=True)) / (z.std(1, unbiased=False, keepdim=True) + 1e-7)

    wrong = F.kl_div(F.log_softmax(population(zs) / 2, 1), F.softmax(population(zt) / 2, 1), reduction="batchmean") * 4
    assert abs(wrong.item() - kd_loss(zs, zt, 2.0, standardize=True).item()) > 1e-3


def test_kd_default_is_unchanged() -> None:
    zs, zt, _ = _logits()
    assert kd_loss(zs, zt).item() == pytest.approx(kd_by_loops(zs, zt, 4.0), rel=REL)
    assert kd_loss(zs, zt, standardize=False).item() == kd_loss(zs, zt, 4.0).item()


def test_kd_ls_is_invariant_to_shift_and_scale_of_the_logits() -> None:
    zs, zt, _ = _logits()
    torch.testing.assert_close(kd_loss(3 * zs + 5, zt - 2, 2.0, True), kd_loss(zs, zt, 2.0, True), rtol=1e-6, atol=0)


def test_standardize_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="C >= 2"):
        standardize_logits(torch.randn(3, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        kd_loss(torch.randn(3, 1), torch.randn(3, 1), standardize=True)


# ----------------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "beta", "t", "standardize"), [(1.0, 8.0, 4.0, False), (0.5, 2.0, 1.0, False),
                                                                  (9.0, 72.0, 2.0, True), (1.0, 0.0, 3.0, False)])
def test_dkd_matches_loops_and_the_reference_formulation(
    alpha: float, beta: float, t: float, standardize: bool
) -> None:
    zs, zt, y = _logits()
    got = dkd_loss(zs, zt, y, alpha, beta, t, standardize)
    assert got.item() == pytest.approx(dkd_by_loops(zs, zt, y, alpha, beta, t, standardize), rel=REL)
    torch.testing.assert_close(got, literal_dkd(zs, zt, y, alpha, beta, t, standardize), rtol=REL, atol=1e-9)
    torch.testing.assert_close(
        _grad(lambda s: dkd_loss(s, zt, y, alpha, beta, t, standardize), zs),
        _grad(lambda s: literal_dkd(s, zt, y, alpha, beta, t, standardize), zs),
        rtol=REL, atol=1e-9,
    )  # fmt: skip


def test_dkd_terms_separately() -> None:
    zs, zt, y = _logits(seed=3)
    tckd = dkd_loss(zs, zt, y, 1.0, 0.0)
    nckd = dkd_loss(zs, zt, y, 0.0, 1.0)
    assert tckd.item() > 0 and nckd.item() > 0
    torch.testing.assert_close(dkd_loss(zs, zt, y, 2.0, 3.0), 2 * tckd + 3 * nckd)


def test_dkd_gradcheck() -> None:
    zs, zt, y = _logits(b=3, c=4)
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, zt, y, 1.0, 8.0, 4.0), (zs.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, zt, y, 9.0, 72.0, 2.0, True), (zs,))


def test_dkd_stays_exact_where_the_reference_formulation_breaks() -> None:
    """Logits of magnitude 1e4: the reference's log of summed probabilities gives inf/NaN; ours stays finite and
    equals the log-space value computed in double precision."""
    zs, zt, y = _logits(b=4, c=6, scale=1e4, seed=1)
    reference = literal_dkd(zs.float(), zt.float(), y, 1.0, 8.0, 4.0)
    assert not torch.isfinite(reference)
    zs32 = zs.float().requires_grad_(True)
    got = dkd_loss(zs32, zt.float(), y, 1.0, 8.0, 4.0)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(zs32.grad).all()
    assert got.item() == pytest.approx(dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).item(), rel=1e-5)


def test_dkd_two_classes_makes_nckd_zero() -> None:
    zs, zt, y = _logits(c=2)
    assert dkd_loss(zs, zt, y, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert dkd_loss(zs, zt, y, 1.0, 0.0).item() == pytest.approx(dkd_by_loops(zs, zt, y, 1.0, 0.0, 4.0), rel=REL)


def test_dkd_refuses_soft_labels_and_bad_labels() -> None:
    zs, zt, y = _logits()
    with pytest.raises(ValueError, match="soft labels"):
        dkd_loss(zs, zt, F.one_hot(y, 7).double())
    with pytest.raises(ValueError, match="integer labels of shape"):
        dkd_loss(zs, zt, y[:3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(zs[:, :1], zt[:, :1], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(zs, zt[:, :6], y)
    torch.testing.assert_close(dkd_loss(zs, zt, y[:, None]), dkd_loss(zs, zt, y))  # (B, 1) labels are fine


# ----------------------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0), (2.0, 0.5, 2.0)])
def test_dist_matches_loops_and_the_literal_formula(beta: float, gamma: float, tau: float) -> None:
    zs, zt, _ = _logits(b=6, c=5)
    got = dist_loss(zs, zt, beta, gamma, tau)
    assert got.item() == pytest.approx(dist_by_loops(zs, zt, beta, gamma, tau), rel=REL)
    torch.testing.assert_close(got, literal_dist(zs, zt, beta, gamma, tau), rtol=REL, atol=1e-9)
    torch.testing.assert_close(
        _grad(lambda s: dist_loss(s, zt, beta, gamma, tau), zs),
        _grad(lambda s: literal_dist(s, zt, beta, gamma, tau), zs),
        rtol=REL, atol=1e-9,
    )  # fmt: skip


def test_dist_carries_tau_squared_as_the_official_code() -> None:
    zs, zt, _ = _logits(b=6, c=5)
    ys, yt = F.softmax(zs / 4, 1), F.softmax(zt / 4, 1)
    no_square = (1 - F.cosine_similarity(ys - ys.mean(1, keepdim=True), yt - yt.mean(1, keepdim=True)).mean()) + (
        1 - F.cosine_similarity(ys.t() - ys.t().mean(1, keepdim=True), yt.t() - yt.t().mean(1, keepdim=True)).mean()
    )  # the paper's pseudocode
    assert dist_loss(zs, zt, temperature=4.0).item() == pytest.approx(16 * no_square.item(), rel=1e-5)


def test_dist_terms_and_identity() -> None:
    zs, zt, _ = _logits(b=6, c=5)
    inter, intra = dist_loss(zs, zt, 1.0, 0.0), dist_loss(zs, zt, 0.0, 1.0)
    torch.testing.assert_close(dist_loss(zs, zt, 2.0, 3.0), 2 * inter + 3 * intra)
    assert dist_loss(zt, zt).item() == pytest.approx(0.0, abs=1e-6)  # identical distributions correlate fully


def test_dist_gradcheck() -> None:
    zs, zt, _ = _logits(b=3, c=4)
    assert torch.autograd.gradcheck(lambda s: dist_loss(s, zt, 1.0, 1.0, 4.0), (zs.requires_grad_(),))


def test_dist_batch_of_one_has_a_constant_intra_term() -> None:
    zs, zt, _ = _logits(b=1, c=5)
    assert dist_loss(zs, zt, 0.0, 1.0, 1.0).item() == pytest.approx(1.0)  # rho = 0 for centred zeros
    assert not _grad(lambda s: dist_loss(s, zt, 0.0, 1.0, 1.0), zs).any()


# ----------------------------------------------------------------------------------------------------------
# NKD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("t", "gamma"), [(1.0, 1.5), (3.0, 3.5), (2.0, 0.0)])
def test_nkd_matches_loops_and_the_literal_formula(t: float, gamma: float) -> None:
    zs, zt, y = _logits()
    got = nkd_loss(zs, zt, y, t, gamma)
    assert got.item() == pytest.approx(nkd_by_loops(zs, zt, y, t, gamma), rel=REL)
    torch.testing.assert_close(got, literal_nkd(zs, zt, y, t, gamma), rtol=REL, atol=1e-9)
    torch.testing.assert_close(
        _grad(lambda s: nkd_loss(s, zt, y, t, gamma), zs), _grad(lambda s: literal_nkd(s, zt, y, t, gamma), zs),
        rtol=REL, atol=1e-9,
    )  # fmt: skip


def test_nkd_non_target_term_is_a_cross_entropy_not_a_kl() -> None:
    zs, _, y = _logits()
    same = nkd_loss(zs, zs, y, 2.0, 1.5)  # a KL would make the non-target term 0 here
    target = -(F.softmax(zs, 1) * F.log_softmax(zs, 1)).gather(1, y[:, None]).mean()
    keep = ~F.one_hot(y, 7).bool()
    q = F.softmax(zs[keep].reshape(5, 6) / 2, 1)
    entropy = -(q * q.log()).sum(1).mean()
    assert same.item() == pytest.approx((target + 1.5 * 4 * entropy).item(), rel=REL)
    assert entropy.item() > 0.5


def test_nkd_reduces_soft_labels_to_their_argmax() -> None:
    zs, zt, y = _logits()
    soft = 0.7 * F.one_hot(y, 7).double() + 0.3 / 7
    torch.testing.assert_close(nkd_loss(zs, zt, soft), nkd_loss(zs, zt, y))


def test_nkd_gradcheck() -> None:
    zs, zt, y = _logits(b=3, c=4)
    assert torch.autograd.gradcheck(lambda s: nkd_loss(s, zt, y, 2.0, 1.5), (zs.requires_grad_(),))


# ----------------------------------------------------------------------------------------------------------
# CTKD pieces
# ----------------------------------------------------------------------------------------------------------
def test_ctkd_lambda_values() -> None:
    assert ctkd_lambda(1, 10) == pytest.approx(-0.024471741852423234, abs=1e-12)
    assert round(ctkd_lambda(1, 10), 3) == -0.024
    assert ctkd_lambda(5, 10) == pytest.approx(-0.5)
    for e in (10, 11, 240):
        assert ctkd_lambda(e, 10) == -1.0
    assert ctkd_lambda(0, 10) == 0.0  # before the first epoch: no reversal
    for e in range(1, 12):
        assert ctkd_lambda(e, 5) == pytest.approx(-(1 - math.cos(math.pi * min(e, 5) / 5)) / 2)
    values = [ctkd_lambda(e, 10) for e in range(1, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # growing in magnitude
    with pytest.raises(ValueError, match="ramp_epochs"):
        ctkd_lambda(1, 0)


def test_gradient_reversal_is_identity_forward_and_scales_backward() -> None:
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64)
    out = gradient_reversal(x, -0.3)
    torch.testing.assert_close(out, x)
    (out * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * w)  # lambda as given, no extra negation


def test_temperature_gradient_reaches_through_softmax_and_the_square() -> None:
    """d/dT of kd_loss with a tensor temperature equals the finite difference of the loss in T."""
    zs, zt, y = _logits()
    for fn in (lambda t: kd_loss(zs, zt, t), lambda t: dkd_loss(zs, zt, y, 1.0, 8.0, t),
               lambda t: kd_loss(zs, zt, t, standardize=True)):  # fmt: skip
        t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        fn(t).backward()
        eps = 1e-6
        numeric = (fn(torch.tensor(3.0 + eps, dtype=torch.float64)) - fn(torch.tensor(3.0 - eps, dtype=torch.float64)))
        assert t.grad.item() == pytest.approx(numeric.item() / (2 * eps), rel=1e-6)
        # the T^2 prefactor alone would give 2 L / T: the softmax path adds to it
        assert abs(t.grad.item() - 2 * fn(torch.tensor(3.0, dtype=torch.float64)).item() / 3) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# degenerate inputs: finite value, finite gradient, fp32 out
# ----------------------------------------------------------------------------------------------------------
LOSSES = {
    "standardize": lambda s, t, y: standardize_logits(s).pow(2).sum() + (standardize_logits(s) * t).sum(),
    "kd_ls": lambda s, t, y: kd_loss(s, t, 2.0, standardize=True),
    "dkd": lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
    "dkd_ls": lambda s, t, y: dkd_loss(s, t, y, 9.0, 72.0, 2.0, standardize=True),
    "dist": lambda s, t, y: dist_loss(s, t, 1.0, 1.0, 4.0),
    "nkd": lambda s, t, y: nkd_loss(s, t, y, 1.0, 1.5),
    "kd_tensor_temperature": lambda s, t, y: kd_loss(s, t, torch.tensor(15.6)),
    "reversal": lambda s, t, y: kd_loss(gradient_reversal(s, -0.5), t, 4.0),
}


def _degenerate(case: str) -> Logits:
    g = torch.Generator().manual_seed(7)
    b, c = 4, 10
    zs, zt = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    if case == "large":
        zs, zt = zs * 1e4, zt * 1e4
    elif case == "batch_of_one":
        zs, zt, y = zs[:1], zt[:1], y[:1]
    elif case == "two_classes":
        zs, zt, y = zs[:, :2], zt[:, :2], y % 2
    elif case == "constant":
        zs = torch.zeros(b, c)  # a zero head
        zt = torch.full((b, c), 3.0)
    elif case == "one_hot_teacher":
        zt = F.one_hot(y, c).float() * 1e4
    elif case == "bf16":
        zs, zt = (zs * 30).bfloat16(), (zt * 30).bfloat16()
    return zs, zt, y


@pytest.mark.parametrize("case", ["large", "batch_of_one", "two_classes", "constant", "one_hot_teacher", "bf16"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_inputs_give_finite_values_and_gradients(name: str, case: str) -> None:
    zs, zt, y = _degenerate(case)
    zs = zs.clone().requires_grad_(True)
    loss = LOSSES[name](zs, zt, y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss), f"{name} on {case}: {loss}"
    assert zs.grad is not None and torch.isfinite(zs.grad).all(), f"{name} on {case}: non-finite gradient"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_fp32_under_bf16_autocast(name: str) -> None:
    zs, zt, y = _degenerate("bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](zs, zt, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_standardize_of_constant_logits_is_zero() -> None:
    z = torch.full((3, 5), 2.5, requires_grad=True)
    out = standardize_logits(z)
    assert not out.any()
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
