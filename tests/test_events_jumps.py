"""Events with directions, counts and jump maps (issue 16 item 2): event times against closed forms (free fall, a
bouncing ball's bounce times) and scipy's ``solve_ivp`` events; gradients of event times and post-jump states
against closed forms and finite differences (direct, checkpoint; the adjoint's clear errors); terminal after n;
Zeno status with the partial solution; bad input. Adaptive steps toward ``jump_t`` times: equal, no sliver step
landing on a jump."""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

import neurodyn
from neurodyn.errors import InputError, ZenoError

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def ball(g):
    """y = (height, velocity) under gravity g (a tensor or float)."""
    def f(t, y):
        return torch.stack([y[1], -g * torch.ones_like(y[1])])
    return f


def bounce(e, direction=-1):
    return neurodyn.Event(lambda t, y: y[0], direction=direction, terminal=False,
                          jump=lambda t, y: torch.stack([y[0], -e * y[1]]))


def bounce_times(g, e, h0, k):
    """Closed form: t_1 = sqrt(2 h0 / g), t_{j+1} = t_j + 2 e^j v_1 / g with v_1 = sqrt(2 g h0) (torch or float)."""
    sqrt = torch.sqrt if isinstance(g, torch.Tensor) else math.sqrt
    t1 = sqrt(2 * h0 / g)
    v1 = g * t1
    out = [t1]
    for j in range(1, k):
        out.append(out[-1] + 2 * e ** j * v1 / g)
    return out, v1


def height(t, g, e, h0):
    """Closed-form height at time t (float t; g, e, h0 tensors or floats)."""
    ts, v1 = bounce_times(g, e, h0, 60)
    if t < float(ts[0]):
        return h0 - 0.5 * g * t * t
    k = max(i for i in range(len(ts)) if float(ts[i]) <= t)
    v = e ** (k + 1) * v1
    s = t - ts[k]
    return v * s - 0.5 * g * s * s


# ------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_ten_bounces_at_the_analytic_times(method):
    g, e, h0 = 9.81, 0.9, 1.0
    exact, v1 = bounce_times(g, e, h0, 10)
    sol = neurodyn.solve(ball(g), torch.tensor([h0, 0.0], dtype=F64), torch.tensor([0.0, exact[-1] + 0.05],
                         dtype=F64), method=method, events=[bounce(e)], **TOL)
    assert sol.status == "success" and len(sol.events) == 10
    assert max(abs(a - b) for a, b in zip(sol.events.t.tolist(), exact)) < 1e-9
    # states before the jumps: on the floor, falling at e^(k-1) v1
    pre = [-e ** k * v1 for k in range(10)]
    assert float(sol.events.y[:, 0].abs().max()) < 1e-9
    assert max(abs(a - b) for a, b in zip(sol.events.y[:, 1].tolist(), pre)) < 1e-8
    assert sol.events.index.tolist() == [0] * 10
    # after the jumps the solve continued: the height at the end is the closed form's
    assert abs(float(sol.ys[-1, 0]) - height(exact[-1] + 0.05, g, e, h0)) < 1e-9


@pytest.mark.parametrize("method, tol", [("bdf", 2e-4), ("adams", 2e-5), ("rk4", 1e-9), ("radau", 1e-6)])
def test_bounces_with_multistep_implicit_and_fixed_step_methods(method, tol):
    """A jump restarts a multistep method's history (its state is not its last step's end): bdf, adams."""
    g, e, h0 = 9.81, 0.8, 1.0
    exact, _ = bounce_times(g, e, h0, 5)
    kw = dict(step_size=0.01) if method == "rk4" else dict(rtol=1e-8, atol=1e-10)
    sol = neurodyn.solve(ball(g), torch.tensor([h0, 0.0], dtype=F64), torch.tensor([0.0, exact[-1] + 0.01],
                         dtype=F64), method=method, events=[bounce(e)], **kw)
    assert len(sol.events) == 5
    assert max(abs(a - b) for a, b in zip(sol.events.t.tolist(), exact)) < tol


def test_free_fall_terminal_event_and_its_gradients_closed_form():
    """t* = sqrt(2 h / g): dt*/dg = -t*/(2 g), dt*/dh = t*/(2 h); the velocity there -sqrt(2 g h)."""
    for gradient in ("direct", "checkpoint"):
        g = torch.tensor(9.81, dtype=F64, requires_grad=True)
        y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
        ev = neurodyn.Event(lambda t, y: y[0], direction=-1)
        sol = neurodyn.solve(ball(g), y0, torch.tensor([0.0, 5.0], dtype=F64), events=[ev], gradient=gradient,
                             params=[g], **TOL)
        ts = math.sqrt(4.0 / 9.81)
        assert sol.status == "event" and abs(float(sol.event_t) - ts) < 1e-12
        assert len(sol.events) == 1 and float(sol.events.t[0]) == float(sol.event_t)
        dg, dh = torch.autograd.grad(sol.event_t, (g, y0), retain_graph=True)
        assert float(dg) == pytest.approx(-ts / (2 * 9.81), rel=1e-8)
        assert float(dh[0]) == pytest.approx(ts / 4.0, rel=1e-8)
        (dv,) = torch.autograd.grad(sol.y_final[1], g)
        assert float(dv) == pytest.approx(-math.sqrt(2 * 2.0) / (2 * math.sqrt(9.81)), rel=1e-8)
        assert torch.isnan(sol.ys[-1]).all()


@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_gradients_through_bounces_match_the_closed_form(gradient):
    """d/d(g, e, h0) of the bounce times, the pre-jump velocities and the heights at output times after several
    jumps, against autograd through the closed form."""
    vals = dict(g=9.81, e=0.8, h0=1.0)
    t_out = torch.tensor([0.0, 0.3, 1.1, 1.9, 2.6], dtype=F64)

    def loss_of(out_heights, ev_t, ev_v):
        return (out_heights * torch.arange(1, 6, dtype=F64)).sum() + (ev_t ** 2).sum() + 0.3 * ev_v.sum()

    g, e, h0 = (torch.tensor(v, dtype=F64, requires_grad=True) for v in vals.values())
    y0 = torch.stack([h0, torch.zeros((), dtype=F64)])
    sol = neurodyn.solve(ball(g), y0, t_out, events=[bounce(e)], gradient=gradient, params=[g, e], **TOL)
    n = len(sol.events)
    assert n == 5
    got = torch.autograd.grad(loss_of(sol.ys[:, 0], sol.events.t, sol.events.y[:, 1]), (g, e, h0))

    g2, e2, h2 = (torch.tensor(v, dtype=F64, requires_grad=True) for v in vals.values())
    ts, v1 = bounce_times(g2, e2, h2, n)
    hs = torch.stack([torch.as_tensor(height(float(t), g2, e2, h2), dtype=F64) for t in t_out])
    want = torch.autograd.grad(loss_of(hs, torch.stack(ts), torch.stack([-e2 ** k * v1 for k in range(n)])),
                               (g2, e2, h2))
    for a, b in zip(got, want):
        assert float(a) == pytest.approx(float(b), rel=1e-7, abs=1e-9)


def test_checkpoint_equals_direct_with_several_events_and_a_neural_field():
    """A small network field, a jump that scales the state, a non-terminal event without jump: the checkpoint's
    replayed gradients equal direct's (same discrete computation), and both match central finite differences."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(F64)
    c = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def f(t, y):
        return torch.stack([y[1], -y[0]]) + 0.1 * net(y)

    evs = [neurodyn.Event(lambda t, y: y[0] - c, direction=-1, terminal=False,
                          jump=lambda t, y: y * torch.tensor([1.0, 0.9], dtype=F64)),
           neurodyn.Event(lambda t, y: y[1], terminal=False)]
    t = torch.linspace(0, 12, 7, dtype=F64)

    def run(gradient, y0):
        sol = neurodyn.solve(f, y0, t, events=evs, gradient=gradient, params=[c, *net.parameters()], rtol=1e-9,
                             atol=1e-11, checkpoints=3)
        return sol, sol.ys.pow(2).sum() + sol.events.t.sum() + sol.events.y.sum()

    y0 = torch.tensor([1.0, 0.2], dtype=F64, requires_grad=True)
    params = [y0, c, *net.parameters()]
    sol_d, l_d = run("direct", y0)
    sol_c, l_c = run("checkpoint", y0)
    assert len(sol_d.events) >= 5 and sol_d.events.index.tolist() == sol_c.events.index.tolist()
    assert sorted(set(sol_d.events.index.tolist())) == [0, 1]
    gd = torch.autograd.grad(l_d, params)
    gc = torch.autograd.grad(l_c, params)
    for a, b in zip(gd, gc):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    eps = 1e-6
    with torch.no_grad():
        for i in range(2):
            d = torch.zeros(2, dtype=F64)
            d[i] = eps
            fd = (run("direct", y0 + d)[1] - run("direct", y0 - d)[1]) / (2 * eps)
            assert float(gd[0][i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)
        c0 = float(c)
        c.fill_(c0 + eps)
        lp = run("direct", y0)[1]
        c.fill_(c0 - eps)
        lm = run("direct", y0)[1]
        c.fill_(c0)
    assert float(gd[1]) == pytest.approx(float((lp - lm) / (2 * eps)), rel=1e-5, abs=1e-7)


def test_adjoint_exact_for_events_without_jumps_clear_errors_otherwise():
    g = torch.tensor(9.81, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(InputError, match="jump or a terminal event.*checkpoint"):
        neurodyn.solve(ball(g), y0, t, events=[bounce(0.9)], gradient="adjoint", params=[g])
    with pytest.raises(InputError, match="jump or a terminal event"):
        neurodyn.solve(ball(g), y0, t, event_fn=lambda t, y: y[0], gradient="interpolated", params=[g])
    # Watching only: sol.ys's gradient is the direct one; the event outputs refuse a gradient.
    watch = [neurodyn.Event(lambda t, y: y[0] - 0.5, terminal=False)]
    sol_a = neurodyn.solve(ball(g), y0, t, events=watch, gradient="adjoint", params=[g], **TOL)
    sol_d = neurodyn.solve(ball(g), y0, t, events=watch, **TOL)
    ga = torch.autograd.grad(sol_a.ys.sum(), (g, y0))
    gd = torch.autograd.grad(sol_d.ys.sum(), (g, y0))
    for a, b in zip(ga, gd):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert abs(float(sol_a.events.t[0]) - math.sqrt(1 / 9.81)) < 1e-10
    with pytest.raises(InputError, match="gradient of sol.ys only"):
        torch.autograd.grad(sol_a.events.t.sum(), g)


# ------------------------------------------------------------------------------------------ scipy
def _scipy_events(fun, y0, span, specs):
    evs = []
    for g, d in specs:
        def ev(t, y, g=g):
            return g(t, y)
        ev.direction = d
        evs.append(ev)
    r = solve_ivp(fun, span, y0, method="DOP853", rtol=1e-13, atol=1e-14, events=evs)
    return sorted((float(t), i) for i, ts in enumerate(r.t_events) for t in ts)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_event_lists_match_scipy_solve_ivp(method):
    """Oscillator with damping and a forcing term: three events with directions; every crossing's time and index
    against scipy's event list (both at tight tolerance)."""
    def fun(t, y):
        return [y[1], -y[0] - 0.1 * y[1] + 0.3 * math.sin(2 * t)]

    def f(t, y):
        return torch.stack([y[1], -y[0] - 0.1 * y[1] + 0.3 * torch.sin(2 * t)])

    specs = [(lambda t, y: y[0], 0), (lambda t, y: y[1] - 0.2, 1), (lambda t, y: y[0] + 0.4 * y[1] - 0.3, -1)]
    want = _scipy_events(fun, [1.0, 0.0], (0.0, 15.0), specs)
    evs = [neurodyn.Event(g, direction=d, terminal=False) for g, d in specs]
    sol = neurodyn.solve(f, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 15.0], dtype=F64),
                         method=method, events=evs, rtol=1e-12, atol=1e-14)
    got = list(zip(sol.events.t.tolist(), sol.events.index.tolist()))
    assert len(got) == len(want) and len(want) >= 10
    assert [i for _, i in got] == [i for _, i in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-10
    # the states at the events: each event's function is ~0 there
    for (t_e, i), y_e in zip(got, sol.events.y):
        assert abs(float(specs[i][0](t_e, y_e))) < 1e-10


def test_sin_crossings_match_scipy_and_closed_form():
    """y = sin t: crossings at k pi, upward ones (direction +1) at even k."""
    osc = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    sol = neurodyn.solve(osc, torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([0.0, 20.0], dtype=F64),
                         events=[neurodyn.Event(lambda t, y: y[0], terminal=False),
                                 neurodyn.Event(lambda t, y: y[0], direction=1, terminal=False)], rtol=1e-12,
                         atol=1e-14)
    both = [t for t, i in zip(sol.events.t.tolist(), sol.events.index.tolist()) if i == 0]
    up = [t for t, i in zip(sol.events.t.tolist(), sol.events.index.tolist()) if i == 1]
    assert max(abs(t - math.pi * (k + 1)) for k, t in enumerate(both)) < 1e-10 and len(both) == 6
    assert max(abs(t - 2 * math.pi * (k + 1)) for k, t in enumerate(up)) < 1e-10 and len(up) == 3
    want = _scipy_events(lambda t, y: [y[1], -y[0]], [0.0, 1.0], (0.0, 20.0), [(lambda t, y: y[0], 0)])
    # (scipy also reports g(t0) = 0 as an event; neurodyn watches a component from its first nonzero value)
    want = [w for w in want if w[0] > 0]
    assert len(want) == len(both) and max(abs(a - b) for a, (b, _) in zip(both, want)) < 1e-10


# ------------------------------------------------------------------------------------------ terminal, Zeno
def test_terminal_after_n_occurrences():
    osc = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    t = torch.linspace(0, 20, 21, dtype=F64)
    sol = neurodyn.solve(osc, torch.tensor([0.0, 1.0], dtype=F64), t,
                         events=[neurodyn.Event(lambda t, y: y[0], terminal=3),
                                 neurodyn.Event(lambda t, y: y[1], terminal=False)], **TOL)
    assert sol.status == "event" and abs(float(sol.event_t) - 3 * math.pi) < 1e-9
    assert sol.events.index.tolist() == [1, 0, 1, 0, 1, 0]  # cos t = 0 at pi/2, 3pi/2, 5pi/2
    assert sol.n_valid == 10 and torch.isnan(sol.ys[10:]).all()
    torch.testing.assert_close(sol.ys[:10, 0], torch.sin(t[:10]), rtol=0, atol=1e-8)
    assert abs(float(sol.y_final[1]) + 1.0) < 1e-9


def test_zeno_status_keeps_the_partial_solution():
    """e = 0.5: the bounce intervals 2 e^k v1 / g halve; with min_event_gap=0.01 the first too close is refused."""
    g, e, h0 = 9.81, 0.5, 1.0
    exact, v1 = bounce_times(g, e, h0, 20)
    k_bad = next(k for k in range(1, 20) if exact[k] - exact[k - 1] < 0.01)
    t = torch.linspace(0, 3, 31, dtype=F64)
    y0 = torch.tensor([h0, 0.0], dtype=F64)
    with pytest.raises(ZenoError, match="Zeno behaviour at t=.*min_event_gap=0.01") as info:
        neurodyn.solve(ball(g), y0, t, events=[bounce(e)], min_event_gap=0.01, **TOL)
    sol = info.value.solution
    assert sol.status == "zeno" and len(sol.events) == k_bad
    assert abs(sol.t_final - exact[k_bad]) < 1e-9
    assert max(abs(a - b) for a, b in zip(sol.events.t.tolist(), exact)) < 1e-9
    valid = int((t <= exact[k_bad]).sum())
    assert sol.n_valid == valid and torch.isnan(sol.ys[valid:]).all()
    assert abs(float(sol.ys[valid - 1, 0]) - height(float(t[valid - 1]), g, e, h0)) < 1e-9
    # max_events
    sol = neurodyn.solve(ball(g), y0, t, events=[bounce(e)], max_events=4, on_failure="return", **TOL)
    assert sol.status == "zeno" and len(sol.events) == 4 and abs(sol.t_final - exact[4]) < 1e-9
    assert "more than max_events=4" in sol.message
    with pytest.raises(neurodyn.SolveFailure, match="cannot differentiate a failed solve"):
        y0g = y0.clone().requires_grad_(True)
        s = neurodyn.solve(ball(g), y0g, t, events=[bounce(e)], max_events=4, on_failure="return",
                           gradient="checkpoint", **TOL)
        s.ys[:3].sum().backward()


def test_odeint_event_is_the_terminal_event():
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t_e, s = neurodyn.odeint_event(ball(9.81), y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0],
                                   rtol=1e-10, atol=1e-12)
    sol = neurodyn.solve(ball(9.81), y0, torch.tensor([0.0, 10.0], dtype=F64),
                         events=[neurodyn.Event(lambda t, y: y[0])], **TOL)
    # the same event to rounding (the two solves' last steps round differently on some CPUs: 5e-14 on an AMD EPYC)
    assert abs(float(t_e) - float(sol.event_t)) < 1e-12 and abs(float(t_e) - math.sqrt(2 / 9.81)) < 1e-12


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(fn=3), "fn must be callable"),
    (dict(fn=lambda t, y: y[0], direction=2), "direction must be 0"),
    (dict(fn=lambda t, y: y[0], direction=True), "direction must be 0"),
    (dict(fn=lambda t, y: y[0], terminal=0), "terminal must be True, False or an int"),
    (dict(fn=lambda t, y: y[0], terminal=1.5), "terminal must be True, False or an int"),
    (dict(fn=lambda t, y: y[0], jump="flip"), "jump must be callable"),
    (dict(fn=lambda t, y: y[0], samples=-1), "samples must be an int >= 0"),
    (dict(fn=lambda t, y: y[0], samples=True), "samples must be an int >= 0"),
    (dict(fn=lambda t, y: y[0], samples=2.0), "samples must be an int >= 0"),
])
def test_bad_event_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        neurodyn.Event(**kwargs)


def test_bad_event_use_is_an_input_error_before_work():
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    f = ball(9.81)
    calls = []

    def counted(t, y):
        calls.append(1)
        return f(t, y)
    with pytest.raises(InputError, match=r"events\[1\] is a function, not a neurodyn.Event"):
        neurodyn.solve(counted, y0, t, events=[neurodyn.Event(lambda t, y: y[0]), lambda t, y: y[0]])
    with pytest.raises(InputError, match="event_fn or events, not both"):
        neurodyn.solve(counted, y0, t, events=[], event_fn=lambda t, y: y[0])
    with pytest.raises(InputError, match="max_events must be an int"):
        neurodyn.solve(counted, y0, t, events=[], max_events=-1)
    with pytest.raises(InputError, match="min_event_gap must be a finite number"):
        neurodyn.solve(counted, y0, t, events=[], min_event_gap=float("nan"))
    assert not calls
    with pytest.raises(InputError, match="must return a tensor.*got float"):
        neurodyn.solve(f, y0, t, events=[neurodyn.Event(lambda t, y: 0.5)])
    with pytest.raises(InputError, match="real tensor.*comparison"):
        neurodyn.solve(f, y0, t, events=[neurodyn.Event(lambda t, y: y[0] > 0)])
    with pytest.raises(InputError, match="returned 2 values at t=.* but 1 at the initial time"):
        neurodyn.solve(f, y0, t, events=[neurodyn.Event(lambda t, y: y[0] if float(t) == 0 else y)])
    bad_jump = neurodyn.Event(lambda t, y: y[0], jump=lambda t, y: y[:1], terminal=False)
    with pytest.raises(InputError, match=r"jump\(t, y\) must return the new state.*shape \(2,\).*got shape \(1,\)"):
        neurodyn.solve(f, y0, t, events=[bad_jump])


def test_checkpoint_refuses_event_tensors_outside_params():
    e = torch.tensor(0.9, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    with pytest.raises(InputError, match=r"events\[0\]\.jump: .*not among its parameters"):
        neurodyn.solve(ball(9.81), y0, torch.tensor([0.0, 2.0], dtype=F64), events=[bounce(e)],
                       gradient="checkpoint")
    sol = neurodyn.solve(ball(9.81), y0, torch.tensor([0.0, 2.0], dtype=F64), events=[bounce(e)],
                         gradient="checkpoint", params=[e], **TOL)
    (ge,) = torch.autograd.grad(sol.ys[-1, 0], e)
    ts, v1 = bounce_times(9.81, e, 1.0, 6)
    (want,) = torch.autograd.grad(torch.as_tensor(height(2.0, 9.81, e, 1.0)), e)
    assert float(ge) == pytest.approx(float(want), rel=1e-7)


# ------------------------------------------------------------------------------------------ the demo
def test_bouncing_ball_demo_meets_its_targets(tmp_path):
    """10 bounces to 1e-9 of the closed form; g and e recovered within 1e-3 from noisy heights (metrics.json)."""
    import json

    from neurodyn.demos.bouncing_ball import experiment

    m = experiment(tmp_path, plots=False, n_obs=25, stream=open("/dev/null", "w"))
    assert m["bounces_found"] == 10 and m["bounce_time_max_error"] < 1e-9
    assert m["g_abs_error"] < 1e-3 and m["e_abs_error"] < 1e-3 and m["recovered_within_1e_3"]
    assert abs(m["g_init"] - m["g_true"]) > 0.5  # it did learn
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["g_learned"] == m["g_learned"]


def test_zeno_detected_where_bounces_accumulate():
    """e = 0.5 over [0, 3]: the bounces accumulate at t_1 (1 + 2 e / (1 - e)) = 3 t_1; with the default limits the
    solve stops there with status "zeno" (the ball does not fall through the floor)."""
    t = torch.linspace(0, 3, 7, dtype=F64)
    sol = neurodyn.solve(ball(9.81), torch.tensor([1.0, 0.0], dtype=F64), t, events=[bounce(0.5)],
                         on_failure="return", **TOL)
    t_acc = 3 * math.sqrt(2 / 9.81)
    assert sol.status == "zeno" and abs(sol.t_final - t_acc) < 1e-6 and "would occur again" in sol.message
    assert len(sol.events) > 15 and float(sol.events.y[:, 0].abs().max()) < 1e-9
    assert sol.n_valid == 3 and float(sol.ys[:3, 0].min()) >= 0


# ------------------------------------------------------------------------------------------ per-sample
def _row_ball(gs, es):
    def f(t, y):
        return torch.stack([y[:, 1], -gs * torch.ones_like(y[:, 1])], 1)
    ev = neurodyn.Event(lambda t, y: y[:, 0], direction=-1, terminal=False,
                        jump=lambda t, y: torch.stack([y[:, 0], -es * y[:, 1]], 1))
    return f, ev


def test_per_sample_bounces_each_row_its_own_closed_form_and_gradients():
    gs = torch.tensor([9.81, 5.0, 9.81, 2.0], dtype=F64, requires_grad=True)
    es = torch.tensor([0.9, 0.8, 0.6, 0.7], dtype=F64, requires_grad=True)
    f, ev = _row_ball(gs, es)
    y0 = torch.tensor([[1.0, 0.0]] * 4, dtype=F64)
    t = torch.linspace(0, 1.7, 5, dtype=F64)
    sol = neurodyn.solve(f, y0, t, events=[ev], per_sample_steps=True, **TOL)
    assert sol.sample_status == ["success"] * 4
    loss = 0.0
    want_loss = 0.0
    gs2 = gs.detach().clone().requires_grad_(True)
    es2 = es.detach().clone().requires_grad_(True)
    for b in range(4):
        got = sol.events.t[sol.events.sample == b]
        exact, _ = bounce_times(float(gs[b]), float(es[b]), 1.0, 30)
        exact = [x for x in exact if x <= 1.7]
        assert len(got) == len(exact) >= 1
        assert max(abs(a - c) for a, c in zip(got.tolist(), exact)) < 1e-9
        loss = loss + got.sum()
        ts, _ = bounce_times(gs2[b], es2[b], 1.0, len(exact))
        want_loss = want_loss + torch.stack(ts).sum()
        # heights at the output times, after the jumps
        for i, tt in enumerate(t.tolist()):
            assert abs(float(sol.ys[i, b, 0]) - height(tt, float(gs[b]), float(es[b]), 1.0)) < 1e-9
    got_g = torch.autograd.grad(loss + sol.ys[-1, :, 0].sum(), (gs, es))
    hs = torch.stack([torch.as_tensor(height(1.7, gs2[b], es2[b], 1.0)) for b in range(4)])
    want_g = torch.autograd.grad(want_loss + hs.sum(), (gs2, es2))
    for a, c in zip(got_g, want_g):
        torch.testing.assert_close(a, c, rtol=1e-7, atol=1e-9)


def test_per_sample_terminal_and_zeno_rows():
    gs = torch.tensor([9.81, 9.81, 9.81], dtype=F64)
    es = torch.tensor([0.9, 0.5, 0.9], dtype=F64)
    f, ev = _row_ball(gs, es)
    # (samples: row 2 rises through 0.3 and falls back below it inside one step; the step ends alone miss that)
    stop = neurodyn.Event(lambda t, y: y[:, 0] - torch.tensor([2.0, 2.0, 0.3], dtype=F64), direction=1, samples=3)
    y0 = torch.tensor([[1.0, 0.0]] * 3, dtype=F64)
    sol = neurodyn.solve(f, y0, torch.linspace(0, 3, 7, dtype=F64), events=[ev, stop], per_sample_steps=True,
                         on_failure="return", **TOL)
    assert sol.sample_status == ["success", "zeno", "event"]
    t1 = math.sqrt(2 / 9.81)
    assert abs(float(sol.t_final_per_sample[1]) - 3 * t1) < 1e-6
    # row 2 stops when rising through 0.3 after its first bounce: v = 0.9 v1, 0.3 = v s - g s^2 / 2
    v = 0.9 * 9.81 * t1
    s = (v - math.sqrt(v * v - 2 * 9.81 * 0.3)) / 9.81
    assert abs(float(sol.t_final_per_sample[2]) - (t1 + s)) < 1e-9
    last = sol.events.index[sol.events.sample == 2].tolist()
    assert last == [0, 1]


def test_per_sample_events_bad_input():
    f, _ = _row_ball(torch.tensor([9.81, 9.81], dtype=F64), torch.tensor([0.9, 0.9], dtype=F64))
    y0 = torch.tensor([[1.0, 0.0]] * 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match=r"one real value per row, shape \(2,\)"):
        neurodyn.solve(f, y0, t, events=[neurodyn.Event(lambda t, y: y[0, 0])], per_sample_steps=True)
    with pytest.raises(InputError, match="gradient='direct' only"):
        neurodyn.solve(f, y0, t, events=[neurodyn.Event(lambda t, y: y[:, 0])], per_sample_steps=True,
                       gradient="checkpoint")


# ------------------------------------------------------------------------------ jump_t: even steps to a jump
JUMPS = [1.0, 1.7, 3.1]


def _piecewise(rates):
    """``t -> rates[i]`` on the i-th piece between the jump times ``JUMPS``."""
    return lambda t: rates[sum(float(t) >= j for j in JUMPS)]


def _solve_with_steps(f, y0, ts, **kw):
    """The solution with ``jump_t=JUMPS`` and its accepted steps' sizes on each piece ``[0, 1], [1, 1.7],
    [1.7, 3.1], [3.1, ts[-1]]``."""
    steps = []
    sol = neurodyn.solve(f, y0, ts, jump_t=JUMPS,
                         step_callbacks={"accept": lambda t, y, h: steps.append((float(t), float(h)))}, **kw)
    edges = [0.0, *JUMPS, float(ts[-1])]
    return sol, [[h for t, h in steps if a - 1e-12 <= t < b - 1e-12] for a, b in zip(edges, edges[1:])]


def test_adaptive_steps_split_the_distance_to_a_jump_evenly():
    """Toward a jump time an adaptive step is the distance split into equal steps no larger than the controller's
    proposal (control.even_step), not steps of the proposal and a sliver landing on the jump. A constant rate on each
    piece: the error estimate is zero, so every proposal is max_step = 0.3 (ifactor growth, clipped). Each piece
    ending at a jump takes ceil(length / 0.3) equal steps; the last piece, ending at the final time (no jump), takes
    steps of 0.3 and a shorter one landing on it, as before. The solution (piecewise linear) is exact to rounding."""
    rate = _piecewise([1.0, -3.0, 0.5, 2.0])
    sol, pieces = _solve_with_steps(lambda t, y: rate(t) * torch.ones_like(y), torch.zeros(1, dtype=F64),
                                    torch.tensor([0.0, 4.2], dtype=F64), first_step=0.3, max_step=0.3, **TOL)
    for hs, n, length in zip(pieces[:3], [4, 3, 5], [1.0, 0.7, 1.4]):
        assert len(hs) == n and max(abs(h - length / n) for h in hs) < 1e-12, hs
    assert len(pieces[3]) == 4 and all(abs(h - 0.3) < 1e-12 for h in pieces[3][:3]), pieces[3]
    assert abs(pieces[3][3] - 0.2) < 1e-12
    assert sol.stats["steps"] == 16 and sol.stats["rejected"] == 0
    assert abs(float(sol.ys[-1, 0]) - (1.0 - 3.0 * 0.7 + 0.5 * 1.4 + 2.0 * 1.1)) < 1e-12


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fixed_steps_split_the_distance_to_a_jump_evenly(method):
    """Fixed steps toward a jump time: the distance split into ceil(length / step_size) equal steps (as adaptive
    steps toward a jump), not steps of step_size and a sliver landing on the jump; toward the final time (no jump),
    steps of step_size and a shorter last one, as before. step_size = 0.3 on pieces of 1.0, 0.7 and 1.4: 4, 3 and 5
    equal steps. y' = -a(t) y, piecewise: every step stays inside one piece, so the result is the method's exact
    one-step factor per step (Euler: 1 - a h; rk4: its degree-4 Taylor polynomial of exp(-a h))."""
    rates = [1.0, 3.0, 0.5, 2.0]
    rate = _piecewise(rates)
    sol, pieces = _solve_with_steps(lambda t, y: -rate(t) * y, torch.ones(1, dtype=F64),
                                    torch.tensor([0.0, 4.2], dtype=F64), method=method, step_size=0.3)
    for hs, n, length in zip(pieces[:3], [4, 3, 5], [1.0, 0.7, 1.4]):
        assert len(hs) == n and max(abs(h - length / n) for h in hs) < 1e-12, hs
    assert [round(h, 12) for h in pieces[3]] == [0.3, 0.3, 0.3, 0.2], pieces[3]

    def factor(z):  # the method's growth factor for y' = lambda y, z = lambda h
        return 1.0 + z if method == "euler" else 1.0 + z + z * z / 2 + z ** 3 / 6 + z ** 4 / 24

    expected = 1.0
    for a, hs in zip(rates, pieces):
        for h in hs:
            expected *= factor(-a * h)
    assert abs(float(sol.ys[-1, 0]) - expected) < 1e-13, (float(sol.ys[-1, 0]), expected)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_no_sliver_step_before_a_jump_and_the_tolerance_met(method):
    """y' = -a(t) y with a rate jumping at each of JUMPS: on every piece ending at a jump no accepted step is a
    sliver (the last step, landing on the jump, is at least half the one before it; without the even split dopri5's
    is 0.47 of it on [1, 1.7], and in general as small as the rounding), and the solution matches the exact one at
    every output time."""
    rates = [1.0, 3.0, 0.5, 2.0]
    rate = _piecewise(rates)
    ts = torch.tensor([0.0, 0.6, 1.0, 1.3, 1.7, 2.5, 3.1, 4.0], dtype=F64)
    sol, pieces = _solve_with_steps(lambda t, y: -rate(t) * y, torch.ones(1, dtype=F64), ts, method=method,
                                    rtol=1e-6, atol=1e-9)
    assert sol.status == "success"
    for hs in pieces[:3]:
        assert len(hs) >= 3 and hs[-1] >= 0.5 * hs[-2], hs
    edges = [0.0, *JUMPS, math.inf]
    exact = [math.exp(-sum(a * max(0.0, min(float(t), hi) - lo) for a, lo, hi in zip(rates, edges, edges[1:])))
             for t in ts]
    torch.testing.assert_close(sol.ys[:, 0], torch.tensor(exact, dtype=F64), rtol=0, atol=5e-6)
