"""Event functions that take a leading dimension of points (Event(vectorized=...)): the stacked evaluation of a
step's sample points and of the root finding's probes gives the closed-form event times and the same occurrences as
the point-by-point path; functions of one point are recognised and evaluated point by point; many components are
compared on the device."""

import math

import pytest
import torch

import neurodyn
from neurodyn.core import events
from neurodyn.core.events import _crossing_many
from neurodyn.errors import InputError

F64 = torch.float64


def osc(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], -1)


class Recorder:
    """Wraps an event function, recording the shape of every ``t`` it is called with."""

    def __init__(self, fn):
        self.fn, self.t_shapes = fn, []

    def __call__(self, t, y):
        self.t_shapes.append(tuple(t.shape))
        return self.fn(t, y)


@pytest.mark.parametrize("stacked_roots", [True, False])
@pytest.mark.parametrize("method, tol", [("dopri5", 1e-7), ("tsit5", 1e-7), ("bdf", 1e-5)])
@pytest.mark.parametrize("delta", [0.3, 0.05])
def test_two_close_roots_stacked_match_closed_form(method, tol, delta, stacked_roots, monkeypatch):
    """y = cos t; g = y + cos(delta) is negative only on (pi - delta, pi + delta): with stacked calls (the sample
    points; the root's probes too, or one point per call) the first root, pi - delta, is found to the resolution,
    and fewer calls are made than point by point."""
    monkeypatch.setattr(events, "STACKED_ROOTS", stacked_roots)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 6.0], dtype=F64)
    stacked = Recorder(lambda t, y: y[..., 0] + math.cos(delta))
    sol = neurodyn.solve(osc, y0, t, method=method, rtol=1e-8, atol=1e-10, events=[neurodyn.Event(stacked)])
    assert sol.status == "event" and abs(float(sol.event_t) - (math.pi - delta)) < tol  # the solver's accuracy
    assert any(len(s) == 1 and s[0] > 1 for s in stacked.t_shapes)  # stacked calls happened
    single = Recorder(lambda t, y: y[..., 0] + math.cos(delta))
    ref = neurodyn.solve(osc, y0, t, method=method, rtol=1e-8, atol=1e-10,
                         events=[neurodyn.Event(single, vectorized=False)])
    assert all(s == () for s in single.t_shapes)
    assert abs(float(sol.event_t) - float(ref.event_t)) < 1e-11
    assert len(stacked.t_shapes) < len(single.t_shapes)


@pytest.mark.parametrize("samples", [0, 3, 7])
@pytest.mark.parametrize("stacked_roots", [True, False])
def test_nonterminal_crossings_of_sine_at_multiples_of_pi(samples, stacked_roots, monkeypatch):
    """y = (sin t, cos t): sin t crosses zero at k pi; every crossing on [0.5, 20] found in order, to 1e-10."""
    monkeypatch.setattr(events, "STACKED_ROOTS", stacked_roots)
    y0 = torch.tensor([math.sin(0.5), math.cos(0.5)], dtype=F64)
    t = torch.tensor([0.5, 20.0], dtype=F64)
    field = lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1)  # noqa: E731
    ev = neurodyn.Event(lambda t, y: y[..., 0], terminal=False, samples=samples)
    sol = neurodyn.solve(field, y0, t, rtol=1e-10, atol=1e-12, events=[ev])
    expect = torch.tensor([k * math.pi for k in range(1, 7)], dtype=F64)
    assert sol.status == "success" and len(sol.events) == 6
    assert float((sol.events.t - expect).abs().max()) < 1e-10


def test_function_indexing_the_first_dimension_is_evaluated_point_by_point():
    """g = y[-1] on a state of shape (4,) returns the last point's whole state when given stacked points: it is
    recognised as a function of one point (whatever the number of sample points) and the crossing is right."""
    y0 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    rec = Recorder(lambda t, y: y[-1] - 0.5)
    sol = neurodyn.solve(lambda t, y: -y, y0, torch.tensor([0.0, 2.0], dtype=F64), rtol=1e-10, atol=1e-12,
                         events=[neurodyn.Event(rec)])
    assert sol.status == "event" and abs(float(sol.event_t) - math.log(2.0)) < 1e-9
    stacked = [s for s in rec.t_shapes if s != ()]
    assert len(stacked) == 1  # the one stacked call that found out


def test_function_of_a_python_float_falls_back():
    """float(t) fails on stacked times: the function is evaluated point by point."""
    rec = Recorder(lambda t, y: y[0] - math.exp(-float(t)) * 0.0 - 0.25)
    sol = neurodyn.solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64),
                         rtol=1e-10, atol=1e-12, events=[neurodyn.Event(rec)])
    assert sol.status == "event" and abs(float(sol.event_t) - math.log(4.0)) < 1e-9


def test_many_components_compared_on_the_device():
    """Twelve levels c_j of y = exp(-t) (more than the components checked on the host): every crossing at
    log(1 / c_j), in time order, with its component's event index."""
    levels = torch.linspace(0.9, 0.05, 12, dtype=F64)
    ev_stacked = neurodyn.Event(lambda t, y: y[..., :1] - levels, terminal=False)
    ev_single = neurodyn.Event(lambda t, y: y[0] - levels, terminal=False, vectorized=False)
    for ev in (ev_stacked, ev_single):
        sol = neurodyn.solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 4.0], dtype=F64),
                             rtol=1e-10, atol=1e-12, events=[ev])
        assert len(sol.events) == 12
        assert float((sol.events.t - torch.log(1.0 / levels)).abs().max()) < 1e-9


@pytest.mark.parametrize("stacked_roots", [True, False])
def test_bouncing_ball_stacked_event_and_jump(stacked_roots, monkeypatch):
    """A ball dropped from 1 m with restitution 0.9: ten bounce times against the closed form to 1e-9."""
    monkeypatch.setattr(events, "STACKED_ROOTS", stacked_roots)
    g0, e = 9.81, 0.9
    field = lambda t, y: torch.stack([y[..., 1], torch.full_like(y[..., 1], -g0)], -1)  # noqa: E731
    bounce = neurodyn.Event(lambda t, y: y[..., 0], direction=-1, terminal=10,
                            jump=lambda t, y: torch.stack([y[0], -e * y[1]]))
    sol = neurodyn.solve(field, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 10.0], dtype=F64),
                         rtol=1e-12, atol=1e-12, events=[bounce])
    t1 = math.sqrt(2.0 / g0)
    expect = [t1 + sum(2 * t1 * e ** k for k in range(1, n)) for n in range(1, 11)]
    assert sol.status == "event" and len(sol.events) == 10
    assert max(abs(float(a) - b) for a, b in zip(sol.events.t, expect)) < 1e-9


def test_vectorized_true_with_a_function_of_one_point_is_refused():
    ev = neurodyn.Event(lambda t, y: y[0] - 0.5, vectorized=True)
    with pytest.raises(InputError, match="vectorized"):
        neurodyn.solve(lambda t, y: -y, torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                       events=[ev])


def test_vectorized_must_be_none_or_bool():
    with pytest.raises(InputError, match="vectorized"):
        neurodyn.Event(lambda t, y: y[0], vectorized="yes")


@pytest.mark.parametrize("kind", ["smooth", "step", "pole"])
def test_crossing_many_reaches_the_resolution(kind):
    """The stacked root finding returns the far end of a bracket of width res around the sign change, for a smooth
    g (in two rounds), a jump and a pole (a sign change without a zero)."""
    root, res = 0.6180339887, 1e-12
    g = {"smooth": lambda x: math.sin(3.0 * (x - root)),
         "step": lambda x: -1.0 if x < root else 2.0,
         "pole": lambda x: -1.0 / (x - root) if x != root else math.inf}[kind]
    rounds = []

    def g_many(xs):
        rounds.append(len(xs))
        return [g(x) for x in xs]

    a, b = 0.5, 0.75
    x = _crossing_many(g_many, a, g(a), b, g(b), res, [(0.25, g(0.25)), (1.0, g(1.0))])
    assert 0.0 <= x - root <= res  # the bracket end past the crossing
    if kind == "smooth":
        assert len(rounds) <= 2
    # a round that shrinks the bracket less than _COARSE + 1 times is followed by one that spreads probes over it
    assert len(rounds) <= 2 * math.ceil(math.log((b - a) / res) / math.log(events._COARSE + 1)) + 1


def test_events_under_inference_mode():
    """The sample points' dense output and the stacked calls work on inference tensors (no version counter)."""
    with torch.inference_mode():
        for ev in (neurodyn.Event(lambda t, y: y[..., 0] - 0.5), neurodyn.Event(lambda t, y: y[0] - 0.5)):
            sol = neurodyn.solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                                 rtol=1e-10, atol=1e-12, events=[ev])
            assert sol.status == "event" and abs(float(sol.event_t) - math.log(2.0)) < 1e-9


def test_deferred_roots_interleave_with_jumps_and_match_one_point_location():
    """y = (sin t, cos t) with two events: sin t crossing zero (non-terminal, no jump: located after the solve,
    all roots together) and cos t crossing 0.5 downwards with a jump that multiplies the state by 0.9 (located in
    the loop). Times and event order equal the run with vectorized=False (every root located in the loop) to the
    root finding's resolution (1e-12 relative: brackets of width 1.3e-11 at t = 13), and the closed forms: the
    jump scales the amplitude but keeps the phase, so the roots stay at k pi and 2 k pi + pi / 3."""
    field = lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1)  # noqa: E731
    y0 = torch.tensor([0.0, 1.0], dtype=F64) + torch.tensor([math.sin(0.2), math.cos(0.2) - 1.0], dtype=F64)
    t = torch.tensor([0.2, 13.0], dtype=F64)
    jump = lambda t, y: 0.9 * y  # noqa: E731
    calls = []

    def level(t, y):
        calls.append(tuple(t.shape))
        return y[..., 0]

    sols = []
    for vec in (None, False):
        evs = [neurodyn.Event(level, terminal=False, vectorized=vec),
               neurodyn.Event(lambda t, y: y[..., 1] - 0.5 * (0.9 ** (t / (2 * math.pi)).floor()), direction=-1,
                              terminal=False, jump=jump, vectorized=vec)]
        calls.clear()
        sols.append(neurodyn.solve(field, y0, t, rtol=1e-10, atol=1e-12, events=evs))
        if vec is None:  # the sine's roots: one stacked call per round for all of them, not calls per root
            assert sum(1 for s in calls if s and s[0] > 4) <= 4
    deferred, one_point = sols
    assert deferred.events.index.tolist() == one_point.events.index.tolist()
    assert float((deferred.events.t - one_point.events.t).abs().max()) < 2.6e-11
    expect = sorted([(k * math.pi, 0) for k in range(1, 5)] + [(2 * k * math.pi + math.pi / 3, 1) for k in range(2)])
    assert deferred.events.index.tolist() == [i for _, i in expect]
    assert float((deferred.events.t - torch.tensor([x for x, _ in expect], dtype=F64)).abs().max()) < 1e-9
    # states at the events: the sine's component is zero there
    sine = deferred.events.y[deferred.events.index == 0][:, 0]
    assert float(sine.abs().max()) < 1e-9


@pytest.mark.parametrize("keep_steps", [None, 2])
def test_deferred_roots_with_checkpoint_gradient_equal_direct(monkeypatch, keep_steps):
    """A non-terminal event whose roots are located after the forward pass of gradient="checkpoint" (no graph
    there; with ``keep_steps`` its sign checks are made in chunks of that many kept steps): the event times and
    their gradients with respect to the initial state equal gradient="direct" (roots located in the loop, in the
    graph) and the closed form."""
    from neurodyn.core import events

    chunks = []
    if keep_steps is not None:
        monkeypatch.setattr(events, "_KEEP_STEPS", keep_steps)
        detect = events.EventWatch._detect_kept
        monkeypatch.setattr(events.EventWatch, "_detect_kept",
                            lambda watch, *a, **k: chunks.append(1) or detect(watch, *a, **k))
    field = lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1)  # noqa: E731
    t = torch.tensor([0.0, 12.0], dtype=F64)
    out = {}
    for gradient in ("direct", "checkpoint"):
        y0 = torch.tensor([0.3, 1.0], dtype=F64, requires_grad=True)
        sol = neurodyn.solve(field, y0, t, rtol=1e-10, atol=1e-12, gradient=gradient,
                             events=[neurodyn.Event(lambda t, y: y[..., 0], terminal=False)])
        (grad,) = torch.autograd.grad(sol.events.t.sum(), y0)
        out[gradient] = (sol.events.t.detach(), grad)
    # y = A sin(t + phi), phi = atan2(0.3, 1): the roots are k pi - phi, each with d/dy0 = -dphi/dy0
    phi = math.atan2(0.3, 1.0)
    n = len(out["direct"][0])
    expect = torch.tensor([k * math.pi - phi for k in range(1, n + 1)], dtype=F64)
    dphi = torch.tensor([1.0, -0.3], dtype=F64) / (0.3 ** 2 + 1.0)
    assert torch.allclose(out["direct"][0], out["checkpoint"][0], rtol=0, atol=1e-9)
    for times, grad in out.values():
        assert float((times - expect).abs().max()) < 1e-9
        assert float((grad + n * dphi).abs().max()) < 1e-7
    assert len(chunks) >= (2 if keep_steps is not None else 0)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_interpolate_rows_several_fractions_per_row(method):
    """interpolate_rows with fractions of shape (B, m) (the deferred roots' probes) equals m calls with one fraction
    per row, for a method with its own dense output (dopri5) and one with cubic Hermite output (rk4); on y' = -y,
    with the exact derivatives at the stage times as stages, it is exp(-t) to the interpolant's accuracy."""
    from neurodyn.solvers import get_solver

    solver = get_solver(method)
    co = solver.coefficients(F64, torch.device("cpu"))
    b, n, h = 3, 2, 0.1
    y0 = torch.rand(b, n, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5
    y1 = y0 * math.exp(-h)
    kh = torch.stack([-y0 * math.exp(-c * h) * h for c in list(co.c)[:solver.stages]])  # (s, B, n)
    fh1 = -y1 * h
    th = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6], [0.3, 0.7, 1.0]], dtype=F64)
    many = solver.interpolate_rows(y0, y1, kh, fh1, th, co)
    assert many.shape == (b, 3, n)
    for q in range(3):
        one = solver.interpolate_rows(y0, y1, kh, fh1, th[:, q].contiguous(), co)
        assert torch.equal(many[:, q], one)
    exact = y0.unsqueeze(1) * torch.exp(-h * th).unsqueeze(2)
    assert float((many - exact).abs().max()) < 1e-5
