"""Cost of event handling: a solve with a non-terminal event in (about) every step against the same solve without
events, interleaved in one process (ratios, not times).

The event function is ``g(t, y) = sin(pi phi(t)) + 1e-9 y[0, 0]``, ``phi`` piecewise linear with ``phi = k + 0.3`` at
the end of the plain solve's ``k``-th step: exactly one crossing in every step, at 70% of it (the solve with the
event takes the same steps; the table gives the events counted). Fields: the benchmark protocol's MLP cases
(``benchmarks/common.py``), ``dopri5``, ``torch.no_grad()`` and one thread. Each variant's time is the median of
``REPS`` interleaved runs; the ratio is events / plain. The function is written twice with the same values: with
tensor ops that take a leading dimension of points (``phi`` looked up by ``torch.searchsorted``: the engine then
evaluates a step's sample points, and each round of a root's probes, in one call) and, as before, point by point
(``phi`` by ``bisect`` on ``float(t)``: one call per point). "watched, no crossing": the first function plus 2
(checked every step, never crossing) / plain.

Run: ``taskset -c 1 python benchmarks/bench_events.py [--cpu] [case ...]``; ``--cpu`` times with the thread's CPU
clock (``time.thread_time``) instead of the wall clock, which the other processes of a shared machine disturb less.
"""

from __future__ import annotations

import bisect
import math
import statistics
import sys
import time

import torch
from common import CASES, make_problem  # noqa: E402

import neurodyn as nd

REPS = 15


CLOCK = time.perf_counter


def _time(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def run_case(name: str, method: str = "dopri5") -> dict:
    case = CASES[name]
    prob = make_problem(case)
    f, y0, t = prob.field, prob.y0, prob.t
    kw = dict(method=method, rtol=case.rtol, atol=case.atol)
    with torch.no_grad():
        ends = [float(t[0])]
        plain = nd.solve(f, y0, t, step_callbacks={"accept": lambda t0, y, h: ends.append(t0 + h)}, **kw)
        n = plain.stats["steps"]
        # phi(t) = k + 0.3 at ends[k] (k >= 1), phi(t0) = 0.5: the zeros of sin(pi phi) fall at phi = 1, 2, ...
        knots = [0.5] + [k + 0.3 for k in range(1, n + 1)]
        slopes = [(knots[i + 1] - knots[i]) / (ends[i + 1] - ends[i]) for i in range(n)]

        def phi_coeffs(tt):  # phi = a t + b on the segment holding tt
            i = min(max(bisect.bisect_right(ends, float(tt)) - 1, 0), n - 1)
            return math.pi * slopes[i], math.pi * (knots[i] - slopes[i] * ends[i])

        def g(tt, y):
            a, b = phi_coeffs(tt)
            return torch.sin(a * tt + b) + 1e-9 * y[0, 0]

        # The same g with tensor ops that take a leading dimension of points (t: (m,), y: (m, *shape)).
        ends_t = torch.tensor(ends, dtype=t.dtype)
        a_t = torch.tensor([math.pi * s for s in slopes], dtype=t.dtype)
        b_t = torch.tensor([math.pi * (knots[i] - slopes[i] * ends[i]) for i in range(n)], dtype=t.dtype)

        def g_points(tt, y):
            i = (torch.searchsorted(ends_t, tt, right=True) - 1).clamp(0, n - 1)
            return torch.sin(a_t[i] * tt + b_t[i]) + 1e-9 * y[..., 0, 0]

        def g_never(tt, y):  # the same function shifted: watched every step, never crossing
            return 2.0 + g_points(tt, y)

        ev = [nd.Event(g_points, terminal=False)]
        ev_point = [nd.Event(g, terminal=False)]
        never = [nd.Event(g_never, terminal=False)]
        watched = nd.solve(f, y0, t, events=ev, **kw)
        by_point = nd.solve(f, y0, t, events=ev_point, **kw)
        assert watched.stats["steps"] == n == by_point.stats["steps"], (watched.stats["steps"], n)
        assert len(watched.events) == len(by_point.events) == n
        # both locate the same crossings (to the root finding's resolution)
        assert float((watched.events.t - by_point.events.t).abs().max()) < 1e-9
        n_ev = len(watched.events)
        times = {"plain": [], "events": [], "point": [], "watch": []}
        for _ in range(REPS):
            times["plain"].append(_time(lambda: nd.solve(f, y0, t, **kw)))
            times["events"].append(_time(lambda: nd.solve(f, y0, t, events=ev, **kw)))
            times["point"].append(_time(lambda: nd.solve(f, y0, t, events=ev_point, **kw)))
            times["watch"].append(_time(lambda: nd.solve(f, y0, t, events=never, **kw)))
    tp, te, to, tw = (statistics.median(times[k]) for k in ("plain", "events", "point", "watch"))
    ratios = [b / a for a, b in zip(times["plain"], times["events"])]
    return {"case": name, "steps": n, "events": n_ev, "plain_ms": 1e3 * tp, "events_ms": 1e3 * te,
            "ratio": te / tp, "ratio_min": min(ratios), "ratio_max": max(ratios), "point_ratio": to / tp,
            "watch_ratio": tw / tp}


def main(names: list[str]) -> None:
    global CLOCK
    torch.set_num_threads(1)
    if "--cpu" in names:
        CLOCK = time.thread_time
        names = [n for n in names if n != "--cpu"] or ["small", "batched", "medium"]
    print("| case | steps | events | plain (ms) | with events (ms) | ratio (median) | ratio range | g point by point "
          "| watched, no crossing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = run_case(name)
        print(f"| {r['case']} | {r['steps']} | {r['events']} | {r['plain_ms']:.1f} | {r['events_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['point_ratio']:.3f} | "
              f"{r['watch_ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["small", "batched", "medium"])
