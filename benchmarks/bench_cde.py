"""cdeint forward+backward: neurodyn.compat.torchcde vs torchcde 0.2.5 (torchdiffeq backend), one process.

Same model (MLP vector field, float32), same data (natural cubic coefficients computed once by torchcde and used by
both), same settings; the variants are interleaved round by round on one thread after one warm-up run each, and
the per-variant median wall of a forward+backward pass is reported with the ratio torchcde / neurodyn (> 1:
neurodyn faster), with each library's error against a float64 rk4 reference (8 steps per knot interval,
adjoint): z at the final time and the gradient with respect to the coefficients. Also reported: the median CPU
time of the process's thread over the same passes (``time.thread_time``: on a machine shared with other jobs the
wall clock counts the time the process waits for the core, the CPU time does not) and its ratio, and each library's
number of vector-field evaluations (counted in one separate, untimed pass).

    taskset -c 1 python benchmarks/bench_cde.py                 # batch 256, 32 channels, length 100, hidden 32
    taskset -c 1 python benchmarks/bench_cde.py --repeats 3 --batch 64
    # a lower bound for any solver library: torchcde's rk4 against a hand-written loop of the same arithmetic
    taskset -c 1 python benchmarks/bench_cde.py --repeats 3 --batch 16 --length 20 --configs rk4-direct,rk4-loop
    # at equal error: neurodyn's dopri5 at a looser rtol (its error at rtol 1e-4 is below torchcde's)
    taskset -c 1 python benchmarks/bench_cde.py --repeats 3 --batch 64 --configs dopri5-direct --neurodyn-rtol 2e-4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchcde

import neurodyn.compat.torchcde as ncde


class Field(torch.nn.Module):
    """``f(z)``: (B, hidden) -> (B, hidden, channels), a one-hidden-layer MLP with a tanh output."""

    def __init__(self, hidden: int, channels: int, width: int = 64):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.l1 = torch.nn.Linear(hidden, width)
        self.l2 = torch.nn.Linear(width, hidden * channels)

    def forward(self, t, z):
        return self.l2(torch.relu(self.l1(z))).tanh().view(*z.shape[:-1], self.hidden, self.channels)


class Counted(torch.nn.Module):
    """``func`` with its calls counted (the NFE pass only: not used in the timed passes)."""

    def __init__(self, func: torch.nn.Module):
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t, z):
        self.calls += 1
        return self.func(t, z)


class HandLoop:
    """``rk4-loop``: the 3/8-rule rk4 with step 1 written out in torch (no solver library): the field, the spline
    derivative ``b + s (two_c + s three_d)`` (at a knot: of the piece ending there, torchcde's convention) from rows
    split once, ``bmm`` products and the stage sums; direct backpropagation. Used in place of neurodyn (same
    interface as the two libraries here), it times what any library must spend on this model, data and method."""

    class CubicSpline:
        def __init__(self, coeffs):
            self.coeffs = coeffs
            self.interval = torch.tensor([0.0, float(coeffs.shape[-2])])

    @staticmethod
    def cdeint(X, func, z0, t, adjoint, method, options, rtol, atol, **kw):
        if adjoint or method != "rk4" or options.get("step_size") != 1.0:
            raise ValueError("HandLoop: rk4 with step 1 and direct gradients only")
        C = X.coeffs.shape[-1] // 4
        parts = [row.split(C, -1) for row in X.coeffs.unbind(-2)]
        tt = t[0]
        z = z0

        def f(z, i, s):
            _, b, c2, d3 = parts[i]
            dx = b if s == 0.0 else torch.add(b, torch.add(c2, d3, alpha=s), alpha=s)
            return torch.bmm(func(tt, z), dx.unsqueeze(-1)).squeeze(-1)

        for i in range(len(parts)):
            k1 = f(z, i, 0.0) if i == 0 else f(z, i - 1, 1.0)  # at a knot: the piece ending there
            k2 = f(z + k1 / 3, i, 1 / 3)
            k3 = f(z + (k2 - k1 / 3), i, 2 / 3)
            k4 = f(z + (k1 - k2 + k3), i, 1.0)
            z = z + (k1 + 3 * (k2 + k3) + k4) * 0.125
        return torch.stack([z0, z], -2)


def run_once(lib, coeffs, func, z0, method, adjoint, rtol, atol):
    """One forward+backward pass: ``(wall seconds, thread CPU seconds, z)``."""
    X = lib.CubicSpline(coeffs)
    kw = dict(adjoint_params=tuple(func.parameters()) + (coeffs,)) if adjoint else {}
    opts = dict(step_size=1.0) if method == "rk4" else {}
    t0, c0 = time.perf_counter(), time.thread_time()
    z = lib.cdeint(X=X, func=func, z0=z0, t=X.interval, adjoint=adjoint, method=method, options=opts, rtol=rtol,
                   atol=atol, **kw)
    loss = z[..., -1, :].pow(2).sum()
    loss.backward()
    return time.perf_counter() - t0, time.thread_time() - c0, z.detach()


def problem(batch: int, length: int, channels: int, hidden: int) -> tuple:
    """The benchmark's data and model (seeded): natural cubic coefficients of smooth series ``(batch, length - 1,
    4 channels)``, a ``Field``, ``z0`` ``(batch, hidden)``, and the float64 reference ``z(T)`` and ``dL/dcoeffs``
    (rk4 with 8 steps per knot interval, landing on the knots, adjoint gradients through neurodyn)."""
    torch.manual_seed(0)
    # smooth series: x[b, k, c] = sin(w k + phase), frequencies 0.02..0.3 per unit time (knots 1 apart)
    w = torch.rand(batch, 1, channels) * 0.28 + 0.02
    phase = torch.rand(batch, 1, channels) * 6.28
    x = torch.sin(w * torch.arange(length, dtype=torch.float32).view(1, -1, 1) + phase)
    coeffs = torchcde.natural_cubic_coeffs(x)
    func = Field(hidden, channels)
    z0 = torch.randn(batch, hidden) * 0.1
    f64 = Field(hidden, channels).double()
    f64.load_state_dict({k: v.double() for k, v in func.state_dict().items()})
    c64 = coeffs.double().requires_grad_(True)
    X64 = ncde.CubicSpline(c64)
    z_ref = ncde.cdeint(X=X64, func=f64, z0=z0.double(), t=X64.interval, adjoint=True, method="rk4",
                        options=dict(step_size=0.125, jump_t=X64.grid_points))
    z_ref[..., -1, :].pow(2).sum().backward()
    return coeffs, func, z0, z_ref.detach()[..., -1, :], c64.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--neurodyn-rtol", type=float, default=None,
                    help="rtol for neurodyn only (default: --rtol); for comparisons at equal error")
    ap.add_argument("--configs", default="rk4-direct,rk4-adjoint,dopri5-direct,dopri5-adjoint",
                    help="comma-separated METHOD-GRADIENT pairs to run; rk4-loop: torchcde against a hand-written rk4 "
                         "loop (HandLoop) in neurodyn's column")
    args = ap.parse_args()
    rtols = {"torchcde": args.rtol, "neurodyn": args.rtol if args.neurodyn_rtol is None else args.neurodyn_rtol}
    torch.set_num_threads(1)
    coeffs, func, z0, z_ref, g_ref = problem(args.batch, args.length, args.channels, args.hidden)
    for lib in (torchcde, ncde):  # warm-up
        run_once(lib, coeffs.clone().requires_grad_(True), func, z0, "rk4", False, args.rtol, args.atol)
    rows = []
    runs = [(m, a, False) for m in ("rk4", "dopri5") for a in (False, True)] + [("rk4", False, True)]
    for method, adjoint, hand in runs:
        config = "loop" if hand else ("adjoint" if adjoint else "direct")
        if f"{method}-{config}" not in args.configs.split(","):
            continue
        other = HandLoop if hand else ncde
        times = {"torchcde": [], "neurodyn": []}
        cpu = {"torchcde": [], "neurodyn": []}
        errs, nfe = {}, {}
        for name, lib in (("torchcde", torchcde), ("neurodyn", other)):  # NFE: one untimed pass
            counted = Counted(func)
            run_once(lib, coeffs.clone().requires_grad_(True), counted, z0, method, adjoint, rtols[name], args.atol)
            nfe[name] = counted.calls
        for _ in range(args.repeats):
            for name, lib in (("torchcde", torchcde), ("neurodyn", other)):
                func.zero_grad()
                c = coeffs.clone().requires_grad_(True)
                wall, thread, z = run_once(lib, c, func, z0, method, adjoint, rtols[name], args.atol)
                times[name].append(wall)
                cpu[name].append(thread)
                errs[name] = (float((z[..., -1, :].double() - z_ref).abs().max()),
                              float((c.grad.double() - g_ref).abs().max() / g_ref.abs().max()))
        t_ref, t_nd = statistics.median(times["torchcde"]), statistics.median(times["neurodyn"])
        c_ref, c_nd = statistics.median(cpu["torchcde"]), statistics.median(cpu["neurodyn"])
        rows.append((method, "direct, hand-written loop" if hand else config, t_ref, t_nd, t_ref / t_nd, errs,
                     c_ref / c_nd, nfe))
        print(f"{method:7s} {rows[-1][1]:8s} torchcde {t_ref:7.3f} s  neurodyn {t_nd:7.3f} s  "
              f"ratio {t_ref / t_nd:5.2f}x  (CPU {c_ref:7.3f} s / {c_nd:7.3f} s: {c_ref / c_nd:5.2f}x; NFE "
              f"{nfe['torchcde']} / {nfe['neurodyn']})  errors vs reference (z, dL/dcoeffs) torchcde "
              f"{errs['torchcde']} neurodyn {errs['neurodyn']}", flush=True)
    print()
    print(f"batch {args.batch}, {args.channels} channels, length {args.length}, hidden {args.hidden}, float32, "
          f"natural cubic, rtol {args.rtol} (neurodyn {rtols['neurodyn']}), atol {args.atol}, rk4 step 1, median of "
          f"{args.repeats}, 1 thread")
    print("| method | gradient | torchcde (s) | neurodyn (s) | speed-up | speed-up (CPU time) "
          "| NFE torchcde / neurodyn | error z(T) torchcde / neurodyn | rel. error dL/dcoeffs torchcde / neurodyn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, g, a, b, ratio, e, cratio, nfe in rows:
        print(f"| {m} | {g} | {a:.3f} | {b:.3f} | {ratio:.2f}x | {cratio:.2f}x | {nfe['torchcde']} / {nfe['neurodyn']} "
              f"| {e['torchcde'][0]:.1e} / {e['neurodyn'][0]:.1e} | {e['torchcde'][1]:.1e} / {e['neurodyn'][1]:.1e} |")


if __name__ == "__main__":
    main()
