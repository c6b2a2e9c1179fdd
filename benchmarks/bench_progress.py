#!/usr/bin/env python
"""The cost of ``solve(progress=...)`` and ``solve(callback=...)`` on bench_core's small case (dopri5).

Variants, interleaved sample by sample in one process (one core, one torch thread, ``no_grad`` as bench_core):

* ``off``: ``progress=False`` (the reference);
* ``progress``: ``progress=True`` (the default meter: nothing drawn before 0.5 s, so this is the per-attempt
  bookkeeping of a solve this short);
* ``progress-drawn``: a meter that draws (``delay=0``, text to an in-memory stream, at most every 0.1 s: the first
  attempt and the close here);
* ``callback``: a no-op ``callback``;
* ``stepping``: ``neurodyn.init`` / ``neurodyn.step`` to the end (manual stepping).

A round times one block of ``--block`` back-to-back solves of every variant (the order reversed every other
round), in CPU time (``process_time``, by default: the machine is shared; ``--clock wall`` for
``perf_counter``). Reported per variant: the median time per solve, its ratio to ``off``'s median, and the median
(and quartiles) over rounds of the ratio to ``off`` in the same round. (Alternating single solves instead of
blocks measures the switching between code paths, a few percent either way on this machine, not the variants.)
``--components`` adds the cost per attempted step and per solve, each measured where it dominates.

    taskset -c 1 .venv/bin/python benchmarks/bench_progress.py --rounds 60 --components
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="small", choices=list(common.CASES))
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--block", type=int, default=10, help="back-to-back solves of one variant per round")
    ap.add_argument("--components", action="store_true", help="also measure the cost per attempt and per solve")
    ap.add_argument("--blocks", type=int, default=40, help="--components: blocks per variant")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args(argv)

    common.setup_torch()
    import neurodyn as nd
    from neurodyn.progress import SolveProgress

    prob = common.make_problem(common.CASES[args.case])
    c = prob.case
    kw = dict(method="dopri5", rtol=c.rtol, atol=c.atol)
    sink = io.StringIO()
    drawn = SolveProgress(backend="text", stream=sink, delay=0.0, interval=0.1)

    def stepping():
        state = nd.init(prob.field, prob.y0, prob.t, **kw)
        while not state.done:
            state = nd.step(state)
        return state.solution

    variants = {
        "off": lambda: nd.solve(prob.field, prob.y0, prob.t, **kw),
        "progress": lambda: nd.solve(prob.field, prob.y0, prob.t, progress=True, **kw),
        "progress-drawn": lambda: nd.solve(prob.field, prob.y0, prob.t, progress=drawn, **kw),
        "callback": lambda: nd.solve(prob.field, prob.y0, prob.t, callback=lambda t, y, h, a: None, **kw),
        "stepping": stepping,
    }
    with torch.no_grad():
        ref = variants["off"]()
        for name, run in variants.items():  # warm-up, and every variant gives the same solution
            sol = run()
            assert torch.equal(sol.ys, ref.ys) and sol.stats["nfe"] == ref.stats["nfe"], name
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        gc.collect()
        gc.freeze()
        names = list(variants)
        per_call: dict[str, list[float]] = {k: [] for k in names}
        ratios: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.rounds):
            took = {}
            for name in (names if r % 2 == 0 else names[::-1]):
                run = variants[name]
                t0 = clock()
                for _ in range(args.block):
                    run()
                took[name] = (clock() - t0) / args.block
            for name in names:
                per_call[name].append(took[name])
                ratios[name].append(took[name] / took["off"])
    off = statistics.median(per_call["off"])
    print(f"case {c.name} ({c.describe()}), dopri5: {ref.stats['steps']} steps, {ref.stats['rejected']} rejected, "
          f"nfe {ref.stats['nfe']}; {args.rounds} rounds of one block of {args.block} solves per variant, "
          f"{args.clock} time")
    print("| variant | ms per solve (median) | ratio to off (medians) | ratio to off in the same round (median, "
          "quartiles) |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(per_call[name])
        q = statistics.quantiles(ratios[name], n=4)
        print(f"| {name} | {1e3 * med:.3f} | {med / off:.4f} | {statistics.median(ratios[name]):.4f} "
              f"({q[0]:.4f} .. {q[2]:.4f}) |")
    if args.components:
        components(nd, drawn, per_call, names, ref, args)
    return 0


def components(nd, drawn, per_call, names, ref, args) -> None:
    """The added cost as its parts, each measured where it dominates: per attempted step on a cheap field with many
    steps (``dy/dt = -y`` over [0, 20] at rtol 1e-10: 263 steps, a few us each), per solve on the same field over
    a span of one step; then ``fixed + attempts * per_attempt`` for the small case. Blocks of 5 solves, the variants
    interleaved block by block, medians over ``--blocks`` blocks."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    y0 = torch.ones(1, 2, dtype=torch.float64)
    f = lambda t, y: -y  # noqa: E731
    long_t = torch.tensor([0.0, 20.0], dtype=torch.float64)
    short_t = torch.tensor([0.0, 1e-3], dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-12)
    extra = {"off": {}, "progress": {"progress": True}, "progress-drawn": {"progress": drawn},
             "callback": {"callback": lambda t, y, h, a: None}}

    def stepping(t):
        state = nd.init(f, y0, t, **kw)
        while not state.done:
            state.step()
        return state.solution

    def timed(t) -> dict[str, float]:
        res: dict[str, list[float]] = {k: [] for k in names}
        for b in range(args.blocks):
            order = names if b % 2 == 0 else names[::-1]
            for name in order:
                t0 = clock()
                for _ in range(5):
                    stepping(t) if name == "stepping" else nd.solve(f, y0, t, **kw, **extra[name])
                res[name].append((clock() - t0) / 5)
        return {k: statistics.median(v) for k, v in res.items()}

    with torch.no_grad():
        info = nd.solve(f, y0, long_t, **kw).stats
        n_long = info["steps"] + info["rejected"]
        short = nd.solve(f, y0, short_t, **kw).stats
        n_short = short["steps"] + short["rejected"]
        lt, st = timed(long_t), timed(short_t)
    attempts = ref.stats["steps"] + ref.stats["rejected"]
    off = statistics.median(per_call["off"])
    print(f"\ncomponents ({args.blocks} blocks of 5 solves per variant; dy/dt = -y: {n_long} attempts over [0, 20], "
          f"{n_short} over [0, 1e-3]); small case: {attempts} attempts, off {1e3 * off:.3f} ms")
    print("| variant | us per attempt | us per solve (fixed) | small case: fixed + attempts x per attempt | "
          "/ off |")
    print("|---|---|---|---|---|")
    for name in names:
        per_attempt = ((lt[name] - lt["off"]) - (st[name] - st["off"])) / max(n_long - n_short, 1)
        fixed = (st[name] - st["off"]) - n_short * per_attempt
        est = fixed + attempts * per_attempt
        print(f"| {name} | {1e6 * per_attempt:.2f} | {1e6 * fixed:.1f} | {1e6 * est:.1f} us | {100 * est / off:.2f}% |")


if __name__ == "__main__":
    raise SystemExit(main())
