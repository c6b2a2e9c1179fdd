"""neurodyn.odeint / odeint_event as drop-in replacements for torchdiffeq's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from problems import B5, E_VDP, GLOBAL_C, irregular_times, max_error

import neurodyn

F64 = torch.float64
TD_ADAPTIVE = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"]
TD_FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]
TOL = {"dopri5": 1e-7, "dopri8": 1e-7, "bosh3": 1e-6, "fehlberg2": 1e-5, "adaptive_heun": 1e-4}


class Recorder:
    def __init__(self, f):
        self.f, self.ts = f, []

    def __call__(self, t, y):
        self.ts.append(float(t))
        return self.f(t, y)


# ----------------------------------------------------------------------------- same as torchdiffeq
@pytest.mark.parametrize("problem", [B5, E_VDP], ids=lambda p: p.name)
@pytest.mark.parametrize("method", TD_ADAPTIVE)
def test_adaptive_agrees_with_torchdiffeq(method, problem):
    """|nd - td| <= |nd - ref| + |td - ref|: nd within its tolerance bound, td within what it achieved."""
    tol = TOL[method]
    ts = irregular_times(problem, seed=5)
    y0 = problem.y0_tensor()
    nd = neurodyn.odeint(problem.f, y0, ts, rtol=tol, atol=tol * 1e-3, method=method)
    td = torchdiffeq.odeint(problem.f, y0, ts, rtol=tol, atol=tol * 1e-3, method=method)
    assert nd.shape == td.shape and nd.dtype == td.dtype
    td_err = max_error(td, problem, ts)
    bound = GLOBAL_C[method] * problem.amplification * problem.scale(tol, tol * 1e-3) + td_err
    diff = float((nd - td).abs().max())
    assert diff <= bound, f"{method}: |neurodyn - torchdiffeq| = {diff:.3e} > {bound:.3e} (td err {td_err:.3e})"


def test_default_method_and_tolerances_match_torchdiffeq():
    ts = irregular_times(B5, seed=6)
    nd = neurodyn.odeint(B5.f, B5.y0_tensor(), ts)
    td = torchdiffeq.odeint(B5.f, B5.y0_tensor(), ts)
    # Both dopri5 at rtol=1e-7, atol=1e-9.
    assert float((nd - td).abs().max()) <= GLOBAL_C["dopri5"] * 1e-7 + max_error(td, B5, ts)


def test_backward_agrees_with_torchdiffeq():
    ts = irregular_times(B5, seed=7).flip(0)
    y1 = torch.from_numpy(B5.reference([B5.t1])[0].copy())
    nd = neurodyn.odeint(B5.f, y1, ts, rtol=1e-8, atol=1e-10)
    td = torchdiffeq.odeint(B5.f, y1, ts, rtol=1e-8, atol=1e-10)
    assert float((nd - td).abs().max()) <= GLOBAL_C["dopri5"] * 1e-8 + max_error(td, B5, ts)


RIGID_T = torch.tensor([0.0, 0.33, 0.9, 1.37, 2.0], dtype=F64)  # off the 0.05 grid


@pytest.mark.parametrize("method", TD_FIXED)
@pytest.mark.parametrize("options", [None, {"step_size": 0.05}, {"step_size": 0.05, "interp": "linear"},
                                     {"step_size": 0.05, "interp": "cubic"}], ids=str)
def test_fixed_grid_matches_torchdiffeq(method, options):
    """Same algorithm, same grid, same interpolation: equal up to round-off."""
    t = torch.linspace(0.0, 2.0, 41, dtype=F64) if options is None else RIGID_T
    nd = neurodyn.odeint(B5.f, B5.y0_tensor(), t, method=method, options=options)
    td = torchdiffeq.odeint(B5.f, B5.y0_tensor(), t, method=method, options=options)
    torch.testing.assert_close(nd, td, rtol=1e-12, atol=1e-12)


def test_perturb_matches_torchdiffeq():
    """perturb=True evaluates func just after the start and just before the end of each step."""

    def f(t, y):
        return torch.ones_like(y) if float(t) > 1.0 else torch.zeros_like(y)

    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=F64)
    y0 = torch.zeros(1, dtype=F64)
    for perturb in (False, True):
        opts = {"perturb": perturb}
        nd = neurodyn.odeint(f, y0, t, method="euler", options=opts)
        td = torchdiffeq.odeint(f, y0, t, method="euler", options=opts)
        torch.testing.assert_close(nd, td, rtol=0, atol=1e-15)
    # With perturbation, the step from t=1 sees the right-hand value: exact answer y(2) = 1.
    assert float(neurodyn.odeint(f, y0, t, method="euler", options={"perturb": True})[-1]) == pytest.approx(1.0)


def test_tuple_state_matches_torchdiffeq():
    a0 = torch.tensor([1.0, 0.5], dtype=F64)
    b0 = torch.tensor([[0.0, -1.0], [0.3, 0.2]], dtype=F64)

    def f(t, state):
        a, b = state
        return -b.sum(0) * a, torch.tanh(a)[None, :] - b

    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    nd = neurodyn.odeint(f, (a0, b0), t, rtol=1e-9, atol=1e-11)
    td = torchdiffeq.odeint(f, (a0, b0), t, rtol=1e-9, atol=1e-11)
    assert isinstance(nd, tuple) and len(nd) == 2
    for x, y in zip(nd, td):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------- options
ADAPTIVE_OPTIONS = {
    "first_step": 1e-3,
    "max_num_steps": 10_000,
    "min_step": 1e-9,
    "max_step": 0.5,
    "step_t": torch.tensor([1.0], dtype=F64),
    "grid_points": torch.tensor([1.0], dtype=F64),
    "jump_t": torch.tensor([1.0], dtype=F64),
    "norm": lambda x: x.abs().max(),
    "dtype": F64,
    "safety": 0.8,
    "ifactor": 5.0,
    "dfactor": 0.3,
}
FIXED_OPTIONS = {"step_size": 0.1, "perturb": True, "interp": "cubic"}


@pytest.mark.parametrize("name", list(ADAPTIVE_OPTIONS))
def test_each_adaptive_option_is_accepted(name):
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    out = neurodyn.odeint(B5.f, B5.y0_tensor(), t, rtol=1e-8, atol=1e-10, method="dopri5",
                          options={name: ADAPTIVE_OPTIONS[name]})
    assert max_error(out, B5, t) <= GLOBAL_C["dopri5"] * 1e-8, name


@pytest.mark.parametrize("name", list(FIXED_OPTIONS))
def test_each_fixed_option_is_accepted(name):
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    opts = {name: FIXED_OPTIONS[name]}
    if name != "step_size":
        opts["step_size"] = 0.01
    out = neurodyn.odeint(B5.f, B5.y0_tensor(), t, method="rk4", options=opts)
    assert max_error(out, B5, t) <= 1e-5, name


def test_max_num_steps():
    with pytest.raises(neurodyn.MaxStepsReached):
        neurodyn.odeint(B5.f, B5.y0_tensor(), torch.tensor([0.0, 20.0], dtype=F64), method="dopri5",
                        options={"max_num_steps": 5})


def test_max_step_limits_the_step():
    rec = Recorder(B5.f)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    out = neurodyn.odeint(rec, B5.y0_tensor(), t, method="dopri5", options={"max_step": 0.01})
    assert len(rec.ts) >= 6 * 200  # >= 200 steps of 6 new evaluations each
    steps = np.diff(sorted(set(rec.ts)))
    assert steps.max() <= 0.01 + 1e-12
    assert max_error(out, B5, t) <= 1e-8


def test_safety_factors_change_the_steps():
    t = torch.tensor([0.0, 5.0], dtype=F64)
    counts = {}
    for label, opts in {"default": None, "cautious": {"safety": 0.5, "ifactor": 1.5}}.items():
        rec = Recorder(B5.f)
        neurodyn.odeint(rec, B5.y0_tensor(), t, rtol=1e-6, atol=1e-9, method="dopri5", options=opts)
        counts[label] = len(rec.ts)
    assert counts["cautious"] > counts["default"], counts


def test_custom_norm_matches_torchdiffeq():
    ts = irregular_times(E_VDP, seed=8)

    def norm(x):
        return x.abs().max()

    nd = neurodyn.odeint(E_VDP.f, E_VDP.y0_tensor(), ts, rtol=1e-7, atol=1e-9, method="dopri5",
                         options={"norm": norm})
    td = torchdiffeq.odeint(E_VDP.f, E_VDP.y0_tensor(), ts, rtol=1e-7, atol=1e-9, method="dopri5",
                         options={"norm": norm})
    assert float((nd - td).abs().max()) <= GLOBAL_C["dopri5"] * 1e-7 * 2.7 + max_error(td, E_VDP, ts)


def test_dtype_option_float32_state():
    t = torch.linspace(0.0, 4.0, 9, dtype=torch.float32)
    out = neurodyn.odeint(B5.f, B5.y0_tensor(torch.float32), t, rtol=1e-6, atol=1e-8, method="dopri5",
                          options={"dtype": F64})
    assert out.dtype == torch.float32
    assert max_error(out.double(), B5, t.double()) < 1e-4


def test_unknown_option_and_method_are_input_errors():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(neurodyn.InputError, match="first_step"):
        neurodyn.odeint(B5.f, B5.y0_tensor(), t, method="dopri5", options={"frist_step": 0.1})
    with pytest.raises(neurodyn.InputError, match="dopri5"):
        neurodyn.odeint(B5.f, B5.y0_tensor(), t, method="dopri45")
    with pytest.raises(ValueError):
        neurodyn.odeint(B5.f, B5.y0_tensor(), t, method="rk4", options={"grid_constructr": None})


# ------------------------------------------------------------------------------- step_t and jump_t
def kink(t, y):
    return y if float(t) < 1.0 else -2.0 * y


def kink_exact(t):
    t = np.asarray(t, dtype=np.float64)
    return np.where(t < 1.0, np.exp(t), math.e * np.exp(-2.0 * (t - 1.0)))


KINK_T = torch.tensor([0.0, 0.5, 1.5, 2.0, 3.0], dtype=F64)


def kink_error(ys):
    return float(np.abs(ys.reshape(-1).numpy() - kink_exact(KINK_T.numpy())).max())


def lands_on_one(times):
    return any(abs(s - 1.0) <= 2.3e-16 for s in times)


@pytest.mark.parametrize("via", ["solve", "odeint"])
def test_jump_t(via):
    y0 = torch.ones(1, dtype=F64)
    jump = torch.tensor([1.0], dtype=F64)
    rec_plain, rec_jump = Recorder(kink), Recorder(kink)
    if via == "solve":
        plain = neurodyn.solve(rec_plain, y0, KINK_T, rtol=1e-6, atol=1e-9).ys
        jumped = neurodyn.solve(rec_jump, y0, KINK_T, rtol=1e-6, atol=1e-9, jump_t=jump).ys
    else:
        plain = neurodyn.odeint(rec_plain, y0, KINK_T, rtol=1e-6, atol=1e-9)
        jumped = neurodyn.odeint(rec_jump, y0, KINK_T, rtol=1e-6, atol=1e-9, method="dopri5",
                                 options={"jump_t": jump})
    e_plain, e_jump = kink_error(plain), kink_error(jumped)
    assert e_jump <= e_plain, (e_jump, e_plain)
    assert e_jump <= GLOBAL_C["dopri5"] * 1e-6 * math.e, e_jump
    assert lands_on_one(rec_jump.ts), "no evaluation within 1 ulp of the jump at t=1"
    # After the jump, the derivative is re-evaluated on the right-hand side (at 1.0 or an ulp after it).
    assert any(1.0 <= s <= 1.0 + 4.5e-16 for s in rec_jump.ts), "no evaluation at the right of the jump"
    # Landing on the kink saves the rejected steps around it.
    assert len(rec_jump.ts) <= len(rec_plain.ts)


@pytest.mark.parametrize("name", ["step_t", "grid_points"])
def test_step_t_lands_on_the_point(name):
    rec = Recorder(B5.f)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    point = 1.0 + 1.0 / 3.0
    out = neurodyn.odeint(rec, B5.y0_tensor(), t, method="dopri5", options={name: torch.tensor([point], dtype=F64)})
    assert any(abs(s - point) <= 4.5e-16 for s in rec.ts), "no step ends on the step_t point"
    assert max_error(out, B5, t) <= GLOBAL_C["dopri5"] * 1e-7


def test_step_t_via_solve():
    rec = Recorder(B5.f)
    point = 1.0 + 1.0 / 3.0
    sol = neurodyn.solve(rec, B5.y0_tensor(), torch.tensor([0.0, 2.0], dtype=F64),
                         step_t=torch.tensor([point], dtype=F64))
    assert sol.success
    assert any(abs(s - point) <= 4.5e-16 for s in rec.ts)


# ----------------------------------------------------------------------------------- odeint_event
G = 9.81


def ball(t, y):
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def ground(t, y):
    return y[0]


@pytest.mark.parametrize("h0", [1.0, 10.0])
def test_odeint_event_falling_ball(h0):
    h = torch.tensor(h0, dtype=F64, requires_grad=True)
    y0 = torch.stack([h, torch.zeros((), dtype=F64)])
    t0 = torch.tensor(0.0, dtype=F64)
    event_t, sol = neurodyn.odeint_event(ball, y0, t0, event_fn=ground, rtol=1e-10, atol=1e-12)
    t_hit = math.sqrt(2 * h0 / G)
    assert abs(event_t.item() - t_hit) < 1e-6, (event_t.item(), t_hit)
    assert sol.shape[-1] == 2
    sold = sol.detach()
    torch.testing.assert_close(sold[0], y0.detach(), rtol=0, atol=0)
    assert abs(float(sold[-1][0])) < 1e-6
    assert abs(float(sold[-1][1]) + G * t_hit) < 1e-5
    # d t_hit / d h0 = 1 / sqrt(2 g h0)
    (grad,) = torch.autograd.grad(event_t, h, retain_graph=True)
    assert float(grad) == pytest.approx(1.0 / math.sqrt(2 * G * h0), rel=1e-6)
    # d v_hit / d h0 = -g / sqrt(2 g h0)   (v_hit = -sqrt(2 g h0))
    (grad_v,) = torch.autograd.grad(sol[-1][1], h)
    assert float(grad_v) == pytest.approx(-G / math.sqrt(2 * G * h0), rel=1e-6)
    # Same event time as torchdiffeq.
    td_t, _ = torchdiffeq.odeint_event(ball, y0.detach(), t0, event_fn=ground, rtol=1e-10, atol=1e-12)
    assert abs(event_t.item() - td_t.item()) < 1e-8


def test_odeint_event_reverse_time():
    """Ball dropped from rest at height h0 at t=-T hits the ground at t=0 (T = sqrt(2 h0 / g)).

    Integrating back from the ground, it passes height h0/2 at t = -T (1 - 1/sqrt 2) with speed g T / sqrt 2.
    """
    h0 = 5.0
    big_t = math.sqrt(2 * h0 / G)
    y0 = torch.tensor([0.0, -G * big_t], dtype=F64)
    event_t, sol = neurodyn.odeint_event(ball, y0, torch.tensor(0.0, dtype=F64),
                                         event_fn=lambda t, y: y[0] - h0 / 2, reverse_time=True,
                                         rtol=1e-10, atol=1e-12)
    assert abs(float(event_t) + big_t * (1 - 1 / math.sqrt(2))) < 1e-6, float(event_t)
    assert abs(float(sol[-1][0]) - h0 / 2) < 1e-6
    assert abs(float(sol[-1][1]) + G * big_t / math.sqrt(2)) < 1e-5
    td_t, _ = torchdiffeq.odeint_event(ball, y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - h0 / 2,
                                       reverse_time=True, rtol=1e-10, atol=1e-12)
    assert abs(event_t.item() - td_t.item()) < 1e-8
