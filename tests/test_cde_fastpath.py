"""The direct-mode fast paths of a CDE solve against independent truths: ``CubicPath.derivative`` with a plain
time (host-side ``s``, fused kernels, ``b`` at a knot) against the cubic's derivative evaluated in float64 from
the coefficients; Runge--Kutta stages built out of place under autograd against the buffered no-grad solve and
against finite differences; the graph a direct solve records against the field's own."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import neurodyn
from neurodyn.paths import CubicPath, natural_cubic_coeffs


def _spline(dtype, requires_grad=False, B=3, T=7, C=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = torch.cat([torch.zeros(1, dtype=torch.float64),
                    torch.rand(T - 1, generator=g, dtype=torch.float64).add(0.3)]).cumsum(0)
    xs = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    coeffs = natural_cubic_coeffs(xs, ts).to(dtype).requires_grad_(requires_grad)
    return ts.to(dtype), coeffs


def _reference_derivative(ts64, coeffs64, t, left):
    """dX/dt at the float64 time t, from the float64 coefficients (numpy): piece by the knot convention."""
    inner = ts64[1:-1]
    i = int(np.searchsorted(inner, t, side="left" if left else "right"))
    s = t - ts64[i]
    C = coeffs64.shape[-1] // 4
    row = coeffs64[..., i, :]
    b, c2, d3 = row[..., C:2 * C], row[..., 2 * C:3 * C], row[..., 3 * C:]
    return b + (c2 + d3 * s) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cubic_derivative_at_plain_times_matches_the_cubic(dtype, left, requires_grad):
    ts, coeffs = _spline(dtype, requires_grad)
    path = CubicPath(ts, coeffs, left=left)
    ts64, c64 = ts.double().numpy(), coeffs.detach().double().numpy()
    knots = ts.tolist()
    times = knots + [(a + b) / 2 for a, b in zip(knots, knots[1:])] + [knots[0] - 0.4, knots[-1] + 0.7]
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for t in times:
        tt = torch.tensor(t, dtype=dtype)
        got = path.derivative(tt)
        assert got.dtype == dtype and got.shape == (3, 2)
        want = _reference_derivative(ts64, c64, float(tt), left)
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=tol, atol=tol)
    if requires_grad:  # the fused form's gradient w.r.t. the coefficients: d/dc of b + s two_c + s^2 three_d
        t = (knots[2] + knots[3]) / 2
        s = float(torch.tensor(t, dtype=dtype) - ts[2])
        path.derivative(torch.tensor(t, dtype=dtype)).sum().backward()
        g = coeffs.grad[..., 2, :].double()
        C = 2
        want = torch.tensor([0.0] * C + [1.0] * C + [s] * C + [s * s] * C, dtype=torch.float64).expand_as(g)
        assert torch.allclose(g, want, rtol=tol, atol=tol)
        assert float(coeffs.grad[..., [0, 1, 3, 4, 5], :].abs().max()) == 0.0


def _cde(dtype, gradient, method, coeffs_grad, nudge=None):
    ts, coeffs = _spline(dtype, coeffs_grad, B=4, T=6, C=3, seed=1)
    if nudge is not None:  # (index, delta): one coefficient moved (finite differences)
        with torch.no_grad():
            coeffs[nudge[0]] += nudge[1]
    torch.manual_seed(2)
    field = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 15)).to(dtype)

    def f(t, z):
        return torch.tanh(field(z)).view(*z.shape[:-1], 5, 3)

    path = CubicPath(ts, coeffs)
    z0 = torch.linspace(-0.5, 0.5, 20, dtype=dtype).view(4, 5)
    kw = dict(step_size=0.25) if method == "rk4" else dict(rtol=1e-8, atol=1e-10)
    sol = neurodyn.solve(neurodyn.ControlTerm(f, path), z0, ts[[0, 3, -1]], method=method, gradient=gradient, **kw)
    return sol, coeffs, field


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_direct_solve_out_of_place_stages_equal_the_buffered_solve(method):
    with torch.no_grad():  # coefficients requiring grad (the knots are jump_t), solved without a graph: buffered
        ref, _, _ = _cde(torch.float64, "direct", method, True)
    sol, coeffs, field = _cde(torch.float64, "direct", method, True)
    assert sol.ys.requires_grad and sol.stats["nfe"] == ref.stats["nfe"]
    assert torch.allclose(sol.ys.detach(), ref.ys, rtol=1e-14, atol=1e-14)
    # gradient w.r.t. one coefficient by central differences
    loss = sol.ys[-1].pow(2).sum()
    (g,) = torch.autograd.grad(loss, [coeffs])
    idx = (1, 2, 4)
    with torch.no_grad():  # the same coefficients requiring grad: the same steps as the solve above
        vals = [float(_cde(torch.float64, "direct", method, True, (idx, d))[0].ys[-1].pow(2).sum())
                for d in (1e-6, -1e-6)]
    fd = (vals[0] - vals[1]) / 2e-6
    assert abs(float(g[idx]) - fd) < 1e-6 * max(1.0, abs(fd)) + (1e-7 if method == "rk4" else 1e-5)


def _nodes(t: torch.Tensor) -> collections.Counter:
    seen, out, stack = set(), collections.Counter(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        out[type(n).__name__] += 1
        stack.extend(m for m, _ in n.next_functions)
    return out


def test_direct_rk4_graph_is_the_fields_plus_a_few_nodes_per_evaluation():
    sol, coeffs, field = _cde(torch.float32, "direct", "rk4", True)
    nodes = _nodes(sol.ys[-1].sum())
    nfe = sol.stats["nfe"]
    z = torch.zeros(4, 5, requires_grad=True)
    per_field = sum(_nodes(torch.tanh(field(z)).view(4, 5, 3).sum()).values()) - 2  # less SumBackward, leaf z
    # no full-buffer copies per stage (CopySlices / AsStrided) and no matmul broadcasting (Expand / UnsafeView)
    for name in ("CopySlices", "AsStridedBackward0", "ExpandBackward0", "UnsafeViewBackward0"):
        assert nodes[name] == 0, name
    assert sum(nodes.values()) <= nfe * (per_field + 8)


def test_float32_direct_rk4_elementwise_stages_agree_with_the_buffered_solve():
    """Below float64 the stages of a fixed-step tableau under autograd are combined elementwise in the state's shape
    (another rounding order than the buffered path's matrix product): the two solves agree to float32 rounding, with
    the same NFE, and the graph holds no concatenation or matrix product of stages."""
    with torch.no_grad():
        ref, _, _ = _cde(torch.float32, "direct", "rk4", True)
    sol, coeffs, _ = _cde(torch.float32, "direct", "rk4", True)
    assert sol.stats["nfe"] == ref.stats["nfe"]
    scale = float(ref.ys.abs().max())
    assert float((sol.ys.detach() - ref.ys).abs().max()) <= 1e-5 * scale
    nodes = _nodes(sol.ys[-1].sum())
    assert nodes["MmBackward0"] == 0 and nodes["AddmmBackward0"] == 2 * sol.stats["nfe"]  # the field's two layers
    assert nodes["CatBackward0"] <= 1  # (the outputs' assembly, not the stages)


def test_float32_elementwise_stages_are_as_accurate_as_torchdiffeq_and_the_buffered_path():
    """``y' = (y2, -y1)`` in float32 with ``h = 2^-10``, 1000 rk4 steps, ``y0`` requiring grad (the elementwise
    path): the error against the exact solution is no larger than the buffered (no-grad) path's and torchdiffeq's
    rk4's by more than 10 % (all ~5e-7: the float32 rounding of the steps), and the gradient of ``y(T)`` w.r.t.
    ``y0`` (the rotation matrix) is exact to float32 rounding."""
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def f(t, y):
        return torch.stack([y[..., 1], -y[..., 0]], -1)

    h, n = 2.0 ** -10, 1000
    t = torch.tensor([0.0, n * h])
    T = n * h
    exact = torch.tensor([np.cos(T), -np.sin(T)], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0], requires_grad=True)
    y_grad = neurodyn.odeint(f, y0, t, method="rk4", options=dict(step_size=h))[-1]
    with torch.no_grad():
        y_buf = neurodyn.odeint(f, y0, t, method="rk4", options=dict(step_size=h))[-1]
        y_td = torchdiffeq.odeint(f, y0, t, method="rk4", options=dict(step_size=h))[-1]
    err = float((y_grad.detach().double() - exact).abs().max())
    err_buf = float((y_buf.double() - exact).abs().max())
    err_td = float((y_td.double() - exact).abs().max())
    assert err <= 1.1 * max(err_buf, err_td) and err < 1e-5
    jac = torch.stack([torch.autograd.grad(y_grad[i], y0, retain_graph=True)[0] for i in range(2)]).double()
    rot = torch.tensor([[np.cos(T), np.sin(T)], [-np.sin(T), np.cos(T)]], dtype=torch.float64)
    assert float((jac - rot).abs().max()) < 1e-5
