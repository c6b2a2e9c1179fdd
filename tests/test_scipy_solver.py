"""method="scipy_solver" in the torchdiffeq layer: any solve_ivp method, forward only."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import torch
import torchdiffeq
from problems import B5, E_VDP

import neurodyn
from neurodyn.errors import InputError, SolveFailure

F64 = torch.float64
SOLVERS = ["RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"]


def direct_scipy(problem, t, solver, rtol, atol, **kw):
    res = scipy.integrate.solve_ivp(problem.f_numpy, (float(t[0]), float(t[-1])), np.asarray(problem.y0, float),
                                    method=solver, t_eval=t.numpy(), rtol=rtol, atol=atol, **kw)
    return torch.from_numpy(res.y.T)


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_scipy_directly(solver):
    p = E_VDP
    t = torch.linspace(p.t0, 6.0, 13, dtype=F64)
    ys = neurodyn.odeint(p.f, p.y0_tensor(), t, method="scipy_solver", options={"solver": solver},
                         rtol=1e-8, atol=1e-10)
    ref = direct_scipy(p, t, solver, 1e-8, 1e-10)
    assert ys.dtype == F64 and ys.shape == (13, 2)
    torch.testing.assert_close(ys, ref, rtol=0, atol=1e-13)


def test_default_solver_is_lsoda_like_torchdiffeq():
    p = B5
    t = torch.linspace(p.t0, 5.0, 6, dtype=F64)
    ys = neurodyn.odeint(p.f, p.y0_tensor(), t, method="scipy_solver")
    td = torchdiffeq.odeint(p.f, p.y0_tensor(), t, method="scipy_solver")
    torch.testing.assert_close(ys, td, rtol=0, atol=1e-13)
    torch.testing.assert_close(ys, direct_scipy(p, t, "LSODA", 1e-7, 1e-9), rtol=0, atol=1e-13)


def test_solve_ivp_options_pass_through():
    p = E_VDP
    t = torch.linspace(p.t0, 3.0, 4, dtype=F64)

    def jac(t_, y):
        return np.array([[0.0, 1.0], [-2.0 * y[0] * y[1] - 1.0, 1.0 - y[0] ** 2]])

    opts = {"solver": "Radau", "max_step": 0.05, "first_step": 1e-3, "jac": jac}
    ys = neurodyn.odeint(p.f, p.y0_tensor(), t, method="scipy_solver", options=opts)
    ref = direct_scipy(p, t, "Radau", 1e-7, 1e-9, max_step=0.05, first_step=1e-3, jac=jac)
    torch.testing.assert_close(ys, ref, rtol=0, atol=1e-13)


def test_shapes_dtypes_tuples_and_backward_time():
    f = lambda t, y: -y * torch.arange(1, 7, dtype=y.dtype).view(2, 3)
    y0 = torch.ones(2, 3)
    t = torch.linspace(0, 1, 5)
    ys = neurodyn.odeint(f, y0, t, method="scipy_solver", options={"solver": "DOP853"}, rtol=1e-9, atol=1e-11)
    assert ys.dtype == torch.float32 and ys.shape == (5, 2, 3)
    exact = torch.exp(-t.view(-1, 1, 1) * torch.arange(1, 7, dtype=torch.float32).view(2, 3))
    torch.testing.assert_close(ys, exact, rtol=1e-5, atol=1e-6)
    back = neurodyn.odeint(f, exact[-1], t.flip(0), method="scipy_solver", options={"solver": "DOP853"},
                           rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(back, exact.flip(0), rtol=1e-5, atol=1e-6)
    # Tuple states, as every odeint method.
    g = lambda t, s: (s[1], -s[0])
    out = neurodyn.odeint(g, (torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)),
                          torch.linspace(0, 1, 3, dtype=F64), method="scipy_solver", options={"solver": "RK45"},
                          rtol=1e-10, atol=1e-12)
    assert isinstance(out, tuple) and out[0].shape == (3, 1)
    torch.testing.assert_close(out[0][:, 0], torch.cos(torch.linspace(0, 1, 3, dtype=F64)), rtol=0, atol=1e-8)


def test_forward_only():
    """As torchdiffeq: y0 and t go to scipy detached, the result carries no gradient (odeint_adjoint gives one:
    tests/test_torchdiffeq_dropin.py)."""
    f = lambda t, y: -y
    t = torch.linspace(0, 1, 3, dtype=F64)
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    ys = neurodyn.odeint(f, y0, t, method="scipy_solver")
    assert not ys.requires_grad
    torch.testing.assert_close(ys, torchdiffeq.odeint(f, y0, t, method="scipy_solver"), rtol=0, atol=1e-13)
    # scipy_odeint itself refuses tensors requiring grad (nothing would flow back).
    from neurodyn.compat.scipy_solver import scipy_odeint

    with pytest.raises(InputError, match="forward only"):
        scipy_odeint(f, y0, t)
    lin = torch.nn.Linear(2, 2).double()
    ys = neurodyn.odeint(lambda t, y: lin(y), y0.detach(), t, method="scipy_solver")
    assert not ys.requires_grad


def test_bad_options_and_failures():
    f = lambda t, y: -y
    y0 = torch.ones(2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(InputError, match="unknown scipy solver"):
        neurodyn.odeint(f, y0, t, method="scipy_solver", options={"solver": "RK99"})
    with pytest.raises(InputError, match="t_eval"):
        neurodyn.odeint(f, y0, t, method="scipy_solver", options={"t_eval": [0.5]})
    with pytest.raises(InputError, match="event_fn"):
        neurodyn.odeint(f, y0, t, method="scipy_solver", event_fn=lambda t, y: y[0] - 0.5)
    # A solution that blows up before the end: solve_ivp's failure becomes a SolveFailure.
    with pytest.raises(SolveFailure, match="solve_ivp"):
        neurodyn.odeint(lambda t, y: y ** 2, y0, torch.tensor([0.0, 2.0], dtype=F64), method="scipy_solver",
                        options={"solver": "RK45"})
