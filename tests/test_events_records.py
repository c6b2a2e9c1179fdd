"""The roots located after the solve (``EventWatch.finish``): a solve whose occurrences were all located there
returns them stacked (``EventRecords``), equal to the checks and roots located in the loop and to the closed forms;
the kept steps of a one-component event are scanned on one list of values, as the generic scan of several
components; the first estimate (``_poly_root``) and the rounds (``_rounds``) keep their accuracy and bracket
contract."""

import math

import numpy as np
import pytest
import torch

import neurodyn
from neurodyn.core import events, output
from neurodyn.core.events import EventRecords, _crossing_many, _poly_root

F64 = torch.float64


def osc(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], -1)


def in_loop(monkeypatch):
    """Every step's sign checks in the loop (the path before deferred checks)."""
    monkeypatch.setattr(events.EventWatch, "_lazy_ok", lambda self, solver, co: False)


def solve_osc(evs, t_end=30.0, **kw):
    # y = A (sin(t + phi), cos(t + phi)), A = hypot(0.3, 1), phi = atan2(0.3, 1)
    y0 = torch.tensor([0.3, 1.0], dtype=F64)
    opts = dict(rtol=1e-10, atol=1e-12)
    opts.update(kw)
    with torch.no_grad():
        return neurodyn.solve(osc, y0, torch.tensor([0.0, t_end], dtype=F64), events=evs, **opts)


PHI = math.atan2(0.3, 1.0)


@pytest.mark.parametrize("direction", [0, 1, -1])
def test_all_deferred_records_stacked_match_the_loop_and_closed_forms(direction, monkeypatch):
    """sin(t + phi) = 0 at k pi - phi (upwards for even k, downwards for odd k): every occurrence located after the
    solve comes back as EventRecords (stacked times, states, indices), with the closed-form times to 1e-9 (the
    solver's accuracy), the loop path's times to the root resolution and its states, and the direction filter."""
    seen = []
    orig = output.stack_events

    def spy(records, *args):
        seen.append(records)
        return orig(records, *args)

    monkeypatch.setattr(output, "stack_events", spy)
    ev = [neurodyn.Event(lambda t, y: y[..., 0], terminal=False, direction=direction)]
    sol = solve_osc(ev)
    assert isinstance(seen[-1], EventRecords)
    rec = seen[-1]
    assert len(rec) == len(sol.events) and rec.index == [0] * len(rec)
    t_i, y_i, e_i = rec[2]
    assert float(t_i) == float(sol.events.t[2]) and torch.equal(y_i, sol.events.y[2]) and e_i == 0
    assert [float(r[0]) for r in rec[1:3]] == sol.events.t[1:3].tolist()
    ks = [k for k in range(1, 10) if direction == 0 or (k % 2 == 0) == (direction > 0)]
    expect = torch.tensor([k * math.pi - PHI for k in ks], dtype=F64)
    assert sol.events.t.shape == expect.shape
    assert float((sol.events.t - expect).abs().max()) < 1e-9
    assert float(sol.events.y[:, 0].abs().max()) < 1e-9
    with monkeypatch.context() as m:
        in_loop(m)
        loop = solve_osc([neurodyn.Event(lambda t, y: y[..., 0], terminal=False, direction=direction,
                                         vectorized=False)])
    assert not isinstance(seen[-1], EventRecords)  # located in the loop: a list of records
    assert loop.events.index.tolist() == sol.events.index.tolist()
    assert float((sol.events.t - loop.events.t).abs().max()) <= 2 * events.ROOT_RTOL * 30.0
    assert float((sol.events.y - loop.events.y).abs().max()) < 1e-10


def test_records_of_the_loop_and_of_deferred_roots_interleave_in_time_order():
    """A terminal-count event (located in the loop) beside a deferred one: the records are a list in time order,
    the counts and closed forms of both."""
    evs = [neurodyn.Event(lambda t, y: y[..., 0], terminal=False),
           neurodyn.Event(lambda t, y: y[..., 1] - 0.5, terminal=4, direction=-1)]
    sol = solve_osc(evs)
    amp = math.hypot(0.3, 1.0)
    # cos(t + phi) = 0.5 / A downwards at t = acos(0.5 / A) - phi + 2 pi k
    down = [math.acos(0.5 / amp) - PHI + 2 * math.pi * k for k in range(4)]
    zeros = [k * math.pi - PHI for k in range(1, 10) if k * math.pi - PHI < down[-1]]
    expect = sorted([(x, 0) for x in zeros] + [(x, 1) for x in down])
    assert sol.status == "event"
    assert sol.events.index.tolist() == [i for _, i in expect]
    assert float((sol.events.t - torch.tensor([x for x, _ in expect], dtype=F64)).abs().max()) < 1e-9


@pytest.mark.parametrize("direction", [0, 1, -1])
def test_one_component_scan_equals_the_scan_of_several(direction):
    """y = cos t, g = y + cos(delta) (two roots inside one step at loose tolerances, steps up to 1): the event alone
    (one component: the one-list scan) and with a second component that never crosses (the generic scan) give
    the same roots, at pi -/+ delta to the solver's accuracy, in each direction."""
    delta = 0.2
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 12.0], dtype=F64)
    kw = dict(rtol=1e-2, atol=1e-4, max_step=1.0)
    one = neurodyn.Event(lambda t, y: y[..., 0] + math.cos(delta), terminal=False, direction=direction)
    two = neurodyn.Event(lambda t, y: torch.stack([y[..., 0] + math.cos(delta), 3.0 + y[..., 1]], -1),
                         terminal=False, direction=direction)
    with torch.no_grad():
        steps = []
        a = neurodyn.solve(osc, y0, t, events=[one], step_callbacks={"accept": lambda t0, y, h: steps.append(
            (t0, t0 + h))}, **kw)
        b = neurodyn.solve(osc, y0, t, events=[two], **kw)
    assert any(s < math.pi - delta and math.pi + delta < e for s, e in steps)  # both roots of a pair in one step
    roots = [r for k in (1, 3) for r in (k * math.pi - delta, k * math.pi + delta)]
    expect = [r for i, r in enumerate(roots) if direction == 0 or (i % 2 == 1) == (direction > 0)]
    assert a.events.t.shape == (len(expect),)
    assert float((a.events.t - torch.tensor(expect, dtype=F64)).abs().max()) < 5e-3
    assert a.events.index.tolist() == b.events.index.tolist()
    assert float((a.events.t - b.events.t).abs().max()) <= 2 * events.ROOT_RTOL * 12.0


@pytest.mark.parametrize("kind", ["cubic", "sine"])
def test_poly_root_within_a_hundredth_of_its_error_estimate(kind):
    """The zero in the bracket of the polynomial through the nodes, to a hundredth of the returned error estimate
    (Newton's method stops there): for a cubic through four nodes the interpolant is the cubic, so that is its
    zero; for a sine through five nodes, the interpolant's zero by numpy's polynomial roots (independent), and the
    estimate bounds the distance to the sine's zero. With the tolerance above the estimate, to the tolerance."""
    root = 0.3710
    g = (lambda x: (x - root) * (x + 0.4) * (x - 1.7)) if kind == "cubic" else (lambda x: math.sin(4.0 * (x - root)))
    nodes = [0.25, 0.5, 0.0, 0.75] if kind == "cubic" else [0.25, 0.5, 0.0, 0.75, 1.0]
    pts = [(x, g(x)) for x in nodes]
    x, err = _poly_root(pts, 0.25, g(0.25), 0.5, g(0.5), 1e-14)
    coeffs = np.polyfit(nodes, [v for _, v in pts], len(nodes) - 1)
    zeros = [z.real for z in np.roots(coeffs) if abs(z.imag) < 1e-9 and 0.25 < z.real < 0.5]
    assert len(zeros) == 1
    assert abs(x - zeros[0]) <= 0.01 * err + 1e-14
    if kind == "cubic":
        assert abs(zeros[0] - root) < 1e-12
    else:
        assert abs(x - root) <= err < 1e-2
    # a tolerance coarser than a hundredth of the estimate: Newton's method stops at it
    x2, _ = _poly_root(pts, 0.25, g(0.25), 0.5, g(0.5), 1e-6)
    assert abs(x2 - zeros[0]) <= 1e-6


@pytest.mark.parametrize("root", [0.61803398875, 0.75 - 0.3e-12])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounds_end_past_the_crossing_or_at_an_exact_zero(sign, root):
    """The rounds return the bracket end past the crossing (g of the other sign than at a, within res of the
    zero), also when the zero lies within res of b (no probe may be past it: the bracket ends at b itself), and an
    exact zero where a probe hits one; in both orientations of the sign change."""
    res = 1e-12

    def g(x):
        return sign * math.sin(3.0 * (x - root))

    x = _crossing_many(lambda xs: [g(p) for p in xs], 0.5, g(0.5), 0.75, g(0.75), res, [(0.25, g(0.25)), (1.0, g(1.0))])
    assert 0.0 <= x - root <= res and (g(x) > 0) == (sign > 0)
    hit = _crossing_many(lambda xs: [0.0 if p == 0.6 else sign * (p - 0.6) for p in xs], 0.5, -0.1 * sign, 0.75,
                         0.15 * sign, res, [(0.25, -0.35 * sign), (1.0, 0.4 * sign)])
    assert hit == 0.6 or 0.0 <= hit - 0.6 <= res


def test_kept_buffer_reused_by_the_next_solve_leaves_earlier_results_alone():
    """The kept steps' buffer goes back to a pool at the end of a solve and the next solve of the same layout
    takes it: an earlier solution's events (times, states) are unchanged by a later solve that reuses it, and each
    solve's events are their closed forms (y = A sin(t + phi): zeros at k pi - phi, for two amplitudes/phases)."""
    ev = [neurodyn.Event(lambda t, y: y[..., 0], terminal=False)]
    first = solve_osc(ev)
    kept_t, kept_y = first.events.t.clone(), first.events.y.clone()
    assert any(key[:2] == (8, 2) for key in events._KEPT_POOL)  # dopri5: 7 stages + the start, 2 elements
    with torch.no_grad():
        second = neurodyn.solve(osc, torch.tensor([-1.2, 0.5], dtype=F64), torch.tensor([0.0, 30.0], dtype=F64),
                                rtol=1e-10, atol=1e-12, events=ev)
    assert torch.equal(first.events.t, kept_t) and torch.equal(first.events.y, kept_y)
    phi2 = math.atan2(-1.2, 0.5)
    expect2 = [k * math.pi - phi2 for k in range(0, 11) if 0 < k * math.pi - phi2 < 30.0]
    assert float((second.events.t - torch.tensor(expect2, dtype=F64)).abs().max()) < 1e-9
    expect1 = [k * math.pi - PHI for k in range(1, 10)]
    assert float((first.events.t - torch.tensor(expect1, dtype=F64)).abs().max()) < 1e-9


@pytest.mark.parametrize("samples", [0, 1, 3, 4, 7])
def test_sample_nodes_are_the_nodes_picked_from_the_samples(samples):
    """The first estimate's nodes taken by index for a bracket that is a sample interval (``_sample_nodes``) are
    the ones ``_nodes`` picks from the step's other sample points, in the same order, for every interval."""
    rng = np.random.default_rng(samples)
    th = (0.0, *((i + 1) / (samples + 1) for i in range(samples)), 1.0)
    for j in range(len(th) - 1):
        vals = rng.uniform(-1.0, 1.0, len(th)).tolist()
        known = [(t, v) for t, v in zip(th, vals) if t != th[j]]
        picked = events._nodes(known, th[j], vals[j], th[j + 1], vals[j + 1])
        assert [(th[q], vals[q]) for q in events._sample_nodes(th, j)] == picked
        assert len(picked) == min(samples, 4) + 2
