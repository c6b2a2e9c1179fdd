"""The continuous adjoint's parameter gradients integrated outside the backward state (a quadrature with the
stepper's weights, :class:`neurodyn.gradients.adjoint._ParamQuadrature`): the same gradients as with ``g`` in the
state, and right against finite differences."""

from __future__ import annotations

import pytest
import torch

import neurodyn
import neurodyn.compat.torchcde as ncde
from neurodyn.solvers import get_solver
from neurodyn.solvers.explicit_rk import ExplicitRungeKutta

D = torch.float64


def _field_and_params():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 3, dtype=D, generator=g).mul_(0.7).requires_grad_(True)
    b = torch.randn(3, dtype=D, generator=g).requires_grad_(True)
    y0 = torch.randn(2, 3, dtype=D, generator=g).requires_grad_(True)
    return (lambda t, y: torch.tanh(y @ w + b) * torch.cos(2 * t)), [w, b], y0


def _grads(gradient, method, in_state, monkeypatch, **kw):
    f, params, y0 = _field_and_params()
    if in_state:  # the previous form: g integrated in the augmented state
        monkeypatch.setattr(ExplicitRungeKutta, "quadrature_weights", lambda self: None)
    else:
        monkeypatch.undo()
    sol = neurodyn.solve(f, y0, torch.linspace(0, 1.5, 4, dtype=D), method=method, gradient=gradient,
                         params=params, **kw)
    out = torch.autograd.grad(sol.ys.pow(2).sum(), [y0, *params])
    monkeypatch.undo()
    return out, sol.stats


@pytest.mark.parametrize("gradient,method,kw", [
    ("adjoint", "rk4", dict(step_size=0.1)),
    ("adjoint", "dopri5", {}),
    ("adjoint", "tsit5", dict(rtol=1e-6, atol=1e-8)),
    ("interpolated", "dopri5", {}),
    ("adjoint", "euler", dict(step_size=0.05)),
])
def test_quadrature_equals_g_in_the_state(gradient, method, kw, monkeypatch):
    new, stats_new = _grads(gradient, method, False, monkeypatch, **kw)
    old, stats_old = _grads(gradient, method, True, monkeypatch, **kw)
    # the same steps (the first one proposed from [y, a, g] as before) and the same gradients to rounding
    assert stats_new["steps_backward"] == stats_old["steps_backward"]
    assert stats_new["nfe_backward"] == stats_old["nfe_backward"]
    for a, b in zip(new, old):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_quadrature_gradients_match_finite_differences():
    f, params, y0 = _field_and_params()
    t = torch.linspace(0, 1.5, 4, dtype=D)

    def loss():
        return neurodyn.solve(f, y0, t, method="rk4", step_size=0.01, gradient="adjoint",
                              params=params).ys.pow(2).sum()

    gw, gb = torch.autograd.grad(loss(), params)
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(params, (gw, gb)):
            flat, gflat = p.view(-1), g.reshape(-1)
            for j in range(flat.numel()):
                flat[j] += eps
                up = float(loss())
                flat[j] -= 2 * eps
                down = float(loss())
                flat[j] += eps
                assert abs((up - down) / (2 * eps) - float(gflat[j])) < 1e-6 * max(1.0, abs(float(gflat[j])))


def test_cde_coefficient_gradients_rk4_adjoint_vs_direct_and_fd():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, dtype=D, generator=g)
    coeffs = ncde.natural_cubic_coeffs(x).requires_grad_(True)
    lin = torch.nn.Linear(4, 12).double()
    with torch.no_grad():  # weights from the test's generator: the suite's global RNG state must not choose them
        lin.weight.copy_(torch.rand(12, 4, dtype=D, generator=g).sub_(0.5))
        lin.bias.copy_(torch.rand(12, dtype=D, generator=g).sub_(0.5))

    def func(t, z):
        return lin(z).tanh().view(*z.shape, 3)

    z0 = torch.randn(2, 4, dtype=D, generator=g)

    def loss(c, adjoint):
        X = ncde.CubicSpline(c)
        kw = dict(adjoint_params=tuple(lin.parameters()) + (c,)) if adjoint else {}
        z = ncde.cdeint(X=X, func=func, z0=z0, t=X.interval, adjoint=adjoint, method="rk4",
                        options=dict(step_size=0.05, jump_t=X.grid_points), **kw)
        return z[..., -1, :].pow(2).sum()

    (g_adj,) = torch.autograd.grad(loss(coeffs, True), coeffs)
    (g_dir,) = torch.autograd.grad(loss(coeffs, False), coeffs)
    # the discrete (direct) and continuous (adjoint) gradients agree to rk4's error at this step
    assert torch.allclose(g_adj, g_dir, rtol=1e-4, atol=1e-5)
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 0, 3), (1, 2, 5), (0, 4, 11), (1, 1, 7)]:
            c = coeffs.detach().clone()
            c[idx] += eps
            up = float(loss(c, False))
            c[idx] -= 2 * eps
            down = float(loss(c, False))
            assert abs((up - down) / (2 * eps) - float(g_adj[idx])) < 1e-4 * max(1.0, abs(float(g_adj[idx])))


@pytest.mark.parametrize("name", ["euler", "midpoint", "rk4", "bosh3", "dopri5", "tsit5", "dopri8"])
def test_explicit_rk_step_is_the_weighted_sum_of_its_evaluations(name):
    """The contract quadrature_weights() declares: y1 = y + h sum_i b_i k_i with k_1 the given k1 and k_2..k_s the
    term's evaluations inside step(), one each, in order."""
    solver = get_solver(name)
    b = solver.quadrature_weights()
    assert len(b) == solver.stages and abs(sum(b) - 1.0) < 1e-14
    seen = []

    def term(t, y):
        k = torch.sin(3 * y) + t
        seen.append(k.reshape(-1))
        return k

    y = torch.tensor([[0.3, -1.2]], dtype=D)
    k1 = term(0.2, y)
    seen.clear()
    co = solver.coefficients(D, y.device)
    y1, _, _ = solver.step(term, 0.2, y, 0.1, k1, co)
    assert len(seen) == solver.stages - 1
    want = y.reshape(-1) + 0.1 * sum(w * k for w, k in zip(b, [k1.reshape(-1), *seen]))
    assert torch.allclose(y1.reshape(-1), want, rtol=0, atol=1e-15)
