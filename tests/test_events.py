"""Events: odeint_event's edge cases (root at t0, no root, bad event values) and the engine's root finding (close
pairs of roots inside one step, discontinuous and steep event functions), against closed forms and torchdiffeq."""

import math

import pytest
import torch
import torchdiffeq

import neurodyn
from neurodyn.compat import torchdiffeq as compat
from neurodyn.errors import InputError, NoEventError

F64 = torch.float64


def decay(t, y):
    return -y


def osc(t, y):
    return torch.stack([y[1], -y[0]])


def t0_():
    return torch.tensor(0.0, dtype=F64)


# ------------------------------------------------------------------------------------------ plain roots
@pytest.mark.parametrize("c", [0.5, 0.1])
def test_decay_root_closed_form_and_torchdiffeq(c):
    """y' = -y, y(0) = y0 = 1, g = y - c: the root is t = log(y0/c); d t / d c = -1/c, d t / d y0 = 1/y0."""
    cc = torch.tensor(c, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    ev = lambda t, y: y[0] - cc  # noqa: E731
    t_e, sol = neurodyn.odeint_event(decay, y0, t0_(), event_fn=ev, rtol=1e-10, atol=1e-12)
    assert abs(float(t_e.detach()) - math.log(1 / c)) < 1e-8
    assert abs(float(sol[-1, 0].detach()) - c) < 1e-9
    g_c, g_y0 = torch.autograd.grad(t_e, (cc, y0))
    assert float(g_c) == pytest.approx(-1 / c, rel=1e-6)
    assert float(g_y0[0]) == pytest.approx(1.0, rel=1e-6)
    td_t, td_sol = torchdiffeq.odeint_event(decay, y0, t0_(), event_fn=ev, rtol=1e-10, atol=1e-12)
    assert abs(float(t_e.detach()) - float(td_t.detach())) < 1e-8
    # (torchdiffeq routes the event time's gradient to the state only, not to event_fn's own tensors)
    (td_gy0,) = torch.autograd.grad(td_t, y0)
    assert float(g_y0[0]) == pytest.approx(float(td_gy0[0]), rel=1e-6)


# ------------------------------------------------------------------------------------------ root at t0
def test_root_at_t0_is_the_event_as_torchdiffeq():
    """y0 = c: the event is at t0 itself (torchdiffeq returns t0); the gradients are those of t = t0 + log(y0 / c)
    (for y0 >= c): d t / d c = -1/c, d t / d y0 = 1/y0, and d t / d t0 = 1."""
    c = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.5], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.25, dtype=F64, requires_grad=True)
    ev = lambda t, y: y[0] - c  # noqa: E731
    t_e, sol = neurodyn.odeint_event(decay, y0, t0, event_fn=ev, rtol=1e-10, atol=1e-12)
    assert float(t_e.detach()) == 0.25
    torch.testing.assert_close(sol.detach(), torch.tensor([[0.5], [0.5]], dtype=F64), rtol=0, atol=0)
    g_c, g_y0, g_t0 = torch.autograd.grad(t_e, (c, y0, t0), retain_graph=True)
    assert float(g_c) == pytest.approx(-2.0, rel=1e-12)
    assert float(g_y0[0]) == pytest.approx(2.0, rel=1e-12)
    assert float(g_t0) == pytest.approx(1.0, rel=1e-12)
    # The event state y(t_e) = c whatever c is: d y_e / d c = 1.
    (gs_c,) = torch.autograd.grad(sol[-1, 0], c)
    assert float(gs_c) == pytest.approx(1.0, rel=1e-12)
    td_t, td_sol = torchdiffeq.odeint_event(decay, y0, t0, event_fn=ev, rtol=1e-10, atol=1e-12)
    assert float(td_t.detach()) == float(t_e.detach())
    torch.testing.assert_close(td_sol.detach(), sol.detach(), rtol=0, atol=0)
    # (torchdiffeq's gradients here are 0: it does not route them through a root found before the first step.)


def test_root_at_t0_any_component_and_reverse_time():
    y0 = torch.tensor([0.5], dtype=F64)
    # The second of two components is zero at t0.
    ev = lambda t, y: torch.stack([y[0] - 0.1, y[0] - 0.5])  # noqa: E731
    for reverse in (False, True):
        t_e, sol = neurodyn.odeint_event(decay, y0, torch.tensor(1.5, dtype=F64), event_fn=ev, reverse_time=reverse)
        td_t, td_sol = torchdiffeq.odeint_event(decay, y0, torch.tensor(1.5, dtype=F64), event_fn=ev,
                                                reverse_time=reverse)
        assert float(t_e.detach()) == float(td_t.detach()) == 1.5
        torch.testing.assert_close(sol, td_sol, rtol=0, atol=0)
    # Tuple states: the event sees the tuple.
    t_e, (a, b) = neurodyn.odeint_event(lambda t, s: (-s[0], -s[1]), (y0, y0.clone()), t0_(),
                                        event_fn=lambda t, s: s[1][0] - 0.5)
    assert float(t_e.detach()) == 0.0 and a.shape == (2, 1) and float(b[-1, 0]) == 0.5


def test_solve_watches_a_component_that_starts_at_zero():
    """solve keeps its own rule: a root at the initial time does not stop it. y = sin t: next root at pi."""
    sol = neurodyn.solve(osc, torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64),
                         rtol=1e-10, atol=1e-12, event_fn=lambda t, y: y[0])
    assert sol.status == "event" and abs(float(sol.event_t) - math.pi) < 1e-8


# ------------------------------------------------------------------------------------------ no root
def test_no_event_before_t_max():
    """y' = -y from 1 never reaches -1: the search stops at t_max with a NoEventError naming it."""
    y0 = torch.tensor([1.0], dtype=F64)
    with pytest.raises(NoEventError, match="no event before t_max=5") as err:
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=lambda t, y: y[0] + 1.0, t_max=5.0)
    assert err.value.status == "success" and err.value.t == 5.0
    assert abs(float(err.value.solution.y_final[0]) - math.exp(-5.0)) < 1e-7
    with pytest.raises(NoEventError, match="t_max=-3") as err:
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=lambda t, y: y[0] + 1.0, t_max=-3.0, reverse_time=True)
    assert err.value.t == -3.0 and abs(float(err.value.solution.y_final[0]) - math.exp(3.0)) < 1e-5
    # The bound still finds a root before it.
    t_e, _ = neurodyn.odeint_event(decay, y0, t0_(), event_fn=lambda t, y: y[0] - 0.5, t_max=5.0, rtol=1e-10,
                                   atol=1e-12)
    assert abs(float(t_e.detach()) - math.log(2.0)) < 1e-8
    with pytest.raises(InputError, match="t_max must be one finite time after t0"):
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=lambda t, y: y[0] - 0.5, t_max=-1.0)
    with pytest.raises(InputError, match="t_max needs odeint_interface"):
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=lambda t, y: y[0] - 0.5, t_max=1.0,
                              odeint_interface=torchdiffeq.odeint)


def test_no_event_within_the_step_budget(monkeypatch):
    y0 = torch.tensor([1.0], dtype=F64)
    never = lambda t, y: y[0] + 1.0  # noqa: E731
    with pytest.raises(NoEventError, match=r"max_num_steps \(200 steps\).*t_max=") as err:
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=never, options={"max_num_steps": 200})
    assert err.value.status == "max_steps_reached" and err.value.solution.stats["steps"] <= 200
    # Without max_num_steps the search has a default budget (torchdiffeq's is 2**31 - 1 steps: it never ends).
    monkeypatch.setattr(compat, "EVENT_MAX_STEPS", 300)
    with pytest.raises(NoEventError, match=r"default step budget \(300 steps\)"):
        neurodyn.odeint_event(decay, y0, t0_(), event_fn=never)
    with pytest.raises(NoEventError, match=r"default step budget \(300 steps\)"):
        neurodyn.odeint(decay, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=never)


# ------------------------------------------------------------------------------------------ bad event values
class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return -y


@pytest.mark.parametrize("bad, match", [
    (lambda t, y: float(y[0]) - 0.5, "got float"),
    (lambda t, y: None, "got NoneType"),
    (lambda t, y: y[0] > 0.5, "dtype torch.bool"),
    (lambda t, y: (y[0] - 0.5).to(torch.complex128), "dtype torch.complex128"),
    (lambda t, y: y[:0], "empty tensor"),
    (lambda t, y: torch.sqrt(y[0] - 2.0), "NaN at the initial time"),
], ids=["float", "none", "bool", "complex", "empty", "nan"])
def test_bad_event_values_are_input_errors_before_work(bad, match):
    y0 = torch.tensor([1.0], dtype=F64)
    f = Counting()
    with pytest.raises(InputError, match=match):
        neurodyn.odeint_event(f, y0, t0_(), event_fn=bad)
    assert f.calls == 0
    with pytest.raises(InputError, match=match):
        neurodyn.solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=bad)
    assert f.calls == 1  # solve's own check of func(t0, y0) only: no step taken


def test_event_values_checked_along_the_solution():
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    grows = lambda t, y: y[0] - 0.1 if float(t) < 1.0 else torch.stack([y[0], y[0]])  # noqa: E731
    with pytest.raises(InputError, match=r"returned 2 values at t=1\..* but 1 at the initial time"):
        neurodyn.solve(decay, y0, t, event_fn=grows)
    to_float = lambda t, y: y[0] - 0.1 if float(t) < 1.0 else 0.5  # noqa: E731
    with pytest.raises(InputError, match=r"got float at t=1\."):
        neurodyn.solve(decay, y0, t, event_fn=to_float)
    nan_late = lambda t, y: torch.log(y[0] - 0.2)  # noqa: E731  (y < 0.2 after t = log 5 = 1.609)
    with pytest.raises(InputError, match=r"NaN at t=1\.[6-9]"):
        neurodyn.solve(decay, y0, t, event_fn=nan_late)


# ------------------------------------------------------------------------------------------ close roots
@pytest.mark.parametrize("method, rtol, delta, tol", [("dopri8", 1e-8, 0.05, 1e-5), ("dopri8", 1e-10, 0.1, 1e-6),
                                                      ("dopri8", 1e-8, 0.1, 1e-5), ("tsit5", 1e-4, 0.1, 1e-3)])
def test_two_roots_inside_one_step(method, rtol, delta, tol):
    """y = cos t; g = y + cos(delta) < 0 only on (pi - delta, pi + delta): two roots closer than a step, with the
    same sign of g at both step ends. The first, pi - delta, is the event."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ev = lambda t, y: y[0] + math.cos(delta)  # noqa: E731
    sol = neurodyn.solve(osc, y0, torch.tensor([0.0, 6.0], dtype=F64), method=method, rtol=rtol, atol=rtol * 1e-2,
                         event_fn=ev)
    assert sol.status == "event" and abs(float(sol.event_t) - (math.pi - delta)) < tol
    t_e, s = neurodyn.odeint_event(osc, y0, t0_(), event_fn=ev, method=method, rtol=rtol, atol=rtol * 1e-2)
    assert abs(float(t_e.detach()) - (math.pi - delta)) < tol
    assert abs(float(s[-1, 1]) + math.sin(delta)) < 10 * tol  # y' = -sin t
    # torchdiffeq sees both roots only with steps shorter than their distance; then it agrees.
    td_method = "dopri5" if method == "tsit5" else method  # (torchdiffeq has no tsit5)
    td_t, _ = torchdiffeq.odeint_event(osc, y0, t0_(), event_fn=ev, method=td_method, rtol=rtol,
                                       atol=rtol * 1e-2, options={"max_step": delta / 2})
    assert abs(float(t_e.detach()) - float(td_t.detach())) < 2 * tol


@pytest.mark.parametrize("method, extra", [("dopri5", 0), ("tsit5", 0), ("bdf", 0), ("radau", 0), ("adams", 0),
                                           ("kvaerno5", 0), ("dopri8", 3)])
def test_sub_point_checks_cost_no_field_evaluations(method, extra):
    """The interior sign checks use dense output that comes with the step; DOP853's own needs three extra stages, so
    after the first step its checks use cubic Hermite (the end derivative is the next step's first stage)."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 6.0], dtype=F64)
    plain = neurodyn.solve(osc, y0, t, method=method, rtol=1e-8, atol=1e-10)
    watched = neurodyn.solve(osc, y0, t, method=method, rtol=1e-8, atol=1e-10, event_fn=lambda t, y: y[0] + 2.0)
    assert watched.status == "success" and watched.stats["steps"] == plain.stats["steps"]
    assert watched.stats["nfe"] == plain.stats["nfe"] + extra


def test_two_roots_inside_one_fixed_step():
    """rk4 with step 0.5: the steps [3, 3.5] holds both roots pi -+ 0.1; cubic Hermite sub-points see them."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    sol = neurodyn.solve(osc, y0, torch.tensor([0.0, 6.0], dtype=F64), method="rk4", step_size=0.5,
                         event_fn=lambda t, y: y[0] + math.cos(0.1))
    assert sol.status == "event" and abs(float(sol.event_t) - (math.pi - 0.1)) < 0.02


# ------------------------------------------------------------------------------------------ discontinuous g
C = 0.3
T_C = math.log(1 / C)  # y' = -y from 1 crosses C here


def _jump(above: float, below: float):
    """A sign-type event function: ``above`` while y > C, ``below`` after (y' = -y from 1 crosses C at T_C)."""
    def g(t, y):
        return torch.where(y[0] > C, torch.tensor(above, dtype=F64), torch.tensor(below, dtype=F64))
    return g


@pytest.mark.parametrize("name, g, rtol, tol", [
    ("sign", lambda t, y: torch.sign(y[0] - C), 1e-10, 1e-8),
    ("lopsided", _jump(1.0, -1e80), 1e-10, 1e-8),
    ("lopsided", _jump(1.0, -1e80), 1e-6, 1e-6),
    ("lopsided_up", _jump(1e13, -1.0), 1e-6, 1e-6),
    ("pole", lambda t, y: 1.0 / (y[0] - C), 1e-10, 1e-8),
], ids=["sign", "lopsided", "lopsided_loose", "lopsided_up_loose", "pole"])
def test_discontinuous_event_function_gives_the_crossing(name, g, rtol, tol):
    """The located time is the crossing to the solution's accuracy (the dense output's error at rtol), not a point
    inside a bracket the secant steps stalled in."""
    y0 = torch.tensor([1.0], dtype=F64)
    sol = neurodyn.solve(decay, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=rtol, atol=rtol * 1e-2, event_fn=g)
    assert sol.status == "event"
    assert abs(float(sol.event_t) - T_C) < tol, (name, float(sol.event_t), T_C)
    assert abs(float(sol.y_final[0]) - C) < tol
    t_e, _ = neurodyn.odeint_event(decay, y0, t0_(), event_fn=g, rtol=rtol, atol=rtol * 1e-2)
    assert abs(float(t_e.detach()) - T_C) < tol
    if name != "pole":  # torchdiffeq bisects on the sign: the same crossing (to its time tolerance, atol)
        td_t, _ = torchdiffeq.odeint_event(decay, y0, t0_(), event_fn=g, rtol=rtol, atol=rtol * 1e-2)
        assert abs(float(t_e.detach()) - float(td_t.detach())) < tol / 5


def test_steep_continuous_event_function_is_zero_at_the_root():
    """g = y - C above C, 1e80 (y - C) below: continuous, so the located point must have g ~ 0 (|y - C| tiny),
    not the middle of a bracket the secant steps never shrank."""
    y0 = torch.tensor([1.0], dtype=F64)
    g = lambda t, y: torch.where(y[0] > C, y[0] - C, 1e80 * (y[0] - C))  # noqa: E731
    sol = neurodyn.solve(decay, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=1e-10, atol=1e-12, event_fn=g)
    assert sol.status == "event" and abs(float(sol.event_t) - T_C) < 1e-8
    assert abs(float(sol.y_final[0]) - C) < 1e-8
    td_t, _ = torchdiffeq.odeint_event(decay, y0, t0_(), event_fn=g, rtol=1e-10, atol=1e-12)
    assert abs(float(sol.event_t) - float(td_t.detach())) < 1e-9


def test_step_end_checks_only_with_samples_zero():
    """``Event(samples=0)`` checks the step ends only (scipy's semantics): no extra field evaluation even for DOP853,
    and two roots inside one step are seen exactly when some accepted step end falls between them."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    tt = torch.tensor([0.0, 6.0], dtype=F64)
    kw = dict(method="dopri8", rtol=1e-8, atol=1e-10)
    plain = neurodyn.solve(osc, y0, tt, **kw)
    never = neurodyn.solve(osc, y0, tt, events=[neurodyn.Event(lambda t, y: y[0] + 2.0, samples=0)], **kw)
    assert never.status == "success" and never.stats["nfe"] == plain.stats["nfe"]
    delta = 0.1
    ev = lambda t, y: y[0] + math.cos(delta)  # noqa: E731  (g < 0 only on (pi - delta, pi + delta))
    ends = [6.0]
    neurodyn.solve(osc, y0, tt, step_callbacks={"accept": lambda t, y, h: ends.append(t + h)}, **kw)
    between = any(math.pi - delta < te < math.pi + delta for te in ends)
    ends_only = neurodyn.solve(osc, y0, tt, events=[neurodyn.Event(ev, samples=0)], **kw)
    assert ends_only.status == ("event" if between else "success")
    sampled = neurodyn.solve(osc, y0, tt, events=[neurodyn.Event(ev)], **kw)  # default: 3 interior checks
    assert sampled.status == "event" and abs(float(sampled.event_t) - (math.pi - delta)) < 1e-5
