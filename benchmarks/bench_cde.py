"""cdeint forward+backward: neurodyn.compat.torchcde vs torchcde 0.2.5 (torchdiffeq backend), one process.

Same model (MLP vector field, float32), same data (natural cubic coefficients computed once by torchcde and used by
both), same settings; the variants are interleaved round by round on one thread, and the per-variant median wall of a
forward+backward pass is reported with the ratio torchcde / neurodyn (> 1: neurodyn faster).

    taskset -c 1 python benchmarks/bench_cde.py                 # batch 256, 32 channels, length 100, hidden 32
    taskset -c 1 python benchmarks/bench_cde.py --repeats 3 --batch 64
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


def run_once(lib, coeffs, func, z0, method, adjoint, rtol, atol):
    X = lib.CubicSpline(coeffs)
    kw = dict(adjoint_params=tuple(func.parameters()) + (coeffs,)) if adjoint else {}
    opts = dict(step_size=1.0) if method == "rk4" else {}
    t0 = time.perf_counter()
    z = lib.cdeint(X=X, func=func, z0=z0, t=X.interval, adjoint=adjoint, method=method, options=opts, rtol=rtol,
                   atol=atol, **kw)
    loss = z[..., -1, :].pow(2).sum()
    loss.backward()
    return time.perf_counter() - t0, z.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.channels).cumsum(-2) / args.length ** 0.5
    coeffs = torchcde.natural_cubic_coeffs(x)
    func = Field(args.hidden, args.channels)
    z0 = torch.randn(args.batch, args.hidden) * 0.1
    rows = []
    for method in ("rk4", "dopri5"):
        for adjoint in (False, True):
            times = {"torchcde": [], "neurodyn": []}
            outs = {}
            for r in range(args.repeats + 1):  # round 0: warm-up
                for name, lib in (("torchcde", torchcde), ("neurodyn", ncde)):
                    func.zero_grad()
                    c = coeffs.clone().requires_grad_(True)
                    wall, z = run_once(lib, c, func, z0, method, adjoint, args.rtol, args.atol)
                    if r:
                        times[name].append(wall)
                    outs[name] = (z, c.grad.clone())
            t_ref, t_nd = statistics.median(times["torchcde"]), statistics.median(times["neurodyn"])
            dz = float((outs["torchcde"][0] - outs["neurodyn"][0]).abs().max())
            dg = float((outs["torchcde"][1] - outs["neurodyn"][1]).abs().max() / outs["torchcde"][1].abs().max())
            rows.append((method, "adjoint" if adjoint else "direct", t_ref, t_nd, t_ref / t_nd, dz, dg))
            print(f"{method:7s} {rows[-1][1]:8s} torchcde {t_ref:7.3f} s  neurodyn {t_nd:7.3f} s  "
                  f"ratio {t_ref / t_nd:5.2f}x  max|dz| {dz:.1e}  rel|d grad coeffs| {dg:.1e}", flush=True)
    print()
    print(f"batch {args.batch}, {args.channels} channels, length {args.length}, hidden {args.hidden}, float32, "
          f"natural cubic, rtol {args.rtol}, atol {args.atol}, rk4 step 1, median of {args.repeats}, 1 thread")
    print("| method | gradient | torchcde (s) | neurodyn (s) | speed-up | max abs diff z | rel diff dL/dcoeffs |")
    print("|---|---|---|---|---|---|---|")
    for m, g, a, b, ratio, dz, dg in rows:
        print(f"| {m} | {g} | {a:.3f} | {b:.3f} | {ratio:.2f}x | {dz:.1e} | {dg:.1e} |")


if __name__ == "__main__":
    main()
