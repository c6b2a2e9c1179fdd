"""Symplectic integrators (leapfrog, yoshida4, semi_implicit_euler): orders, bounded energy error where
rk4/dopri5 of the same cost drift, the [q, p] state convention, dense output, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurodyn
from neurodyn.errors import InputError

F64 = torch.float64
ORDERS = {"semi_implicit_euler": 1, "leapfrog": 2, "yoshida4": 4}
METHODS = list(ORDERS)


def pendulum(t, y):
    """H = p^2 / 2 - cos q; state (..., 2) = [q, p]."""
    return torch.cat([y[..., 1:], -torch.sin(y[..., :1])], -1)


def energy(y):
    return 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])


# A batch of pendulums, small to large amplitude (all librating).
Y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.5], [0.0, 1.5]], dtype=F64)


def reference(y0, t_end):
    t = torch.tensor([0.0, t_end], dtype=F64)
    return neurodyn.solve(pendulum, y0, t, method="dopri8", rtol=1e-13, atol=1e-14).ys[-1]


def test_registered():
    for m in METHODS:
        assert m in neurodyn.available_methods()
        s = neurodyn.solvers.get_solver(m)
        assert s.order == ORDERS[m] and s.adaptive is False and s.name == m


@pytest.mark.parametrize("method", METHODS)
def test_convergence_order(method):
    y0 = Y0[:2]
    t = torch.tensor([0.0, 10.0], dtype=F64)
    ref = reference(y0, 10.0)
    hs = [0.1, 0.05, 0.025, 0.0125]
    errs = [float((neurodyn.solve(pendulum, y0, t, method=method, step_size=h).ys[-1] - ref).abs().max())
            for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - ORDERS[method]) <= 0.3, (method, slope, errs)


def _energy_stats(ys):
    """max |dH| and the means of |dH| over the first and the last tenth (worst pendulum of the batch)."""
    dh = (energy(ys) - energy(Y0)).abs().amax(-1)
    n = len(dh) // 10
    return float(dh.max()), float(dh[1:n + 1].mean()), float(dh[-n:].mean())


def _energy_run(method, h, t_end, **kw):
    n = round(t_end / h)
    t = torch.linspace(0, t_end, n + 1, dtype=F64)  # fixed-step methods step on this grid
    sol = neurodyn.solve(pendulum, Y0, t, method=method, **kw)
    return _energy_stats(sol.ys), sol.stats["nfe"]


def _check_energy(t_end, h_leapfrog):
    # Equal cost: leapfrog 2 calls/step, yoshida4 6, rk4 4; dopri5's tolerance picked for about the same count.
    (lf_max, lf_first, lf_last), lf_nfe = _energy_run("leapfrog", h_leapfrog, t_end)
    (y4_max, y4_first, y4_last), y4_nfe = _energy_run("yoshida4", 3 * h_leapfrog, t_end)
    (rk_max, rk_first, rk_last), rk_nfe = _energy_run("rk4", 2 * h_leapfrog, t_end)
    t = torch.linspace(0, t_end, round(t_end / h_leapfrog) + 1, dtype=F64)
    sol = neurodyn.solve(pendulum, Y0, t, method="dopri5", rtol=1e-5, atol=1e-7)
    dp_max, dp_first, dp_last = _energy_stats(sol.ys)
    assert abs(y4_nfe - lf_nfe) <= 0.05 * lf_nfe and abs(rk_nfe - lf_nfe) <= 0.05 * lf_nfe
    assert sol.stats["nfe"] <= 1.5 * lf_nfe
    # Symplectic: bounded error, no drift (last tenth ~ first tenth).
    assert lf_max < 5e-3 and y4_max < 2e-3
    lf_drift, y4_drift = abs(lf_last - lf_first), abs(y4_last - y4_first)
    assert lf_drift <= 0.05 * lf_first and y4_drift <= 0.05 * y4_first
    # rk4 and dopri5 at that cost drift: the error grows steadily.
    for first, last in ((rk_first, rk_last), (dp_first, dp_last)):
        assert last >= 5 * first
        assert last - first > 10 * max(lf_drift, y4_drift)
    return lf_drift, y4_drift, rk_last - rk_first, dp_last - dp_first


def test_energy_bounded_where_rk_drifts():
    """10^4 leapfrog steps (~150 periods) of a batch of pendulums."""
    _check_energy(t_end=1000.0, h_leapfrog=0.1)


@pytest.mark.slow
def test_energy_bounded_where_rk_drifts_1e5_steps():
    _check_energy(t_end=10000.0, h_leapfrog=0.1)


def test_semi_implicit_euler_energy_bounded():
    (mx, first, last), _ = _energy_run("semi_implicit_euler", 0.1, 500.0)
    assert mx < 0.1 and abs(last - first) <= 0.05 * first


def test_state_convention_batched_and_d2():
    """Last dimension = [q (d), p (d)]; leading dimensions are a batch; d = 2 (a 2-d harmonic oscillator with
    different frequencies per coordinate): each coordinate matches its own 1-d solve."""
    w = torch.tensor([1.0, 3.0], dtype=F64)

    def osc2(t, y):  # H = |p|^2 / 2 + sum w_i^2 q_i^2 / 2
        q, p = y[..., :2], y[..., 2:]
        return torch.cat([p, -(w ** 2) * q], -1)

    y0 = torch.tensor([[[1.0, 0.5, 0.0, 0.2]], [[0.3, -1.0, 0.1, 0.0]]], dtype=F64)  # (2, 1, 4)
    t = torch.linspace(0, 3, 7, dtype=F64)
    for method in METHODS:
        ys = neurodyn.solve(osc2, y0, t, method=method, step_size=0.01).ys
        assert ys.shape == (7, 2, 1, 4)
        for i in range(2):
            for b in range(2):
                def osc1(t_, y_, wi=w[i]):
                    return torch.cat([y_[..., 1:], -(wi ** 2) * y_[..., :1]], -1)
                y1 = torch.stack([y0[b, 0, i], y0[b, 0, 2 + i]])
                ref = neurodyn.solve(osc1, y1, t, method=method, step_size=0.01).ys
                torch.testing.assert_close(ys[:, b, 0, i], ref[:, 0], rtol=0, atol=1e-13)
                torch.testing.assert_close(ys[:, b, 0, 2 + i], ref[:, 1], rtol=0, atol=1e-13)
        c = torch.cos(w * 3.0)
        s = torch.sin(w * 3.0)
        exact_q = y0[:, 0, :2] * c + y0[:, 0, 2:] / w * s
        tol = {"semi_implicit_euler": 0.1, "leapfrog": 1e-3, "yoshida4": 1e-6}[method]
        assert float((ys[-1, :, 0, :2] - exact_q).abs().max()) < tol


def test_odd_last_dimension_raises():
    with pytest.raises(InputError, match=r"\[q, p\]"):
        neurodyn.solve(lambda t, y: -y, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       method="leapfrog", step_size=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_nfe_and_fsal(method):
    """2m func calls per step (m drifts), plus the initial derivative, when outputs lie on the step grid."""
    t = torch.linspace(0, 2, 21, dtype=F64)
    sol = neurodyn.solve(pendulum, Y0[0], t, method=method)
    per_step = {"semi_implicit_euler": 2, "leapfrog": 2, "yoshida4": 6}[method]
    assert sol.stats["steps"] == 20 and sol.stats["nfe"] == 1 + per_step * 20


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_hermite(method):
    """Output times inside steps: cubic Hermite on the exact end derivatives (not the carried hybrid one)."""
    h = 0.05
    t_out = torch.tensor([0.0, 0.013, 0.52, 0.777, 1.2345, 2.0], dtype=F64)
    sol = neurodyn.solve(pendulum, Y0[1], t_out, method=method, step_size=h)
    grid = torch.linspace(0, 2.0, 41, dtype=F64)
    on_grid = neurodyn.solve(pendulum, Y0[1], grid, method=method).ys
    torch.testing.assert_close(sol.ys[-1], on_grid[-1], rtol=0, atol=1e-12)  # a step end: no interpolation
    exact_grid = neurodyn.solve(pendulum, Y0[1], grid, method="dopri8", rtol=1e-12, atol=1e-13).ys
    exact = neurodyn.solve(pendulum, Y0[1], t_out, method="dopri8", rtol=1e-12, atol=1e-13).ys
    method_err = float((on_grid - exact_grid).abs().max())
    interp_err = float((sol.ys - exact).abs().max())
    assert interp_err <= method_err + 1e-5  # the Hermite error is O(h^4) ~ 1e-6 here
    if ORDERS[method] >= 2:
        # Local check: from the method's own state at the step start, the exact flow to each interior time.
        lin = neurodyn.solve(pendulum, Y0[1], t_out, method=method, step_size=h, interp="linear").ys
        for i in range(1, len(t_out) - 1):
            j = int(float(t_out[i]) // h)
            local = neurodyn.solve(pendulum, on_grid[j], torch.stack([grid[j], t_out[i]]), method="dopri8",
                                   rtol=1e-12, atol=1e-13).ys[-1]
            step_end = neurodyn.solve(pendulum, on_grid[j], grid[j:j + 2], method="dopri8", rtol=1e-12,
                                      atol=1e-13).ys[-1]
            step_err = float((on_grid[j + 1] - step_end).abs().max())  # the method's own local error
            herm_err = float((sol.ys[i] - local).abs().max())
            assert herm_err <= step_err + 1e-6
            assert float((lin[i] - local).abs().max()) > 5 * herm_err


def test_leapfrog_time_reversible():
    """Leapfrog is symmetric: integrating back from y(T) returns to y0 up to rounding."""
    t = torch.linspace(0, 20, 401, dtype=F64)
    yT = neurodyn.solve(pendulum, Y0, t, method="leapfrog").ys[-1]
    back = neurodyn.solve(pendulum, yT, t.flip(0), method="leapfrog").ys[-1]
    torch.testing.assert_close(back, Y0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    """Gradients through the steps (gradient='direct') w.r.t. y0 and a parameter, float64 gradcheck."""
    t = torch.linspace(0, 1, 3, dtype=F64)

    def run(y0, g):
        def f(t_, y):
            return torch.cat([y[..., 1:], -g * torch.sin(y[..., :1])], -1)
        return neurodyn.solve(f, y0, t, method=method, step_size=0.1).ys

    y0 = torch.tensor([[0.8, 0.1], [0.2, -0.3]], dtype=F64, requires_grad=True)
    g = torch.tensor(1.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, g))


def test_torchdiffeq_layer():
    t = torch.linspace(0, 2, 5, dtype=F64)
    a = neurodyn.odeint(pendulum, Y0, t, method="yoshida4", options={"step_size": 0.01})
    b = neurodyn.solve(pendulum, Y0, t, method="yoshida4", step_size=0.01).ys
    torch.testing.assert_close(a, b, rtol=0, atol=0)
