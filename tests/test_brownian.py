"""Brownian paths (neurodyn.paths.brownian): statistics against closed forms, exact identities, determinism, the
torchsde call form against torchsde itself, and errors.

Statistical tests use a wide batch (each element an independent Brownian motion) and tolerances of about 5 standard
errors, with fixed entropies (so they are deterministic, and a wrong variance by a few percent fails).
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from scipy import integrate, stats

from neurodyn import BrownianInterval, BrownianPath, BrownianTree, ControlTerm, InputError, ReverseBrownian
from neurodyn.core.paths import Path
from neurodyn.paths.brownian import _compose, _split_coefficients

torchsde = pytest.importorskip("torchsde")

N = 20000  # batch width for the statistics
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _se(n: int) -> float:
    return 1.0 / math.sqrt(n)


# ------------------------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levy_area", ["none", "space-time", "space-time-time"])
def test_increments_are_normal_with_variance_h(levy_area, dtype, device):
    bm = BrownianInterval(0.0, 2.0, shape=(N,), dtype=dtype, device=device, entropy=11, levy_area=levy_area)
    bm.increment(0.1, 0.35)
    bm.increment(0.35, 0.9)  # so that [0.1, 0.9] below is made of two nodes (the composition)
    for s, t in [(0.1, 0.35), (0.35, 0.9), (0.1, 0.9), (0.9, 2.0), (0.0, 2.0), (0.5, 0.5 + 1e-3)]:
        out = bm.levy(s, t)
        assert out.W.dtype == dtype and out.W.shape == (N,) and out.W.device.type == device
        h = t - s
        for x, var in [(out.W, h), (out.H, h / 12), (out.K, h / 720)]:
            if x is None:
                continue
            p = stats.kstest(x.double().cpu().numpy() / math.sqrt(var), "norm").pvalue
            assert p > 1e-3, (levy_area, s, t, var, p)


def test_space_time_quantities_are_uncorrelated():
    bm = BrownianInterval(0.0, 1.0, shape=(N,), dtype=torch.float64, entropy=5, levy_area="space-time-time")
    bm.increment(0.2, 0.45)
    a, b = bm.levy(0.0, 0.3), bm.levy(0.3, 0.8)
    xs = [a.W, a.H, a.K, b.W, b.H, b.K]
    c = torch.corrcoef(torch.stack(xs))
    off = c - torch.diag(torch.diagonal(c))
    assert off.abs().max() < 5 * _se(N), c


def test_disjoint_increments_are_independent():
    bm = BrownianInterval(0.0, 1.0, shape=(N,), dtype=torch.float64, entropy=8)
    w = [bm.increment(a, b) for a, b in [(0.7, 0.9), (0.0, 0.3), (0.3, 0.7), (0.9, 1.0)]]
    c = torch.corrcoef(torch.stack(w))
    assert (c - torch.eye(4, dtype=c.dtype)).abs().max() < 5 * _se(N)
    # and W(t) has covariance min(s, t)
    ws, wt = bm.evaluate(0.3), bm.evaluate(0.9)
    assert abs((ws * wt).mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.9 + 0.09) * _se(N)


# ------------------------------------------------------------------------------------------------ bridges


def _bridge_cov_with_stats(u: float) -> tuple[float, float, float]:
    """On [0, 1]: Var B(u), Cov(B(u), H), Cov(B(u), K) for the Brownian bridge B, by quadrature of its covariance
    min(u, r) - u r against H's weight 1 and K's weight (1/2 - r) (independent of the code)."""
    cov = lambda r: min(u, r) - u * r  # noqa: E731
    ch = integrate.quad(cov, 0, 1, points=[u], epsabs=1e-13)[0]
    ck = integrate.quad(lambda r: cov(r) * (0.5 - r), 0, 1, points=[u], epsabs=1e-13)[0]
    return u * (1 - u), ch, ck


@pytest.mark.parametrize("levy_area", ["none", "space-time", "space-time-time"])
@pytest.mark.parametrize("u", [0.5, 0.3, 0.85])
def test_bridge_conditional_mean_and_variance(levy_area, u):
    """W(u) given W(1) (and H, K of [0, 1]): mean and variance from the bridge's covariance."""
    w1 = torch.full((N,), 0.7, dtype=torch.float64)
    h1 = torch.full((N,), -0.2, dtype=torch.float64)
    kw = {"H": h1} if levy_area != "none" else {}
    bm = BrownianInterval(0.0, 1.0, entropy=3, levy_area=levy_area, W=w1, **kw)
    wu = bm.evaluate(u)
    var_b, ch, ck = _bridge_cov_with_stats(u)
    mean, var = u * 0.7, var_b
    if levy_area != "none":  # H given (Var H = 1/12)
        mean += ch / (1 / 12) * -0.2
        var -= ch * ch / (1 / 12)
    if levy_area == "space-time-time":  # K drawn at the root: condition on the drawn values
        k = bm.levy(0.0, 1.0).K
        resid = wu - mean - ck / (1 / 720) * k
        var -= ck * ck / (1 / 720)
        assert abs(resid.mean().item()) < 5 * math.sqrt(var) * _se(N)
        assert abs(resid.var().item() / var - 1) < 5 * math.sqrt(2) * _se(N)
        return
    assert abs(wu.mean().item() - mean) < 5 * math.sqrt(var) * _se(N)
    assert abs(wu.var().item() / var - 1) < 5 * math.sqrt(2) * _se(N)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("r", [0.5, 0.01, 0.37, 0.999])
def test_split_law_reproduces_the_parent_and_has_unit_covariance(k, r):
    """The standardised split G = [mean | noise]: children have identity covariance (unconditionally) and compose
    back to the parent exactly."""
    g = torch.tensor(_split_coefficients(r, k), dtype=torch.float64)
    p = torch.randn(k, 5, dtype=torch.float64)
    z = torch.randn(k, 5, dtype=torch.float64)
    kids = g @ torch.cat([p, z])
    sds = [1.0, 1 / 12, 1 / 720][:k]
    left = [kids[i] * math.sqrt(r * sds[i]) for i in range(k)]
    right = [kids[k + i] * math.sqrt((1 - r) * sds[i]) for i in range(k)]
    back = _compose(r, 1 - r, left, right)
    for i in range(k):
        torch.testing.assert_close(back[i], p[i] * math.sqrt(sds[i]), rtol=1e-12, atol=1e-12)
    # unconditional covariance of the children (p, z standard): G G^T = I
    torch.testing.assert_close(g @ g.T, torch.eye(2 * k, dtype=torch.float64), rtol=0, atol=1e-12)


def test_space_time_levy_area_aggregates_like_torchsde():
    """H over [s, t] from H, W over [s, u] and [u, t] with torchsde's aggregation formula (independent of ours)."""
    bm = BrownianInterval(0.0, 1.0, shape=(6, 3), dtype=torch.float64, entropy=2, levy_area="space-time")
    s, u, t = 0.1, 0.42, 0.9
    a, b, whole = bm.levy(s, u), bm.levy(u, t), bm.levy(s, t)
    h_agg = ((t - u) * (b.H + 0.5 * a.W) + (u - s) * (a.H - 0.5 * b.W)) / (t - s)
    torch.testing.assert_close(whole.H, h_agg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.W, a.W + b.W, rtol=1e-12, atol=1e-12)


def test_U_and_K_match_riemann_sums_of_the_path():
    """U = int (W(r) - W(s)) dr (torchsde's return_U) and K from the definition, against trapezoid sums of the
    same path on a fine grid."""
    bm = BrownianInterval(0.0, 1.0, shape=(50,), dtype=torch.float64, entropy=4, levy_area="space-time-time")
    s, t, n = 0.2, 0.7, 2000
    h = t - s
    w, u = bm(s, t, return_U=True)
    k = bm.levy(s, t).K
    rs = [s + h * i / n for i in range(n + 1)]
    steps = torch.stack([bm.increment(a, b) for a, b in zip(rs, rs[1:])])
    path = torch.cat([torch.zeros_like(steps[:1]), steps.cumsum(0)])  # (n+1, 50): W(r) - W(s)
    r_t = torch.tensor(rs, dtype=torch.float64).unsqueeze(-1) - s
    u_riemann = torch.trapezoid(path, dx=h / n, dim=0)
    k_riemann = torch.trapezoid(path * (h / 2 - r_t), dx=h / n, dim=0) / h**2 + w / 12
    torch.testing.assert_close(path[-1], w, rtol=1e-11, atol=1e-11)
    # Trapezoid error on a Brownian path: std ~ h^1.5 / n / sqrt(12)... bound it loosely by h * sqrt(h / n).
    assert (u - u_riemann).abs().max() < 0.2 * h * math.sqrt(h / n)
    assert (k - k_riemann).abs().max() < 0.2 * math.sqrt(h / n)
    assert (u - u_riemann).abs().max() < 1e-3 * u.abs().max()  # and it is not trivially small
    # Backward in time, [t, s] read from t down to s: the same definitions with h = s - t < 0, W_{t,r} = W(r) - W(t).
    back = bm.levy(t, s)
    w_back = path - path[-1]  # W(r) - W(t)
    r_back = r_t - h  # r - t
    h_back = -h
    h_def = -torch.trapezoid(w_back, dx=h / n, dim=0) / h_back + 0.5 * w  # (1/h) int_t^s = -(1/h) int_s^t
    k_def = -torch.trapezoid(w_back * (h_back / 2 - r_back), dx=h / n, dim=0) / h_back**2 - w / 12
    torch.testing.assert_close(back.W, -w, rtol=0, atol=0)
    assert (back.H - h_def).abs().max() < 0.2 * math.sqrt(h / n)
    assert (back.K - k_def).abs().max() < 0.2 * math.sqrt(h / n)


# ------------------------------------------------------------------------------------------------ Levy area A


def _true_levy_area(bm: BrownianInterval, s: float, t: float, n: int) -> torch.Tensor:
    rs = [s + (t - s) * i / n for i in range(n + 1)]
    dw = torch.stack([bm.increment(a, b) for a, b in zip(rs, rs[1:])])  # (n, batch, m)
    path = torch.cat([torch.zeros_like(dw[:1]), dw.cumsum(0)])
    mid = 0.5 * (path[1:] + path[:-1])  # Stratonovich sums: exact area of the piecewise-linear path
    b = (mid.unsqueeze(-1) * dw.unsqueeze(-2)).sum(0)
    return 0.5 * (b - b.transpose(-1, -2))


@pytest.mark.parametrize("approx", ["davie", "foster"])
def test_levy_area_approximations_have_the_levy_area_moments(approx):
    """Var A_ij = h^2 / 4 (from E exp(i x A) = 1 / cosh(x h / 2)), E[A | W, H] = H_i W_j - W_i H_j, antisymmetric."""
    h = 0.5
    bm = BrownianInterval(0.0, 1.0, shape=(N, 3), dtype=torch.float64, entropy=9, levy_area=approx)
    bm.increment(0.3, 0.6)
    for s in (0.1, 0.5):  # [0.5, 1.0] is one node, [0.1, 0.6] three (Chen's relation across them)
        out = bm.levy(s, s + h)
        a = out.A
        assert a.shape == (N, 3, 3)
        torch.testing.assert_close(a, -a.transpose(-1, -2), rtol=0, atol=0)
        assert a.diagonal(dim1=-2, dim2=-1).abs().max() == 0
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            x = a[:, i, j]
            assert abs(x.mean().item()) < 5 * (h / 2) * _se(N)
            assert abs(x.var().item() / (h * h / 4) - 1) < 0.1  # kurtosis > 3: a looser but still tight bound
            cond = out.H[:, i] * out.W[:, j] - out.W[:, i] * out.H[:, j]
            resid = x - cond
            for y in (out.W[:, i], out.W[:, j], out.H[:, i], out.H[:, j], cond):
                assert abs(torch.corrcoef(torch.stack([resid, y]))[0, 1].item()) < 5 * _se(N)


@pytest.mark.parametrize("approx", ["davie", "foster"])
def test_levy_area_satisfies_chens_relation(approx):
    """A Levy area over [s, t] is A_{s,u} + A_{u,t} + (W_{s,u} (x) W_{u,t} - W_{u,t} (x) W_{s,u}) / 2 (exactly, for
    the Levy area of any path): the approximation obeys it across the intervals it was asked about."""
    bm = BrownianInterval(0.0, 1.0, shape=(5, 4), dtype=torch.float64, entropy=3, levy_area=approx)
    a, b = bm.levy(0.2, 0.45), bm.levy(0.45, 0.9)
    whole = bm.levy(0.2, 0.9)
    chen = a.A + b.A + 0.5 * (a.W.unsqueeze(-1) * b.W.unsqueeze(-2) - b.W.unsqueeze(-1) * a.W.unsqueeze(-2))
    torch.testing.assert_close(whole.A, chen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bm.levy(0.9, 0.2).A, -whole.A, rtol=0, atol=0)


@pytest.mark.slow
def test_foster_conditional_variance_matches_the_true_levy_area():
    """The true Levy area (fine Stratonovich sums of the same path) given H has variance h^2/20 + h/5 (H_i^2 + H_j^2)
    around H_i W_j - W_i H_j: the regression that Foster's approximation samples from."""
    n_paths = 6000
    bm = BrownianInterval(0.0, 1.0, shape=(n_paths, 2), dtype=torch.float64, entropy=21, levy_area="foster")
    out = bm.levy(0.0, 1.0)
    true_a = _true_levy_area(bm, 0.0, 1.0, 800)[:, 0, 1]
    cond = out.H[:, 0] * out.W[:, 1] - out.W[:, 0] * out.H[:, 1]
    r2 = (true_a - cond) ** 2
    sh = out.H[:, 0] ** 2 + out.H[:, 1] ** 2
    x = torch.stack([torch.ones_like(sh), sh], -1)
    coef = torch.linalg.lstsq(x, r2.unsqueeze(-1)).solution.squeeze(-1)
    assert abs(coef[0].item() - 1 / 20) < 0.012 and abs(coef[1].item() - 1 / 5) < 0.08, coef
    approx_r2 = (out.A[:, 0, 1] - cond) ** 2
    assert abs(approx_r2.mean().item() / r2.mean().item() - 1) < 0.1


# ------------------------------------------------------------------------------------------------ identities


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_additivity_to_rounding(dtype, tol):
    bm = BrownianInterval(0.0, 3.0, shape=(4, 5), dtype=dtype, entropy=1, levy_area="space-time")
    pts = sorted(random.Random(0).uniform(0, 3) for _ in range(30))
    for s, u, t in zip(pts, pts[10:], pts[20:]):
        torch.testing.assert_close(bm.increment(s, u) + bm.increment(u, t), bm.increment(s, t), rtol=tol, atol=tol)
        torch.testing.assert_close(bm.evaluate(t) - bm.evaluate(s), bm.increment(s, t), rtol=tol, atol=tol)
        torch.testing.assert_close(bm.increment(t, s), -bm.increment(s, t), rtol=0, atol=0)
    assert bm.evaluate(0.0).abs().max() == 0


def _queries(order: str, n: int = 200) -> list[tuple[float, float]]:
    qs = [(i / n, (i + 1) / n) for i in range(n)]
    if order == "backward":
        return qs[::-1]
    if order == "random":
        qs = qs[:]
        random.Random(1).shuffle(qs)
    if order == "repeated":
        return qs + qs[::-1] + qs
    return qs


@pytest.mark.parametrize("cache_size", [None, 45, 3, 0])
def test_same_interval_same_increment_in_any_query_order(cache_size):
    """Within one object: every interval keeps its value however it is revisited (evictions redraw identically)."""
    bm = BrownianInterval(0.0, 1.0, shape=(3, 2), dtype=torch.float64, entropy=7, cache_size=cache_size,
                          levy_area="space-time")
    first = {q: bm.levy(*q) for q in _queries("forward")}
    for order in ("backward", "random", "repeated"):
        for q in _queries(order):
            out = bm.levy(*q)
            assert torch.equal(out.W, first[q].W) and torch.equal(out.H, first[q].H), (order, q)
    q = _queries("forward")[60]
    out = bm.levy(*q)
    saved = out.W.clone(), out.H.clone()
    out.W.mul_(0.0), out.H.mul_(0.0)  # a caller changing what it got in place does not change the path
    assert torch.equal(bm.levy(*q).W, saved[0]) and torch.equal(bm.levy(*q).H, saved[1])
    assert saved[0].abs().max() > 0
    whole = bm.increment(0.0, 1.0)
    whole.zero_()
    assert bm.increment(0.0, 1.0).abs().max() > 0
    # rejected adaptive step: a long step, then two halves, then the long one again
    big = bm.increment(0.1, 0.6)
    torch.testing.assert_close(bm.increment(0.1, 0.35) + bm.increment(0.35, 0.6), big, rtol=1e-13, atol=1e-13)
    assert torch.equal(bm.increment(0.1, 0.6), big)


@pytest.mark.parametrize("cache_size", [45, 2])
def test_determinism_given_entropy_and_queries(cache_size):
    a = BrownianInterval(0.0, 1.0, shape=(5,), entropy=123, cache_size=cache_size)
    b = BrownianInterval(0.0, 1.0, shape=(5,), entropy=123, cache_size=None)
    c = BrownianInterval(0.0, 1.0, shape=(5,), entropy=124)
    qs = _queries("random", 100)
    wa = torch.stack([a.increment(*q) for q in qs])
    assert torch.equal(wa, torch.stack([b.increment(*q) for q in qs]))
    assert not torch.equal(wa, torch.stack([c.increment(*q) for q in qs]))
    torch.manual_seed(0)
    d = BrownianInterval(0.0, 1.0, shape=(5,))
    torch.manual_seed(0)
    e = BrownianInterval(0.0, 1.0, shape=(5,))
    assert d.entropy == e.entropy and torch.equal(d.increment(0.2, 0.3), e.increment(0.2, 0.3))


@pytest.mark.parametrize("levy_area", ["none", "space-time-time"])
def test_brownian_tree_depends_on_entropy_only(levy_area):
    """halfway_tree / BrownianTree: two objects with one entropy agree whatever order they were queried in."""
    ref = None
    for order in ("forward", "backward", "random", "repeated"):
        bm = BrownianTree(0.0, t1=1.0, shape=(4,), dtype=torch.float64, entropy=5, levy_area=levy_area, cache_size=8)
        vals = {q: bm.levy(*q) for q in _queries(order, 50)}
        if ref is None:
            ref = vals
        for q, v in vals.items():
            assert torch.equal(v.W, ref[q].W), (order, q)
            if levy_area != "none":
                assert torch.equal(v.K, ref[q].K)


def test_brownian_tree_statistics_and_snapping():
    bm = BrownianTree(0.0, t1=1.0, shape=(N,), dtype=torch.float64, entropy=2, tol=1e-3)
    w = bm.increment(0.3, 0.55)
    grid = 2 ** math.ceil(math.log2(1 / 1e-3))
    h = (round(0.55 * grid) - round(0.3 * grid)) / grid  # snapped times
    assert stats.kstest(w.numpy() / math.sqrt(h), "norm").pvalue > 1e-3
    assert torch.equal(bm.increment(0.3 + 1e-5, 0.55), w)  # within one grid cell: the same grid point


def test_brownian_path_keeps_every_value_and_is_brownian():
    bm = BrownianPath(0.0, 1.0, shape=(N,), dtype=torch.float64, entropy=4)
    ws = torch.stack([bm.increment(i / 100, (i + 1) / 100) for i in range(100)])
    assert stats.kstest((ws[37] / 0.1).numpy(), "norm").pvalue > 1e-3
    torch.testing.assert_close(ws.sum(0), bm.evaluate(1.0), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.stack([bm.increment(i / 100, (i + 1) / 100) for i in range(99, -1, -1)]), ws.flip(0))
    c = torch.corrcoef(ws[:5])
    assert (c - torch.eye(5, dtype=c.dtype)).abs().max() < 5 * _se(N)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(shape, dtype):
    bm = BrownianInterval(0.0, 1.0, shape=shape, dtype=dtype, entropy=0, levy_area="foster")
    out = bm.levy(0.2, 0.6)
    assert out.W.shape == shape and out.H.shape == shape and out.K is None
    assert out.W.dtype == dtype and out.H.dtype == dtype
    assert out.A.shape == (shape + (shape[-1],) if shape else ()) and out.A.dtype == dtype
    assert bm.evaluate(0.5).shape == shape and bm.increment(0.6, 0.2).shape == shape
    z = bm.levy(0.3, 0.3)
    assert z.W.abs().max() == 0 and z.W.shape == shape


def test_inference_mode_and_grad_mode_give_the_same_path():
    ref = BrownianInterval(0.0, 1.0, shape=(3,), dtype=torch.float64, entropy=0, levy_area="space-time")
    with torch.inference_mode():
        bm = BrownianInterval(0.0, 1.0, shape=(3,), dtype=torch.float64, entropy=0, levy_area="space-time")
        got = [bm.levy(0.1, 0.2), bm.levy(0.1, 0.2), bm.levy(0.0, 1.0), bm.levy(0.15, 0.6)]
    want = [ref.levy(0.1, 0.2), ref.levy(0.1, 0.2), ref.levy(0.0, 1.0), ref.levy(0.15, 0.6)]
    for g, w in zip(got, want):
        assert torch.equal(g.W, w.W) and torch.equal(g.H, w.H)
    assert torch.equal(bm.increment(0.1, 0.2), ref.increment(0.1, 0.2))  # used outside inference mode afterwards


# ------------------------------------------------------------------------------------------------ engine


def test_path_protocol_and_control_term():
    bm = BrownianInterval(0.0, 1.0, shape=(3, 2), dtype=torch.float64, entropy=0)
    assert isinstance(bm, Path) and bm.knots == () and bm.grad_tensors() == []
    term = ControlTerm(lambda t, y: torch.ones(*y.shape, 2, dtype=y.dtype), bm)
    assert torch.equal(term.contr(0.25, 0.5), bm.increment(0.25, 0.5))
    with pytest.raises(InputError, match="nowhere differentiable|no derivative"):
        bm.derivative(0.5)
    tt = torch.tensor(0.5, dtype=torch.float64)
    assert torch.equal(bm.evaluate(tt), bm.evaluate(0.5))


# ------------------------------------------------------------------------------------------------ torchsde


@pytest.mark.parametrize("levy_area", ["none", "space-time", "davie", "foster"])
def test_call_form_structure_matches_torchsde(levy_area):
    ours = BrownianInterval(0.0, 1.0, size=(4, 3), dtype=torch.float64, entropy=1, levy_area_approximation=levy_area)
    theirs = torchsde.BrownianInterval(0.0, 1.0, size=(4, 3), dtype=torch.float64, entropy=1,
                                       levy_area_approximation=levy_area)
    combos = [(False, False)]
    if levy_area != "none":
        combos.append((True, False))
    if levy_area in ("davie", "foster"):
        combos += [(False, True), (True, True)]
    for ru, ra in combos:
        a, b = ours(0.2, 0.5, return_U=ru, return_A=ra), theirs(0.2, 0.5, return_U=ru, return_A=ra)
        assert type(a) is type(b)
        if isinstance(a, tuple):
            assert [x.shape for x in a] == [x.shape for x in b] and [x.dtype for x in a] == [x.dtype for x in b]
        else:
            assert a.shape == b.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bm in (ours, theirs):  # bm(ta) is W(ta) - W(t0) in both
            torch.testing.assert_close(bm(0.5), bm(0.0, 0.5), rtol=1e-13, atol=1e-13)
    for bm in (ours, theirs):  # out of range: warning + clamp; ta > tb: RuntimeError
        with pytest.warns(UserWarning):
            torch.testing.assert_close(bm(0.5, 1.5), bm(0.5, 1.0))
        with pytest.raises(RuntimeError):
            bm(0.6, 0.4)
    assert ours.shape == theirs.shape and ours.levy_area_approximation == theirs.levy_area_approximation


def test_levy_area_for_one_dimensional_shapes_is_zero_as_torchsde():
    for cls in (BrownianInterval, torchsde.BrownianInterval):
        bm = cls(0.0, 1.0, size=(5,), levy_area_approximation="davie", entropy=0)
        w, a = bm(0.1, 0.4, return_A=True)
        assert a.shape == w.shape and a.abs().max() == 0


def test_wrappers_match_torchsde_relations():
    w0 = torch.full((4, 1), 2.0, dtype=torch.float64)
    for ours, theirs in [(BrownianPath(0.0, w0), torchsde.BrownianPath(0.0, w0)),
                         (BrownianTree(0.0, w0, entropy=3), torchsde.BrownianTree(0.0, w0, entropy=3))]:
        for bm in (ours, theirs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.testing.assert_close(bm(0.5) - bm(0.0, 0.5), w0)
            assert bm.shape == (4, 1) and bm.dtype == torch.float64
    w1 = torch.full((4, 1), -1.0, dtype=torch.float64)
    for bm in (BrownianTree(0.0, w0, t1=2.0, w1=w1), torchsde.BrownianTree(0.0, w0, t1=2.0, w1=w1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(bm(2.0), w1)
    base, tbase = BrownianInterval(0.0, 1.0, size=(3,), entropy=0), torchsde.BrownianInterval(0.0, 1.0, size=(3,))
    for b in (base, tbase):
        assert torch.equal(ReverseBrownian(b)(-0.8, -0.3), b(0.3, 0.8))
        assert torch.equal(torchsde.ReverseBrownian(b)(-0.8, -0.3), b(0.3, 0.8))
    assert torch.equal(ReverseBrownian(base).increment(-0.8, -0.3), base.increment(0.3, 0.8))


def test_torchsde_sdeint_runs_on_our_brownian_interval():
    """torchsde code unchanged, our bm: its Euler-Maruyama equals the hand-written sum over our increments."""

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -0.5 * y

        def g(self, t, y):
            return 0.3 * torch.cos(y)

    y0 = torch.full((8, 2), 0.4, dtype=torch.float64)
    bm = BrownianInterval(0.0, 1.0, size=(8, 2), dtype=torch.float64, entropy=6)
    ys = torchsde.sdeint(SDE(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), bm=bm, method="euler", dt=0.1)
    y, t0 = y0, 0.0
    while t0 < 1.0:  # torchsde's time stepping: t + dt, clipped at the end (so 0.1 + 0.1 + 0.1 != 0.3)
        t1 = min(t0 + 0.1, 1.0)
        y = y + (-0.5 * y) * (t1 - t0) + 0.3 * torch.cos(y) * bm.increment(t0, t1)
        t0 = t1
    torch.testing.assert_close(ys[-1], y, rtol=1e-10, atol=1e-10)


def test_torchsde_srk_on_our_space_time_area_converges_at_order_1_5():
    """torchsde's SRK (strong order 1.5, it uses U = h (W/2 + H)) on our path, against a fine SRK solve on the same
    path: slope 1.5 within 0.15 only if H at each step size is the conditional law's (an H drawn independently of
    the path, with the right variance, gives slope ~0.94 on this SDE)."""

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return torch.sin(3 * y)

        def g(self, t, y):
            return 0.5 * torch.cos(y) + 0.8

    y0 = torch.ones(128, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    dts = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    bm = BrownianInterval(0.0, 1.0, size=(128, 1), dtype=torch.float64, entropy=3, levy_area_approximation="space-time")
    ref = torchsde.sdeint(SDE(), y0, ts, bm=bm, method="srk", dt=1 / 512)[-1]  # the coarse steps then aggregate
    errs = []
    for dt in dts:
        errs.append((torchsde.sdeint(SDE(), y0, ts, bm=bm, method="srk", dt=dt)[-1] - ref).abs().mean().item())
    slope = (math.log(errs[0]) - math.log(errs[-1])) / (math.log(dts[0]) - math.log(dts[-1]))
    assert abs(slope - 1.5) < 0.15, (slope, errs)


# ------------------------------------------------------------------------------------------------ memory, errors


def _depth(node) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d


def test_memory_is_bounded_by_the_cache_and_the_tree_stays_shallow():
    """O(cache) memory; O(log n) depth even when step widths vary by 1e4 (a stiff patch of an adaptive solve), so
    that the backward pass with evictions costs O(1) draws per step, not O(n)."""
    bm = BrownianInterval(0.0, 1.0, shape=(2,), entropy=0, cache_size=45)
    ts = [i / 200 for i in range(101)]  # [0, 0.5] in steps of 5e-3
    ts += [0.5 + i * 5e-7 for i in range(1, 2001)]  # then 2000 steps of 5e-7
    ts += [ts[-1] + i * (1.0 - ts[-1]) / 50 for i in range(1, 51)]
    for a, b in zip(ts, ts[1:]):
        bm.increment(a, b)
    assert len(bm._cache) <= 45
    deepest = max(_depth(bm._locate(a, b)[0]) for a, b in zip(ts, ts[1:]))
    assert deepest < math.log2(1 / 5e-7) + 40, deepest
    draws = [0]
    children = bm._children

    def counting(parent, v):
        draws[0] += 1
        return children(parent, v)

    bm._children = counting
    for a, b in reversed(list(zip(ts, ts[1:]))):
        bm.increment(a, b)
    assert draws[0] < 4 * len(ts), draws[0]  # (the tree's shape, hence this count, depends on the queries only)


def test_errors():
    with pytest.raises(InputError, match="levy_area must be one of"):
        BrownianInterval(0.0, 1.0, shape=(2,), levy_area="stratonovich")
    with pytest.raises(InputError, match="t0 < t1"):
        BrownianInterval(1.0, 1.0, shape=(2,))
    with pytest.raises(InputError, match="shape"):
        BrownianInterval(0.0, 1.0)
    with pytest.raises(InputError, match="floating point"):
        BrownianInterval(0.0, 1.0, shape=(2,), dtype=torch.int64)
    with pytest.raises(InputError, match="W has shape"):
        BrownianInterval(0.0, 1.0, shape=(2,), W=torch.zeros(3))
    with pytest.raises(InputError, match="positive tol"):
        BrownianInterval(0.0, 1.0, shape=(2,), halfway_tree=True, tol=0.0)
    with pytest.raises(InputError, match="below the floating-point resolution"):
        BrownianTree(1e6, t1=1e6 + 1, shape=(2,), tol=1e-12)
    bm = BrownianInterval(0.0, 1.0, shape=(2,), entropy=0)
    with pytest.raises(InputError, match=r"outside the path's interval \[0.0, 1.0\]"):
        bm.increment(0.5, 1.5)
    with pytest.raises(InputError, match="outside"):
        bm.evaluate(-0.1)
    with pytest.raises(InputError, match="one time"):
        bm.evaluate(torch.tensor([0.1, 0.2]))
    with pytest.raises(InputError, match="levy_area='davie' or 'foster'"):
        bm(0.1, 0.2, return_A=True)
    with pytest.raises(InputError, match="levy_area='space-time'"):
        bm(0.1, 0.2, return_U=True)
    with pytest.raises(InputError, match="'space-time-time'"):
        BrownianInterval(0.0, 1.0, shape=(2,), levy_area="foster").require("K")
    assert bm.levy(0.1, 0.2).A is None and bm.levy(0.1, 0.2).H is None
    torch.testing.assert_close(bm.increment(0.0, 1.0 + 1e-15), bm.increment(0.0, 1.0))  # rounding slack
