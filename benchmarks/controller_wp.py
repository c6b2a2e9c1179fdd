#!/usr/bin/env python
"""Work-precision at equal error: neurodyn's step-size controller settings against diffrax and torchdiffeq.

NFE and errors are deterministic (no timing), so the machine's load does not matter. For every problem each
configuration solves at a sweep of tolerances (``atol = rtol / 100``; dopri5, float64), giving points
(error, NFE); ``common.at_error`` interpolates NFE at a given error log-log between the two sweep points that
bracket it. The reference error levels are diffrax's: at each of diffrax's sweep points, the ratio
``NFE(config at diffrax's error) / NFE(diffrax)``. Reported per problem: the ratio at the problem's own rtol
(protocol cases) and the geometric mean and the maximum over the sweep.

Problems: the protocol cases of ``common.py`` (small, batched, medium, large; max abs error at the 11 output
times against scipy DOP853 at rtol 1e-12), the Van der Pol batch of ``bench_suite.py`` (shared steps; and per
row: neurodyn ``per_sample_steps=True`` against diffrax vmapped) and the DETEST-style problems of
``tests/problems.py`` (21 output times, exact or DOP853 references). diffrax runs the torch vector field through
``jax.pure_callback`` (the same numbers in both), one jitted solve per problem with the tolerances traced.

    .venv/bin/python benchmarks/controller_wp.py                   # everything (~5 min)
    .venv/bin/python benchmarks/controller_wp.py --problems small,large,detest --configs default,diffrax-like
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_suite as bs  # noqa: E402
import common  # noqa: E402
import problems as detest  # noqa: E402

import neurodyn  # noqa: E402

F64 = torch.float64
PID = neurodyn.PIDController
CONFIGS = {
    "default": {},
    "I": {"pcoeff": 0.0, "icoeff": 1.0},
    "PI+keep": {"accept_dfactor": 1.0},
    "I+keep": {"pcoeff": 0.0, "icoeff": 1.0, "accept_dfactor": 1.0},
    "diffrax-like": {"pcoeff": 0.0, "icoeff": 5 / 6, "accept_dfactor": 1.0},
    "PI(0.1;0.6)+keep": {"pcoeff": 0.1, "icoeff": 0.6, "accept_dfactor": 1.0},
    "PI(0.2;0.6)+keep": {"pcoeff": 0.2, "icoeff": 0.6, "accept_dfactor": 1.0},
    "PI(0.05;0.85)": {"pcoeff": 0.05, "icoeff": 0.85},
    "PI(0.05;0.8)": {"pcoeff": 0.05, "icoeff": 0.8},
    "I(1/6)": {"pcoeff": 0.0, "icoeff": 5 / 6},
    "PI safety 0.95": {"safety": 0.95},
}
DETEST_RTOLS = tuple(10.0 ** -k for k in (3, 4, 5, 6, 7, 8, 9, 10))


def sweep_around(rtol: float) -> tuple[float, ...]:
    """Half-decade steps from 30x looser to 100x tighter than ``rtol`` (the range the error levels need)."""
    return tuple(rtol * 10 ** (k / 2) for k in (3, 2, 1, 0, -1, -2, -3, -4))


class Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


def jax_callback_solver(js, f, y0: np.ndarray, ts: np.ndarray, counter: list):
    """A jitted diffrax solve ``(rtol, atol) -> ys`` of the torch field ``f`` through ``pure_callback``."""
    jax, jnp, dfx = js.jax, js.jnp, js.dfx
    shape = jax.ShapeDtypeStruct(y0.shape, jnp.float64)

    def host(t, y):
        counter[0] += 1
        with torch.no_grad():
            return f(torch.tensor(float(t), dtype=F64), torch.from_numpy(np.array(y))).numpy()

    def vf(t, y, args):
        return jax.pure_callback(host, shape, t, y)

    term = dfx.ODETerm(vf)
    t0, t1 = float(ts[0]), float(ts[-1])

    @jax.jit
    def solve(rtol, atol):
        return dfx.diffeqsolve(term, dfx.Dopri5(), t0=t0, t1=t1, dt0=None, y0=jnp.asarray(y0),
                               saveat=dfx.SaveAt(ts=jnp.asarray(ts)), max_steps=200000,
                               stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol)).ys

    def run(rtol):
        counter[0] = 0
        ys = np.asarray(jax.block_until_ready(solve(rtol, rtol / 100)))
        return ys, counter[0]

    return run


def problem_list(names):
    out = []  # (name, field, y0, ts, ref, rtols, own rtol, vdp)
    for name in names:
        if name in common.CASES:
            prob = common.make_problem(common.CASES[name])
            ref, _ = common.reference_solution(prob)
            out.append((name, prob.field, prob.y0, prob.t, ref, sweep_around(prob.case.rtol), prob.case.rtol, False))
        elif name == "vdp":
            prob = bs.vdp_problem()
            out.append((name, prob.field, prob.y0, prob.t, bs.vdp_reference(prob), sweep_around(bs.VDP_RTOL),
                        bs.VDP_RTOL, True))
        elif name == "detest":
            for p in detest.ALL_PROBLEMS:
                ts = torch.linspace(p.t0, p.t1, 21, dtype=F64)
                out.append((p.name, p.f, p.y0_tensor(), ts, p.reference(ts.numpy()), DETEST_RTOLS, None, False))
        else:
            raise SystemExit(f"unknown problem {name!r}: choose from {list(common.CASES)}, vdp, detest")
    return out


def neurodyn_points(f, y0, ts, ref, rtols, ctrl, per_sample=False):
    pts = []
    for rtol in rtols:
        cf = Counting(f)
        with torch.no_grad():
            sol = neurodyn.solve(cf, y0, ts, method="dopri5", rtol=rtol, atol=rtol / 100, controller=ctrl,
                                 per_sample_steps=per_sample)
        nfe = common._nfe_from_stats(sol.stats) if per_sample else cf.n
        pts.append((rtol, float(np.abs(sol.ys.numpy() - ref).max()), nfe))
    return pts


def torchdiffeq_points(f, y0, ts, ref, rtols):
    import torchdiffeq

    pts = []
    for rtol in rtols:
        cf = Counting(f)
        with torch.no_grad():
            ys = torchdiffeq.odeint(cf, y0, ts, method="dopri5", rtol=rtol, atol=rtol / 100)
        pts.append((rtol, float(np.abs(ys.numpy() - ref).max()), cf.n))
    return pts


def diffrax_points(js, f, y0, ts, ref, rtols, vdp_vmap=False, mu=None):
    pts = []
    if vdp_vmap:
        solve = js.solver(bs.JaxSide.vdp, vmap=True)
        for rtol in rtols:
            ys, steps = js.jax.block_until_ready(solve(js.jnp.asarray(y0.numpy()), js.jnp.asarray(mu), rtol,
                                                       rtol / 100, float(ts[-1])))
            ys = np.moveaxis(np.asarray(ys), 1, 0)
            pts.append((rtol, float(np.abs(ys - ref).max()), 6 * int(np.max(np.asarray(steps))) + 1))
        return pts
    counter = [0]
    run = jax_callback_solver(js, f, y0.numpy(), ts.numpy(), counter)
    for rtol in rtols:
        ys, nfe = run(rtol)
        pts.append((rtol, float(np.abs(ys - ref).max()), nfe))
    return pts


def ratios(pts, ref_pts):
    """``NFE(pts at ref's error) / NFE(ref)`` at each of ref's points (None where out of pts' range)."""
    return [None if (n := common.at_error(pts, e)) is None else n / nfe for _, e, nfe in ref_pts]


def summary(rs, own_index=None):
    ok = [r for r in rs if r is not None]
    if not ok:
        return "—"
    gm = math.exp(statistics.fmean(math.log(r) for r in ok))
    own = "" if own_index is None or rs[own_index] is None else f"{rs[own_index]:.2f} @rtol; "
    return f"{own}gm {gm:.2f}, max {max(ok):.2f} ({len(ok)}/{len(rs)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="small,batched,medium,large,vdp,detest")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-torchdiffeq", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    js = bs.JaxSide()
    configs = [c for c in args.configs.split(",") if c]
    cols = configs + ([] if args.no_torchdiffeq else ["torchdiffeq"])
    print("NFE at diffrax's error / diffrax's NFE (log-log interpolated on each sweep; < 1: fewer NFE than diffrax)."
          "\n'@rtol': at the problem's own rtol; gm / max over diffrax's sweep points inside the range.\n")
    print("| problem | diffrax NFE/err @rtol | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    gms: dict[str, list] = {c: [] for c in cols}
    for name, f, y0, ts, ref, rtols, own, vdp in problem_list(args.problems.split(",")):
        own_i = rtols.index(own) if own is not None else None
        variants = [(name, False)] + ([(name + " per-row", True)] if vdp else [])
        for label, per_row in variants:
            mu = f.mu.numpy() if vdp else None
            d = diffrax_points(js, f, y0, ts, ref, rtols, vdp_vmap=per_row, mu=mu)
            cells = []
            for c in cols:
                if c == "torchdiffeq":
                    pts = None if per_row else torchdiffeq_points(f, y0, ts, ref, rtols)
                else:
                    pts = neurodyn_points(f, y0, ts, ref, rtols, PID(**CONFIGS[c]), per_sample=per_row)
                if pts is None:
                    cells.append("—")
                    continue
                rs = ratios(pts, d)
                gms[c] += [math.log(r) for r in rs if r is not None]
                extra = "" if own_i is None else f" [{pts[own_i][2]}/{pts[own_i][1]:.1e}]"
                cells.append(summary(rs, own_i) + extra)
            dd = "" if own_i is None else f"{d[own_i][2]}/{d[own_i][1]:.1e}"
            print(f"| {label} | {dd} | " + " | ".join(cells) + " |", flush=True)
    print("| **all** (gm) | | " + " | ".join(f"{math.exp(statistics.fmean(v)):.3f}" if v else "—"
                                           for v in gms.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
