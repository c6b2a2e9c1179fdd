#!/usr/bin/env python
"""Gradient benchmark: one training step with each of neurodyn's gradient methods and torchdiffeq's.

One training step = forward solve + ``loss = ys.pow(2).mean()`` + ``loss.backward()`` with respect to
the vector field's parameters, on the core protocol's MLP field (see ``common.py``), dopri5,
``atol = rtol / 100``, 11 output times, one thread.

Entries: neurodyn ``solve(..., gradient=)`` with ``direct``, ``adjoint``, ``checkpoint``
(``checkpoints=16``) and ``interpolated``; torchdiffeq ``odeint`` (backprop through the solver) and
``odeint_adjoint`` (its defaults: full adjoint norm); and, for reference only, torchdiffeq
``odeint_adjoint`` with ``adjoint_options={"norm": "seminorm"}``.

Measured:

* wall: median of ``--repeats`` timed steps after one warm-up, interleaved across entries (rotating
  order) in this process, so that load from other processes hits every entry alike;
* NFE: a counter module around the field, read after the forward solve and after ``backward``
  (forward / backward split); counted in the memory run;
* peak memory: each entry runs one step in a fresh subprocess. After building the field and the data
  the subprocess reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak RSS so far), runs the
  step, reads it again: peak = after - before. This is the memory the step needed beyond everything
  the process already held (model, data, imported libraries);
* memory growth: the same peak measurement for direct, adjoint, checkpoint (16) and interpolated as
  the integration time grows 1x, 2x, 4x, 8x, 16x (default: the large case, T = 5 .. 80).

Usage::

    .venv/bin/python benchmarks/bench_gradients.py                   # everything (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/bench_gradients.py --quick           # smoke run (~1 min)
    .venv/bin/python benchmarks/bench_gradients.py --update-readme   # also refresh README's section

Writes ``benchmarks/out/gradients.json`` and ``benchmarks/out/gradients.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import DTYPE, N_TIMES, OUT_DIR, Case, CountingField, import_neurodyn, make_problem  # noqa: E402

CASES = {
    "small": Case("small", dim=2, hidden=64, batch=1, T=10.0, rtol=1e-6),
    "large": Case("large", dim=64, hidden=256, batch=512, T=5.0, rtol=1e-6),
    # Used for the growth table only when asked for (--growth-case mid).
    "mid": Case("mid", dim=16, hidden=128, batch=256, T=5.0, rtol=1e-6),
}
ENTRIES = [
    "neurodyn:direct", "neurodyn:adjoint", "neurodyn:checkpoint", "neurodyn:interpolated",
    "torchdiffeq:odeint", "torchdiffeq:odeint_adjoint", "torchdiffeq:odeint_adjoint(seminorm)",
]
GROWTH_ENTRIES = ["neurodyn:direct", "neurodyn:adjoint", "neurodyn:checkpoint", "neurodyn:interpolated"]
GROWTH_FACTORS = (1, 2, 4, 8, 16)
METHOD = "dopri5"
CHECKPOINTS = 16

README_HEADING = "## Gradient methods"
README_START = "<!-- bench-gradients:start -->"
README_END = "<!-- bench-gradients:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# One training step
# --------------------------------------------------------------------------- #
def make_trainable_problem(case: Case):
    prob = make_problem(case)
    prob.field.requires_grad_(True)
    return prob


def forward(entry: str, field, prob):
    """The forward solve of ``entry``; returns (ys, neurodyn stats or None)."""
    c = prob.case
    kw = {"rtol": c.rtol, "atol": c.atol, "method": METHOD}
    lib, what = entry.split(":")
    if lib == "neurodyn":
        import neurodyn

        sol = neurodyn.solve(field, prob.y0, prob.t, gradient=what, checkpoints=CHECKPOINTS, **kw)
        return sol.ys, sol.stats
    import torchdiffeq

    if what == "odeint":
        return torchdiffeq.odeint(field, prob.y0, prob.t, **kw), None
    if what == "odeint_adjoint":
        return torchdiffeq.odeint_adjoint(field, prob.y0, prob.t, **kw), None
    if what == "odeint_adjoint(seminorm)":
        return torchdiffeq.odeint_adjoint(field, prob.y0, prob.t, adjoint_options={"norm": "seminorm"}, **kw), None
    raise ValueError(entry)


def train_step(entry: str, field, prob, counter: CountingField | None = None) -> dict:
    """Forward + loss + backward; parameters' .grad are left set (the caller clears them)."""
    ys, stats = forward(entry, field, prob)
    nfe_f = counter.nfe if counter is not None else None
    loss = ys.pow(2).mean()
    loss.backward()
    out = {"loss": float(loss.detach())}
    if counter is not None:
        out["nfe_forward"] = nfe_f
        out["nfe_backward"] = counter.nfe - nfe_f
    if stats is not None:
        out["steps"] = int(stats["steps"])
        out["steps_backward"] = stats.get("steps_backward")
        out["nfe_stats"] = int(stats["nfe"])
        out["nfe_backward_stats"] = stats.get("nfe_backward")
        out["checkpoints"] = stats.get("checkpoints")
        out["adjoint_drift"] = stats.get("adjoint_drift")
    return out


def clear_grads(field) -> None:
    for p in field.parameters():
        p.grad = None


# --------------------------------------------------------------------------- #
# Worker: one step in a fresh process, peak RSS
# --------------------------------------------------------------------------- #
def _proc_status_kib(key: str) -> int | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak of this process image) from /proc/self/status, KiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def worker(spec: dict) -> dict:
    common.setup_torch()
    nd, reason = import_neurodyn()
    if nd is None:
        raise RuntimeError(reason)
    import torchdiffeq  # noqa: F401 - imported before the baseline like neurodyn

    case = Case(**spec["case"])
    prob = make_trainable_problem(case)
    counter = CountingField(prob.field)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_before, rss_before = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    res = train_step(spec["entry"], counter, prob, counter)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_after = _proc_status_kib("VmHWM")
    res.update({
        "entry": spec["entry"], "case": spec["case"], "wall_first_s": wall,
        "maxrss_before_kib": before, "maxrss_after_kib": after, "vmrss_before_kib": rss_before,
        "vmhwm_before_kib": hwm_before, "vmhwm_after_kib": hwm_after,
        "peak_mib": (after - before) / 1024.0,
        "peak_vmhwm_mib": None if hwm_before is None else (hwm_after - hwm_before) / 1024.0,
    })
    # Linux carries the parent's RSS high-water mark into ru_maxrss across fork+exec: if the baseline
    # is above this process image's own peak (VmHWM), ru_maxrss is not this process's and the
    # difference would under-read. Then the per-image VmHWM difference is used and flagged.
    res["maxrss_inherited"] = hwm_before is not None and before > hwm_before + 1024
    if res["maxrss_inherited"]:
        res["peak_mib"] = res["peak_vmhwm_mib"]
    return res


def run_worker(entry: str, case: Case, timeout: float = 900.0) -> dict:
    spec = {"entry": entry, "case": {"name": case.name, "dim": case.dim, "hidden": case.hidden,
                                     "batch": case.batch, "T": case.T, "rtol": case.rtol}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    err = "?"
    for _attempt in range(2):  # one retry: the source tree may be mid-edit when a worker imports it
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"entry": entry, "error": f"timeout after {timeout:.0f} s"}
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        log(f"  worker {entry} failed ({err}); retrying once")
        time.sleep(2.0)
    return {"entry": entry, "error": err}


# --------------------------------------------------------------------------- #
# Timing (in this process, interleaved)
# --------------------------------------------------------------------------- #
def time_case(case: Case, entries: list[str], repeats: int) -> dict:
    prob = make_trainable_problem(case)
    field = prob.field
    params = list(field.parameters())
    grads: dict[str, torch.Tensor] = {}
    walls: dict[str, list[float]] = {e: [] for e in entries}
    errors: dict[str, str] = {}
    for e in entries:  # warm-up (also the gradient for the cross-check)
        try:
            clear_grads(field)
            train_step(e, field, prob)
            grads[e] = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            errors[e] = f"{type(exc).__name__}: {exc}"
            log(f"  {case.name} {e}: {errors[e]}")
    ok = [e for e in entries if e not in errors]
    for r in range(repeats):
        order = ok[r % len(ok):] + ok[:r % len(ok)]
        for e in order:
            clear_grads(field)
            gc.collect()
            t0 = time.perf_counter()
            train_step(e, field, prob)
            walls[e].append(time.perf_counter() - t0)
        log(f"  {case.name}: round {r + 1}/{repeats} done")
    ref = grads.get("neurodyn:direct")
    out = {}
    for e in entries:
        row = {"walls_s": walls[e], "error": errors.get(e)}
        if walls[e]:
            row["wall_s"] = statistics.median(walls[e])
        if ref is not None and e in grads:
            row["grad_rel_diff_vs_direct"] = float((grads[e] - ref).norm() / ref.norm())
        out[e] = row
    return out


# --------------------------------------------------------------------------- #
# Targets and formatting
# --------------------------------------------------------------------------- #
def evaluate_targets(results: dict, growth: dict | None) -> list[dict]:
    rows = []
    for cname, rows_c in results.items():
        nd_adj, tdq_adj = rows_c.get("neurodyn:adjoint", {}), rows_c.get("torchdiffeq:odeint_adjoint", {})
        if "wall_s" in nd_adj and "wall_s" in tdq_adj:
            ratio = nd_adj["wall_s"] / tdq_adj["wall_s"]
            nb, tb = nd_adj.get("nfe_backward"), tdq_adj.get("nfe_backward")
            fewer = nb is not None and tb is not None and nb < tb
            rows.append({"target": "adjoint time <= 0.67x torchdiffeq odeint_adjoint, fewer backward NFE",
                         "case": cname, "measured": f"{ratio:.2f}x, backward NFE {nb} vs {tb}",
                         "pass": ratio <= 0.67 and fewer})
        ck, di = rows_c.get("neurodyn:checkpoint", {}), rows_c.get("neurodyn:direct", {})
        if "wall_s" in ck and "wall_s" in di:
            ratio = ck["wall_s"] / di["wall_s"]
            rows.append({"target": "checkpoint time <= 1.5x direct time", "case": cname,
                         "measured": f"{ratio:.2f}x", "pass": ratio <= 1.5})
    if growth:
        gcase = growth["case"]
        lo, hi = min(growth["factors"]), max(growth["factors"])
        for e in GROWTH_ENTRIES:
            r_lo, r_hi = growth["rows"].get(f"{e}@{lo}", {}), growth["rows"].get(f"{e}@{hi}", {})
            if "peak_mib" not in r_lo or "peak_mib" not in r_hi:
                continue
            if r_lo["peak_mib"] < 1.0:  # a ratio of readings at the KiB noise level means nothing
                rows.append({"target": f"{e.split(':')[1]} memory growth {hi}x T vs {lo}x T", "case": gcase,
                             "measured": f"invalid: peak at {lo}x is {r_lo['peak_mib']:.2f} MiB", "pass": False})
                continue
            g = r_hi["peak_mib"] / r_lo["peak_mib"]
            steps_g = r_hi["steps"] / r_lo["steps"]
            name = e.split(":")[1]
            measured = f"{g:.2f}x (steps {steps_g:.2f}x: {r_lo['steps']} -> {r_hi['steps']})"
            if name in ("adjoint", "checkpoint"):
                rows.append({"target": f"{name} memory growth {hi}x T vs {lo}x T <= 1.3x", "case": gcase,
                             "measured": measured, "pass": g <= 1.3})
            elif name == "direct":
                # "Grows ~linearly" in the number of steps: at least half the step growth.
                rows.append({"target": f"direct memory grows ~linearly with the steps ({hi}x T vs {lo}x T)",
                             "case": gcase, "measured": measured, "pass": g >= 0.5 * steps_g})
    return rows


def _f(v, fmt="{:.3g}"):
    return "" if v is None else fmt.format(v)


def _load(meta: dict) -> str:
    a, b = meta.get("loadavg_start"), meta.get("loadavg_end")
    return f"{a[0]:.1f} at start, {b[0]:.1f} at end" if a and b else "?"


def format_markdown(meta: dict, results: dict, growth: dict | None, targets: list[dict]) -> str:
    lines = [
        f"Run {meta['date']} on {meta['cpu']} ({meta['logical_cpus']} logical CPUs, shared; torch "
        f"{meta['torch']}, 1 thread; 1-min load average {_load(meta)}), torchdiffeq {meta['torchdiffeq']}; "
        f"dopri5, atol = rtol/100, "
        f"{N_TIMES} output times; wall = median of {meta['repeats']} training steps after a warm-up "
        f"(forward + backward of mean(ys^2)); peak = max-RSS increase of one step in a fresh process.",
        "",
    ]
    for cname, rows_c in results.items():
        c = CASES[cname]
        lines += [f"**{cname}** ({c.describe()})", "",
                  "| entry | wall ms | NFE fwd | NFE bwd | steps fwd / bwd | peak MiB | grad rel. diff vs direct |",
                  "|---|---|---|---|---|---|---|"]
        for e, r in rows_c.items():
            if r.get("error"):
                lines.append(f"| {e} | error: {r['error'][:80]} | | | | | |")
                continue
            steps = _f(r.get("steps"), "{}")
            if r.get("steps_backward") is not None:
                steps += f" / {r['steps_backward']}"
            lines.append(f"| {e} | {_f(1e3 * r['wall_s'] if 'wall_s' in r else None)} | "
                         f"{_f(r.get('nfe_forward'), '{}')} | {_f(r.get('nfe_backward'), '{}')} | {steps} | "
                         f"{_f(r.get('peak_mib'), '{:.2f}')} | {_f(r.get('grad_rel_diff_vs_direct'), '{:.1e}')} |")
        lines.append("")
    if growth:
        c = CASES[growth["case"]]
        lines += [f"**Memory growth** ({growth['case']}: dim={c.dim} hidden={c.hidden} batch={c.batch} "
                  f"rtol={c.rtol:g}; T = {c.T:g} x factor; one step per fresh process; peak MiB, "
                  f"steps fwd[/bwd], NFE fwd/bwd)", ""]
        head = "| entry | " + " | ".join(f"{k}x (T={c.T * k:g})" for k in growth["factors"]) + \
               f" | growth {max(growth['factors'])}x/1x |"
        lines += [head, "|---" * (len(growth["factors"]) + 2) + "|"]
        for e in GROWTH_ENTRIES:
            cells = []
            for k in growth["factors"]:
                r = growth["rows"].get(f"{e}@{k}", {})
                if "peak_mib" not in r:
                    cells.append(f"error: {r.get('error', '?')[:40]}")
                    continue
                st = f"{r['steps']}" + (f"/{r['steps_backward']}" if r.get("steps_backward") is not None else "")
                cells.append(f"{r['peak_mib']:.0f} MiB, {st} steps, {r['nfe_forward']}/{r['nfe_backward']} NFE")
            lo = growth["rows"].get(f"{e}@{min(growth['factors'])}", {})
            hi = growth["rows"].get(f"{e}@{max(growth['factors'])}", {})
            gr = (f"{hi['peak_mib'] / lo['peak_mib']:.2f}x" if "peak_mib" in lo and "peak_mib" in hi
                  and lo["peak_mib"] >= 1.0 else "")
            lines.append(f"| {e} | " + " | ".join(cells) + f" | {gr} |")
        lines.append("")
    lines += ["Targets:", "", "| target | case | measured | result |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['case']} | {t['measured']} | {'PASS' if t['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def update_readme(md: str) -> None:
    """Replace the results block inside this script's README section (appending it if missing)."""
    path = Path(__file__).resolve().parent / "README.md"
    text = path.read_text()
    block = f"{README_START}\n{md}{README_END}"
    if README_START in text and README_END in text:
        pat = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n{README_HEADING}\n\n{block}\n"
    path.write_text(text)


# --------------------------------------------------------------------------- #
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default="small,large")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--growth-case", default="large", help="case of the memory-growth table (large or mid)")
    ap.add_argument("--growth-factors", default=",".join(map(str, GROWTH_FACTORS)))
    ap.add_argument("--no-growth", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small case, 1 repeat, growth on mid with 1x,2x")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    if args.quick:
        args.cases, args.repeats, args.growth_case, args.growth_factors = "small", 1, "mid", "1,2"
    common.setup_torch()
    nd, reason = import_neurodyn()
    if nd is None:
        log(f"neurodyn not importable: {reason}")
        return 1
    t_start = time.perf_counter()
    meta = common.machine_info()
    meta["loadavg_start"] = list(os.getloadavg())
    meta.update({"repeats": args.repeats, "method": METHOD, "checkpoints": CHECKPOINTS, "dtype": str(DTYPE)})

    # 1. Memory and NFE: one step per fresh process, all of them before this process does any heavy
    #    work (see worker(): a large parent's RSS high-water mark would leak into ru_maxrss).
    keep = ("nfe_forward", "nfe_backward", "steps", "steps_backward", "peak_mib", "peak_vmhwm_mib",
            "maxrss_inherited", "checkpoints", "adjoint_drift", "nfe_stats", "nfe_backward_stats", "wall_first_s",
            "maxrss_before_kib", "vmrss_before_kib", "vmhwm_before_kib")
    cnames = args.cases.split(",")
    results: dict[str, dict] = {c: {e: {} for e in ENTRIES} for c in cnames}
    for cname in cnames:
        case = CASES[cname]
        log(f"[{cname}] {case.describe()}: memory + NFE (one step per fresh process)")
        for e in ENTRIES:
            w = run_worker(e, case)
            if "error" in w:
                results[cname][e]["error"] = w["error"]
                log(f"  {e}: {w['error']}")
                continue
            results[cname][e].update({k: w.get(k) for k in keep})
            log(f"  {e}: NFE {w['nfe_forward']}/{w['nfe_backward']}, peak {w['peak_mib']:.1f} MiB "
                f"(VmHWM {w['peak_vmhwm_mib']:.1f}), first step {w['wall_first_s']:.2f} s")

    growth = None
    if not args.no_growth:
        gcase = CASES[args.growth_case]
        factors = [int(x) for x in args.growth_factors.split(",")]
        growth = {"case": args.growth_case, "factors": factors, "rows": {}}
        for k in factors:
            case_k = Case(gcase.name, gcase.dim, gcase.hidden, gcase.batch, gcase.T * k, gcase.rtol)
            for e in GROWTH_ENTRIES:
                w = run_worker(e, case_k)
                growth["rows"][f"{e}@{k}"] = w
                if "error" in w:
                    log(f"  growth {k}x {e}: {w['error']}")
                else:
                    log(f"  growth {k}x (T={case_k.T:g}) {e}: peak {w['peak_mib']:.1f} MiB "
                        f"(VmHWM {w['peak_vmhwm_mib']:.1f}), steps {w['steps']}, "
                        f"NFE {w['nfe_forward']}/{w['nfe_backward']}, {w['wall_first_s']:.1f} s")

    # 2. Wall: in this process, interleaved.
    for cname in cnames:
        case = CASES[cname]
        log(f"[{cname}] timing ({args.repeats} rounds)")
        timed = time_case(case, [e for e in ENTRIES if not results[cname][e].get("error")], args.repeats)
        for e, row in timed.items():
            err = row.pop("error")
            if err:
                results[cname][e]["error"] = err
            results[cname][e].update(row)
            if "wall_s" in row:
                log(f"  {e}: wall {1e3 * row['wall_s']:.1f} ms")

    targets = evaluate_targets(results, growth)
    meta["total_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = list(os.getloadavg())
    md = format_markdown(meta, results, growth, targets)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gradients.json").write_text(json.dumps(
        {"meta": meta, "cases": {k: CASES[k].__dict__ for k in results}, "results": results,
         "growth": growth, "targets": targets}, indent=1, default=str))
    (out_dir / "gradients.md").write_text(md)
    print(md)
    if args.update_readme:
        update_readme(md)
        log("README.md: gradient section updated")
    log(f"total {meta['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
