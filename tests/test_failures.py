"""Every non-success status, in both on_failure modes, with partial results and helpful messages."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import neurodyn

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
SUGGESTION = re.compile(
    r"\b(try|increase|decrease|reduce|raise|lower|loosen|tighten|check|consider|use|set|pass|allow)\b", re.I
)


def assert_good_message(msg: str, t: float, *keywords: str):
    """The message names the time reached (some number in it equals t to 4 digits) and suggests a fix."""
    numbers = [float(x) for x in NUMBER.findall(msg)]
    assert any(math.isclose(x, t, rel_tol=1e-4, abs_tol=1e-6) for x in numbers), \
        f"message does not name the time reached t={t!r}: {msg!r}"
    assert SUGGESTION.search(msg), f"message has no suggestion: {msg!r}"
    if keywords:
        assert any(k.lower() in msg.lower() for k in keywords), f"message mentions none of {keywords}: {msg!r}"


def assert_partial(sol, exact, rtol, status, check_final=True):
    """Outputs at or before t_final are valid (close to exact), later ones are NaN; y_final at t_final."""
    assert sol.status == status and not sol.success
    assert isinstance(sol.message, str) and sol.message
    ts = sol.ts.numpy()
    before = ts <= sol.t_final
    ys = sol.ys.reshape(len(ts), -1).numpy()
    assert before[0], "the initial time is always valid"
    ref = np.stack([np.atleast_1d(exact(t)) for t in ts[before]]).reshape(int(before.sum()), -1)
    ref = np.broadcast_to(ref, ys[before].shape)
    np.testing.assert_allclose(ys[before], ref, rtol=rtol, atol=0)
    assert np.isnan(ys[~before]).all(), f"rows after t_final={sol.t_final} are not NaN: {ys[~before]}"
    yf = sol.y_final.reshape(-1).numpy()
    assert np.isfinite(yf).all(), f"y_final is not finite: {yf}"
    if not check_final:
        return
    np.testing.assert_allclose(yf, np.broadcast_to(np.atleast_1d(exact(sol.t_final)), yf.shape), rtol=rtol)


def failure_pair(call, exc_type):
    """Run ``call(on_failure=...)`` both ways; return (exception, returned solution)."""
    with pytest.raises(exc_type) as info:
        call(on_failure="raise")
    err = info.value
    assert isinstance(err, neurodyn.SolveFailure)
    ret = call(on_failure="return")
    return err, ret


# --------------------------------------------------------------------------------------- success
def test_success_status():
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2, dtype=torch.float64), t)
    assert sol.status == "success" and sol.success and isinstance(sol.message, str)
    assert sol.t_final == 1.0


# ----------------------------------------------------------------------------- max_steps_reached
def a3(t, y):
    return y * torch.cos(t)


def a3_exact(t):
    return math.exp(math.sin(t))


def test_max_steps_reached():
    t = torch.linspace(0.0, 20.0, 41, dtype=torch.float64)

    def call(on_failure):
        return neurodyn.solve(a3, torch.ones(1, dtype=torch.float64), t, rtol=1e-8, atol=1e-10, max_steps=5,
                              on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.MaxStepsReached)
    assert err.status == "max_steps_reached"
    assert 0.0 < err.t < 20.0
    assert err.solution.stats["steps"] == 5 and ret.stats["steps"] == 5
    assert math.isclose(err.solution.t_final, err.t, rel_tol=0, abs_tol=1e-15)
    assert ret.t_final == err.t
    for sol in (err.solution, ret):
        assert_partial(sol, a3_exact, 1e-6, "max_steps_reached")
    assert_good_message(str(err), err.t, "max_steps")
    assert_good_message(ret.message, ret.t_final, "max_steps")


# --------------------------------------------------------------------------- step_size_underflow
def blowup(t, y):
    return y * y  # y = 1 / (1 - t): singular at t = 1


def blowup_exact(t):
    return 1.0 / (1.0 - t)


def test_step_size_underflow_at_singularity():
    t = torch.tensor([0.0, 0.5, 0.9, 1.5, 2.0], dtype=torch.float64)

    def call(on_failure):
        return neurodyn.solve(blowup, torch.ones(1, dtype=torch.float64), t, on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.StepSizeUnderflow)
    assert err.status == "step_size_underflow"
    # The numerical solution's own singularity is where 1/y reaches 0; 1/y carries an absolute error of
    # about rtol (1e-7), so the solver may stop a tolerance-sized distance past t = 1, not more.
    assert 1.0 - 1e-3 < err.t < 1.0 + 1e-6, err.t
    assert ret.t_final == err.t
    for sol in (err.solution, ret):
        assert_partial(sol, blowup_exact, 1e-5, "step_size_underflow", check_final=False)
        assert float(sol.y_final) > 1e6  # it got close to the blow-up
        assert (sol.ts.numpy() <= sol.t_final).sum() == 3  # 0, 0.5, 0.9 valid; 1.5, 2.0 NaN
    assert_good_message(str(err), err.t)
    assert_good_message(ret.message, ret.t_final)


def test_step_size_underflow_min_step():
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)

    def call(on_failure):
        return neurodyn.solve(blowup, torch.ones(1, dtype=torch.float64), t, min_step=1e-3, on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.StepSizeUnderflow)
    assert err.status == "step_size_underflow"
    # Steps ~ (1 - t) * (rtol)^(1/5) fall below 1e-3 well before t = 1 but after t = 0.5.
    assert 0.5 < err.t < 1.0 - 1e-3, err.t
    assert ret.t_final == err.t
    assert_partial(ret, blowup_exact, 1e-5, "step_size_underflow")
    assert_good_message(str(err), err.t, "min_step")


# ------------------------------------------------------------------------------------ non_finite
def nan_after_half(t, y):
    return -y if float(t) <= 0.5 else torch.full_like(y, float("nan"))


def test_non_finite_adaptive_homes_in_on_the_bad_region():
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)

    def call(on_failure):
        return neurodyn.solve(nan_after_half, torch.ones(2, dtype=torch.float64), t, on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.NonFiniteError)
    assert err.status == "non_finite"
    # The solver shrinks the step to get as close as it can to where func turns NaN.
    assert 0.5 - 1e-4 <= err.t <= 0.5, f"t reached {err.t!r}, want within 1e-4 below 0.5"
    assert ret.t_final == err.t
    for sol in (err.solution, ret):
        assert_partial(sol, lambda s: math.exp(-s), 1e-7, "non_finite")
        assert torch.isfinite(sol.y_final).all()
    assert_good_message(str(err), err.t, "nan", "inf", "finite")


def test_non_finite_fixed_step_stops_at_last_good_step():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)

    def f(t, y):
        return -y if float(t) <= 0.56 else torch.full_like(y, float("inf"))

    def call(on_failure):
        return neurodyn.solve(f, torch.ones(1, dtype=torch.float64), t, method="rk4", step_size=0.05,
                              on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.NonFiniteError)
    assert err.status == "non_finite"
    # Steps of 0.05: the step from 0.50 is fine (stages up to 0.55), the one from 0.55 is not (0.5667).
    assert math.isclose(err.t, 0.55, abs_tol=1e-12), err.t
    assert_partial(ret, lambda s: math.exp(-s), 1e-7, "non_finite")
    assert_good_message(str(err), err.t)


def test_non_finite_at_the_start():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def call(on_failure):
        return neurodyn.solve(lambda t, y: y / 0.0, torch.ones(1, dtype=torch.float64), t, on_failure=on_failure)

    err, ret = failure_pair(call, neurodyn.NonFiniteError)
    assert err.t == 0.0 and ret.t_final == 0.0
    assert torch.isnan(ret.ys[1]).all()
    torch.testing.assert_close(ret.ys[0], torch.ones(1, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- event
def test_event_status():
    g, h0 = 9.81, 10.0
    y0 = torch.tensor([h0, 0.0], dtype=torch.float64)

    def ball(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -g)])

    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    sol = neurodyn.solve(ball, y0, t, rtol=1e-10, atol=1e-12, event_fn=lambda t, y: y[0])
    assert sol.status == "event"
    assert abs(sol.t_final - math.sqrt(2 * h0 / g)) < 1e-6, sol.t_final
    assert abs(float(sol.y_final[0])) < 1e-6
