"""``natural_cubic_coeffs`` on data with missing values (and with ``lengths``): the batched per-row-knot solve
against the per-row loop it replaced (kept here verbatim as the reference), to the bit, and its gradients."""

from __future__ import annotations

import pytest
import torch

from neurodyn.errors import InputError
from neurodyn.paths import natural_cubic_coeffs
from neurodyn.paths.fill import check_data, fill_missing

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- the reference: the library's earlier implementation (one spline per row with holes, a Python loop) ----
def _ref_no_nan(ts, x):
    T = x.shape[-2]
    h = (ts[1:] - ts[:-1]).to(x.dtype).unsqueeze(-1)
    dx = x[..., 1:, :] - x[..., :-1, :]
    if T == 2:
        z = torch.zeros_like(dx)
        return torch.cat([x[..., :1, :], dx / h, z, z], -1)
    r = h.reciprocal()
    s = 3 * dx * r * r
    zero_r = torch.zeros_like(r[:1])
    diag = 2 * (torch.cat([zero_r, r], 0) + torch.cat([r, zero_r], 0))
    zero_s = torch.zeros_like(s[..., :1, :])
    rhs = torch.cat([zero_s, s], -2) + torch.cat([s, zero_s], -2)
    cp, dp = [], []
    c_prev = r[0] / diag[0]
    d_prev = rhs[..., 0, :] / diag[0]
    cp.append(c_prev)
    dp.append(d_prev)
    for k in range(1, T):
        denom = diag[k] - r[k - 1] * c_prev
        c_prev = r[k] / denom if k < T - 1 else None
        d_prev = (rhs[..., k, :] - r[k - 1] * d_prev) / denom
        cp.append(c_prev)
        dp.append(d_prev)
    m = [dp[-1]]
    for k in range(T - 2, -1, -1):
        m.append(dp[k] - cp[k] * m[-1])
    m = torch.stack(m[::-1], -2)
    m0, m1 = m[..., :-1, :], m[..., 1:, :]
    two_c = (6 * dx * r - 4 * m0 - 2 * m1) * r
    three_d = (-6 * dx * r + 3 * (m0 + m1)) * r * r
    return torch.cat([x[..., :-1, :], m0, two_c, three_d], -1)


def _ref_shift(coeffs, offset):
    a, b, c2, d3 = coeffs.chunk(4, -1)
    o = offset.to(coeffs.dtype)
    return torch.cat([a + (b + (0.5 * c2 + d3 * o / 3) * o) * o, b + (c2 + d3 * o) * o, c2 + 2 * d3 * o, d3], -1)


def _reference(xs, ts=None):
    ts = check_data("natural_cubic_coeffs", xs, ts)
    nan = torch.isnan(xs)
    if not bool(nan.any()):
        return _ref_no_nan(ts, xs)
    T, C = xs.shape[-2], xs.shape[-1]
    batch = xs.shape[:-2]
    idx = torch.arange(T, device=xs.device).view(T, 1).expand_as(xs)
    obs = ~nan
    first = torch.where(obs, idx, torch.full_like(idx, T)).amin(-2, keepdim=True)
    last = torch.where(obs, idx, torch.full_like(idx, -1)).amax(-2, keepdim=True)
    x0 = torch.where(nan, torch.zeros_like(xs), xs)
    xf = torch.where(idx < first, x0.gather(-2, first.clamp(max=T - 1)), xs)
    xf = torch.where(idx > last, x0.gather(-2, last.clamp(min=0)), xf)
    series = xf.movedim(-1, -2).reshape(-1, T)
    holes = torch.isnan(series)
    empty = (last < 0).movedim(-1, -2).reshape(-1)
    out = series.new_zeros(series.shape[0], T - 1, 4)
    full = ~holes.any(-1) & ~empty
    if bool(full.any()):
        out[full] = _ref_no_nan(ts, series[full].unsqueeze(-1))
    tt = ts.to(xs.dtype)
    for i in torch.nonzero(holes.any(-1) & ~empty).reshape(-1).tolist():
        keep = ~holes[i]
        t_o, x_o = tt[keep], series[i][keep]
        pieces = _ref_no_nan(t_o, x_o.unsqueeze(-1))
        j = torch.searchsorted(t_o[1:-1].detach().contiguous(), tt[:-1].detach(), right=True)
        out[i] = _ref_shift(pieces[j], (tt[:-1] - t_o[j]).unsqueeze(-1))
    out = out.reshape(*batch, C, T - 1, 4).movedim(-3, -1)
    return out.reshape(*batch, T - 1, 4 * C)


def _holey(shape, dtype, seed, rate=0.5):
    """Random data with ``rate`` of its values NaN, plus rows with leading / trailing NaN only, all-NaN rows, rows
    with one and with two observations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    x = x.masked_fill(torch.rand(*shape, generator=g) < rate, float("nan"))
    flat = x.view(-1, shape[-2], shape[-1])
    flat[0, :, 0] = float("nan")  # never observed
    flat[0, 1:4, 1] = torch.randn(3, generator=g, dtype=dtype)
    flat[0, :1, 1] = float("nan")
    flat[0, 4:, 1] = float("nan")  # leading and trailing NaN only
    flat[1, :, 0] = float("nan")
    flat[1, 2, 0] = 1.5  # one observation
    flat[1, :, 1] = float("nan")
    flat[1, 0, 1], flat[1, -1, 1] = -1.0, 2.0  # two observations, at both ends
    flat[2, :, 0] = float("nan")
    flat[2, 1, 0], flat[2, 3, 0] = 0.5, 0.25  # two observations inside
    return x


def _times(T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(0.2 + torch.rand(T, generator=g, dtype=dtype), 0) - 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 9, 3), (2, 3, 11, 4), (7, 2)])
def test_batched_equals_the_per_row_loop_bitwise(dtype, shape):
    for seed in range(3):
        if len(shape) > 2:
            x = _holey(shape, dtype, seed)
        else:  # no batch dimension
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(*shape, generator=g, dtype=dtype).masked_fill(torch.rand(*shape, generator=g) < 0.4,
                                                                          float("nan"))
        for ts in (None, _times(shape[-2], dtype, seed)):
            got, want = natural_cubic_coeffs(x, ts), _reference(x, ts)
            assert not torch.isnan(got).any()
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_equals_the_per_row_loop_at_high_drop_rates(dtype):
    for rate in (0.2, 0.8, 0.95):
        x = _holey((16, 13, 5), dtype, 7, rate)
        assert torch.equal(natural_cubic_coeffs(x), _reference(x))


def test_the_spline_passes_through_the_observations():
    x = _holey((4, 10, 3), torch.float64, 3)
    ts = _times(10, torch.float64, 3)
    c = natural_cubic_coeffs(x, ts)
    a = c[..., :3]
    obs = ~torch.isnan(x[:, :-1])
    assert torch.allclose(a[obs], x[:, :-1][obs], atol=1e-12)


def _loss(f, x, ts, w):
    return (f(x, ts) * w).sum()


def test_gradients_equal_the_per_row_loop():
    x = _holey((3, 8, 3), torch.float64, 5)
    ts0 = _times(8, torch.float64, 5)
    w = torch.randn(3, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = []
    for f in (natural_cubic_coeffs, _reference):
        xx = x.clone().requires_grad_(True)
        ts = ts0.clone().requires_grad_(True)
        gx, gt = torch.autograd.grad(_loss(f, xx, ts, w), (xx, ts))
        grads.append((gx, gt))
    (gx1, gt1), (gx2, gt2) = grads
    nan = torch.isnan(x)
    assert torch.equal(gx1[nan], torch.zeros_like(gx1[nan]))  # no gradient to a missing value
    assert torch.allclose(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gt1, gt2, rtol=1e-10, atol=1e-12)
    assert gx1[~nan].abs().sum() > 0 and gt1.abs().sum() > 0


def test_gradcheck_with_missing_values():
    x = _holey((3, 6, 3), torch.float64, 2).requires_grad_(True)
    ts = _times(6, torch.float64, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: natural_cubic_coeffs(a, b), (x, ts))
    lengths = torch.tensor([4, 6, 2])
    assert torch.autograd.gradcheck(lambda a, b: natural_cubic_coeffs(a, b, lengths=lengths), (x, ts))


def _lengths_reference(x, ts, lengths):
    """Per series: the reference spline of its first ``L`` points, then its last (filled) value held."""
    B, T, C = x.shape
    out = torch.zeros(B, T - 1, 4 * C, dtype=x.dtype)
    for b, L in enumerate(lengths.tolist()):
        xs = x[b, :L]
        out[b, :L - 1] = _reference(xs, ts[:L])
        if L < T:
            held = torch.nan_to_num(fill_missing(xs, ts[:L])[-1], nan=0.0)
            out[b, L - 1:, :C] = held
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lengths_equal_one_spline_per_series_bitwise(dtype):
    B, T, C = 12, 9, 3
    g = torch.Generator().manual_seed(4)
    x = _holey((B, T, C), dtype, 4)
    ts = _times(T, dtype, 4)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([2, T, 3])
    x[5:7, :] = float("nan")  # no data at all; and, below, data only after the end
    x[7, 6:, :] = 1.0
    x[7, :6, :] = float("nan")
    lengths[7] = 4
    got = natural_cubic_coeffs(x, ts, lengths=lengths)
    assert torch.equal(got, _lengths_reference(x, ts, lengths))
    assert torch.equal(got[7], torch.zeros_like(got[7]))  # what is after the end is ignored
    # the same data with the padding changed: the same coefficients
    pad = torch.arange(T)[None, :, None] >= lengths[:, None, None]
    assert torch.equal(natural_cubic_coeffs(x.masked_fill(pad, 3.0), ts, lengths=lengths), got)
    # lengths all T: as without lengths
    full = torch.full((B,), T)
    assert torch.equal(natural_cubic_coeffs(x, ts, lengths=full), natural_cubic_coeffs(x, ts))
    y = torch.randn(B, T, C, dtype=dtype, generator=g)
    assert torch.equal(natural_cubic_coeffs(y, ts, lengths=full), natural_cubic_coeffs(y, ts))


def test_lengths_are_checked():
    x = torch.randn(3, 5, 2)
    for bad in (torch.tensor([2, 3]), torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1, 3, 4]),
                torch.tensor([2, 3, 6]), [2, 3, 4]):
        with pytest.raises(InputError, match="length"):
            natural_cubic_coeffs(x, lengths=bad)
