"""Brownian interval queries per second: neurodyn's BrownianInterval vs torchsde's, side by side in one process.

Both are built as torchsde's ``sdeint`` builds its default (no ``dt`` hint, default cache), values of shape
``(512, 64)`` float32 on CPU, ``[0, 1]``, queries ``[i dt, (i + 1) dt]`` with ``dt = 0.01`` (100 queries):

* ``forward``: a fresh object, the queries in increasing time (a fixed-step forward solve);
* ``backward``: the same object again, in decreasing time (the adjoint's backward pass / a replay);
* ``random``: a fresh object, the queries in a shuffled order (fixed seed);
* ``halves``: a fresh object, each step asked as a whole, then as two halves (an adaptive step rejected and
  retried), in increasing time.

for ``levy_area`` ``none`` and ``space-time`` (the SRK's), plus ``foster`` for ``forward`` (with ``return_A``), and
``BrownianPath`` (torchsde's form ``BrownianPath(t0, w0)``, every value kept) ``forward`` and ``backward``.
Entries run round-robin (one call of each per repeat) so that load changes hit them alike; the figure is the median
over repeats of queries per second on CPU time (``time.process_time``) and wall time. Run it on one core:

    taskset -c 1 .venv/bin/python benchmarks/bench_brownian.py [--repeats 15] [--batch 512 --channels 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torchsde

import neurodyn

DT = 0.01
N_STEPS = 100


def _queries(order: str) -> list[tuple[float, float, dict]]:
    qs = [(i * DT, (i + 1) * DT) for i in range(N_STEPS)]
    if order == "random":
        random.Random(0).shuffle(qs)
    if order == "halves":
        out = []
        for a, b in qs:
            m = 0.5 * (a + b)
            out += [(a, b), (a, m), (m, b)]
        qs = out
    return qs


def _run(make: Callable, order: str, levy: str) -> tuple[float, float, int]:
    """One timed pass: (cpu seconds, wall seconds, number of queries)."""
    kw = {"return_A": True} if levy == "foster" else {}
    if order == "backward":
        bm = make()
        for a, b in _queries("forward"):
            bm(a, b, **kw)
        qs = _queries("forward")[::-1]
    else:
        bm = make()
        qs = _queries(order)
    c0, w0 = time.process_time(), time.perf_counter()
    for a, b in qs:
        bm(a, b, **kw)
    return time.process_time() - c0, time.perf_counter() - w0, len(qs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--channels", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = (args.batch, args.channels)

    w0 = torch.zeros(size)

    def interval(mod):
        def make(levy, seed):
            if levy == "path":
                return lambda: mod.BrownianPath(0.0, w0)
            return lambda: mod.BrownianInterval(0.0, 1.0, size=size, dtype=torch.float32, entropy=seed,
                                                levy_area_approximation=levy)
        return make

    libs = {"neurodyn": interval(neurodyn), "torchsde": interval(torchsde)}
    cases = [(order, levy) for levy in ("none", "space-time") for order in ("forward", "backward", "random", "halves")]
    cases += [("forward", "foster"), ("forward", "path"), ("backward", "path")]
    times: dict[tuple[str, str, str], list[tuple[float, float, int]]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is dropped
        for order, levy in cases:
            for lib, make in libs.items():
                r = _run(make(levy, rep), order, levy)
                if rep:
                    times.setdefault((order, levy, lib), []).append(r)

    print(f"# Brownian interval queries per second, shape {size} float32, dt={DT} on [0, 1], "
          f"median of {args.repeats}, torch {torch.__version__}, torchsde {torchsde.__version__}, "
          f"threads={torch.get_num_threads()}\n")
    print("| queries | levy_area (path: BrownianPath) | neurodyn q/s (CPU) | torchsde q/s (CPU) | speed-up CPU "
          "| speed-up wall |")
    print("|---|---|---:|---:|---:|---:|")
    for order, levy in cases:
        row = {}
        for lib in libs:
            rs = times[(order, levy, lib)]
            n = rs[0][2]
            row[lib] = (n / statistics.median(r[0] for r in rs), n / statistics.median(r[1] for r in rs))
        nd, ts = row["neurodyn"], row["torchsde"]
        print(f"| {order} | {levy} | {nd[0]:,.0f} | {ts[0]:,.0f} | {nd[0] / ts[0]:.2f}x | {nd[1] / ts[1]:.2f}x |")


if __name__ == "__main__":
    main()
