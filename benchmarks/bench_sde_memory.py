"""Peak memory of one SDE training step as the number of steps grows 1x -> 16x: gradient="direct" vs "adjoint".

Each configuration runs in a fresh subprocess (``--child``): it builds the 64-d MLP SDE of ``bench_sde.py`` (batch
``--batch``, reversible Heun, Stratonovich, diagonal noise), runs a two-step solve to warm up, records its
resident set size, then runs one training step (``mean(y(1)^2).backward()``) at ``dt = 0.01 / k`` and reports the
growth of the peak RSS (``ru_maxrss``) over that baseline. Growth ratio = extra peak at 16x / extra peak at 1x.

    taskset -c 1 .venv/bin/python benchmarks/bench_sde_memory.py [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(gradient: str, k: int, batch: int) -> None:
    from bench_sde import DIM, MLPSDE

    import neurodyn
    from neurodyn.paths import BrownianInterval

    torch.set_num_threads(1)
    sde = MLPSDE("stratonovich")
    y0 = torch.randn(batch, DIM)
    ts = torch.tensor([0.0, 1.0])
    params = list(sde.parameters())

    def step(dt: float) -> None:
        bm = BrownianInterval(0.0, 1.0, shape=(batch, DIM), entropy=1)
        term = neurodyn.sde_term(sde.f, sde.g, bm, sde_type="stratonovich")
        kw = {"params": params} if gradient == "adjoint" else {}
        sol = neurodyn.solve(term, y0, ts, method="reversible_heun", step_size=dt, gradient=gradient, **kw)
        sol.ys[-1].pow(2).mean().backward()

    step(0.5)  # warm-up: two steps
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(0.01 / k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"gradient": gradient, "k": k, "extra_peak_kib": peak - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gradients", default="direct,adjoint")
    parser.add_argument("--child", nargs=2, metavar=("GRADIENT", "K"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.batch)
        return
    rows = []
    gradients = args.gradients.split(",")
    for gradient in gradients:
        for k in (1, 4, 16):
            out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--child", gradient, str(k)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for gradient in gradients:
        r = {row["k"]: row["extra_peak_kib"] for row in rows if row["gradient"] == gradient}
        print(f"{gradient}: extra peak RSS 1x {r[1]} KiB, 4x {r[4]} KiB, 16x {r[16]} KiB, growth "
              f"{r[16] / max(r[1], 1):.2f}x")


if __name__ == "__main__":
    main()
