"""SDE training step (forward + backward): neurodyn.compat.torchsde vs torchsde 0.2.6, direct and adjoint, one process.

A Stratonovich SDE with a 64-d MLP drift and a diagonal diffusion ``sigmoid(w * y + b)`` (``g_i`` depends on ``y_i``),
batch 512, t in [0, 1], dt = 0.01, float32, loss ``mean(y(1)^2)``. Each library integrates on its own
BrownianInterval (same settings). Variants interleaved round by round on one thread; the per-variant minimum wall
over the rounds and the ratio torchsde / neurodyn (> 1: neurodyn faster). Then the memory the backward keeps: the
bytes autograd saves during the forward for 16 and 256 steps (adjoint: flat; direct: grows with the steps).

    taskset -c 1 python benchmarks/bench_sde_adjoint.py
    taskset -c 1 python benchmarks/bench_sde_adjoint.py --rounds 5 --batch 128
"""

from __future__ import annotations

import argparse
import time

import torch
import torchsde

import neurodyn.compat.torchsde as nts


class SDE(torch.nn.Module):
    noise_type = "diagonal"
    sde_type = "stratonovich"

    def __init__(self, d: int, width: int = 64):
        super().__init__()
        self.drift = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d))
        self.w = torch.nn.Parameter(0.1 * torch.randn(d))
        self.b = torch.nn.Parameter(torch.zeros(d))

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return torch.sigmoid(self.w * y + self.b)


def train_step(lib, fn, sde, y0, method, dt) -> float:
    bm = lib.BrownianInterval(0.0, 1.0, size=tuple(y0.shape), entropy=1)
    sde.zero_grad()
    start = time.perf_counter()
    ys = fn(sde, y0, torch.tensor([0.0, 1.0]), bm=bm, method=method, dt=dt)
    ys[-1].pow(2).mean().backward()
    return time.perf_counter() - start


def saved_mib(fn, sde, y0, method, dt) -> float:
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    bm = nts.BrownianInterval(0.0, 1.0, size=tuple(y0.shape), entropy=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(sde, y0, torch.tensor([0.0, 1.0]), bm=bm, method=method, dt=dt)
    return total[0] / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dt", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sde = SDE(args.dim)
    y0 = torch.randn(args.batch, args.dim)
    print(f"batch {args.batch}, d {args.dim}, dt {args.dt}, min over {args.rounds} rounds (s)")
    print("| method | gradient | neurodyn | torchsde | torchsde / neurodyn |")
    print("|---|---|---|---|---|")
    for method in ("midpoint", "reversible_heun"):
        walls: dict = {}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, ours, theirs in (("direct", nts.sdeint, torchsde.sdeint),
                                       ("adjoint", nts.sdeint_adjoint, torchsde.sdeint_adjoint)):
                walls.setdefault((name, "n"), []).append(train_step(nts, ours, sde, y0, method, args.dt))
                walls.setdefault((name, "t"), []).append(train_step(torchsde, theirs, sde, y0, method, args.dt))
        for name in ("direct", "adjoint"):
            n, t = min(walls[(name, "n")][1:]), min(walls[(name, "t")][1:])
            print(f"| {method} | {name} | {n:.3f} | {t:.3f} | {t / n:.2f} |")
    print()
    print("| method | gradient | saved MiB, 16 steps | 256 steps | growth |")
    print("|---|---|---|---|---|")
    for method in ("midpoint", "reversible_heun"):
        for name, fn in (("adjoint", nts.sdeint_adjoint), ("direct", nts.sdeint)):
            a, b = saved_mib(fn, sde, y0, method, 1 / 16), saved_mib(fn, sde, y0, method, 1 / 256)
            print(f"| {method} | {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
