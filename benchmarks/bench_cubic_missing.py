"""The cost of :func:`neurodyn.paths.natural_cubic_coeffs` on data with missing values (NaN).

A ``(64, 29, 13)`` float32 batch with 50% of its values dropped, two patterns: whole time points per series (all
channels of a dropped ``(series, time)`` NaN, as the demo's ``drop_observations(per="time")``) and each value on its
own; plus the complete batch (no NaN) as a control. Median (and min) of ``--repeats`` calls, forward only and forward
+ backward (``sum`` of the coefficients w.r.t. the data), one thread. Alternate an old and a new tree:

    PYTHONPATH=/tmp/old/src taskset -c 1 python benchmarks/bench_cubic_missing.py --label old
    PYTHONPATH=src taskset -c 1 python benchmarks/bench_cubic_missing.py --label new
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neurodyn.paths import natural_cubic_coeffs


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), min(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, T, C = 64, 29, 13
    x = torch.randn(B, T, C, generator=g)
    cases = {
        "time points": x.masked_fill(torch.rand(B, T, 1, generator=g) < 0.5, float("nan")),
        "values": x.masked_fill(torch.rand(B, T, C, generator=g) < 0.5, float("nan")),
        "no NaN": x,
    }
    for name, data in cases.items():
        fwd = _time(lambda d=data: natural_cubic_coeffs(d), args.repeats)

        def fb(d=data):
            xx = d.clone().requires_grad_(True)
            natural_cubic_coeffs(xx).sum().backward()

        both = _time(fb, args.repeats)
        print(f"{args.label}\t{name}\tforward {fwd[0] * 1e3:.2f} ms (min {fwd[1] * 1e3:.2f})\t"
              f"forward+backward {both[0] * 1e3:.2f} ms (min {both[1] * 1e3:.2f})", flush=True)


if __name__ == "__main__":
    main()
