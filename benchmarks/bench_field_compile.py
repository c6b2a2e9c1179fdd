#!/usr/bin/env python
"""One evaluation of a protocol MLP field: eager against ``torch.compile`` (and against ``torch.compile`` keeping
ATen's ``tanh``), CPU time per evaluation, interleaved blocks, best of ``--rounds``.

Usage::

    taskset -c 1 .venv/bin/python benchmarks/bench_field_compile.py --dim 64 --hidden 256 --batch 512   # large case

The third variant swaps ``aten.tanh`` in Inductor's post-grad graph for an opaque custom op calling ``torch.tanh``,
so the compiled field keeps ATen's (MKL VML) ``tanh`` while Inductor lowers everything else: it tells how much of
the compiled field's cost is Inductor's float64 ``tanh``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MLPField  # noqa: E402


@torch.library.custom_op("neurodyn_bench::aten_tanh", mutates_args=())
def aten_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


@aten_tanh.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def keep_aten_tanh(graph: torch.fx.Graph) -> None:
    """Inductor post-grad pass: every ``aten.tanh`` becomes the opaque op above (an extern kernel call)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.tanh.default:
            node.target = torch.ops.neurodyn_bench.aten_tanh.default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f = MLPField(args.dim, args.hidden)
    y = torch.randn(args.batch, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.zeros((), dtype=torch.float64)
    compiled = torch.compile(f, options={"cpp_wrapper": True})
    aten = torch.compile(MLPField(args.dim, args.hidden),
                         options={"cpp_wrapper": True, "post_grad_custom_pre_pass": keep_aten_tanh})
    variants = {"eager": lambda: f(t, y), "compiled": lambda: compiled(t, y),
                "compiled, ATen tanh": lambda: aten(t, y)}
    with torch.no_grad():
        ref = f(t, y)
        for name, fn in variants.items():
            err = float((fn() - ref).abs().max())  # the first call compiles
            print(f"{name}: max |difference| to eager {err:.1e}", flush=True)
        best = dict.fromkeys(variants, float("inf"))
        n = max(1, int(2e6 // (args.batch * args.hidden)))
        for _ in range(args.rounds):
            for name, fn in variants.items():
                s = time.thread_time()
                for _ in range(n):
                    fn()
                best[name] = min(best[name], (time.thread_time() - s) / n)
    for name, v in best.items():
        print(f"{name}: {v * 1e6:.1f} us per evaluation ({v / best['eager']:.2f}x eager)")


if __name__ == "__main__":
    main()
