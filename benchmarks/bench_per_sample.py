"""Per-sample stepping on a batch of 256 Van der Pol oscillators with mu from 1 to 25.

Each oscillator is an independent 2-d problem; their stiffness differs by 25x. Compared in one run:
neurodyn with one step size for the batch, neurodyn with ``per_sample_steps=True``, torchdiffeq (one
step size), torchode (per-sample steps by design). dopri5, rtol 1e-5, atol 1e-7, t in [0, 10] with 11
outputs, float64, one thread; error against scipy Radau at rtol 1e-11 per oscillator.

    .venv/bin/python benchmarks/bench_per_sample.py [--repeats 5]
"""

from __future__ import annotations

import argparse
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

    def vdp(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    y0 = torch.stack([torch.full((B,), 2.0, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)], -1)
    t = torch.linspace(0, 10, 11, dtype=torch.float64)
    ref = torch.tensor(np.stack([
        solve_ivp(lambda tt, yy, m=float(m): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (0, 10), [2.0, 0.0],
                  method="Radau", rtol=1e-11, atol=1e-12, t_eval=t.numpy()).y.T for m in mu])).transpose(0, 1)

    entries = {
        "neurodyn (one step size)": lambda: neurodyn.solve(vdp, y0, t, rtol=RTOL, atol=ATOL).ys,
        "neurodyn per_sample_steps": lambda: neurodyn.solve(vdp, y0, t, rtol=RTOL, atol=ATOL,
                                                            per_sample_steps=True).ys,
    }
    try:
        import torchdiffeq

        entries["torchdiffeq (one step size)"] = lambda: torchdiffeq.odeint(vdp, y0, t, rtol=RTOL, atol=ATOL)
    except ImportError:
        pass
    try:
        import torchode as to

        term = to.ODETerm(vdp)
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=ATOL, rtol=RTOL, term=term))
        t_eval = t.repeat(B, 1)
        entries["torchode (per-sample)"] = lambda: solver.solve(
            to.InitialValueProblem(y0=y0, t_eval=t_eval)).ys.transpose(0, 1)
    except ImportError:
        pass

    rows = []
    with torch.no_grad():
        for name, fn in entries.items():
            out = fn()  # warm-up
            walls = []
            for _ in range(args.repeats):
                w0 = time.perf_counter()
                out = fn()
                walls.append(time.perf_counter() - w0)
            rows.append((name, sorted(walls)[len(walls) // 2], float((out - ref).abs().max())))
    base = dict((n, w) for n, w, _ in rows).get("torchode (per-sample)")
    print(f"Van der Pol batch: B={B}, mu in [1, 25], dopri5, rtol={RTOL}, atol={ATOL}, median of {args.repeats}\n")
    print("| entry | wall ms | max abs err | wall / torchode |")
    print("|---|---|---|---|")
    for name, w, err in rows:
        ratio = f"{w / base:.2f}" if base else "-"
        print(f"| {name} | {w * 1e3:.0f} | {err:.1e} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
