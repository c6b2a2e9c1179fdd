"""Cost of event handling: a solve with a non-terminal event in (about) every step against the same solve without
events, interleaved in one process (ratios, not times).

The event function is ``g(t, y) = sin(w t) + 1e-9 y[0, 0]`` with ``w = pi N / T``, ``N`` the number of steps the plain
solve takes: about one crossing per step (the table gives events per step). Fields: the benchmark protocol's MLP
cases (``benchmarks/common.py``), ``dopri5``, ``torch.no_grad()`` and one thread. Each variant's time is the median of
``REPS`` interleaved runs; the ratio is events / plain. "watched, no crossing": the same function plus 2 (checked at
the step's sub-points every step, never crossing) / plain.

Run: ``taskset -c 1 python benchmarks/bench_events.py [case ...]``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from common import CASES, make_problem  # noqa: E402

import neurodyn as nd

REPS = 9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_case(name: str, method: str = "dopri5") -> dict:
    case = CASES[name]
    prob = make_problem(case)
    f, y0, t = prob.field, prob.y0, prob.t
    kw = dict(method=method, rtol=case.rtol, atol=case.atol)
    with torch.no_grad():
        plain = nd.solve(f, y0, t, **kw)
        n = plain.stats["steps"]
        w = math.pi * n / case.T

        def g(tt, y):
            return torch.sin(w * tt) + 1e-9 * y[0, 0]

        def g_never(tt, y):  # the same function shifted: watched every step, never crossing
            return 2.0 + torch.sin(w * tt) + 1e-9 * y[0, 0]

        ev = [nd.Event(g, terminal=False)]
        never = [nd.Event(g_never, terminal=False)]
        watched = nd.solve(f, y0, t, events=ev, **kw)
        assert watched.stats["steps"] == n, (watched.stats["steps"], n)
        n_ev = len(watched.events)
        times = {"plain": [], "events": [], "watch": []}
        for _ in range(REPS):
            times["plain"].append(_time(lambda: nd.solve(f, y0, t, **kw)))
            times["events"].append(_time(lambda: nd.solve(f, y0, t, events=ev, **kw)))
            times["watch"].append(_time(lambda: nd.solve(f, y0, t, events=never, **kw)))
    tp, te, tw = (statistics.median(times[k]) for k in ("plain", "events", "watch"))
    ratios = [b / a for a, b in zip(times["plain"], times["events"])]
    return {"case": name, "steps": n, "events": n_ev, "plain_ms": 1e3 * tp, "events_ms": 1e3 * te,
            "ratio": te / tp, "ratio_min": min(ratios), "ratio_max": max(ratios), "watch_ratio": tw / tp}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| case | steps | events | plain (ms) | with events (ms) | ratio (median) | ratio range | watched, no "
          "crossing |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        r = run_case(name)
        print(f"| {r['case']} | {r['steps']} | {r['events']} | {r['plain_ms']:.1f} | {r['events_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['watch_ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["small", "batched", "medium"])
