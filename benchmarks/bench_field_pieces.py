#!/usr/bin/env python
"""The pieces of one evaluation of a protocol MLP field (issue 18: what limits the medium and large cases per NFE),
torch against JAX/XLA (diffrax's back end) and numpy's BLAS, float64, one thread, process CPU time per call (median
of ``--rounds`` blocks of ``--calls`` calls).

Rows: each layer's matrix product in the layout neurodyn's compiled loop hands to ``mm`` (``h @ W.T``: ``nn.Linear``'s
weight read as a column-major right operand), the same with a row-major right operand, numpy's ``@`` (the BLAS numpy
ships) and XLA's ``dot``; a hidden layer's bias add and ``tanh`` as neurodyn's compiled code writes them (one fused
kernel, :func:`neurodyn.compile.patches.library_tanh`) and as XLA does; the field as the compiled loop runs it (the
products, then the fused kernels) against ``jax.jit`` of the whole MLP. Last, each ``tanh``'s accuracy: its largest
and mean error in ulp against long double ``tanh`` on 3.7e6 points in [-22, 22].

Usage::

    taskset -c 0 .venv/bin/python benchmarks/bench_field_pieces.py --cases medium,large
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_suite import _jax_setup  # noqa: E402
from common import CASES, MLPField, setup_torch  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` blocks of the process CPU time per call of ``fn`` (microseconds)."""
    fn()
    fn()
    blocks = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        blocks.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(blocks)


def compiled(fn: Callable, *args: torch.Tensor) -> Callable:
    """``fn`` compiled with neurodyn's CPU loop options and its ``tanh`` lowering (``library_tanh``)."""
    from neurodyn.compile.loop import CPU_OPTIONS
    from neurodyn.compile.patches import library_tanh

    out = torch.compile(fn, dynamic=False, options=dict(CPU_OPTIONS))
    with library_tanh():
        out(*args)
    return out


def rows_for(name: str, calls: int, rounds: int) -> list[tuple[str, float, float]]:
    import jax
    import jax.numpy as jnp

    case = CASES[name]
    field = MLPField(case.dim, case.hidden)
    linears = [m for m in field.net if isinstance(m, torch.nn.Linear)]
    h = torch.randn(case.batch, case.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        for i, lin in enumerate(linears):
            x = torch.randn(case.batch, lin.in_features, dtype=torch.float64)
            w = lin.weight
            wt_row = w.t().contiguous()
            xn, wn = x.numpy(), wt_row.numpy()
            jx, jw = jnp.asarray(xn), jnp.asarray(wn)
            dot = jax.jit(lambda a, b: a @ b)
            label = f"layer {i}: ({case.batch}, {lin.in_features}) x ({lin.in_features}, {lin.out_features})"
            torch_us = per_call_us(lambda x=x, w=w: x @ w.t(), calls, rounds)
            rows.append((label + " torch, as nn.Linear (W.T column-major)", torch_us,
                         per_call_us(lambda jx=jx, jw=jw, dot=dot: dot(jx, jw).block_until_ready(), calls, rounds)))
            rows.append((label + " torch, row-major right operand", per_call_us(lambda x=x, b=wt_row: x @ b, calls,
                                                                                 rounds), rows[-1][2]))
            rows.append((label + " numpy's BLAS", per_call_us(lambda a=xn, b=wn: a @ b, calls, rounds), rows[-1][2]))
        hidden = torch.randn(case.batch, case.hidden, dtype=torch.float64)
        bias = linears[0].bias
        act = compiled(lambda v, b: torch.tanh(v + b), hidden, bias)
        jact = jax.jit(lambda v, b: jnp.tanh(v + b))
        jh, jb = jnp.asarray(hidden.numpy()), jnp.asarray(bias.numpy())
        rows.append((f"bias + tanh on ({case.batch}, {case.hidden}), one fused kernel",
                     per_call_us(lambda: act(hidden, bias), calls, rounds),
                     per_call_us(lambda: jact(jh, jb).block_until_ready(), calls, rounds)))
        params = [(jnp.asarray(m.weight.t().contiguous().numpy()), jnp.asarray(m.bias.numpy())) for m in linears]

        def mlp(y, ps):
            for k, (wk, bk) in enumerate(ps):
                y = y @ wk + bk
                if k < len(ps) - 1:
                    y = jnp.tanh(y)
            return y

        jfield = jax.jit(mlp)
        jy = jnp.asarray(h.numpy())
        # the compiled loop writes each layer as mm and its bias add (and tanh) as one fused kernel after it
        # (loop.LoopProducts): its field costs the products as nn.Linear hands them over plus the fused kernels
        ours = sum(r[1] for r in rows[0:3 * len(linears):3]) + (len(linears) - 1) * rows[-1][1]
        xla_pieces = sum(r[2] for r in rows[0:3 * len(linears):3]) + (len(linears) - 1) * rows[-1][2]
        rows.append(("field: neurodyn's products + fused kernels / XLA's pieces (sums of the rows above)", ours,
                     xla_pieces))
        rows.append(("field: neurodyn's pieces / XLA's jit of the whole MLP", ours,
                     per_call_us(lambda: jfield(jy, params).block_until_ready(), calls, rounds)))
    return rows


def tanh_ulps() -> list[tuple[str, float, float]]:
    """Max and mean ulp error of neurodyn's compiled float64 ``tanh`` and of XLA's, against long double ``tanh``."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-2, 2, 400001), np.linspace(-40, 40, 100001), 3 * rng.standard_normal(200000),
                        rng.uniform(-22, 22, 3_000_000)])
    ref = np.tanh(x.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref.astype(np.float64)))
    ours = compiled(torch.tanh, torch.from_numpy(x))(torch.from_numpy(x)).numpy()
    xla = np.asarray(jax.jit(jnp.tanh)(jnp.asarray(x)))
    out = []
    for name, y in (("neurodyn", ours), ("XLA", xla)):
        ulps = np.abs(y.astype(np.longdouble) - ref) / spacing
        out.append((name, float(ulps.max()), float(ulps.mean())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="medium,large")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    setup_torch()
    _jax_setup()  # float64, one thread, as bench_suite runs diffrax
    print("| case | piece | torch / neurodyn (us) | XLA (us) | ratio |")
    print("|---|---|---|---|---|")
    for name in args.cases.split(","):
        for label, ours, xla in rows_for(name, args.calls, args.rounds):
            print(f"| {name} | {label} | {ours:.0f} | {xla:.0f} | {ours / xla:.2f} |", flush=True)
    print("\n| float64 tanh | max ulp | mean ulp |\n|---|---|---|")
    for name, worst, mean in tanh_ulps():
        print(f"| {name} | {worst:.2f} | {mean:.3f} |")


if __name__ == "__main__":
    main()
