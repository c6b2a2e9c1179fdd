"""Overheads of issue 12's gradient fixes, each variant against the other in one process (ratios, not times).

1. ``gradient="direct"`` through implicit methods: the stage correction applied twice (exact second derivatives)
   against once (first order only), first-order forward + backward.
2. The hidden-tensor guard (one graph walk per backward evaluation of the field) on against off.

Run: ``taskset -c 1 python benchmarks/bench_gradient_overheads.py``.
"""

from __future__ import annotations

import importlib
import time

import torch

import neurodyn as nd
from neurodyn.gradients import common

implicit_rk = importlib.import_module("neurodyn.solvers.implicit_rk")
bdf = importlib.import_module("neurodyn.solvers.bdf")


def _single_correction(zstar, g_of, solver):
    return zstar - implicit_rk.StageCorrection.apply(g_of(zstar), solver)


def _best(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    torch.set_num_threads(1)
    dt = torch.float64
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dt)
    a = -torch.diag(torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=dt))

    def stiff(t, y):
        return y @ a.T + 0.1 * net(y)

    def run_direct(method: str) -> None:
        y0 = torch.ones(1, 4, dtype=dt, requires_grad=True)
        sol = nd.solve(stiff, y0, torch.linspace(0, 1, 5, dtype=dt), method=method, gradient="direct", rtol=1e-6,
                       atol=1e-8)
        sol.ys.pow(2).sum().backward()

    two = implicit_rk.correct_stage
    print("direct through implicit methods, first order: two corrections / one (median of 5)")
    for method in ("radau", "kvaerno5", "bdf", "gl4"):
        ratios = []
        for _ in range(5):
            implicit_rk.correct_stage = bdf.correct_stage = _single_correction
            one_t = _best(lambda m=method: run_direct(m))
            implicit_rk.correct_stage = bdf.correct_stage = two
            ratios.append(_best(lambda m=method: run_direct(m)) / one_t)
        print(f"  {method:9s} {sorted(ratios)[2]:.3f}")

    mlp = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 2)).to(dt)

    def run_grad(gradient: str) -> None:
        y0 = torch.randn(16, 2, dtype=dt, requires_grad=True)
        sol = nd.solve(lambda t, y: mlp(y), y0, torch.linspace(0, 1, 5, dtype=dt), gradient=gradient,
                       params=list(mlp.parameters()), rtol=1e-6, atol=1e-8)
        sol.ys.pow(2).sum().backward()

    watch = common.HiddenTensorGuard.watch
    print("hidden-tensor guard on / off, forward + backward (median of 5)")
    for gradient in ("adjoint", "interpolated", "checkpoint"):
        ratios = []
        for _ in range(5):
            common.HiddenTensorGuard.watch = lambda self, roots, inputs: None
            off = _best(lambda g=gradient: run_grad(g))
            common.HiddenTensorGuard.watch = watch
            ratios.append(_best(lambda g=gradient: run_grad(g)) / off)
        print(f"  {gradient:12s} {sorted(ratios)[2]:.3f}")


if __name__ == "__main__":
    main()
