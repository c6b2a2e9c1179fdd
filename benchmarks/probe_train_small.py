#!/usr/bin/env python
"""Where the small case's compiled training step (``compile=True``, ``gradient="direct"`` / ``"checkpoint"``) spends
its CPU time, in one process (the tree on ``PYTHONPATH``).

The step is the suite's (``bench_suite.py --train-cases small``): ``solve(field, y0, t, method="dopri5", rtol, atol,
compile=True, gradient=...)``, loss ``ys.pow(2).mean()``, ``backward()``, ``.grad`` cleared before each step. Parts
timed with ``time.thread_time_ns`` (CPU time of this thread) by wrapping, after the warm-up:

* ``step``: the whole step; ``forward``: the ``solve`` call; ``backward``: ``loss.backward()``;
* ``prepare``: :func:`neurodyn.solve.prepare` (argument checks; for ``"checkpoint"`` the hidden-tensor check);
* ``hidden``: :func:`neurodyn.gradients.check_hidden_tensors` as ``prepare`` calls it;
* ``plug_in`` (in ``prepare``), ``start`` (``start_direct``), ``integrate`` (the loop, with the compiled forward),
  ``finish`` (``finish_direct``: the :class:`Solution`), ``attach`` (joining the outputs to the graph),
  ``rec_backward`` (``_RecordedSolve.backward``, with the compiled backward);
* ``fwd_call`` / ``bwd_call``: the compiled forward and backward programs' calls (Dynamo guards, the AOT/Inductor
  wrappers, the C++ loop);
* ``fwd_inner`` / ``bwd_inner``: of those, Inductor's compiled graph (``CompiledFxGraph.__call__``: its Python
  wrapper and the C++ program), so ``fwd_call - fwd_inner`` is Dynamo's guards and the AOT wrappers;
* derived: ``fwd_host`` = forward - fwd_call (Python around the compiled forward), ``bwd_host`` = backward - bwd_call
  (eager autograd and ``_RecordedSolve.backward``'s Python around the compiled backward).

Rounds alternate the two gradients; per part the median (quartiles) over rounds of the per-step mean.

    PYTHONPATH=src .venv/bin/python benchmarks/probe_train_small.py --rounds 15 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gradients  # noqa: E402
import common  # noqa: E402

PARTS = ("step", "forward", "backward", "prepare", "hidden", "plug_in", "start", "integrate", "finish", "attach",
         "fwd_call", "fwd_inner", "rec_backward", "bwd_call", "bwd_inner")


class Timed:
    """A callable wrapped to add its thread CPU time to ``acc[name]`` (attribute reads pass through)."""

    def __init__(self, fn, acc: dict, name: str):
        self._fn, self._acc, self._name = fn, acc, name

    def __call__(self, *a, **k):
        self._acc["_in"] = self._name
        s = time.thread_time_ns()
        try:
            return self._fn(*a, **k)
        finally:
            self._acc[self._name] += time.thread_time_ns() - s
            self._acc["_in"] = None

    def __getattr__(self, item):
        return getattr(self._fn, item)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps per round and gradient")
    ap.add_argument("--gradients", default="direct,checkpoint")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-gc", action="store_true", help="gc.disable() while timing")
    args = ap.parse_args(argv)
    common.setup_torch()
    import neurodyn

    nsolve = importlib.import_module("neurodyn.solve")  # (the module: neurodyn.solve is the function)
    from neurodyn.compile import loop as cloop

    case = common.CASES["small"]
    prob = bench_gradients.make_trainable_problem(case)
    f = prob.field
    grads = args.gradients.split(",")

    def step(gradient):
        for p in f.parameters():
            p.grad = None
        sol = neurodyn.solve(f, prob.y0, prob.t, method="dopri5", rtol=case.rtol, atol=case.atol, compile=True,
                             gradient=gradient)
        sol.ys.pow(2).mean().backward()

    for g in grads:  # compile and verify
        for _ in range(5):
            step(g)
    acc = dict.fromkeys(PARTS, 0)
    per_func = cloop._CACHE[f]
    for key in list(per_func):
        v = per_func[key]
        if isinstance(key, tuple) and key and key[0] == "backward":  # the compiled backward program
            per_func[key] = Timed(v, acc, "bwd_call")
        elif callable(v) and hasattr(v, "code"):  # the compiled whole loop (torch.compile's wrapper)
            per_func[key] = Timed(v, acc, "fwd_call")
    from torch._inductor import output_code

    graph_call = output_code.CompiledFxGraph.__call__

    def inner(self, inputs):  # Inductor's compiled graph: its Python wrapper and the C++ program
        s = time.thread_time_ns()
        try:
            return graph_call(self, inputs)
        finally:
            if acc["_in"] in ("fwd_call", "bwd_call"):
                acc[acc["_in"].replace("call", "inner")] += time.thread_time_ns() - s

    output_code.CompiledFxGraph.__call__ = inner
    acc["_in"] = None
    nsolve.prepare = Timed(nsolve.prepare, acc, "prepare")
    import neurodyn.compile as ncompile
    from neurodyn.compile import train as ctrain
    from neurodyn.gradients import checkpoint as gcheck
    from neurodyn.gradients import direct as gdirect

    ncompile.plug_in = Timed(ncompile.plug_in, acc, "plug_in")
    for mod in (gdirect, gcheck):
        mod.start_direct = Timed(mod.start_direct, acc, "start")
        mod.integrate = Timed(mod.integrate, acc, "integrate")
        mod.finish_direct = Timed(mod.finish_direct, acc, "finish")
    ctrain.attach = Timed(ctrain.attach, acc, "attach")
    rec_backward = ctrain._RecordedSolve.backward

    def timed_backward(ctx, *grads):  # _RecordedSolve.backward (looked up on the class by autograd)
        s = time.thread_time_ns()
        try:
            return rec_backward(ctx, *grads)
        finally:
            acc["rec_backward"] += time.thread_time_ns() - s

    ctrain._RecordedSolve.backward = staticmethod(timed_backward)
    nsolve.check_hidden_tensors = Timed(nsolve.check_hidden_tensors, acc, "hidden")
    solve = neurodyn.solve

    def timed_step(gradient):
        for p in f.parameters():
            p.grad = None
        s = time.thread_time_ns()
        sol = solve(f, prob.y0, prob.t, method="dopri5", rtol=case.rtol, atol=case.atol, compile=True,
                    gradient=gradient)
        m = time.thread_time_ns()
        loss = sol.ys.pow(2).mean()
        b = time.thread_time_ns()
        loss.backward()
        e = time.thread_time_ns()
        acc["forward"] += m - s
        acc["backward"] += e - b
        acc["step"] += e - s

    for g in grads:
        for _ in range(3):
            timed_step(g)
    if args.no_gc:
        gc.collect()
        gc.disable()
    res = {g: {p: [] for p in (*PARTS, "fwd_host", "bwd_host")} for g in grads}
    for r in range(args.rounds):
        order = grads if r % 2 == 0 else grads[::-1]
        for g in order:
            for k in PARTS:
                acc[k] = 0
            for _ in range(args.steps):
                timed_step(g)
            us = {k: acc[k] / args.steps / 1e3 for k in PARTS}
            us["fwd_host"] = us["forward"] - us["fwd_call"]
            us["bwd_host"] = us["backward"] - us["bwd_call"]
            for k, v in us.items():
                res[g][k].append(v)
    print(f"CPU us per step, median (quartiles) of {args.rounds} rounds x {args.steps} steps")
    print("| part | " + " | ".join(grads) + " |")
    print("|---|" + "---|" * len(grads))
    for p in (*PARTS, "fwd_host", "bwd_host"):
        cells = []
        for g in grads:
            q = statistics.quantiles(res[g][p], n=4)
            cells.append(f"{statistics.median(res[g][p]):.0f} ({q[0]:.0f}-{q[2]:.0f})")
        print(f"| {p} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
