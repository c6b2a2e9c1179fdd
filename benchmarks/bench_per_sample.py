"""Per-sample stepping on a batch of 256 Van der Pol oscillators with mu from 1 to 25.

Each oscillator is an independent 2-d problem; their stiffness differs by 25x. Compared in one run:
neurodyn with one step size for the batch, neurodyn with ``per_sample_steps=True``, both also with
``compile=True`` (the compiled whole loop; for per-sample steps ``neurodyn.compile.rows``), torchdiffeq
(one step size), torchode (per-sample steps by design). dopri5, rtol 1e-5, atol 1e-7, t in [0, 10] with 11
outputs, float64, one thread; error against scipy Radau at rtol 1e-11 per oscillator.

The entries run round-robin (one call of each per repeat), so a change in the machine's load hits them
alike; wall and CPU time are medians. NFE counts vector-field calls (each on the whole batch); steps are
the attempted steps of the loop (per-sample: of the row that needs the most). At equal error: torchode
is also run at the loosest of a few tighter rtols that reaches neurodyn per-sample's error, when its
error at the same rtol is larger.

    .venv/bin/python benchmarks/bench_per_sample.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

import neurodyn

B = 256
RTOL, ATOL = 1e-5, 1e-7


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mu = torch.linspace(1, 25, B, dtype=torch.float64)
    calls = [0]

    def vdp(t, y):
        calls[0] += 1
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    y0 = torch.stack([torch.full((B,), 2.0, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)], -1)
    t = torch.linspace(0, 10, 11, dtype=torch.float64)
    ref = torch.tensor(np.stack([
        solve_ivp(lambda tt, yy, m=float(m): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (0, 10), [2.0, 0.0],
                  method="Radau", rtol=1e-11, atol=1e-12, t_eval=t.numpy()).y.T for m in mu])).transpose(0, 1)

    def vdp_bare(t, y):  # for compile=True: a compiled loop cannot run the counter (NFE from sol.stats)
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    reported_nfe = {}

    def nd(name, **kw):
        field = vdp_bare if kw.get("compile") else vdp

        def run():
            sol = neurodyn.solve(field, y0, t, rtol=RTOL, atol=ATOL, **kw)
            st = sol.stats
            if kw.get("compile"):
                reported_nfe[name] = st["nfe"]
            if st.get("per_sample"):  # the loop runs as long as the row with the most attempts
                return sol.ys, int((st["steps_per_sample"] + st["rejected_per_sample"]).max())
            return sol.ys, st["steps"] + st["rejected"]
        return name, run

    entries = dict([
        nd("neurodyn (one step size)"),
        nd("neurodyn per_sample_steps", per_sample_steps=True),
        nd("neurodyn (one step size), compile=True", compile=True),
        nd("neurodyn per_sample_steps, compile=True", per_sample_steps=True, compile=True),
    ])
    try:
        import torchdiffeq

        entries["torchdiffeq (one step size)"] = lambda: (torchdiffeq.odeint(vdp, y0, t, rtol=RTOL, atol=ATOL), None)
    except ImportError:
        pass
    try:
        import torchode as to

        term = to.ODETerm(vdp)
        t_eval = t.repeat(B, 1)

        def torchode_entry(rtol):
            solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=ATOL, rtol=rtol, term=term))

            def run():
                sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval))
                return sol.ys.transpose(0, 1), int(sol.stats["n_steps"].max())
            return run

        entries["torchode (per-sample)"] = torchode_entry(RTOL)
    except ImportError:
        pass

    def error(out):
        return float((out - ref).abs().max())

    with torch.no_grad():
        errs = {name: error(fn()[0]) for name, fn in entries.items()}  # also the warm-up
        if "torchode (per-sample)" in entries and errs["torchode (per-sample)"] > errs["neurodyn per_sample_steps"]:
            target = errs["neurodyn per_sample_steps"]
            for factor in (0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
                fn = torchode_entry(RTOL * factor)
                e = error(fn()[0])
                if e <= target:
                    name = f"torchode (per-sample), rtol {RTOL * factor:.1e}: error matched"
                    entries[name], errs[name] = fn, e
                    break
        walls = {name: [] for name in entries}
        cpus = {name: [] for name in entries}
        counts = {}
        for _ in range(args.repeats):
            for name, fn in entries.items():
                calls[0] = 0
                c0, w0 = time.process_time(), time.perf_counter()
                _, steps = fn()
                walls[name].append(time.perf_counter() - w0)
                cpus[name].append(time.process_time() - c0)
                counts[name] = (reported_nfe.get(name, calls[0]), steps)
    base = statistics.median(walls["torchode (per-sample)"]) if "torchode (per-sample)" in walls else None
    base_cpu = statistics.median(cpus["torchode (per-sample)"]) if base else None
    print(f"Van der Pol batch: B={B}, mu in [1, 25], dopri5, rtol={RTOL}, atol={ATOL}, median of {args.repeats} "
          f"(round-robin)\n")
    print("| entry | wall ms | CPU ms | NFE | steps | max abs err | wall / torchode | CPU / torchode |")
    print("|---|---|---|---|---|---|---|---|")
    for name in entries:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        nfe, steps = counts[name]
        ratio = f"{w / base:.2f} | {c / base_cpu:.2f}" if base else "- | -"
        print(f"| {name} | {w * 1e3:.0f} | {c * 1e3:.0f} | {nfe} | {steps if steps is not None else '-'} | "
              f"{errs[name]:.1e} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
