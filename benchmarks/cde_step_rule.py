"""Why dopri5 takes more steps in neurodyn's cdeint than in torchcde's, and what each step rule costs.

``bench_cde.py``'s model and data (its ``Field``, smooth sine series, natural cubic coefficients, ``rtol=1e-4``,
``atol=1e-6``, RMS norm, no knots landed on), direct backpropagation, forward+backward timed in thread CPU time,
interleaved round by round on one thread:

* ``torchcde``: ``torchcde.cdeint(method="dopri5")`` (torchdiffeq's dopri5);
* ``cdeint``: ``neurodyn.compat.torchcde.cdeint(method="dopri5")`` (since the seventh session of 2026-12-06:
  torchdiffeq's step rule, so this row's NFE is torchcde's; before, neurodyn's defaults);
* the same ControlTerm and path through ``neurodyn.solve`` with each combination of the two rules in which the
  libraries differ: the embedded error estimate (neurodyn's ``dopri5``: Dormand--Prince's fourth-order weights as
  in Hairer's DOPRI5 and scipy's RK45; torchdiffeq's: ``(1951/21600, 0, 22642/50085, 451/720, -12231/42400,
  649/6300, 1/60)``, registered here for the experiment only, as ``dopri5-td-estimate``) and the step-size
  controller (neurodyn's default PI control, or torchdiffeq's I control that never shrinks a step after an
  accepted one: ``PIDController(pcoeff=0, icoeff=1, accept_dfactor=1)``).

Printed per row: NFE, the errors against bench_cde's float64 reference (z at the final time, relative error of the
coefficient gradient), the median CPU time and the ratio torchcde / row.

    taskset -c 1 python benchmarks/cde_step_rule.py --batch 64 --length 100 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from fractions import Fraction

import torch
import torchcde
from bench_cde import Counted, problem

import neurodyn
import neurodyn.compat.torchcde as ncde
from neurodyn.solvers.tableaus import TABLEAUS, register

F = Fraction
TD_BHAT = (F(1951, 21600), 0, F(22642, 50085), F(451, 720), F(-12231, 42400), F(649, 6300), F(1, 60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dp5 = TABLEAUS["dopri5"]
    register(dataclasses.replace(dp5, name="dopri5-td-estimate",
                                 b_err=tuple(b - bh for b, bh in zip(dp5.b, TD_BHAT))))
    torch.set_num_threads(1)
    coeffs, func, z0, z_ref, g_ref = problem(args.batch, args.length, 32, 32)
    i_control = neurodyn.PIDController(pcoeff=0.0, icoeff=1.0, accept_dfactor=1.0)
    rows = {  # name: (method, controller) for neurodyn.solve; None: the cdeint of a library
        "torchcde": None, "cdeint": None,
        "solve: neurodyn estimate, PI": ("dopri5", None),
        "solve: neurodyn estimate, I": ("dopri5", i_control),
        "solve: torchdiffeq estimate, PI": ("dopri5-td-estimate", None),
        "solve: torchdiffeq estimate, I": ("dopri5-td-estimate", i_control),
    }

    def run(name: str, f: torch.nn.Module) -> tuple[float, torch.Tensor, torch.Tensor]:
        c = coeffs.clone().requires_grad_(True)
        f.zero_grad()
        t0 = time.thread_time()
        if name == "torchcde":
            X = torchcde.CubicSpline(c)
            z = torchcde.cdeint(X=X, func=f, z0=z0, t=X.interval, adjoint=False, method="dopri5")[..., -1, :]
        elif name == "cdeint":
            X = ncde.CubicSpline(c)
            z = ncde.cdeint(X=X, func=f, z0=z0, t=X.interval, adjoint=False, method="dopri5")[..., -1, :]
        else:
            X = ncde.CubicSpline(c)
            method, controller = rows[name]
            z = neurodyn.solve(neurodyn.ControlTerm(f, X.as_path()), z0, X.interval, method=method, rtol=1e-4,
                               atol=1e-6, controller=controller).ys[-1]
        z.pow(2).sum().backward()
        return time.thread_time() - t0, z.detach(), c.grad

    stats = {}
    for name in rows:
        counted = Counted(func)
        _, z, g = run(name, counted)
        stats[name] = (counted.calls, float((z.double() - z_ref).abs().max()),
                       float((g.double() - g_ref).abs().max() / g_ref.abs().max()))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name in rows:
            times[name].append(run(name, func)[0])
    ref = statistics.median(times["torchcde"])
    print(f"batch {args.batch}, length {args.length}, dopri5, rtol 1e-4, atol 1e-6, direct, median CPU time of "
          f"{args.repeats}")
    print("| run | NFE | error z(T) | rel. error dL/dcoeffs | CPU time (s) | torchcde / this |")
    print("|---|---|---|---|---|---|")
    for name in rows:
        m = statistics.median(times[name])
        nfe, ez, eg = stats[name]
        print(f"| {name} | {nfe} | {ez:.3g} | {eg:.3g} | {m:.3f} | {ref / m:.2f}x |")


if __name__ == "__main__":
    main()
