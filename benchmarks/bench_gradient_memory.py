#!/usr/bin/env python
"""Memory and time of one gradient step with each gradient method (the table of docs/guide/gradients.md).

Problem: the benchmark protocol's tanh MLP field (``common.py``: dim 16, hidden 128, batch 256, float64), dopri5
at ``rtol=1e-6, atol=1e-8``, 11 outputs on ``[0, T]``; one step is forward solve + ``ys.pow(2).mean()`` +
``backward()`` to the field's parameters. ``T`` is taken at 1x, 4x and 16x its base value (2.5), so that the
number of solver steps grows and the memory that grows with it shows.

Measured per method (``direct``, ``adjoint``, ``checkpoint`` with 16 checkpoints, ``interpolated``):

* **peak memory**: each (method, T) runs in a fresh subprocess. After building the field and the data, the
  subprocess resets the kernel's record of its peak resident set (``/proc/self/clear_refs``, value 5), runs the
  step, and reads the peak (``VmHWM``): peak - resident before = the memory the step needed at its worst point,
  forward and backward, beyond what the process already held. Where the reset is not allowed the subprocess
  falls back to ``ru_maxrss`` deltas (marked in the output);
* **autograd tape**: the bytes of the tensors autograd saved for the backward pass during the forward solve
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once; deterministic): what the forward leaves
  for the backward pass, the part of the memory that scales with the steps for ``direct``;
* **time**: median of ``--repeats`` steps after a warm-up, the methods interleaved (rotating order) in one
  process, one thread; the ratio to ``direct`` is the robust figure on a loaded machine;
* NFE forward / backward, and the gradient's relative difference to ``direct`` (max over parameters).

Usage::

    taskset -c 1 .venv/bin/python benchmarks/bench_gradient_memory.py              # ~3 min on one core
    taskset -c 1 .venv/bin/python benchmarks/bench_gradient_memory.py --quick      # smoke run (~20 s)

Writes ``benchmarks/out/gradient_memory.json`` and ``benchmarks/out/gradient_memory.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, Case, CountingField, import_neurodyn, make_problem  # noqa: E402

METHODS = ("direct", "adjoint", "checkpoint", "interpolated")
BASE = Case("gradmem", dim=16, hidden=128, batch=256, T=2.5, rtol=1e-6)


def case_for(scale: int) -> Case:
    return Case(BASE.name, BASE.dim, BASE.hidden, BASE.batch, BASE.T * scale, BASE.rtol)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def one_step(nd, prob, method: str, counter: CountingField, forward_context=contextlib.nullcontext
             ) -> tuple[list[torch.Tensor], int, int]:
    """A training step: forward solve (inside ``forward_context()``), loss, backward. Returns (param grads,
    nfe forward, nfe backward)."""
    for p in counter.parameters():
        p.grad = None
    counter.nfe = 0
    with forward_context():
        sol = nd.solve(counter, prob.y0, prob.t, method="dopri5", rtol=prob.case.rtol, atol=prob.case.atol,
                       gradient=method, checkpoints=16)
    nfe_f = counter.nfe
    sol.ys.pow(2).mean().backward()
    return [p.grad.detach().clone() for p in counter.parameters()], nfe_f, counter.nfe - nfe_f


def worker(method: str, scale: int) -> dict:
    """One step in this (fresh) process: peak memory and the autograd tape."""
    torch.set_num_threads(1)
    nd, why = import_neurodyn()
    assert nd is not None, why
    prob = make_problem(case_for(scale))
    prob.field.requires_grad_(True)
    counter = CountingField(prob.field)
    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved by several operations counts once

    def pack(x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return x

    def forward_context():
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)

    rss_before = _status_kib("VmRSS")
    exact = _reset_peak()
    maxrss_before = _status_kib("VmHWM")
    _, nfe_f, nfe_b = one_step(nd, prob, method, counter, forward_context)
    peak = _status_kib("VmHWM")
    base = rss_before if exact else maxrss_before
    return {"method": method, "scale": scale, "T": prob.case.T, "peak_mib": (peak - base) / 1024,
            "tape_mib": sum(saved.values()) / 2**20, "exact_peak": exact, "nfe_forward": nfe_f, "nfe_backward": nfe_b}


def run_worker(method: str, scale: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(scale)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(scale: int, repeats: int) -> dict:
    """Median step time per method (interleaved, rotating order) and the gradients' difference to direct."""
    nd, why = import_neurodyn()
    assert nd is not None, why
    prob = make_problem(case_for(scale))
    prob.field.requires_grad_(True)
    counter = CountingField(prob.field)
    grads = {m: one_step(nd, prob, m, counter)[0] for m in METHODS}  # warm-up, and the gradients
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeats):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for m in order:
            t0 = time.perf_counter()
            one_step(nd, prob, m, counter)
            times[m].append(time.perf_counter() - t0)
    ref = grads["direct"]
    out = {}
    for m in METHODS:
        rel = max(float((g - r).norm() / r.norm()) for g, r in zip(grads[m], ref))
        out[m] = {"time_s": statistics.median(times[m]), "grad_rel_diff": rel}
    return out


def table(rows: list[dict], times: dict) -> str:
    scales = sorted({r["scale"] for r in rows})
    lo, hi = scales[0], scales[-1]
    by = {(r["method"], r["scale"]): r for r in rows}
    head = ["method"] + [f"peak MiB, T={case_for(s).T:g}" for s in scales] + [f"tape MiB, T={case_for(hi).T:g}",
            f"growth {hi}x T", f"time, T={case_for(lo).T:g}", "vs direct", "NFE fwd/bwd", "grad vs direct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_direct = times["direct"]["time_s"]
    for m in METHODS:
        growth = by[(m, hi)]["peak_mib"] / max(by[(m, lo)]["peak_mib"], 1e-9)
        cells = [f"`{m}`"] + [f"{by[(m, s)]['peak_mib']:.1f}" for s in scales] + [
            f"{by[(m, hi)]['tape_mib']:.1f}", f"{growth:.2f}x", f"{times[m]['time_s'] * 1e3:.0f} ms",
            f"{times[m]['time_s'] / t_direct:.2f}x", f"{by[(m, lo)]['nfe_forward']}/{by[(m, lo)]['nfe_backward']}",
            f"{times[m]['grad_rel_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    if not all(r["exact_peak"] for r in rows):
        lines.append("\n(peak from ru_maxrss deltas: the kernel refused the peak reset)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "SCALE"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="T at 1x and 4x, 3 timing repeats")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    torch.set_num_threads(1)
    scales = (1, 4) if args.quick else (1, 4, 16)
    repeats = 3 if args.quick else args.repeats
    rows = [run_worker(m, s) for s in scales for m in METHODS]
    times = timing(scales[0], repeats)
    md = (f"Gradient methods, one training step: MLP field dim={BASE.dim} hidden={BASE.hidden} batch={BASE.batch} "
          f"float64, dopri5 rtol={BASE.rtol:g} atol={BASE.atol:g}, checkpoint with 16 checkpoints; one thread.\n\n"
          + table(rows, times) + "\n")
    print(md)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "gradient_memory.json").write_text(json.dumps({"rows": rows, "times": times, "base": vars(BASE),
                                                              "pid_cpus": sorted(os.sched_getaffinity(0))},
                                                             indent=1))
    (OUT_DIR / "gradient_memory.md").write_text(md)


if __name__ == "__main__":
    main()
