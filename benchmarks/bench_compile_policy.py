#!/usr/bin/env python
"""``solve(compile=True)`` against eager, per protocol case: eager, compiled steps, compiled whole loop (both forced)
and the path ``neurodyn.compile.policy`` chooses, interleaved in one process, median wall of the timed runs.

Usage::

    taskset -c 1 .venv/bin/python benchmarks/bench_compile_policy.py                 # all four cases, dopri5
    taskset -c 1 .venv/bin/python benchmarks/bench_compile_policy.py --cases small,batched --repeats 7

Prints a markdown table: case, eager ms, compiled-step ms, compiled-loop ms, chosen path and its ms, ratio to eager.
The first solve of each variant (compilation, the policy's measurement) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import CASES, make_problem  # noqa: E402

VARIANTS = ("eager", "step", "loop", "chosen")


def run(nd, prob, method: str, variant: str):
    """One solve of ``variant``: ``step``/``loop`` force the compiled path (policy off), ``chosen`` is compile=True."""
    import neurodyn.compile.loop as cl
    import neurodyn.compile.policy as cp

    c = prob.case
    saved = cl.worthwhile, cp.FORCE
    if variant in ("step", "loop"):
        cp.FORCE = "compiled"
        cl.worthwhile = (lambda y0, n: variant == "loop")
    try:
        return nd.solve(prob.field, prob.y0, prob.t, method=method, rtol=c.rtol, atol=c.atol,
                        compile=variant != "eager")
    finally:
        cl.worthwhile, cp.FORCE = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--method", default="dopri5")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    common.setup_torch()
    nd, reason = common.import_neurodyn()
    if nd is None:
        print(f"neurodyn not importable: {reason}", file=sys.stderr)
        return 1
    rows = []
    for name in args.cases.split(","):
        prob = make_problem(CASES[name.strip()])
        with torch.no_grad():
            first = {}
            for v in VARIANTS:
                s = time.perf_counter()
                sol = run(nd, prob, args.method, v)
                first[v] = time.perf_counter() - s
                run(nd, prob, args.method, v)
                if v == "chosen":
                    path, why = sol.stats.get("compiled"), sol.stats.get("compile_reason", "")
            walls = {v: [] for v in VARIANTS}
            for r in range(args.repeats):
                for v in VARIANTS[r % 4:] + VARIANTS[: r % 4]:
                    s = time.perf_counter()
                    run(nd, prob, args.method, v)
                    walls[v].append(time.perf_counter() - s)
        med = {v: statistics.median(w) * 1e3 for v, w in walls.items()}
        rows.append((name, med, path, why, first))
        print(f"[{name}] {path}: {why}; first solves (s): "
              + ", ".join(f"{v} {first[v]:.2f}" for v in VARIANTS), file=sys.stderr, flush=True)
    print("| case | eager ms | compiled-step ms | compiled-loop ms | chosen path | chosen ms | chosen / eager |"
          "\n|---|---|---|---|---|---|---|")
    for name, med, path, _, _ in rows:
        print(f"| {name} | {med['eager']:.3g} | {med['step']:.3g} ({med['step'] / med['eager']:.2f}x) "
              f"| {med['loop']:.3g} ({med['loop'] / med['eager']:.2f}x) | {path} | {med['chosen']:.3g} "
              f"| {med['chosen'] / med['eager']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
