"""float32 against torchdiffeq 0.2.5 (issue 12): ``rk4``'s rounding and drift, and ``perturb``.

* ``rk4`` in float32 rounds every stage combination once at the state's magnitude (``y + h (a @ k)``), as
  torchdiffeq's ``y0 + dy``, and the step's arithmetic spans the float32 times the step goes between: the error
  against a float64 solve of the same steps is torchdiffeq's, step by step and over thousands of steps.
* ``perturb=True`` nudges times by one ulp of float32 (the dtype of the time tensor the field receives): the field
  never sees the grid point, forward nor in the adjoint's backward solve, as torchdiffeq's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchdiffeq
from torch import nn

import neurodyn
from neurodyn.core.stepper import nextafter
from neurodyn.solvers.explicit_rk import float32_step

F32 = torch.float32


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ROT = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])


def rotation(t, y):
    """y' = (y2, -y1) for a batch of states (B, 2): every row an independent harmonic oscillator."""
    return y @ ROT.to(y.dtype).T


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def test_rk4_float32_step_rounds_once_like_torchdiffeq():
    """One rk4 step from 4096 random states: the error against the same step in float64 is torchdiffeq's (the stage
    sums of ``addmm`` rounded at y's magnitude once per stage: twice torchdiffeq's error, 62% equal outputs)."""
    y0 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    h = 2.0 ** -10
    t = torch.tensor([0.0, h])
    with torch.no_grad():
        nd = neurodyn.odeint(rotation, y0, t, method="rk4", options={"step_size": h})[-1]
        td = torchdiffeq.odeint(rotation, y0, t, method="rk4", options={"step_size": h})[-1]
        ref = torchdiffeq.odeint(rotation, y0.double(), t.double(), method="rk4", options={"step_size": h})[-1]
    assert nd.dtype == F32
    assert rms(nd - ref) <= 1.02 * rms(td - ref)
    assert float((nd == td).float().mean()) >= 0.99
    # never more than one float32 spacing (at the state's size) away from torchdiffeq's step
    scale = td.abs().amax(dim=1, keepdim=True)
    assert bool(((nd - td).abs() <= torch.finfo(F32).eps * scale).all())


def _mlp_fields():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    net64 = copy.deepcopy(net).double()
    return (lambda t, y: net(y)), (lambda t, y: net64(y))


@pytest.mark.parametrize("case", ["rotation h=0.1", "rotation h=2^-7", "mlp h=0.05"])
def test_rk4_float32_drift_no_worse_than_torchdiffeq(case):
    """Thousands of float32 rk4 steps for 64 states: the error against torchdiffeq's float64 rk4 on the same grid
    (its truncation error cancels) is torchdiffeq's float32 error. Before: 8x (h=0.1, where float32(h) shortened
    every step alike), 2.5x and 2.3x."""
    g = torch.Generator().manual_seed(0)
    if case.startswith("rotation"):
        f = f64 = rotation
        h, T = (0.1, 200.0) if case.endswith("0.1") else (2.0 ** -7, 20.0)
    else:
        f, f64 = _mlp_fields()
        h, T = 0.05, 50.0
    y0 = torch.randn(64, 2, generator=g)
    t = torch.linspace(0.0, T, 3)
    opts = {"step_size": h}
    with torch.no_grad():
        nd = neurodyn.odeint(f, y0, t, method="rk4", options=opts)
        nds = neurodyn.solve(f, y0, t, method="rk4", step_size=h).ys
        td = torchdiffeq.odeint(f, y0, t, method="rk4", options=opts)
        ref = torchdiffeq.odeint(f64, y0.double(), t.double(), method="rk4", options=opts)
    assert torch.equal(nd, nds)
    e_nd, e_td = rms(nd - ref), rms(td - ref)
    assert e_nd <= 1.3 * e_td, (e_nd, e_td)


def test_float32_step_spans_the_float32_times():
    """The steps add up to float32(t_end) - float32(t0) (float32(h) per step would not), and equal ``h`` when the
    grid is exact in float32."""
    ts = [k * 0.01 for k in range(10_001)]
    steps = [float32_step(a, b - a) for a, b in zip(ts[:-1], ts[1:])]
    assert math.fsum(steps) == float(torch.tensor(100.0)) - 0.0
    assert abs(10_000 * float(torch.tensor(0.01)) - 100.0) > 2e-6  # what casting h would have integrated
    assert all(float32_step(k / 128, 1 / 128) == 1 / 128 for k in range(1000))
    for a, b in zip(ts[:200], ts[1:201]):  # each step is the difference of the two float32 times
        assert float32_step(a, b - a) == float(torch.tensor(b) - torch.tensor(a))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nextafter_is_one_ulp_of_the_time_dtype(dtype):
    """Cast to the time dtype, the nudged time differs from the cast time by exactly one spacing of that dtype."""
    for t in (0.0, 1.0, 0.1, -2.5, 1000.3):
        tt = torch.tensor(t, dtype=dtype)
        for direction in (1.0, -1.0):
            nudged = nextafter(t, direction, dtype)
            nt = torch.tensor(nudged, dtype=dtype)
            assert float(nt) == nudged  # representable: the cast keeps it
            inf = torch.tensor(math.inf if direction > 0 else -math.inf, dtype=dtype)
            assert torch.equal(nt, torch.nextafter(tt, inf))


class Switch(nn.Module):
    """dy/dt = a(t) theta y with a = 1 before t = 1 and -2 from t = 1 on; records the times it sees (float32)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(0.7))
        self.times: list[torch.Tensor] = []

    def forward(self, t, y):
        self.times.append(t.detach().clone())
        a = torch.where(t < 1.0, torch.ones_like(t), torch.full_like(t, -2.0))
        return a * self.theta * y


def _run_switch(lib, adjoint: bool):
    f = Switch()
    y0 = torch.tensor([1.5], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0])
    fn = lib.odeint_adjoint if adjoint else lib.odeint
    ys = fn(f, y0, t, method="rk4", options={"step_size": 0.25, "perturb": True})
    n_forward = len(f.times)
    ys[-1].sum().backward()
    forward = torch.stack(f.times[:n_forward])
    backward = torch.stack(f.times[n_forward:]) if len(f.times) > n_forward else torch.zeros(0)
    return ys.detach(), y0.grad, f.theta.grad, forward, backward


@pytest.mark.parametrize("adjoint", [False, True])
def test_perturb_float32_never_evaluates_on_the_grid_point(adjoint):
    """perturb=True in float32: the field never sees t = 1 (where it jumps), forward or backward, and sees exactly
    the times torchdiffeq's does (one float32 ulp either side of the grid points). Before, the float64 nudge was
    rounded away by the cast to float32: the step ending at t = 1 saw the right-hand value (y(2) off by 7%) and the
    adjoint's backward solve did not perturb at all."""
    ys, gy0, gth, fw, bw = _run_switch(neurodyn, adjoint)
    tys, tgy0, tgth, tfw, tbw = _run_switch(torchdiffeq, adjoint)
    assert fw.dtype == F32
    one = torch.tensor(1.0)
    below, above = torch.nextafter(one, torch.tensor(0.0)), torch.nextafter(one, torch.tensor(2.0))
    for seen, td_seen in ((fw, tfw), (bw, tbw)):
        assert not bool((seen == 1.0).any())
        assert set(td_seen.tolist()) >= {float(below), float(above)} or not len(td_seen)
        # torchdiffeq's times around the grid points (nudged ones): neurodyn's are the same
        nudged = {x for x in td_seen.tolist() if any(abs(x - g) < 1e-6 for g in (0.25 * k for k in range(9)))}
        assert nudged == {x for x in seen.tolist() if any(abs(x - g) < 1e-6 for g in (0.25 * k for k in range(9)))}
    # y(2) = 1.5 exp(0.7 - 1.4): rk4 with steps of 0.25 on each smooth piece
    exact = 1.5 * math.exp(-0.7)
    assert float(ys[-1]) == pytest.approx(exact, rel=5e-4)
    assert torch.allclose(ys, tys, rtol=2e-6, atol=0)
    assert float(gy0) == pytest.approx(float(tgy0), rel=1e-5)
    assert float(gth) == pytest.approx(float(tgth), rel=1e-5)
    assert float(gth) == pytest.approx(-exact, rel=2e-3)  # d y(2) / d theta


def test_perturb_float32_gradient_methods_agree():
    """direct, adjoint and checkpoint gradients with perturb=True in float32 match the closed form (each evaluates
    the first derivative just after t0, the adjoint's backward solve perturbs too); checkpoint's is direct's (both
    differentiate the discrete solve). Before, all three were 3% to 4% off (the step ending at t = 1 saw a = -2)."""
    out = {}
    for gradient in ("direct", "adjoint", "checkpoint"):
        f = Switch()
        y0 = torch.tensor([1.5], requires_grad=True)
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, 2.0]), method="rk4", step_size=0.25, perturb=True,
                             gradient=gradient)
        sol.ys[-1].sum().backward()
        assert not any(bool(x == 1.0) for x in f.times)
        out[gradient] = (float(sol.ys[-1].detach()), float(y0.grad), float(f.theta.grad))
    exact = 1.5 * math.exp(-0.7)
    for gradient, (y2, gy0, gth) in out.items():
        assert y2 == pytest.approx(exact, rel=5e-4), gradient
        assert gy0 == pytest.approx(math.exp(-0.7), rel=5e-4), gradient
        assert gth == pytest.approx(-exact, rel=2e-3), gradient
    assert out["checkpoint"][1:] == pytest.approx(out["direct"][1:], rel=2e-6)


def test_jump_t_float32_never_evaluates_on_the_jump():
    """jump_t nudges in the time dtype too: in float32 the adaptive solve lands on t = 1 and evaluates the field
    just before it (end of the step) and just after it (next step), never at it."""
    f = Switch()
    y0 = torch.tensor([1.5])
    with torch.no_grad():
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, 2.0]), method="dopri5", rtol=1e-6, atol=1e-8, jump_t=[1.0])
    seen = torch.stack(f.times)
    assert not bool((seen == 1.0).any())
    one = torch.tensor(1.0)
    assert bool((seen == torch.nextafter(one, torch.tensor(0.0))).any())
    assert bool((seen == torch.nextafter(one, torch.tensor(2.0))).any())
    assert float(sol.ys[-1]) == pytest.approx(1.5 * math.exp(-0.7), rel=1e-5)
