"""Fixed-step solves of a ControlTerm read ``dX/dt`` from one evaluation at every stage time
(:func:`neurodyn.core.loop.evaluation_grid`, :meth:`neurodyn.core.term.ControlTerm.on_grid`): against the same solve
with per-stage evaluations (the grid switched off), for every gradient method; against torchcde's own ``cdeint``;
``derivative_grid`` against ``derivative`` at each time (the cubic's and the linear path's, with their gradients)."""

from __future__ import annotations

import pytest
import torch
import torchcde

import neurodyn
import neurodyn.compat.torchcde as ncde
from neurodyn.core import loop
from neurodyn.paths import CubicPath, LinearPath, natural_cubic_coeffs


class _Field(torch.nn.Module):
    def __init__(self, hidden=3, channels=2, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(1)
        self.hidden, self.channels = hidden, channels
        self.lin = torch.nn.Linear(hidden, hidden * channels).to(dtype)

    def forward(self, t, z):
        return self.lin(z).tanh().view(*z.shape[:-1], self.hidden, self.channels)


def _data(dtype=torch.float64, B=2, T=6, C=2):
    g = torch.Generator().manual_seed(0)
    ts = torch.cat([torch.zeros(1, dtype=torch.float64),
                    torch.rand(T - 1, generator=g, dtype=torch.float64).add(0.4)]).cumsum(0).to(dtype)
    xs = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype)
    return ts, xs


class _Counted:
    """A path whose per-call ``derivative`` is counted (its grid evaluation is not)."""

    def __init__(self, path):
        self.path, self.calls = path, 0

    def __getattr__(self, name):
        return getattr(self.path, name)

    def derivative(self, t):
        self.calls += 1
        return self.path.derivative(t)


def _solve(gradient, grid, ts_grad=False, method="rk4"):
    ts, xs = _data()
    ts = ts.clone().requires_grad_(ts_grad)
    coeffs = natural_cubic_coeffs(xs, ts.detach()).requires_grad_(True)
    field = _Field()
    path = _Counted(CubicPath(ts, coeffs, land=False))
    z0 = torch.full((2, 3), 0.1, dtype=torch.float64)
    old = loop.GRID_MAX_ELEMENTS
    loop.GRID_MAX_ELEMENTS = old if grid else 0
    try:
        sol = neurodyn.solve(neurodyn.ControlTerm(field, path), z0, torch.stack([ts[0], ts[-1]]).detach(),
                             method=method, step_size=0.3, gradient=gradient)
        sol.ys[-1].pow(2).sum().backward()
    finally:
        loop.GRID_MAX_ELEMENTS = old
    grads = [coeffs.grad, *(p.grad for p in field.parameters())] + ([ts.grad] if ts_grad else [])
    return sol, grads, path.calls


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_grid_solve_equals_the_per_stage_solve_for_every_gradient_method(gradient):
    sol_g, grads_g, calls_g = _solve(gradient, True)
    sol_s, grads_s, calls_s = _solve(gradient, False)
    # the grid was used: the forward loop evaluated the path per call only at the first stage (and the check)
    assert calls_s >= 4 * sol_s.stats["steps"] and calls_g < calls_s - 3 * sol_g.stats["steps"]
    assert sol_g.stats["nfe"] == sol_s.stats["nfe"]
    torch.testing.assert_close(sol_g.ys, sol_s.ys, rtol=1e-13, atol=1e-14)
    assert grads_g[0].abs().max() > 1e-3  # the coefficients' gradient exists (the adjoint does not miss it)
    for a, b in zip(grads_g, grads_s):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_grid_gradient_reaches_the_knot_times():
    _, grads_g, _ = _solve("direct", True, ts_grad=True)
    _, grads_s, _ = _solve("direct", False, ts_grad=True)
    assert grads_g[-1].abs().max() > 1e-4
    torch.testing.assert_close(grads_g[-1], grads_s[-1], rtol=1e-11, atol=1e-13)


def test_grid_gradient_against_finite_differences():
    ts, xs = _data()
    coeffs = natural_cubic_coeffs(xs, ts)
    field = _Field()
    z0 = torch.full((2, 3), 0.1, dtype=torch.float64)
    t = torch.stack([ts[0], ts[-1]])

    def loss(c):
        sol = neurodyn.solve(neurodyn.ControlTerm(field, CubicPath(ts, c, land=False)), z0, t, method="rk4",
                             step_size=0.3)
        return sol.ys[-1].pow(2).sum()

    c = coeffs.clone().requires_grad_(True)
    loss(c).backward()
    idx = [(0, 1, 3), (1, 4, 6), (1, 2, 1)]
    for i in idx:
        e = torch.zeros_like(coeffs)
        e[i] = 1e-6
        with torch.no_grad():
            fd = (loss(coeffs + e) - loss(coeffs - e)) / 2e-6
        assert abs(float(c.grad[i]) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("prod", [False, True])
def test_cdeint_rk4_with_the_grid_matches_torchcde(prod):
    ts, xs = _data(B=3, T=8)
    coeffs = natural_cubic_coeffs(xs, ts)
    field = _Field()
    if prod:
        class Prod(torch.nn.Module):
            def __init__(self, f):
                super().__init__()
                self.f = f

            def forward(self, t, z):
                return self.f(t, z)

            def prod(self, t, z, dxdt):
                return (self.f(t, z) @ dxdt.unsqueeze(-1)).squeeze(-1)
        field = Prod(field)
    z0 = torch.full((3, 3), 0.1, dtype=torch.float64)
    out = {}
    for name, lib in (("torchcde", torchcde), ("neurodyn", ncde)):
        c = coeffs.clone().requires_grad_(True)
        X = lib.CubicSpline(c, ts)
        field.zero_grad()
        z = lib.cdeint(X=X, func=field, z0=z0, t=X.interval, adjoint=False, method="rk4",
                       options=dict(step_size=0.25))
        z[..., -1, :].pow(2).sum().backward()
        out[name] = (z.detach(), c.grad, [p.grad.clone() for p in field.parameters()])
    torch.testing.assert_close(out["neurodyn"][0], out["torchcde"][0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out["neurodyn"][1], out["torchcde"][1], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["neurodyn"][2], out["torchcde"][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derivative_grid_equals_derivative_at_each_time(left, dtype):
    ts, xs = _data(dtype)
    tt = torch.cat([ts, (ts[:-1] + ts[1:]) / 2, ts[:1] - 0.2, ts[-1:] + 0.3])
    coeffs = natural_cubic_coeffs(xs, ts).requires_grad_(True)
    ts_g = ts.clone().requires_grad_(True)
    for path in (CubicPath(ts_g, coeffs, left=left), LinearPath(ts, xs.clone().requires_grad_(True), left=left)):
        grid = path.derivative_grid(tt)
        each = torch.stack([path.derivative(x) for x in tt])
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grid, each, **tol)
        w = torch.randn(grid.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
        leaves = [x for x in path.grad_tensors()] if isinstance(path, LinearPath) else [coeffs, ts_g]
        g1 = torch.autograd.grad((grid * w).sum(), leaves)
        g2 = torch.autograd.grad((each * w).sum(), leaves)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, **tol)


def test_ode_solves_and_adaptive_solves_use_no_grid():
    calls = []
    original = neurodyn.ControlTerm.on_grid

    def spy(self, *a):
        calls.append(1)
        return original(self, *a)

    neurodyn.ControlTerm.on_grid = spy
    try:
        y0 = torch.ones(2, dtype=torch.float64)
        neurodyn.solve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                       step_size=0.1)
        ts, xs = _data()
        term = neurodyn.ControlTerm(_Field(), CubicPath(ts, natural_cubic_coeffs(xs, ts)))
        neurodyn.solve(term, torch.zeros(2, 3, dtype=torch.float64), ts[[0, -1]], method="dopri5")
        assert calls == []
        neurodyn.solve(term, torch.zeros(2, 3, dtype=torch.float64), ts[[0, -1]], method="rk4", step_size=0.5)
        assert calls == [1]
    finally:
        neurodyn.ControlTerm.on_grid = original
