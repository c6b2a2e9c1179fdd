"""Fixed-step methods: empirical convergence order, grid semantics, and exact one-step formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from problems import ADAPTIVE_ORDERS, B5, FIXED_METHODS, FIXED_ORDERS, Problem

import neurodyn

# The rigid body (exact solution via Jacobi elliptic functions) on [0, 4]: smooth, nonlinear, 3-d.
RIGID = Problem("B5_rigid_body_0_4", B5.f, B5.y0, 0.0, 4.0, exact=B5.exact)


# The same body on a warped clock s(t) = t + sin(t)/2: z(t) = y(s(t)) solves z' = s'(t) f(z), a
# non-autonomous field (so the nodes c of every stage matter, which they do not for RIGID).
def _warped(t, y):
    return (1.0 + 0.5 * torch.cos(t)) * B5.f(t, y)


WARPED = Problem("B5_warped_clock_0_4", _warped, B5.y0, 0.0, 4.0,
                 exact=lambda t: B5.exact(np.asarray(t) + 0.5 * np.sin(t)))
CONVERGENCE_PROBLEMS = [RIGID, WARPED]

# Step counts per nominal order, chosen (with an independent RK implementation) so that the error is in
# the asymptotic regime and far above round-off (>= ~1e-12) at the finest step.
STEPS_BY_ORDER = {
    1: [128, 256, 512, 1024],
    2: [64, 128, 256, 512],
    3: [32, 64, 128, 256],
    4: [16, 32, 64, 128],
    5: [64, 128, 256, 512],  # 5th-order pairs are pre-asymptotic (slope ~5.4) below 64 steps here
    8: [8, 16, 32],
}


def final_error(method, n_steps, problem=RIGID, **kwargs):
    h = (problem.t1 - problem.t0) / n_steps
    t = torch.tensor([problem.t0, problem.t1], dtype=torch.float64)
    sol = neurodyn.solve(problem.f, problem.y0_tensor(), t, method=method, step_size=h, **kwargs)
    assert sol.success
    err = float(np.abs(sol.ys[-1].numpy() - problem.reference([problem.t1])[0]).max())
    return err, sol


def observed_order(method, order, problem):
    ns = STEPS_BY_ORDER[order]
    errs, sols = zip(*(final_error(method, n, problem) for n in ns))
    hs = [(problem.t1 - problem.t0) / n for n in ns]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    return slope, errs, sols


@pytest.mark.parametrize("problem", CONVERGENCE_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("method", FIXED_METHODS)
def test_convergence_order_fixed(method, problem):
    order = FIXED_ORDERS[method]
    slope, errs, sols = observed_order(method, order, problem)
    assert abs(slope - order) <= 0.3, f"{method}: observed order {slope:.2f}, nominal {order}; errors {errs}"
    for n, sol in zip(STEPS_BY_ORDER[order], sols):
        assert sol.stats["steps"] == n, (n, sol.stats)


@pytest.mark.parametrize("problem", CONVERGENCE_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("method", list(ADAPTIVE_ORDERS))
def test_convergence_order_adaptive_pairs_on_fixed_steps(method, problem):
    order = ADAPTIVE_ORDERS[method]
    # solve() runs an adaptive method with step_size as constant steps (error control off).
    _, sol = final_error(method, STEPS_BY_ORDER[order][0], problem)
    assert sol.stats["steps"] == STEPS_BY_ORDER[order][0] and sol.stats["rejected"] == 0, sol.stats
    slope, errs, _ = observed_order(method, order, problem)
    assert abs(slope - order) <= 0.3, f"{method}: observed order {slope:.2f}, nominal {order}; errors {errs}"


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_grid_semantics_without_step_size(method):
    """Without step_size a fixed-step method steps on the output grid t (torchdiffeq semantics)."""
    n = 64
    grid = torch.linspace(RIGID.t0, RIGID.t1, n + 1, dtype=torch.float64)
    on_grid = neurodyn.solve(RIGID.f, RIGID.y0_tensor(), grid, method=method)
    assert on_grid.success
    assert on_grid.stats["steps"] == n
    # The same as a hand-rolled step-by-step integration between consecutive grid points.
    y = RIGID.y0_tensor()
    for i in range(n):
        step = neurodyn.solve(RIGID.f, y, grid[i:i + 2], method=method)
        assert step.stats["steps"] == 1
        y = step.ys[-1]
        torch.testing.assert_close(on_grid.ys[i + 1], y, rtol=1e-14, atol=1e-14)
    # Irregular grid: still one step per interval, and the error matches the order.
    g = np.random.default_rng(0)
    irregular = torch.tensor(np.sort(np.concatenate([[0.0, 4.0], g.uniform(0, 4, 63)])), dtype=torch.float64)
    sol = neurodyn.solve(RIGID.f, RIGID.y0_tensor(), irregular, method=method)
    assert sol.stats["steps"] == len(irregular) - 1


# One step of y' = y from y(0) = 1 with step h is the Taylor polynomial of e^h up to the method's order
# (for these methods with stages == order).
TAYLOR = {m: FIXED_ORDERS[m] for m in FIXED_METHODS}


@pytest.mark.parametrize("method", FIXED_METHODS)
@pytest.mark.parametrize("h", [0.1, 0.37])
def test_one_step_is_taylor_polynomial(method, h):
    order = TAYLOR[method]
    t = torch.tensor([0.0, h], dtype=torch.float64)
    sol = neurodyn.solve(lambda t, y: y, torch.ones((), dtype=torch.float64), t, method=method)
    expected = sum(h**k / math.factorial(k) for k in range(order + 1))
    assert abs(float(sol.ys[-1]) - expected) <= 4e-15, (float(sol.ys[-1]), expected)


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_one_step_quadrature_exactness(method):
    """y' = p (t - a)^(p-1) is integrated exactly by an order-p method (tests the nodes c)."""
    order = FIXED_ORDERS[method]
    t0, h, a = 0.3, 0.5, -0.2

    def f(t, y):
        return order * (t - a) ** (order - 1) * torch.ones_like(y)

    t = torch.tensor([t0, t0 + h], dtype=torch.float64)
    sol = neurodyn.solve(f, torch.zeros(2, dtype=torch.float64), t, method=method)
    expected = (t0 + h - a) ** order - (t0 - a) ** order
    torch.testing.assert_close(sol.ys[-1], torch.full((2,), expected, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_step_size_backward_in_time():
    """step_size is a magnitude: it also works when t decreases."""
    t = torch.tensor([4.0, 0.0], dtype=torch.float64)
    y4 = torch.from_numpy(RIGID.reference([4.0])[0].copy())
    sol = neurodyn.solve(RIGID.f, y4, t, method="rk4", step_size=4.0 / 64)
    assert sol.stats["steps"] == 64
    err = float(np.abs(sol.ys[-1].numpy() - np.asarray(RIGID.y0)).max())
    fwd_err, _ = final_error("rk4", 64)
    assert err < 1e-6 and err < 10 * fwd_err, (err, fwd_err)


@pytest.mark.parametrize("compile", [False, True])
def test_float32_times_landed_without_a_sliver_step(compile):
    """Times given in float32 are rounded (0.3 is 0.30000001192...), so steps of the given size accumulated in float64
    miss them by less than a float32 ulp. The step that comes within that of a stop lands on it: [0, 0.3] with
    step_size=0.1 takes 3 steps (it took a fourth of 1.2e-8), observation times every 1/49 with jump_t and
    step_size=1/49 one step per interval (it took 62 for 49), backward in time too; Euler's exact product of factors
    (1 - h) meets the result."""
    for t_end, n in ((0.3, 3), (2.9, 29), (5.3, 53)):
        sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, t_end]), method="euler",
                             step_size=0.1, compile=compile)
        assert sol.stats["steps"] == n, (t_end, sol.stats)
        assert abs(sol.stats["last_step"] - 0.1) < 1e-6
        torch.testing.assert_close(sol.ys[-1], torch.full((2,), 0.9 ** n), rtol=2e-6, atol=0)
        back = neurodyn.solve(lambda t, y: y, torch.ones(2), torch.tensor([t_end, 0.0]), method="euler",
                              step_size=0.1, compile=compile)
        assert back.stats["steps"] == n, (t_end, back.stats)
    ts = torch.linspace(0.0, 1.0, 50)
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), ts, method="euler", step_size=1 / 49, jump_t=ts[1:-1],
                         compile=compile)
    assert sol.stats["steps"] == 49, sol.stats
    # A stop farther than the float32 resolution is still reached by a step of its own (3 steps, then 0.05).
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 0.35]), method="euler", step_size=0.1)
    assert sol.stats["steps"] == 4 and abs(sol.stats["last_step"] - 0.05) < 1e-6
    # Near t = 1e6 float32 resolves 0.0625 only: the allowance is capped (control.LANDING_TIME_CAP), so no step
    # grows past 1.001 step sizes (uncapped, the first step's end would land on the end time, 0.275 away).
    t = torch.tensor([1e6, 1e6 + 0.375])
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), t, method="euler", step_size=0.1, compile=compile)
    assert sol.stats["steps"] == 4 and abs(sol.stats["last_step"] - 0.075) < 1e-9, sol.stats
