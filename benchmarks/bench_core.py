#!/usr/bin/env python
"""Core benchmark: neurodyn vs torchdiffeq vs torchode, one run, one table.

Usage::

    .venv/bin/python benchmarks/bench_core.py                 # all cases, 5 repeats
    .venv/bin/python benchmarks/bench_core.py --cases small,large --repeats 5
    .venv/bin/python benchmarks/bench_core.py --quick         # small+batched, 1 repeat
    .venv/bin/python benchmarks/bench_core.py --update-readme # also refresh README results

Writes ``benchmarks/out/core.json`` and ``benchmarks/out/core.md`` and prints the
markdown. neurodyn rows appear automatically once ``neurodyn.solve`` imports.
See benchmarks/README.md for the protocol and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    CASES,
    METHODS,
    OUT_DIR,
    CountingField,
    Entry,
    FieldTimer,
    import_neurodyn,
    make_problem,
    neurodyn_odeint_runner,
    neurodyn_solve_runner,
    reference_solution,
    torchdiffeq_runner,
    torchode_runner,
)

# (name, case, method, kind, threshold); kind "speedup" => nd solve >= threshold x
# faster than torchdiffeq dopri5 at equal-or-smaller error; "overhead" => <= threshold.
TARGETS = [
    ("speed-up vs torchdiffeq", "small", "dopri5", "speedup", 3.0),
    ("speed-up vs torchdiffeq", "small", "tsit5", "speedup", 3.0),
    ("speed-up vs torchdiffeq", "large", "dopri5", "speedup", 1.2),
    ("speed-up vs torchdiffeq", "large", "tsit5", "speedup", 1.2),
    ("overhead", "small", "dopri5", "overhead", 1.5),
    ("overhead", "small", "tsit5", "overhead", 1.5),
    ("overhead", "large", "dopri5", "overhead", 1.05),
    ("overhead", "large", "tsit5", "overhead", 1.05),
]

README_START = "<!-- bench-core:start -->"
README_END = "<!-- bench-core:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_entries(prob, nd, with_odeint: bool, with_compile: bool = True) -> list[Entry]:
    entries = [
        Entry("torchdiffeq", "odeint", "dopri5", lambda: torchdiffeq_runner(prob, "dopri5")),
    ]
    for m in METHODS:
        entries.append(Entry("torchode", "AutoDiffAdjoint", m,
                             lambda m=m: torchode_runner(prob, m)))
    if nd is not None:
        for m in METHODS:
            entries.append(Entry("neurodyn", "solve", m,
                                 lambda m=m: neurodyn_solve_runner(prob, m, nd)))
        if with_compile:
            for m in METHODS:
                entries.append(Entry("neurodyn", "solve+compile", m,
                                     lambda m=m: neurodyn_solve_runner(prob, m, nd, compile=True)))
        if with_odeint and hasattr(nd, "odeint"):
            for m in METHODS:
                entries.append(Entry("neurodyn", "odeint", m,
                                     lambda m=m: neurodyn_odeint_runner(prob, m, nd)))
    return entries


def run_case(case, nd, args) -> dict:
    prob = make_problem(case)
    log(f"[{case.name}] {case.describe()}")

    s = time.perf_counter()
    ys_ref, ref_info = reference_solution(prob, use_cache=not args.no_ref_cache)
    ref_info["elapsed_s"] = time.perf_counter() - s
    log(f"[{case.name}] reference: {ref_info}")

    # t_f: bare field call on this batch. Measured up front and again around
    # every timed run (the machine is shared), median over all blocks.
    timer = FieldTimer(prob.field, prob.t[:1].clone(), prob.y0)
    tf_wall, tf_cpu = timer.blocks(11 if args.quick else 15)
    log(f"[{case.name}] t_f (bare field call, first pass) = "
        f"{statistics.median(tf_wall) * 1e6:.2f} us wall, {statistics.median(tf_cpu) * 1e6:.2f} us CPU")

    entries = build_entries(prob, nd, with_odeint=not args.no_odeint, with_compile=not args.no_compile)
    records: dict[str, dict] = {}
    runners = {}
    counted = CountingField(prob.field)
    for e in entries:
        rec = {"case": case.name, "library": e.library, "entry": e.entry, "method": e.method}
        records[e.key] = rec
        try:
            runner = e.make()
            counted.nfe = 0
            # compile=True traces the field (a Python counter would count traces, and a second field object
            # would compile a second program): the bare field, NFE from sol.stats.
            compiled = e.entry == "solve+compile"
            with torch.no_grad():
                s = time.perf_counter()
                ys, reported = runner(prob.field if compiled else counted)
                rec["first_call_s"] = time.perf_counter() - s
            rec["nfe"] = reported if compiled else counted.nfe
            rec["nfe_reported"] = reported
            err = np.abs(ys.detach().numpy() - ys_ref)
            rec["max_abs_err"] = float(err.max())
            rec["max_abs_err_final_time"] = float(err[-1].max())
            runners[e.key] = runner
            if not args.quick:  # extra warm-up with the bare field (what is timed)
                with torch.no_grad():
                    runner(prob.field)
            log(f"[{case.name}] {e.key}: nfe={rec['nfe']} reported={reported} "
                f"err={rec['max_abs_err']:.2e} first={rec['first_call_s']:.3f}s")
        except Exception as exc:  # noqa: BLE001 - record and keep benchmarking
            rec["failed"] = f"{type(exc).__name__}: {exc}"
            log(f"[{case.name}] {e.key} FAILED: {rec['failed']}")
            if args.verbose:
                traceback.print_exc()

    # Interleaved timing rounds (rotating order) so drift on a shared machine
    # hits all libraries alike. Each timed run is bracketed by two short blocks
    # of bare field calls; the overhead of that run uses this paired t_f, so
    # that load from other processes largely cancels in wall / (NFE * t_f).
    # Every run is timed on two clocks: wall (the protocol) and process CPU
    # time (robust to other processes on a shared machine).
    keys = list(runners)
    tm: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "cpu": [], "ov_wall": [], "ov_cpu": []} for k in keys}
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)] if keys else []
        for k in order:
            pre_w, pre_c = timer.blocks(2, scale=0.5)
            with torch.no_grad():
                s, c = time.perf_counter(), time.process_time()
                runners[k](prob.field)
                wall, cpu = time.perf_counter() - s, time.process_time() - c
            post_w, post_c = timer.blocks(2, scale=0.5)
            tf_wall += pre_w + post_w
            tf_cpu += pre_c + post_c
            d = tm[k]
            d["wall"].append(wall)
            d["cpu"].append(cpu)
            nfe = records[k]["nfe"]
            if nfe:
                d["ov_wall"].append(wall / (nfe * statistics.median(pre_w + post_w)))
                d["ov_cpu"].append(cpu / (nfe * statistics.median(pre_c + post_c)))
        log(f"[{case.name}] round {r + 1}/{args.repeats} done")

    t_f, t_f_cpu = statistics.median(tf_wall), statistics.median(tf_cpu)
    log(f"[{case.name}] t_f (bare field call) = {t_f * 1e6:.2f} us wall "
        f"(min {min(tf_wall) * 1e6:.2f}, max {max(tf_wall) * 1e6:.2f}), "
        f"{t_f_cpu * 1e6:.2f} us CPU (min {min(tf_cpu) * 1e6:.2f}, max {max(tf_cpu) * 1e6:.2f}); "
        f"{len(tf_wall)} blocks")

    def med(v):
        return statistics.median(v) if v else None

    for k in keys:
        rec, d = records[k], tm[k]
        rec.update(
            walls_s=d["wall"], cpus_s=d["cpu"],
            wall_s=med(d["wall"]), cpu_s=med(d["cpu"]),
            t_f_s=t_f, t_f_cpu_s=t_f_cpu,
            overheads_paired=d["ov_wall"], overheads_cpu_paired=d["ov_cpu"],
            overhead=med(d["ov_wall"]), overhead_cpu=med(d["ov_cpu"]),
        )
        rec["overhead_unpaired"] = rec["wall_s"] / (rec["nfe"] * t_f) if rec["nfe"] and d["wall"] else None

    return {
        "case": case.name,
        "params": {"dim": case.dim, "hidden": case.hidden, "batch": case.batch,
                   "T": case.T, "rtol": case.rtol, "atol": case.atol,
                   "n_times": common.N_TIMES},
        "reference": ref_info,
        "t_f_s": t_f,
        "t_f_cpu_s": t_f_cpu,
        "t_f_blocks_s": tf_wall,
        "t_f_cpu_blocks_s": tf_cpu,
        "records": list(records.values()),
    }


# --------------------------------------------------------------------------- #
# Comparisons, targets, formatting
# --------------------------------------------------------------------------- #
def _find(case_res, library, entry, method):
    for r in case_res["records"]:
        if (r["library"], r["entry"], r["method"]) == (library, entry, method) and "wall_s" in r:
            return r
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def comparisons(results, nd_available):
    rows = []
    for cr in results:
        for m in METHODS:
            tdq = _find(cr, "torchdiffeq", "odeint", "dopri5")
            tod = _find(cr, "torchode", "AutoDiffAdjoint", m)
            nd_entries = ["solve", "solve+compile", "odeint"] if nd_available else [None]
            for ent in nd_entries:
                nd = _find(cr, "neurodyn", ent, m) if ent else None
                if ent in ("odeint", "solve+compile") and nd is None:
                    continue
                row = {"case": cr["case"], "method": m, "nd_entry": ent,
                       "neurodyn": nd, "torchdiffeq": tdq, "torchode": tod}
                for clock, key in (("", "wall_s"), ("_cpu", "cpu_s")):
                    row["speedup_vs_torchdiffeq" + clock] = (
                        _ratio(tdq[key], nd[key]) if nd and tdq else None)
                    row["speedup_vs_torchode" + clock] = (
                        _ratio(tod[key], nd[key]) if nd and tod else None)
                row["err_ratio_vs_torchdiffeq"] = (
                    nd["max_abs_err"] / tdq["max_abs_err"]) if nd and tdq else None
                rows.append(row)
    return rows


def evaluate_targets(comp_rows, err_slack):
    """Verdicts on wall time (the protocol: ``status``) and on CPU time (``status_cpu``)."""
    out = []
    entries = ["solve"] + (["solve+compile"] if any(r["nd_entry"] == "solve+compile" for r in comp_rows) else [])
    for (name, case, method, kind, thr), entry in ((tg, e) for e in entries for tg in TARGETS):
        row = next((r for r in comp_rows if r["case"] == case and r["method"] == method
                    and r["nd_entry"] == entry), None)
        label = name if entry == "solve" else f"{name} [compile=True]"
        t = {"target": label, "case": case, "method": method, "kind": kind, "threshold": thr}
        if row is None or row["neurodyn"] is None:
            if not any(r["case"] == case for r in comp_rows):
                note = "case not run"
            elif row is None or row["nd_entry"] is None:
                note = "neurodyn not available"
            else:
                note = "neurodyn run failed"
            t.update(measured=None, measured_cpu=None, status="n/a", status_cpu="n/a", note=note)
        elif kind == "speedup":
            er = row["err_ratio_vs_torchdiffeq"]
            err_ok = er is not None and er <= 1.0 + err_slack
            sp, spc = row["speedup_vs_torchdiffeq"], row["speedup_vs_torchdiffeq_cpu"]
            t.update(measured=sp, measured_cpu=spc, err_ratio=er, err_ok=err_ok,
                     status="PASS" if (sp is not None and sp >= thr and err_ok) else "FAIL",
                     status_cpu="PASS" if (spc is not None and spc >= thr and err_ok) else "FAIL")
        else:
            ov, ovc = row["neurodyn"]["overhead"], row["neurodyn"]["overhead_cpu"]
            t.update(measured=ov, measured_cpu=ovc,
                     status="PASS" if (ov is not None and ov <= thr) else "FAIL",
                     status_cpu="PASS" if (ovc is not None and ovc <= thr) else "FAIL")
        out.append(t)
    return out


def _ms(r, key="wall_s"):
    return f"{r[key] * 1e3:.3g}" if r and r.get(key) is not None else "—"


def _nfe(r):
    return str(r["nfe"]) if r else "—"


def _err(r):
    return f"{r['max_abs_err']:.1e}" if r else "—"


def _ov(r, key="overhead"):
    return f"{r[key]:.2f}" if r and r.get(key) is not None else "—"


def _x(v):
    return f"{v:.2f}x" if v is not None else "—"


def format_markdown(meta, results, comp_rows, targets, args) -> str:
    lines = []
    m = meta["machine"]
    la = m.get("loadavg_start"), m.get("loadavg_end")
    lines.append(f"Run {m['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, shared; "
                 f"1-min load average {la[0]:.1f} at start, {la[1]:.1f} at end), "
                 f"torch {m['torch']} ({m['torch_threads']} thread), torchdiffeq {m['torchdiffeq']}, "
                 f"torchode {m['torchode']}; median of {args.repeats} timed run(s)"
                 f"{' (--quick)' if args.quick else ''}. "
                 "Absolute times are noisy on this machine; compare ratios.")
    lines.append("")
    if max(la) > (m.get("logical_cpus") or 1):
        lines.append(f"**The load average exceeded the {m.get('logical_cpus')} cores during this run: "
                     "wall-time numbers (especially overheads) are dominated by other processes; "
                     "read the CPU-time table and verdicts alongside.**")
        lines.append("")
    if not meta["neurodyn"]["available"]:
        lines.append(f"neurodyn not importable: {meta['neurodyn']['reason']}")
        lines.append("")
    lines.append("Cases: " + "; ".join(
        f"**{cr['case']}** ({', '.join(f'{k}={v:g}' for k, v in cr['params'].items())}, "
        f"t_f={cr['t_f_s'] * 1e6:.1f} µs wall / {cr['t_f_cpu_s'] * 1e6:.1f} µs CPU)" for cr in results))
    lines.append("")
    lines.append("Columns with three values are neurodyn / torchdiffeq / torchode. "
                 "torchdiffeq has no tsit5: its dopri5 is the baseline in tsit5 rows. "
                 "overhead = median over runs of wall / (NFE · t_f), with t_f timed right around each "
                 "run. speed-up = other wall / neurodyn wall (medians).")
    lines.append("")
    lines.append("| case | method | neurodyn entry | wall ms (nd / tdq / to) | NFE (nd / tdq / to) "
                 "| max abs err (nd / tdq / to) | overhead (nd / tdq / to) "
                 "| speed-up vs torchdiffeq | speed-up vs torchode |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in comp_rows:
        nd, tdq, tod = r["neurodyn"], r["torchdiffeq"], r["torchode"]
        lines.append(
            f"| {r['case']} | {r['method']} | {r['nd_entry'] or 'n/a'} "
            f"| {_ms(nd)} / {_ms(tdq)} / {_ms(tod)} "
            f"| {_nfe(nd)} / {_nfe(tdq)} / {_nfe(tod)} "
            f"| {_err(nd)} / {_err(tdq)} / {_err(tod)} "
            f"| {_ov(nd)} / {_ov(tdq)} / {_ov(tod)} "
            f"| {_x(r['speedup_vs_torchdiffeq'])} | {_x(r['speedup_vs_torchode'])} |")
    lines.append("")
    failed = [rec for cr in results for rec in cr["records"] if "failed" in rec]
    for rec in failed:
        lines.append(f"- FAILED {rec['case']} {rec['library']}.{rec['entry']} {rec['method']}: "
                     f"{rec['failed']}")
    mism = [rec for cr in results for rec in cr["records"]
            if rec.get("nfe_reported") is not None and rec["nfe_reported"] != rec.get("nfe")]
    for rec in mism:
        lines.append(f"- NFE mismatch {rec['case']} {rec['library']}.{rec['entry']} "
                     f"{rec['method']}: counted {rec['nfe']}, stats['nfe'] {rec['nfe_reported']}")
    if failed or mism:
        lines.append("")
    lines.append("Same runs on process CPU time (one torch thread, so this is close to what the wall "
                 "time would be on an idle machine; much less sensitive to other processes):")
    lines.append("")
    lines.append("| case | method | neurodyn entry | CPU ms (nd / tdq / to) | overhead CPU (nd / tdq / to) "
                 "| speed-up CPU vs torchdiffeq | speed-up CPU vs torchode |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in comp_rows:
        nd, tdq, tod = r["neurodyn"], r["torchdiffeq"], r["torchode"]
        c, o = "cpu_s", "overhead_cpu"
        lines.append(
            f"| {r['case']} | {r['method']} | {r['nd_entry'] or 'n/a'} "
            f"| {_ms(nd, c)} / {_ms(tdq, c)} / {_ms(tod, c)} "
            f"| {_ov(nd, o)} / {_ov(tdq, o)} / {_ov(tod, o)} "
            f"| {_x(r['speedup_vs_torchdiffeq_cpu'])} | {_x(r['speedup_vs_torchode_cpu'])} |")
    lines.append("")
    lines.append(f"Targets (neurodyn.solve; speed-up targets also require neurodyn error "
                 f"<= torchdiffeq dopri5 error x {1 + args.err_slack:g}). The verdict of record is "
                 "the wall-time one (the protocol); the CPU-time one tells whether a failure is load "
                 "noise:")
    lines.append("")
    lines.append("| target | case | method | threshold | error nd/tdq | measured (wall) | result (wall) "
                 "| measured (CPU) | result (CPU) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        if t["kind"] == "speedup":
            thr = f">= {t['threshold']:g}x"
            meas, measc = _x(t["measured"]), _x(t["measured_cpu"])
            er = f"{t['err_ratio']:.2f}" if t.get("err_ratio") is not None else "—"
        else:
            thr = f"<= {t['threshold']:g}"
            meas = f"{t['measured']:.2f}" if t["measured"] is not None else "—"
            measc = f"{t['measured_cpu']:.2f}" if t["measured_cpu"] is not None else "—"
            er = ""
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']} | {t['case']} | {t['method']} | {thr} | {er} | {meas} "
                     f"| {t['status']}{note} | {measc} | {t['status_cpu']} |")
    lines.append("")
    return "\n".join(lines)


def update_readme(md: str, start: str = README_START, end: str = README_END) -> bool:
    """Replace what stands between the ``start`` and ``end`` markers of benchmarks/README.md with ``md``."""
    path = Path(__file__).resolve().parent / "README.md"
    if not path.exists():
        return False
    text = path.read_text()
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        return False
    text = pat.sub(lambda _: f"{start}\n{md}\n{end}", text)
    path.write_text(text)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated subset of {','.join(CASES)} "
                    "(default: all; --quick: small,batched)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per entry (default 5; --quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repeat, no extra warm-up, fewer t_f blocks, small+batched by default")
    ap.add_argument("--no-odeint", action="store_true", help="skip the neurodyn.odeint rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the neurodyn solve(compile=True) rows")
    ap.add_argument("--no-ref-cache", action="store_true",
                    help="recompute the DOP853 reference instead of using benchmarks/out/*.tmp")
    ap.add_argument("--err-slack", type=float, default=0.10,
                    help="'equal error' tolerance for speed-up targets (default 0.10 = 10%%)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--update-readme", action="store_true",
                    help="replace the results section of benchmarks/README.md with this run")
    ap.add_argument("--render", type=Path, default=None, metavar="CORE_JSON",
                    help="run nothing: re-render the tables from an earlier core.json")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)

    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.cases is None:
        args.cases = "small,batched" if args.quick else ",".join(CASES)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    if args.render is not None:
        payload = json.loads(args.render.read_text())
        proto = payload["protocol"]
        args.repeats, args.quick, args.err_slack = proto["repeats"], proto["quick"], proto["err_slack"]
        results = payload["results"]
        comp = comparisons(results, payload["neurodyn"]["available"])
        md = format_markdown(payload, results, comp, evaluate_targets(comp, args.err_slack), args)
        (args.render.parent / "core.md").write_text("# Core benchmark\n\n" + md)
        print(md)
        if args.update_readme:
            log("README updated" if update_readme(md) else "README results markers not found")
        return 0

    common.setup_torch()
    nd, reason = import_neurodyn()
    if nd is None:
        log(f"neurodyn not importable ({reason}); benchmarking the peers only")
    else:
        log(f"neurodyn from {getattr(nd, '__file__', '?')}")

    meta = {
        "machine": common.machine_info(),
        "neurodyn": {"available": nd is not None, "reason": reason,
                     "file": getattr(nd, "__file__", None) if nd else None,
                     "version": getattr(nd, "__version__", None) if nd else None},
        "protocol": {"dtype": "float64", "field_seed": common.FIELD_SEED,
                     "y0_seed": common.Y0_SEED, "weight_scale": common.WEIGHT_SCALE,
                     "reference": f"scipy DOP853 rtol={common.REF_RTOL:g} atol={common.REF_ATOL:g}",
                     "repeats": args.repeats, "quick": args.quick, "err_slack": args.err_slack},
        "argv": sys.argv[1:] if argv is None else argv,
    }

    meta["machine"]["loadavg_start"] = os.getloadavg()[0]
    results = [run_case(CASES[n], nd, args) for n in names]
    meta["machine"]["loadavg_end"] = os.getloadavg()[0]
    comp = comparisons(results, nd is not None)
    targets = evaluate_targets(comp, args.err_slack)
    md = format_markdown(meta, results, comp, targets, args)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    gi = args.out_dir / ".gitignore"
    if not gi.exists():
        gi.write_text("*.tmp\n")

    def slim(row):
        return {k: (v if not isinstance(v, dict) else
                    {kk: v.get(kk) for kk in ("library", "entry", "method", "wall_s", "cpu_s")})
                for k, v in row.items()}

    payload = {**meta, "results": results,
               "comparisons": [slim(r) for r in comp], "targets": targets}
    (args.out_dir / "core.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (args.out_dir / "core.md").write_text("# Core benchmark\n\n" + md)
    print(md)
    if args.update_readme:
        log("README updated" if update_readme(md) else "README results markers not found")
    log(f"wrote {args.out_dir / 'core.json'} and {args.out_dir / 'core.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
