"""Dtypes (float32/64, complex64/128), arbitrary state shapes and tuple states (through odeint)."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch
from problems import ADAPTIVE_METHODS, GLOBAL_C

import neurodyn

LOW_ORDER_TOL = {"adaptive_heun": 1e-6, "fehlberg2": 1e-7, "bosh3": 1e-6, "dopri5": 1e-7, "tsit5": 1e-7,
                 "dopri8": 1e-9}


class Recorder:
    """Wraps a field; remembers the dtype/shape of every t and y it was called with."""

    def __init__(self, f):
        self.f = f
        self.t_dtypes, self.t_dims, self.y_dtypes = set(), set(), set()

    def __call__(self, t, y):
        self.t_dtypes.add(t.dtype)
        self.t_dims.add(t.dim())
        self.y_dtypes.add(y.dtype)
        return self.f(t, y)


def a3(t, y):
    return y * torch.cos(t)


def a3_exact(t):
    return np.exp(np.sin(t))


# ------------------------------------------------------------------------------------------- real
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "rk4"])
def test_float32(method):
    t = torch.linspace(0.0, 10.0, 23, dtype=torch.float32)
    f = Recorder(a3)
    kw = {"step_size": 0.01} if method == "rk4" else {}
    sol = neurodyn.solve(f, torch.ones(1, dtype=torch.float32), t, method=method, rtol=1e-5, atol=1e-6, **kw)
    assert sol.success
    assert sol.ys.dtype == torch.float32 and sol.ts.dtype == torch.float32
    assert f.t_dtypes == {torch.float32} and f.t_dims == {0} and f.y_dtypes == {torch.float32}
    err = np.abs(sol.ys[:, 0].double().numpy() - a3_exact(t.double().numpy())).max()
    # float32 round-off (~1e-7 relative per step, a few thousand steps) plus rtol=1e-5 global error.
    assert err < 1e-3, err


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "rk4"])
def test_float64(method):
    t = torch.linspace(0.0, 10.0, 23, dtype=torch.float64)
    f = Recorder(a3)
    kw = {"step_size": 0.005} if method == "rk4" else {}
    sol = neurodyn.solve(f, torch.ones(1, dtype=torch.float64), t, method=method, rtol=1e-10, atol=1e-12, **kw)
    assert sol.ys.dtype == torch.float64
    assert f.t_dtypes == {torch.float64} and f.t_dims == {0} and f.y_dtypes == {torch.float64}
    err = np.abs(sol.ys[:, 0].numpy() - a3_exact(t.numpy())).max()
    assert err < 1e-7, err


# ---------------------------------------------------------------------------------------- complex
OMEGA, LAM = 2.0, 0.1
Y0C = [1.0 + 0.5j, -0.3 + 2.0j]


def rotating(t, y):
    return (1j * OMEGA - LAM) * y


def rotating_exact(t):
    return np.array(Y0C)[None, :] * np.exp((1j * OMEGA - LAM) * np.asarray(t))[:, None]


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + ["rk4"])
def test_complex128_linear(method):
    t = torch.linspace(0.0, 10.0, 29, dtype=torch.float64)
    f = Recorder(rotating)
    y0 = torch.tensor(Y0C, dtype=torch.complex128)
    if method == "rk4":
        sol = neurodyn.solve(f, y0, t, method=method, step_size=0.01)
        bound = 1e-7
    else:
        tol = LOW_ORDER_TOL[method]
        sol = neurodyn.solve(f, y0, t, method=method, rtol=tol, atol=tol * 1e-3)
        bound = GLOBAL_C[method] * tol * 2.1
    assert sol.success
    assert sol.ys.dtype == torch.complex128 and sol.ys.shape == (29, 2)
    assert f.t_dtypes == {torch.float64} and f.t_dims == {0} and f.y_dtypes == {torch.complex128}
    err = np.abs(sol.ys.numpy() - rotating_exact(t.numpy())).max()
    assert err <= bound, (err, bound)


def test_complex64():
    t = torch.linspace(0.0, 10.0, 29, dtype=torch.float32)
    f = Recorder(rotating)
    sol = neurodyn.solve(f, torch.tensor(Y0C, dtype=torch.complex64), t, rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == torch.complex64
    assert f.t_dtypes == {torch.float32} and f.y_dtypes == {torch.complex64}
    err = np.abs(sol.ys.numpy().astype(np.complex128) - rotating_exact(t.double().numpy())).max()
    assert err < 1e-3, err


def test_complex128_nonlinear_dense():
    """y' = -i |y|^2 y keeps |y| and rotates at rate |y0|^2: y = y0 exp(-i |y0|^2 t)."""
    y0 = torch.tensor([0.8 + 0.6j, 0.5 - 1.0j, 1.3j], dtype=torch.complex128)

    def f(t, y):
        return -1j * (y.abs() ** 2) * y

    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    sol = neurodyn.solve(f, y0, t, rtol=1e-10, atol=1e-12, dense=True)
    fine = torch.linspace(0.0, 3.0, 41, dtype=torch.float64)
    ev = sol.evaluate(fine)
    assert ev.dtype == torch.complex128 and ev.shape == (41, 3)
    r2 = np.abs(y0.numpy()) ** 2
    exact = y0.numpy()[None, :] * np.exp(-1j * r2[None, :] * fine.numpy()[:, None])
    assert np.abs(ev.numpy() - exact).max() < 1e-7
    assert abs(cmath.phase(complex(sol.ys[-1, 0])) - cmath.phase((0.8 + 0.6j) * cmath.exp(-3j))) < 1e-7


# ----------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(), (1,), (3, 4, 5), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_arbitrary_shapes(shape, method):
    g = torch.Generator().manual_seed(0)
    rates = 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    y0 = torch.randn(shape, generator=g, dtype=torch.float64)

    def f(t, y):
        assert y.shape == shape
        return -rates * y

    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=torch.float64)
    kw = {"step_size": 0.01} if method == "rk4" else {"rtol": 1e-9, "atol": 1e-12}
    sol = neurodyn.solve(f, y0, t, method=method, dense=True, **kw)
    assert sol.ys.shape == (4, *shape)
    assert sol.y_final.shape == shape
    exact = y0[None] * torch.exp(-rates[None] * t.reshape(-1, *([1] * len(shape))))
    torch.testing.assert_close(sol.ys, exact, rtol=0, atol=1e-7)
    tq = torch.tensor([[0.1, 0.5], [1.5, 1.9]], dtype=torch.float64)
    assert sol.evaluate(tq).shape == (2, 2, *shape)


def test_non_contiguous_state():
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).t()
    assert not y0.is_contiguous()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = neurodyn.solve(lambda t, y: -y, y0, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys[-1], y0 * math.exp(-1.0), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------- tuple via odeint
@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.01})])
def test_tuple_state_odeint(method, options):
    """Harmonic oscillator x' = v, v' = -x with x of shape (3,) and v of shape (1, 3)."""
    x0 = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    v0 = torch.tensor([[0.0, 1.0, 0.25]], dtype=torch.float64)

    def f(t, state):
        x, v = state
        assert isinstance(state, tuple) and x.shape == (3,) and v.shape == (1, 3)
        return v[0], -x[None]

    t = torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
    out = neurodyn.odeint(f, (x0, v0), t, rtol=1e-10, atol=1e-12, method=method, options=options)
    assert isinstance(out, tuple) and len(out) == 2
    xs, vs = out
    assert xs.shape == (11, 3) and vs.shape == (11, 1, 3)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    torch.testing.assert_close(xs, x0 * c + v0[0] * s, rtol=0, atol=1e-7)
    torch.testing.assert_close(vs[:, 0], -x0 * s + v0[0] * c, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.01})])
def test_tuple_state_with_a_scalar_member(method, options):
    """A 0-dim tensor in a tuple state: z' = 1 next to y' = -y."""
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    z0 = torch.tensor(0.5, dtype=torch.float64)

    def f(t, state):
        y, z = state
        assert y.shape == (2,) and z.shape == ()
        return -y, torch.ones_like(z)

    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    ys, zs = neurodyn.odeint(f, (y0, z0), t, rtol=1e-10, atol=1e-12, method=method, options=options)
    assert ys.shape == (5, 2) and zs.shape == (5,)
    torch.testing.assert_close(zs, 0.5 + t, rtol=0, atol=1e-10)
    torch.testing.assert_close(ys, y0 * torch.exp(-t)[:, None], rtol=0, atol=1e-7)
