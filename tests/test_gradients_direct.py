"""gradient="direct": backpropagation through the solver's operations, checked in float64."""

from __future__ import annotations

import pytest
import torch

import neurodyn
from neurodyn.solvers import get_solver

F64 = torch.float64
METHODS = ["dopri5", "tsit5", "rk4", "bosh3"]


def options(method):
    # Tight tolerances so that the step sequence (a function of y0 too) moves the result by far less
    # than gradcheck's tolerance; rk4 on a fixed grid; bosh3 (3rd order, many steps) a little looser.
    if method == "rk4":
        return {"step_size": 0.05}
    return {"rtol": 1e-8, "atol": 1e-10} if method == "bosh3" else {"rtol": 1e-10, "atol": 1e-12}


def small_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_()
    b = (0.1 * torch.randn(3, generator=g, dtype=F64)).requires_grad_()
    y0 = torch.randn(3, generator=g, dtype=F64).requires_grad_()
    return w, b, y0


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_tanh_field(method):
    w, b, y0 = small_problem()
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)

    def run(y0, w, b):
        def f(t, y):
            return torch.tanh(w @ y + b) - 0.1 * y

        return neurodyn.solve(f, y0, t, method=method, gradient="direct", **options(method)).ys

    assert torch.autograd.gradcheck(run, (y0, w, b))


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_time_dependent_linear_field(method):
    """y' = A y + sin(t) * c, gradients w.r.t. y0, A and c."""
    g = torch.Generator().manual_seed(1)
    a = (0.3 * torch.randn(2, 2, generator=g, dtype=F64)).requires_grad_()
    c = torch.randn(2, generator=g, dtype=F64).requires_grad_()
    y0 = torch.randn(2, generator=g, dtype=F64).requires_grad_()
    t = torch.tensor([0.0, 0.7, 1.5], dtype=F64)

    def run(y0, a, c):
        return neurodyn.solve(lambda t, y: a @ y + torch.sin(t) * c, y0, t, method=method, gradient="direct",
                              **options(method)).ys

    assert torch.autograd.gradcheck(run, (y0, a, c))


def linear_system(seed=2, n=4):
    g = torch.Generator().manual_seed(seed)
    a = 0.4 * torch.randn(n, n, generator=g, dtype=F64) - 0.2 * torch.eye(n, dtype=F64)
    y0 = torch.randn(n, generator=g, dtype=F64)
    return a, y0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_jacobian_wrt_y0_is_matrix_exponential(method, direction):
    """For y' = A y, dy(T)/dy0 = expm(A (T - t0))."""
    a, y0 = linear_system()
    t_end = 2.0 if direction == "forward" else -2.0
    t = torch.tensor([0.0, t_end], dtype=F64)
    opts = {"step_size": 0.01} if method == "rk4" else {"rtol": 1e-10, "atol": 1e-12}

    def final(y):
        return neurodyn.solve(lambda t, y: a @ y, y, t, method=method, gradient="direct", **opts).ys[-1]

    jac = torch.autograd.functional.jacobian(final, y0)
    expected = torch.linalg.matrix_exp(a * t_end)
    # rk4 with h=0.01: global error ~ h^4 ~ 1e-8 relative; adaptive at rtol=1e-10: ~1e-9.
    torch.testing.assert_close(jac, expected, rtol=0, atol=5e-7)
    torch.testing.assert_close(final(y0), expected @ y0, rtol=0, atol=5e-7)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_wrt_matrix_matches_matrix_exp(method):
    """d/dA of w . y(T) through the solver equals d/dA of w . expm(A T) y0 (torch's exact matrix_exp VJP)."""
    a, y0 = linear_system(seed=3)
    w = torch.randn(4, generator=torch.Generator().manual_seed(4), dtype=F64)
    big_t = 1.5
    t = torch.tensor([0.0, big_t], dtype=F64)
    opts = {"step_size": 0.01} if method == "rk4" else {"rtol": 1e-10, "atol": 1e-12}

    a1 = a.clone().requires_grad_()
    y_end = neurodyn.solve(lambda t, y: a1 @ y, y0, t, method=method, gradient="direct", **opts).ys[-1]
    (g_solver,) = torch.autograd.grad(w @ y_end, a1)

    a2 = a.clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(w @ (torch.linalg.matrix_exp(a2 * big_t) @ y0), a2)
    torch.testing.assert_close(g_solver, g_exact, rtol=0, atol=5e-7)


def test_gradient_through_intermediate_outputs():
    """Outputs between steps (interpolated) are differentiable too: y(t) = y0 exp(-k t)."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t = torch.tensor([0.0, 0.37, 1.13, 2.9], dtype=F64)
    ys = neurodyn.solve(lambda t, y: -k * y, y0, t, rtol=1e-10, atol=1e-12, gradient="direct").ys
    loss = ys.sum()
    (gk,) = torch.autograd.grad(loss, k)
    expected = float((-t[:, None] * y0[None, :] * torch.exp(-0.7 * t[:, None])).sum())
    assert float(gk) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("method", [*METHODS, "dopri8"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_stages_under_autograd_equal_the_buffered_ones(method, dtype):
    """Under autograd the explicit RK stages are stacked out of place; without it they are written into reused
    buffers. The same steps and NFE, and the same arithmetic: outputs and dense output bit for bit -- except for a
    fixed-step tableau in float32, whose combinations under autograd (and with steps recorded for dense output) are
    elementwise, another rounding order than the buffered matrix product (solvers/explicit_rk.py): there the outputs
    agree to float32 rounding and the dense outputs (both recorded: both elementwise) bit for bit."""
    w, b, y0 = small_problem(1)
    w, b, y0 = w.detach().to(dtype), b.detach().to(dtype), y0.detach().to(dtype)
    t = torch.linspace(0.0, 2.0, 7, dtype=dtype)
    opts = options(method) if dtype == F64 else ({"step_size": 0.05} if method == "rk4" else {"rtol": 1e-5})

    def f(t, y):
        return torch.tanh(y @ w.T + b) * (1 + 0.1 * t)

    with torch.no_grad():
        plain = neurodyn.solve(f, y0, t, method=method, **opts)
    y0g = y0.clone().requires_grad_()
    graded = neurodyn.solve(f, y0g, t, method=method, **opts)
    assert graded.ys.requires_grad
    assert graded.stats["steps"] == plain.stats["steps"] and graded.stats["nfe"] == plain.stats["nfe"]
    if dtype == F64 or get_solver(method).adaptive:
        assert torch.equal(graded.ys.detach(), plain.ys)
    else:
        assert float((graded.ys.detach() - plain.ys).abs().max()) <= 4e-6 * float(plain.ys.abs().max())
    # dense output (recorded steps: stages kept from the stacked path vs from a fresh buffer)
    with torch.no_grad():
        dense_plain = neurodyn.solve(f, y0, t, method=method, dense=True, **opts)
    dense_graded = neurodyn.solve(f, y0g, t, method=method, dense=True, **opts)
    tq = torch.linspace(0.05, 1.95, 9, dtype=dtype)
    assert torch.equal(dense_graded.evaluate(tq).detach(), dense_plain.evaluate(tq))
