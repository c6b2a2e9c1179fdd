"""Probe: what a compiled training step could give for fixed-step Euler--Maruyama on bench_sde.py's problem (64-d MLP
drift, diagonal MLP diffusion, batch 512, dt = 0.01, float32, one thread), not wired into ``solve``.

Forward: the 100 steps as one compiled ``torch._higher_order_ops.scan`` without autograd, the Brownian increments
stacked on the host first (the same intervals ``solve`` queries), the scan's per-step outputs being the step start
states (no record rewritten per step). Backward: one compiled ``while_loop`` over the steps, last first, pulling the
cotangent of ``y`` back through each step with ``torch.func.vjp`` of the same step (its four forward products are
recomputed: 16 products per step against autograd's 12) and summing the parameters' gradients. Loss: mean of
``y(1)^2``. Prints the gradients' largest relative difference from ``neurodyn.solve``'s (direct) and the training
step's thread CPU time (median of ``--repeats``, interleaved) for neurodyn eager, torchsde and the probe.

    taskset -c 1 PYTHONPATH=src python benchmarks/probe_sde_train_compiled.py --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._higher_order_ops.scan import scan
from torch.func import functional_call, vjp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sde as B  # noqa: E402

from neurodyn.compat.torchsde import BrownianInterval  # noqa: E402
from neurodyn.compile.loop import LOOP_OPTIONS, library_tanh, vectorize_strided_loads  # noqa: E402

N = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ts = torch.tensor([0.0, 1.0])
    y0 = torch.randn(B.BATCH, B.DIM, generator=torch.Generator().manual_seed(1))
    sde = B.MLPSDE("ito")
    bm = BrownianInterval(0.0, 1.0, shape=(B.BATCH, B.DIM), dtype=torch.float32, entropy=5, cache_size=None)
    names = [n for n, _ in sde.named_parameters()]

    def step(params, y, dW, h):
        p = dict(zip(names, params))
        f = functional_call(sde.drift, {k[6:]: v for k, v in p.items() if k.startswith("drift.")}, (y,))
        z = functional_call(sde.diff, {k[5:]: v for k, v in p.items() if k.startswith("diff.")}, (y,))
        return y + f * h + 0.2 * torch.sigmoid(z) * dW

    def forward(y, dWs, hs, *params):
        def comb(y, x):
            return step(params, y, x[0], x[1]), y.clone()
        return scan(comb, y, (dWs, hs))

    def backward(a, ys, dWs, hs, *params):
        def cond(i, a, *gs):
            return i >= 0

        def body(i, a, *gs):
            at = i.view(1)
            dW, h = dWs.index_select(0, at).squeeze(0), hs.index_select(0, at).view(())
            _, pull = vjp(lambda yy, *pp: step(pp, yy, dW, h), ys.index_select(0, at).squeeze(0), *params)
            outs = pull(a)
            return (i - 1, outs[0], *[g0 + g1 for g0, g1 in zip(gs, outs[1:])])

        start = torch.full((), N - 1, dtype=torch.int64)
        return torch._higher_order_ops.while_loop(cond, body, (start, a, *[torch.zeros_like(p) for p in params]))

    with vectorize_strided_loads(), library_tanh():
        c_forward = torch.compile(forward, options=LOOP_OPTIONS, fullgraph=True)
        c_backward = torch.compile(backward, options=LOOP_OPTIONS, fullgraph=True)

    def probe() -> None:
        dWs = torch.stack([bm(i * B.DT, (i + 1) * B.DT if i < N - 1 else 1.0) for i in range(N)])
        hs = torch.full((N,), B.DT)
        hs[-1] = 1.0 - (N - 1) * B.DT
        params = [p.detach() for p in sde.parameters()]
        with torch.no_grad(), vectorize_strided_loads(), library_tanh():
            y_end, ys = c_forward(y0, dWs, hs, *params)
            _, _, *grads = c_backward(2.0 * y_end / y_end.numel(), ys, dWs, hs, *params)
        for p, g in zip(sde.parameters(), grads):
            p.grad = g

    def eager() -> None:
        sde.zero_grad()
        B._nd(sde, y0, ts, bm, "euler", B.DT)[-1].pow(2).mean().backward()

    def torchsde_step() -> None:
        sde.zero_grad()
        B._ts(sde, y0, ts, bm, "euler", B.DT)[-1].pow(2).mean().backward()

    eager()
    reference = [p.grad.clone() for p in sde.parameters()]
    probe()
    rel = max(float((p.grad - r).abs().max() / r.abs().max()) for p, r in zip(sde.parameters(), reference))
    print(f"gradients: largest relative difference from solve(): {rel:.2e}")
    entries = {"neurodyn eager": eager, "torchsde": torchsde_step, "probe": probe}
    times: dict[str, list[float]] = {k: [] for k in entries}
    for fn in entries.values():
        fn()
    for _ in range(args.repeats):
        for k, fn in entries.items():
            t0 = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v * 1e3:.1f} ms, torchsde / this {med['torchsde'] / v:.2f}")


if __name__ == "__main__":
    main()
