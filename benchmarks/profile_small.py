#!/usr/bin/env python
"""Profile neurodyn on the benchmark's small case to find per-step overhead.

Runs the exact problem of ``bench_core.py`` (same field, y0, times, tolerances)
under cProfile and prints the top functions by tottime.

    .venv/bin/python benchmarks/profile_small.py                    # neurodyn.solve, dopri5
    .venv/bin/python benchmarks/profile_small.py --method tsit5 --top 40
    .venv/bin/python benchmarks/profile_small.py --entry odeint
    .venv/bin/python benchmarks/profile_small.py --library torchdiffeq  # compare with a peer
    .venv/bin/python benchmarks/profile_small.py --save out/small.prof.tmp  # for snakeviz etc.
    .venv/bin/python benchmarks/profile_small.py --compile --runs 500    # solve(..., compile=True), the suite's row

The bare field cost is printed alongside: with ``NFE * t_f`` as the floor,
everything else in the profile is solver overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="small", choices=list(common.CASES))
    ap.add_argument("--method", default="dopri5", choices=list(common.METHODS))
    ap.add_argument("--library", default="neurodyn", choices=["neurodyn", "torchdiffeq", "torchode"])
    ap.add_argument("--entry", default="solve", choices=["solve", "odeint"],
                    help="neurodyn entry point (default: solve)")
    ap.add_argument("--compile", action="store_true",
                    help="neurodyn.solve with compile=True (the suite's 'neurodyn compiled'; the first solve compiles)")
    ap.add_argument("--runs", type=int, default=20, help="profiled solves (default 20)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    ap.add_argument("--save", type=Path, default=None, help="also dump raw stats to this file")
    args = ap.parse_args(argv)

    common.setup_torch()
    case = common.CASES[args.case]
    prob = common.make_problem(case)

    if args.library == "neurodyn":
        nd, reason = common.import_neurodyn()
        if nd is None:
            print(f"neurodyn not importable: {reason}", file=sys.stderr)
            return 2
        if args.compile and args.entry == "solve":
            runner = common.neurodyn_solve_runner(prob, args.method, nd, compile=True)
        else:
            make = common.neurodyn_solve_runner if args.entry == "solve" else common.neurodyn_odeint_runner
            runner = make(prob, args.method, nd)
        label = f"neurodyn.{args.entry} {args.method}" + (" compile=True" if args.compile else "")
    elif args.library == "torchdiffeq":
        if args.method != "dopri5":
            print("torchdiffeq has no tsit5; profiling dopri5", file=sys.stderr)
        runner = common.torchdiffeq_runner(prob, "dopri5")
        label = "torchdiffeq.odeint dopri5"
    else:
        runner = common.torchode_runner(prob, args.method)
        label = f"torchode {args.method}"

    # compile=True: the bare field (a counting wrapper would be compiled as another field), NFE from sol.stats
    counted = prob.field if args.compile else common.CountingField(prob.field)
    with torch.no_grad():
        _, reported = runner(counted)  # warm-up + NFE
        runner(prob.field)
        nfe = reported if args.compile else counted.nfe
        t_f, t_f_cpu = common.time_field_call(prob.field, prob.t[:1].clone(), prob.y0, blocks=11)
        s, c = time.perf_counter(), time.process_time()
        for _ in range(args.runs):
            runner(prob.field)
        wall = (time.perf_counter() - s) / args.runs
        cpu = (time.process_time() - c) / args.runs

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.runs):
            runner(prob.field)
        prof.disable()

    print(f"{label} on case {case.name} ({case.describe()})")
    print(f"NFE = {nfe}; unprofiled, per solve:")
    for clock, total, tf in (("wall", wall, t_f), ("CPU ", cpu, t_f_cpu)):
        print(f"  {clock}: {total * 1e3:.3f} ms, t_f = {tf * 1e6:.2f} us, "
              f"overhead = {total / (nfe * tf):.2f}, "
              f"non-field time per evaluation = {(total - nfe * tf) / nfe * 1e6:.2f} us")
    print(f"profile over {args.runs} solves, top {args.top} by {args.sort}:")
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats(args.sort).print_stats(args.top)
    print(buf.getvalue())

    # Where does the time go? tottime grouped by origin; C builtins (torch ops,
    # float(), ...) are charged to the Python function that called them.
    def origin(fname: str) -> str:
        if "neurodyn" in fname and "site-packages" not in fname:
            return "solver" if args.library == "neurodyn" else "other"
        if "torch/nn" in fname or "benchmarks" in fname:
            return "field"  # MLPField.forward + nn.Module call machinery
        if args.library in fname:
            return "solver"
        return "other"

    groups: dict[str, float] = {}
    for (fname, _line, _func), (_cc, _nc, tt, _ct, callers) in st.stats.items():
        if fname == "~" and callers:
            for (cfile, _cl, _cf), ctimes in callers.items():
                g = origin(cfile) + " (C calls)"
                groups[g] = groups.get(g, 0.0) + ctimes[2]
        else:
            g = origin(fname) + (" (C calls)" if fname == "~" else " (Python)")
            groups[g] = groups.get(g, 0.0) + tt
    total = sum(groups.values()) or 1.0
    print(f"tottime by origin (field = MLPField + nn.Module machinery; solver = {args.library}):")
    for g, tt in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {tt / args.runs * 1e3:8.3f} ms/solve  {100 * tt / total:5.1f}%  {g}")
    if args.library == "neurodyn":
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(args.sort).print_stats(r"neurodyn", args.top)
        print("\nneurodyn's own functions only:")
        print(buf.getvalue().split("function calls", 1)[-1])
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        st.dump_stats(str(args.save))
        print(f"raw stats saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
