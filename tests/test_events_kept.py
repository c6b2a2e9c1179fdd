"""Sign checks deferred to the end of the solve (``EventWatch._keep`` / ``_detect_kept``): for events whose crossings
only need recording, the steps are kept and their sample points checked all together after the loop. The records
(times, states, event indices, order), the status and the hits the checkpoint replays use are those of the checks in
the loop (forced here by ``EventWatch._lazy_ok`` returning False, and by ``vectorized=False``), to the root finding's
resolution, and the closed forms."""

import math

import pytest
import torch

import neurodyn
from neurodyn.core import events
from neurodyn.errors import InputError
from neurodyn.solvers import get_solver

F64 = torch.float64


def osc(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], -1)


class Spy:
    """Counts the calls of ``EventWatch._detect_kept`` (the deferred sign checks)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = events.EventWatch._detect_kept

        def wrapped(watch, *args, **kwargs):
            self.calls += 1
            return orig(watch, *args, **kwargs)

        monkeypatch.setattr(events.EventWatch, "_detect_kept", wrapped)


def in_loop(monkeypatch):
    """Every step's sign checks in the loop (the path before deferred checks)."""
    monkeypatch.setattr(events.EventWatch, "_lazy_ok", lambda self, solver, co: False)


def resolution(t):
    return 2 * events.ROOT_RTOL * t.abs().clamp(min=1.0)


def assert_same_records(a, b):
    assert a.events.index.tolist() == b.events.index.tolist()
    assert bool(((a.events.t - b.events.t).abs() <= resolution(b.events.t)).all())
    assert float((a.events.y - b.events.y).abs().max()) < 1e-10


def solve_osc(evs, t_end=40.0, **kw):
    y0 = torch.tensor([0.3, 1.0], dtype=F64)
    with torch.no_grad():
        return neurodyn.solve(osc, y0, torch.tensor([0.0, t_end], dtype=F64), rtol=1e-10, atol=1e-12, events=evs,
                              **kw)


def two_events():
    """Level crossings of y = A (sin(t + phi), cos(t + phi)): y[0] = 0 (both directions) and a two-component event
    with direction +1: y[1] = 0.999 A upwards (just before the maxima of y[1]) and y[0] = -A/2 upwards."""
    amp = math.hypot(0.3, 1.0)
    return [neurodyn.Event(lambda t, y: y[..., 0], terminal=False),
            neurodyn.Event(lambda t, y: torch.stack([y[..., 1] - 0.999 * amp, y[..., 0] + 0.5 * amp], -1),
                           terminal=False, direction=1)]


def test_kept_checks_match_the_loop_and_closed_forms(monkeypatch):
    """Many crossings of two events (one with two components and a direction): the deferred checks run (at the
    end, and once before the crossings the kept steps could show might reach max_events) and give the in-loop
    records and the closed forms: y = A sin(t + phi), phi = atan2(0.3, 1)."""
    spy = Spy(monkeypatch)
    evs = two_events()
    solve_osc(evs)  # finds out that the functions take stacked points
    spy.calls = 0
    kept = solve_osc(evs)
    calls = spy.calls
    assert 1 <= calls <= 1 + kept.stats["steps"] * 12 // 10_000  # 12: the crossings a step can show
    assert len(kept.events) > 20
    with monkeypatch.context() as m:
        in_loop(m)
        loop = solve_osc(evs)
    point = solve_osc([neurodyn.Event(e.fn, direction=e.direction, terminal=False, vectorized=False) for e in evs])
    assert spy.calls == calls  # neither of these kept steps
    assert_same_records(kept, loop)
    assert_same_records(kept, point)
    # closed forms: y[0] = 0 at k pi - phi; the other event's states on one of its levels
    phi = math.atan2(0.3, 1.0)
    zeros = kept.events.t[kept.events.index == 0]
    expect = torch.tensor([k * math.pi - phi for k in range(1, len(zeros) + 1)], dtype=F64)
    assert float((zeros - expect).abs().max()) < 1e-8
    y1 = kept.events.y[kept.events.index == 1]
    amp = math.hypot(0.3, 1.0)
    on_level = torch.minimum((y1[:, 1] - 0.999 * amp).abs(), (y1[:, 0] + 0.5 * amp).abs())
    assert float(on_level.max()) < 1e-9


def test_close_double_roots_within_one_step(monkeypatch):
    """y = cos t; g = y + cos(delta) < 0 only on (pi - delta, pi + delta): two roots inside one step (loose
    tolerances, steps up to 1) with the same sign at its ends; the sample points see both (non-terminal, deferred
    checks), at pi -/+ delta to the solver's accuracy and at the in-loop path's times."""
    delta = 0.2
    ev = [neurodyn.Event(lambda t, y: y[..., 0] + math.cos(delta), terminal=False)]
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 6.0], dtype=F64)
    kw = dict(rtol=1e-2, atol=1e-4, max_step=1.0, events=ev)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        neurodyn.solve(osc, y0, t, **kw)
        steps = []
        sol = neurodyn.solve(osc, y0, t, step_callbacks={"accept": lambda t0, y, h: steps.append((t0, t0 + h))},
                             **kw)
        assert spy.calls >= 1
        assert any(a < math.pi - delta and math.pi + delta < b for a, b in steps)  # both roots in one step
        with monkeypatch.context() as m:
            in_loop(m)
            loop = neurodyn.solve(osc, y0, t, **kw)
    expect = torch.tensor([math.pi - delta, math.pi + delta], dtype=F64)
    assert float((sol.events.t - expect).abs().max()) < 5e-3
    assert_same_records(sol, loop)


@pytest.mark.parametrize("cap", [1, 3])
def test_chunks_of_kept_steps(cap, monkeypatch):
    """At most ``cap`` steps kept (the memory bound): their checks run in chunks during the solve, and the records
    are the same as with one chunk."""
    evs = two_events()
    whole = solve_osc(evs)
    spy = Spy(monkeypatch)
    monkeypatch.setattr(events, "_KEEP_STEPS", cap)
    chunked = solve_osc(evs)
    assert spy.calls >= whole.stats["steps"] // cap
    assert_same_records(chunked, whole)


def test_max_events_reached_with_kept_steps(monkeypatch):
    """max_events: steps are kept while their crossings cannot reach it, then checked in the loop; the Zeno stop
    comes at the same occurrence and time as with every check in the loop, after the same records."""
    evs = two_events()
    spy = Spy(monkeypatch)
    kept = solve_osc(evs, max_events=17, on_failure="return")
    assert spy.calls >= 1
    with monkeypatch.context() as m:
        in_loop(m)
        loop = solve_osc(evs, max_events=17, on_failure="return")
    assert kept.status == loop.status == "zeno"
    assert len(kept.events) == len(loop.events) == 17
    assert_same_records(kept, loop)
    assert abs(float(kept.t_final) - float(loop.t_final)) <= 1e-9


def test_nan_at_a_kept_step_is_an_input_error():
    """An event function that turns NaN along the solution (log of y - 0.2, y = exp(-t): NaN after t = log 5)
    raises the loop's error, with the time of the first NaN sample point."""
    ev = neurodyn.Event(lambda t, y: torch.log(y[..., 0] - 0.2), terminal=False)
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    with torch.no_grad():
        with pytest.raises(InputError, match=r"NaN at t=(1\.[6-9]|2\.)"):
            neurodyn.solve(lambda t, y: -y, y0, t, rtol=1e-8, atol=1e-10, events=[ev])


def test_no_event_solve_unchanged():
    """Events change nothing in the solution itself: the same steps and outputs (bit for bit) with and without a
    non-terminal event whose steps are kept."""
    y0 = torch.tensor([0.3, 1.0], dtype=F64)
    t = torch.linspace(0.0, 20.0, 7, dtype=F64)
    with torch.no_grad():
        plain = neurodyn.solve(osc, y0, t, rtol=1e-8, atol=1e-10)
        ev = [neurodyn.Event(lambda t, y: y[..., 0], terminal=False)]
        neurodyn.solve(osc, y0, t, rtol=1e-8, atol=1e-10, events=ev)
        with_ev = neurodyn.solve(osc, y0, t, rtol=1e-8, atol=1e-10, events=ev)
    assert torch.equal(plain.ys, with_ev.ys)
    assert plain.stats["steps"] == with_ev.stats["steps"] and len(with_ev.events) == 6


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_interpolate_rows_many_points_by_weights(method):
    """interpolate_rows at many fractions per row (the batched product of stage weights, from 4096 output
    elements on) equals the one-fraction-per-row evaluation (Horner's rule) to rounding, and exp(-t) on y' = -y
    with exact stage derivatives to the interpolant's accuracy."""
    solver = get_solver(method)
    co = solver.coefficients(F64, torch.device("cpu"))
    b, n, h = 8, 300, 0.1
    y0 = torch.rand(b, n, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    kh = torch.stack([-y0 * math.exp(-c * h) * h for c in list(co.c)[:solver.stages]])
    th = torch.rand(b, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    many = solver.interpolate_rows(y0, y0, kh, None, th, co)
    assert many.shape == (b, 5, n) and b * 5 * n >= 4096
    for q in range(5):
        one = solver.interpolate_rows(y0, y0, kh, None, th[:, q].contiguous(), co)
        assert torch.allclose(many[:, q], one, rtol=1e-14, atol=0)
    exact = y0.unsqueeze(1) * torch.exp(-h * th).unsqueeze(2)
    assert float((many - exact).abs().max()) < 1e-5
