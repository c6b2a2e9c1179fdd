"""Per-sample stepping: every row its own step size, output times, status; against scipy per row."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import neurodyn

F64 = torch.float64


def _vdp_batch(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


def _scipy_vdp(m, t_eval):
    sol = solve_ivp(lambda tt, yy: [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (t_eval[0], t_eval[-1]),
                    [2.0, 0.0], method="Radau", rtol=1e-11, atol=1e-12, t_eval=t_eval)
    return sol.y.T


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
def test_matches_scipy_per_row_and_steps_differ(method):
    mu = torch.tensor([0.5, 2.0, 8.0, 15.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=F64)
    t = torch.linspace(0, 6, 9, dtype=F64)
    rtol = 1e-4 if method == "adaptive_heun" else 1e-7
    sol = neurodyn.solve(_vdp_batch(mu), y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, per_sample_steps=True)
    ref = np.stack([_scipy_vdp(float(m), t.numpy()) for m in mu], 1)
    err = np.abs(sol.ys.numpy() - ref).max()
    assert err < (2e-2 if method == "adaptive_heun" else 5e-4), err
    steps = sol.stats["steps_per_sample"]
    assert len(set(steps.tolist())) > 1  # rows really step on their own
    assert sol.sample_status == ["success"] * 4


def test_each_row_equals_its_own_solve():
    """A per-sample solve of row b is the same computation as a plain solve of row b alone."""
    mu = torch.tensor([1.0, 5.0, 12.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    t = torch.linspace(0, 5, 7, dtype=F64)
    sol = neurodyn.solve(_vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, per_sample_steps=True)
    for b in range(3):
        one = neurodyn.solve(_vdp_batch(mu[b:b + 1]), y0[b:b + 1], t, rtol=1e-6, atol=1e-8)
        assert torch.allclose(sol.ys[:, b], one.ys[:, 0], rtol=1e-9, atol=1e-10)
        assert int(sol.stats["steps_per_sample"][b]) == one.stats["steps"]


def test_per_sample_output_times():
    a = torch.tensor([[-1.0], [-2.0], [-0.5]], dtype=F64)
    t = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.1, 0.2], [0.0, 2.0, 4.0]], dtype=F64)
    sol = neurodyn.solve(lambda tt, y: a * y, torch.ones(3, 1, dtype=F64), t, rtol=1e-10, atol=1e-12,
                         per_sample_steps=True)
    exact = torch.exp(a.view(1, 3) * t.T).unsqueeze(-1)
    assert torch.allclose(sol.ys, exact, rtol=1e-8, atol=1e-12)


def test_failure_of_one_sample_keeps_the_others():
    def f(t, y):  # row 1 blows up (y' = y^2 from 1: singular at t = 1), rows 0 and 2 decay
        rate = torch.tensor([[-1.0], [0.0], [-2.0]], dtype=F64)
        return rate * y + torch.tensor([[0.0], [1.0], [0.0]], dtype=F64) * y * y
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    sol = neurodyn.solve(f, torch.ones(3, 1, dtype=F64), t, per_sample_steps=True, on_failure="return")
    assert sol.sample_status[0] == "success" and sol.sample_status[2] == "success"
    assert sol.sample_status[1] in ("step_size_underflow", "non_finite")
    assert abs(float(sol.t_final_per_sample[1]) - 1.0) < 1e-3
    assert abs(float(sol.ys[2, 0, 0]) - np.exp(-2.0)) < 1e-6
    assert abs(float(sol.ys[1, 1, 0]) - 2.0) < 1e-5  # y(0.5) = 1 / (1 - 0.5)
    assert torch.isnan(sol.ys[2, 1, 0])
    with pytest.raises(neurodyn.SolveFailure):
        neurodyn.solve(f, torch.ones(3, 1, dtype=F64), t, per_sample_steps=True)


def test_direct_gradients_match_finite_differences():
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)

    def loss(w_, y0_):
        return neurodyn.solve(lambda tt, y: torch.tanh(y @ w_), y0_, t, rtol=1e-10, atol=1e-12,
                              per_sample_steps=True).ys.pow(2).sum()

    assert torch.autograd.gradcheck(loss, (w, y0), atol=1e-6, rtol=1e-5)


def test_bad_input():
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(neurodyn.InputError, match="adaptive"):
        neurodyn.solve(lambda tt, y: -y, y0, t, method="rk4", step_size=0.1, per_sample_steps=True)
    with pytest.raises(neurodyn.InputError, match="gradient"):
        neurodyn.solve(lambda tt, y: -y, y0, t, gradient="adjoint", per_sample_steps=True)
    with pytest.raises(neurodyn.InputError, match="one row per sample"):
        neurodyn.solve(lambda tt, y: -y, y0, torch.zeros(3, 3, dtype=F64), per_sample_steps=True)
