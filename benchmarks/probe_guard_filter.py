#!/usr/bin/env python
"""In one process: the small case's compiled training step (``compile=True``, gradient direct) with the whole loop's
and the backward's Dynamo guard filter (:func:`neurodyn.compile.step.torch_identity_guards`) and without it (every
guard kept), on two copies of the same field (each compiles its own programs), alternating per round; CPU time of
the thread per step, and of the two compiled calls outside Inductor's graph (Dynamo's guards, the AOT wrappers).

    PYTHONPATH=src .venv/bin/python benchmarks/probe_guard_filter.py --rounds 20 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gradients  # noqa: E402
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    common.setup_torch()
    from torch._inductor import output_code

    import neurodyn
    from neurodyn.compile import loop as lmod
    from neurodyn.compile import step as smod
    from neurodyn.compile import train as tmod

    case = common.CASES["small"]
    prob = bench_gradients.make_trainable_problem(case)
    fields = {"filtered": prob.field, "all guards": copy.deepcopy(prob.field)}
    acc = {"inner": 0}
    graph_call = output_code.CompiledFxGraph.__call__

    def inner(self, inputs):
        s = time.thread_time_ns()
        try:
            return graph_call(self, inputs)
        finally:
            acc["inner"] += time.thread_time_ns() - s

    def step(f):
        for p in f.parameters():
            p.grad = None
        sol = neurodyn.solve(f, prob.y0, prob.t, method="dopri5", rtol=case.rtol, atol=case.atol, compile=True)
        sol.ys.pow(2).mean().backward()
        return sol

    grads = {}
    for name, f in fields.items():  # compile each field's programs with its filter
        filt = smod.torch_identity_guards if name == "filtered" else (lambda entries: [True] * len(entries))
        lmod.torch_identity_guards = tmod.torch_identity_guards = filt
        for _ in range(4):
            sol = step(f)
        assert sol.stats["compiled"] == "loop"
        grads[name] = [p.grad.clone() for p in f.parameters()]
    lmod.torch_identity_guards = tmod.torch_identity_guards = smod.torch_identity_guards
    same = all(bool((a == b).all()) for a, b in zip(*grads.values()))
    output_code.CompiledFxGraph.__call__ = inner
    res = {name: {"step": [], "outside": []} for name in fields}
    names = list(fields)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            acc["inner"] = 0
            s = time.thread_time_ns()
            for _ in range(args.steps):
                step(fields[name])
            total = time.thread_time_ns() - s
            res[name]["step"].append(total / args.steps / 1e3)
            res[name]["inner"] = res[name].get("inner", []) + [acc["inner"] / args.steps / 1e3]
    ratios = [a / b for a, b in zip(res["filtered"]["step"], res["all guards"]["step"])]
    print(f"gradients equal bit for bit: {same}")
    print(f"CPU us per step, median (quartiles) of {args.rounds} rounds x {args.steps} steps")
    for name in names:
        st, inn = res[name]["step"], res[name]["inner"]
        q = statistics.quantiles(st, n=4)
        print(f"{name}: step {statistics.median(st):.0f} ({q[0]:.0f}-{q[2]:.0f}); outside Inductor's graphs "
              f"{statistics.median(st) - statistics.median(inn):.0f}")
    q = statistics.quantiles(ratios, n=4)
    print(f"filtered / all guards per round: {statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f}); filtered "
          f"faster in {sum(x < 1 for x in ratios)} of {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
