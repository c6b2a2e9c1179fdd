"""One ODE adjoint training step with and without the compiled backward evaluations, against torchdiffeq.

A tanh MLP field ``f(t, y)`` (``dim -> hidden -> hidden -> dim``), ``y0`` of shape ``(batch, dim)``, dopri5, outputs at
5 times, loss ``mean(y^2)``, ``gradient="adjoint"``. Modes, alternated round-robin in one process (one thread):

* ``eager``: ``compile=False``;
* ``compiled forward``: ``compile=True`` with the backward solve's evaluations eager
  (``neurodyn.compile.adjoint.adjoint_fields`` replaced by a function returning None, as before they existed);
* ``compiled``: ``compile=True`` (the backward evaluations as compiled programs, :mod:`neurodyn.compile.adjoint`);
* ``torchdiffeq``: ``torchdiffeq.odeint_adjoint`` with the same tolerances.

Prints one JSON row per mode (median CPU time per step, the thread's CPU clock) and the relative difference of the
compiled mode's parameter gradient from the eager one's.

    python benchmarks/bench_adjoint_compiled.py --batch 512 --dim 64 --hidden 128 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchdiffeq

import neurodyn
import neurodyn.compile.adjoint as compiled_adjoint


class Field(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--t-end", type=float, default=1.0)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    func = Field(args.dim, args.hidden).to(dtype)
    y0 = 0.5 * torch.randn(args.batch, args.dim, dtype=dtype)
    ts = torch.linspace(0.0, args.t_end, 5, dtype=dtype)
    real = compiled_adjoint.adjoint_fields

    def step(mode: str) -> list[torch.Tensor]:
        func.zero_grad()
        if mode == "torchdiffeq":
            ys = torchdiffeq.odeint_adjoint(func, y0, ts, method="dopri5", rtol=args.rtol, atol=args.atol)
        else:
            # (solve() reads adjoint_fields when it prepares the solve; the backward pass uses what it read)
            compiled_adjoint.adjoint_fields = real if mode == "compiled" else (lambda *a: None)
            try:
                ys = neurodyn.solve(func, y0, ts, method="dopri5", rtol=args.rtol, atol=args.atol,
                                    gradient="adjoint", compile=mode != "eager").ys
            finally:
                compiled_adjoint.adjoint_fields = real
        ys.square().mean().backward()
        return [p.grad.clone() for p in func.parameters()]

    modes = ["eager", "compiled forward", "compiled", "torchdiffeq"]
    grads = {m: step(m) for m in modes}  # warm-up (compiles)
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(grads["compiled"], grads["eager"]))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            t0 = time.thread_time()
            step(m)
            times[m].append(time.thread_time() - t0)
    for m in modes:
        print(json.dumps({"mode": m, "ms": 1e3 * statistics.median(times[m]), "batch": args.batch, "dim": args.dim,
                          "hidden": args.hidden, "dtype": args.dtype}))
    print(json.dumps({"grad_rel_diff_compiled_vs_eager": diff}))


if __name__ == "__main__":
    main()
