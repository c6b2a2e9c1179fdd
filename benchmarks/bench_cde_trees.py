"""cdeint forward+backward: torchcde, an old neurodyn tree and this one, interleaved in one process.

The old tree's ``neurodyn`` package is copied into a temporary directory under the name ``neurodyn_old`` (the
package imports itself relatively, so both copies load side by side) and imported next to this checkout's
``neurodyn``; every round runs the three libraries on ``bench_cde.py``'s model and data (fresh coefficients
requiring grad, ``func``'s gradients zeroed), the order rotating round by round, and records the thread CPU time of
a forward+backward pass. Reported: the medians, and the per-round ratios old/new (> 1: the new tree faster), with
their quartiles and the number of rounds in which the new tree was faster -- differences of a few per cent that
separate processes cannot resolve on a loaded machine.

    git worktree add /tmp/nd-old <commit>
    taskset -c 1 python benchmarks/bench_cde_trees.py --old /tmp/nd-old/src --rounds 120
    taskset -c 1 python benchmarks/bench_cde_trees.py --old /tmp/nd-old/src --batch 64 --length 100 --rounds 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchcde

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cde  # noqa: E402

import neurodyn.compat.torchcde as new  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="source tree of the old code (the directory holding neurodyn/)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--method", default="rk4", choices=("rk4", "dopri5"))
    ap.add_argument("--adjoint", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    shutil.copytree(Path(args.old) / "neurodyn", Path(tmp) / "neurodyn_old")
    sys.path.insert(0, tmp)
    import neurodyn_old.compat.torchcde as old

    torch.set_num_threads(1)
    coeffs, func, z0, _, _ = bench_cde.problem(args.batch, args.length, 32, 32)

    def once(lib) -> float:
        c = coeffs.clone().requires_grad_(True)
        func.zero_grad()
        X = lib.CubicSpline(c)
        kw = dict(adjoint_params=tuple(func.parameters()) + (c,)) if args.adjoint else {}
        opts = dict(step_size=1.0) if args.method == "rk4" else {}
        t0 = time.thread_time()
        z = lib.cdeint(X=X, func=func, z0=z0, t=X.interval, adjoint=args.adjoint, method=args.method, options=opts,
                       rtol=1e-4, atol=1e-6, **kw)
        z[..., -1, :].pow(2).sum().backward()
        return time.thread_time() - t0

    libs = {"torchcde": torchcde, "old": old, "new": new}
    for lib in libs.values():
        once(lib)
    times: dict[str, list[float]] = {k: [] for k in libs}
    names = list(libs)
    for r in range(args.rounds):
        for k in names[r % 3:] + names[:r % 3]:
            times[k].append(once(libs[k]))
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = [a / b for a, b in zip(times["old"], times["new"])]

    def quartiles(x: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in statistics.quantiles(x, n=4))

    tc_old = [a / b for a, b in zip(times["torchcde"], times["old"])]
    tc_new = [a / b for a, b in zip(times["torchcde"], times["new"])]
    print(f"batch {args.batch}, length {args.length}, {args.method} {'adjoint' if args.adjoint else 'direct'}, "
          f"{args.rounds} rounds, CPU ms (median): torchcde {med['torchcde']:.2f}, old {med['old']:.2f}, new "
          f"{med['new']:.2f}")
    print(f"old/new per round: median {statistics.median(ratio):.3f} (quartiles {quartiles(ratio)}); new faster in "
          f"{sum(x > 1 for x in ratio)} of {len(ratio)} rounds")
    print(f"torchcde/old per round: median {statistics.median(tc_old):.3f} (quartiles {quartiles(tc_old)}); "
          f"torchcde/new: median {statistics.median(tc_new):.3f} (quartiles {quartiles(tc_new)})")


if __name__ == "__main__":
    main()
