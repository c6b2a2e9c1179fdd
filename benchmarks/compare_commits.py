#!/usr/bin/env python
"""Old vs new: the same neurodyn workloads timed for two source trees, side by side in one run.

Each tree runs in its own worker subprocess (``PYTHONPATH=<tree>``, pinned to one core, one torch thread).
A round starts a fresh worker per tree; both build and warm up every workload (the first call, and with it
any ``torch.compile`` work, is never timed); then the parent asks them in turn for timed samples, alternating
old/new sample by sample (old-new, new-old, ...), so that load from other processes hits both trees alike.
Only one worker computes at any time; the other waits on its pipe. The workload definitions (problems,
fields, tolerances, runners) come from *this* checkout's ``benchmarks/`` (``common.py``, ``bench_suite.py``,
``bench_gradients.py``) for both trees: only the ``neurodyn`` package differs.

Workloads (dopri5 everywhere):

* ``core-{small,large}-{eager,compile}``: ``neurodyn.solve`` on bench_core's protocol cases
  (``common.CASES``, ``common.neurodyn_solve_runner``), eager and ``compile=True``, under ``no_grad``;
* ``vdp-per-sample``: bench_suite's / bench_per_sample's Van der Pol batch (256 oscillators, mu 1..25,
  rtol 1e-5) with ``per_sample_steps=True``;
* ``train-small-{direct,checkpoint}``: bench_suite's compiled training step (``compile=True``) on the same case
  (not run unless named in ``--workloads``);
* ``grad-small-{direct,adjoint,checkpoint,interpolated}``: one training step of bench_gradients.py
  (forward solve, ``ys.pow(2).mean()``, ``backward``) on the protocol's small case; ``--grad-cases
  small,large`` adds the large case (3-5 s per step).

Per workload: a sample is a slot of back-to-back calls filling at least ``--slot-ms`` (sized once, from the
warm-up calls' CPU time; 1 call for slower workloads), divided by the number of calls; wall (``perf_counter``)
and CPU (``process_time``) time; ``gc.collect()`` before each sample, and everything the setup built is
moved to the permanent GC generation (``gc.freeze``) so that full collections do not land in samples. Per
round and tree the median of the samples; reported: the median over rounds of those medians (old ms, new
ms), the median over rounds of the per-round ratio new/old (the verdict's number: the two workers of a round
ran side by side, so load that changes between rounds cancels), and the range of the per-round ratios (the
run's noise). NFE (counted with
``common.CountingField``; forward + backward for gradients) must be equal in both trees; the outputs
(``ys``, or the parameter gradient) are compared too.

Usage::

    git worktree add /tmp/nd-old 289c0ed          # the commit before the change
    .venv/bin/python benchmarks/compare_commits.py --old /tmp/nd-old/src --new src
    .venv/bin/python benchmarks/compare_commits.py --old /tmp/nd-old/src --quick     # ~2 min smoke run

Writes ``benchmarks/out/compare_commits.md`` and ``.json`` (``--out``) and prints the table. Exit status 1
when a workload is slower than ``--tol`` (default 3%) on the verdict clock, NFE differ, or a workload failed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out" / "compare_commits.md"
METHOD = "dopri5"

CORE_WORKLOADS = ("core-small-eager", "core-small-compile", "core-large-eager", "core-large-compile")
VDP_WORKLOADS = ("vdp-per-sample",)
GRAD_METHODS = ("direct", "adjoint", "checkpoint", "interpolated")
# bench_suite's compiled training steps (--train-cases small): compile=True, gradient direct / checkpoint.
TRAIN_WORKLOADS = ("train-small-direct", "train-small-checkpoint")
# A workload whose slot takes at least this long gets --slow-samples samples per round instead of --samples.
SLOW_SAMPLE_S = 0.2
SETUP_TIMEOUT_S = 600.0
SAMPLE_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def workload_names(grad_cases: list[str]) -> list[str]:
    """All workload names for the given gradient cases, in run order."""
    return [*CORE_WORKLOADS, *VDP_WORKLOADS, *(f"grad-{c}-{m}" for c in grad_cases for m in GRAD_METHODS),
            *TRAIN_WORKLOADS]


# =========================================================================== #
# Worker side (runs with PYTHONPATH=<tree>; imports torch and neurodyn)
# =========================================================================== #
def _digest(x) -> str:
    return hashlib.sha1(x.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


class Workload:
    """One timed thing. ``prepare`` runs the counted and warm-up calls and returns the facts to compare;
    ``call`` is what is timed."""

    def __init__(self, name: str, nd, warmups: int):
        self.name, self.nd, self.warmups = name, nd, warmups
        self.output = None  # the tensor compared between the trees

    def prepare(self) -> dict:
        raise NotImplementedError

    def call(self) -> None:
        raise NotImplementedError

    def _warm(self) -> float:
        """The untimed warm-up calls; returns the shortest one's CPU time (sizes the samples, little load noise)."""
        best = math.inf
        for _ in range(self.warmups):
            c = time.process_time()
            self.call()
            best = min(best, time.process_time() - c)
        return best


class CoreWorkload(Workload):
    """bench_core's protocol case, ``neurodyn.solve`` eager or ``compile=True``, under ``no_grad``."""

    def __init__(self, name, nd, warmups, case: str, compile: bool):
        super().__init__(name, nd, warmups)
        import torch
        from common import CASES, make_problem, neurodyn_solve_runner

        self.torch = torch
        self.compile = compile
        self.prob = make_problem(CASES[case])
        self.runner = neurodyn_solve_runner(self.prob, METHOD, nd, compile=compile)

    def prepare(self) -> dict:
        from common import CountingField

        p, c = self.prob, self.prob.case
        with self.torch.no_grad():
            # compile=True traces the field: a counting wrapper would count traces (and compile a second
            # program), so the compiled rows take NFE from sol.stats, as bench_core does.
            counter = CountingField(p.field)
            s = time.perf_counter()
            _, reported = self.runner(p.field if self.compile else counter)
            first = time.perf_counter() - s
            sol = self.nd.solve(p.field, p.y0, p.t, method=METHOD, rtol=c.rtol, atol=c.atol, compile=self.compile)
        self.output = sol.ys
        st = sol.stats
        return {"nfe": reported if self.compile else counter.nfe, "nfe_reported": reported,
                "steps": int(st["steps"]), "rejected": int(st.get("rejected", 0)),
                "compiled": st.get("compiled"), "first_call_s": first, "warm_call_cpu_s": self._warm()}

    def call(self) -> None:
        with self.torch.no_grad():
            self.runner(self.prob.field)


class VdpWorkload(Workload):
    """bench_suite's Van der Pol batch with ``per_sample_steps=True`` (bench_suite.neurodyn_per_sample_runner)."""

    def __init__(self, name, nd, warmups):
        super().__init__(name, nd, warmups)
        import torch
        from bench_suite import neurodyn_per_sample_runner, vdp_problem

        self.torch = torch
        self.prob = vdp_problem()
        self.runner = neurodyn_per_sample_runner(self.prob, nd)

    def prepare(self) -> dict:
        from common import CountingField

        p, c = self.prob, self.prob.case
        with self.torch.no_grad():
            counter = CountingField(p.field)
            s = time.perf_counter()
            _, reported = self.runner(counter)
            first = time.perf_counter() - s
            sol = self.nd.solve(p.field, p.y0, p.t, method=METHOD, rtol=c.rtol, atol=c.atol, per_sample_steps=True)
        self.output = sol.ys
        st = sol.stats
        steps = st.get("steps_per_sample")
        return {"nfe": counter.nfe, "nfe_reported": reported,
                "steps": int(steps.max()) if steps is not None else int(st["steps"]),
                "first_call_s": first, "warm_call_cpu_s": self._warm()}

    def call(self) -> None:
        with self.torch.no_grad():
            self.runner(self.prob.field)


class GradWorkload(Workload):
    """One training step of bench_gradients.py (``train_step``) with ``gradient=<method>``."""

    def __init__(self, name, nd, warmups, case: str, method: str):
        super().__init__(name, nd, warmups)
        import torch
        from bench_gradients import CASES as GRAD_CASES
        from bench_gradients import make_trainable_problem

        self.torch = torch
        self.entry = f"neurodyn:{method}"
        self.prob = make_trainable_problem(GRAD_CASES[case])

    def prepare(self) -> dict:
        from bench_gradients import clear_grads, train_step
        from common import CountingField

        field = self.prob.field
        counter = CountingField(field)
        clear_grads(field)
        s = time.perf_counter()
        res = train_step(self.entry, counter, self.prob, counter)
        first = time.perf_counter() - s
        clear_grads(field)
        train_step(self.entry, field, self.prob)
        self.output = self.torch.cat([q.grad.reshape(-1) for q in field.parameters()]).clone()
        return {"nfe": res["nfe_forward"] + res["nfe_backward"], "nfe_forward": res["nfe_forward"],
                "nfe_backward": res["nfe_backward"], "steps": res.get("steps"),
                "steps_backward": res.get("steps_backward"), "first_call_s": first, "warm_call_cpu_s": self._warm()}

    def call(self) -> None:
        from bench_gradients import clear_grads, train_step

        clear_grads(self.prob.field)
        train_step(self.entry, self.prob.field, self.prob)


class TrainCompiledWorkload(Workload):
    """bench_suite's compiled training step (``build_train_jobs``' "neurodyn compiled direct / checkpoint"):
    ``solve(..., compile=True, gradient=<method>)`` on bench_gradients' trainable case, ``ys.pow(2).mean()``,
    ``backward()``. NFE from ``sol.stats`` (a counting wrapper would be traced into the compiled program)."""

    def __init__(self, name, nd, warmups, case: str, method: str):
        super().__init__(name, nd, warmups)
        import torch
        from bench_gradients import CASES as GRAD_CASES
        from bench_gradients import make_trainable_problem

        self.torch = torch
        self.method = method
        self.prob = make_trainable_problem(GRAD_CASES[case])

    def _step(self):
        from bench_gradients import clear_grads

        p, c = self.prob, self.prob.case
        clear_grads(p.field)
        sol = self.nd.solve(p.field, p.y0, p.t, method=METHOD, rtol=c.rtol, atol=c.atol, compile=True,
                            gradient=self.method)
        sol.ys.pow(2).mean().backward()
        return sol

    def prepare(self) -> dict:
        s = time.perf_counter()
        sol = self._step()
        first = time.perf_counter() - s
        sol = self._step()
        self.output = self.torch.cat([q.grad.reshape(-1) for q in self.prob.field.parameters()]).clone()
        st = sol.stats
        return {"nfe": int(st["nfe"]), "steps": int(st["steps"]), "compiled": st.get("compiled"),
                "first_call_s": first, "warm_call_cpu_s": self._warm()}

    def call(self) -> None:
        self._step()


def make_workload(name: str, nd, warmups: int) -> Workload:
    kind, *rest = name.split("-")
    if kind == "core":
        case, mode = rest
        return CoreWorkload(name, nd, warmups, case, compile=(mode == "compile"))
    if name == "vdp-per-sample":
        return VdpWorkload(name, nd, warmups)
    if kind == "grad":
        case, method = rest
        return GradWorkload(name, nd, warmups, case, method)
    if kind == "train":
        case, method = rest
        return TrainCompiledWorkload(name, nd, warmups, case, method)
    raise ValueError(f"unknown workload {name!r}")


def _import_tree_neurodyn(tree: Path):
    """Import neurodyn and make sure it is the one from ``tree`` (not an installed copy)."""
    import neurodyn

    where = Path(neurodyn.__file__).resolve()
    if tree.resolve() not in where.parents:
        raise RuntimeError(f"neurodyn was imported from {where}, not from the tree {tree}: pass the directory "
                           f"that contains the neurodyn package (a checkout's src/)")
    return neurodyn


def worker_main(tree: str, core: int | None) -> int:
    """Serve the parent's requests, one JSON line in, one JSON line out."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours, torch's, C-level) go to stderr, not into the protocol
    if core is not None:
        os.sched_setaffinity(0, {core})
    sys.path.insert(0, str(BENCH_DIR))
    import common
    import torch

    common.setup_torch()
    workloads: dict[str, Workload] = {}

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            reply({"ok": True})
            return 0
        if cmd == "setup":
            try:
                nd = _import_tree_neurodyn(Path(tree))
                meta = {"neurodyn_file": nd.__file__, "neurodyn_version": getattr(nd, "__version__", None),
                        "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                        "machine": common.machine_info()}
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
                reply({"fatal": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                return 1
            infos = {}
            for name in req["workloads"]:
                try:
                    w = make_workload(name, nd, req["warmups"])
                    info = w.prepare()
                    info["digest"] = _digest(w.output)
                    if req.get("save_dir"):
                        path = Path(req["save_dir"]) / f"{req['tag']}-{name}.pt"
                        torch.save(w.output.detach().clone(), path)
                        info["saved"] = str(path)
                    workloads[name] = w
                    infos[name] = info
                except Exception as exc:  # noqa: BLE001 - one failing workload does not stop the others
                    infos[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                gc.collect()
            # Everything built so far (torch, Dynamo/Inductor state, the problems) goes into the permanent
            # generation: a full collection of it takes ~0.5 s, which would otherwise land in random samples
            # (and the gc.collect() before every sample would cost as much).
            gc.freeze()
            reply({"meta": meta, "workloads": infos})
        elif cmd == "time":
            w = workloads[req["workload"]]
            inner = int(req["inner"])
            try:
                gc.collect()
                s, c = time.perf_counter(), time.process_time()
                for _ in range(inner):
                    w.call()
                wall, cpu = time.perf_counter() - s, time.process_time() - c
                reply({"wall": wall / inner, "cpu": cpu / inner})
            except Exception as exc:  # noqa: BLE001
                reply({"error": f"{type(exc).__name__}: {exc}"})
        else:
            reply({"error": f"unknown command {cmd!r}"})
    return 0


# =========================================================================== #
# Parent side (no torch import)
# =========================================================================== #
class WorkerError(RuntimeError):
    pass


class Worker:
    """One subprocess serving one tree."""

    def __init__(self, tag: str, tree: Path, core: int | None, log_path: Path):
        self.tag, self.tree = tag, tree
        env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree)]
        if core is not None:
            cmd += ["--core", str(core)]
        self.log_path = log_path
        self._log = open(log_path, "a")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=str(REPO_ROOT))

    def ask(self, req: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"{self.tag} worker died: {self._tail()}") from exc
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerError(f"{self.tag} worker gave no answer to {req['cmd']!r} within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.tag} worker died: {self._tail()}")
        return json.loads(line)

    def _tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-5:]) or f"exit status {self.proc.poll()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "quit"}, timeout=30)
                self.proc.wait(timeout=30)
            except (WorkerError, subprocess.TimeoutExpired, OSError, ValueError):
                self.kill()
        self._log.close()


def tree_info(tree: Path) -> dict:
    """Commit and dirtiness of the git checkout that holds ``tree`` (None where it is not one)."""
    def git(*a):
        p = subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"path": str(tree), "commit": commit,
            "subject": git("log", "-1", "--format=%s") if commit else None,
            "dirty": bool(git("status", "--porcelain", "--", ".")) if commit else None}


def _median(v):
    return statistics.median(v) if v else None


def summarize(name: str, data: dict, tol: float, clock: str) -> dict:
    """Per-round medians -> medians over rounds, ratios, spread and verdict for one workload."""
    row = {"workload": name}
    info = data["info"]
    errs = [f"{tag}: {i['error']}" for tag in ("old", "new") for i in info.get(tag, []) if i.get("error")]
    errs += data["errors"]
    if errs:
        row.update(verdict="FAIL (error)", error="; ".join(dict.fromkeys(errs)))
    for k in ("wall", "cpu"):
        rounds = {tag: [_median(s) for s in data[k][tag] if s] for tag in ("old", "new")}
        ratios = [_median(n) / _median(o) for o, n in zip(data[k]["old"], data[k]["new"], strict=True) if o and n]
        # each new sample over the old sample taken right before or after it (same round): an alternative
        # estimate, kept in the JSON
        paired = [b / a for o, n in zip(data[k]["old"], data[k]["new"], strict=True) for a, b in zip(o, n)]
        old, new = _median(rounds["old"]), _median(rounds["new"])
        # The ratio of record: the median over rounds of each round's new/old ratio. The two workers of a round
        # run at the same time, so load that changes between rounds cancels in their ratio; on this machine it
        # was as close to 1 as the ratio of the two medians in self-comparisons on CPU time and 2-4x closer
        # on wall time (benchmarks/README.md, "Old vs new").
        row[k] = {"old_s": old, "new_s": new, "ratio": _median(ratios),
                  "ratio_of_medians": new / old if old and new else None,
                  "round_medians_old_s": rounds["old"], "round_medians_new_s": rounds["new"],
                  "round_ratios": ratios, "paired_ratio_median": _median(paired),
                  "samples_old_s": data[k]["old"], "samples_new_s": data[k]["new"]}
    ok_info = {tag: [i for i in info.get(tag, []) if "error" not in i] for tag in ("old", "new")}
    for key in ("nfe", "nfe_forward", "nfe_backward", "steps", "steps_backward", "compiled"):
        vals = {tag: sorted({json.dumps(i.get(key)) for i in ok_info[tag]}) for tag in ("old", "new")}
        if any(v != "null" for v in vals["old"] + vals["new"]):
            row[key] = {tag: [json.loads(v) for v in vals[tag]] for tag in ("old", "new")}
    digests = {tag: sorted({i["digest"] for i in ok_info[tag]}) for tag in ("old", "new")}
    row["digests"] = digests
    row["same_output"] = bool(digests["old"]) and digests["old"] == digests["new"] and len(digests["old"]) == 1
    if data.get("max_abs_diff") is not None:
        row["max_abs_diff"] = data["max_abs_diff"]
    if "verdict" in row:
        return row
    nfe = row.get("nfe", {})
    if not nfe or nfe["old"] != nfe["new"] or len(nfe["old"]) != 1:
        row["verdict"] = "FAIL (NFE differ)"
        return row
    r = row[clock]["ratio"]
    if r is None:
        row["verdict"] = "FAIL (no timings)"
    elif r > 1 + tol:
        row["verdict"] = "FAIL (slower)"
    elif r < 1 - tol:
        row["verdict"] = "PASS (faster)"
    else:
        row["verdict"] = "PASS"
    return row


def _ms(v) -> str:
    if v is None:
        return "-"
    ms = v * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _nfe_cell(row) -> str:
    nfe = row.get("nfe")
    if not nfe:
        return "-"
    old, new = ",".join(map(str, nfe["old"])), ",".join(map(str, nfe["new"]))
    if "nfe_forward" in row:
        f, b = row["nfe_forward"], row["nfe_backward"]
        old += f" ({','.join(map(str, f['old']))}+{','.join(map(str, b['old']))})"
        new += f" ({','.join(map(str, f['new']))}+{','.join(map(str, b['new']))})"
    return f"{old} / {new}"


def format_markdown(meta: dict, rows: list[dict]) -> str:
    clock, tol = meta["clock"], meta["tol"]
    m = meta.get("machine") or {}
    la = meta["loadavg"]
    lines = [
        f"Run {meta['date']} on {m.get('cpu', '?')} ({m.get('logical_cpus', '?')} logical CPUs; 1-min load average "
        f"{la['start']:.1f} at start, {la['end']:.1f} at end), torch {m.get('torch', '?')} (1 thread), workers pinned "
        f"to core {meta['core']}; {meta['rounds']} round(s), a fresh worker per tree and round, samples alternated "
        f"old/new; {meta['samples']} samples per round ({meta['slow_samples']} for slots >= {SLOW_SAMPLE_S:g} s), "
        f"each >= {meta['slot_ms']:g} ms of back-to-back calls; total {meta['total_s'] / 60:.1f} min.",
        "",
    ]
    for tag in ("old", "new"):
        t = meta["trees"][tag]
        commit = f"{t['commit'][:9]} ({t['subject']})" + (", with uncommitted changes" if t["dirty"] else "") \
            if t["commit"] else "not a git checkout"
        lines.append(f"* **{tag}**: `{t['path']}`, {commit}")
    lines += [
        "",
        f"ms = {clock} time of one call, median over rounds of the per-round medians. new/old = median over "
        f"rounds of the per-round ratio (new median / old median of the round). Verdict on {clock} time: PASS "
        f"when new/old <= {1 + tol:.2f} and the NFE are equal; \"round ratios\" = min-max of the per-round "
        f"ratios ({clock}), the run's noise. NFE: counted field calls (gradients: forward (+) backward).",
        "",
        "| workload | old ms | new ms | new/old wall | new/old CPU | round ratios | NFE old / new | same output "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "wall" not in r:
            lines.append(f"| {r['workload']} | - | - | - | - | - | - | - | {r['verdict']} |")
            continue
        w, c, k = r["wall"], r["cpu"], r[clock]
        rr = k["round_ratios"]
        spread = f"{min(rr):.3f}-{max(rr):.3f}" if rr else "-"
        same = "yes" if r["same_output"] else ("no" + (f" (max diff {r['max_abs_diff']:.1e})"
                                                         if r.get("max_abs_diff") is not None else ""))
        ratio_w = f"{w['ratio']:.3f}" if w["ratio"] else "-"
        ratio_c = f"{c['ratio']:.3f}" if c["ratio"] else "-"
        lines.append(f"| {r['workload']} | {_ms(k['old_s'])} | {_ms(k['new_s'])} | {ratio_w} | {ratio_c} | {spread} | "
                     f"{_nfe_cell(r)} | {same} | {r['verdict']} |")
    errs = [r for r in rows if r.get("error")]
    if errs:
        lines += ["", "Errors:", ""] + [f"* {r['workload']}: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def _max_abs_diff(a: str | None, b: str | None) -> float | None:
    """Max abs difference of two saved outputs (the parent imports torch only here, after the timing)."""
    if not a or not b:
        return None
    import torch

    x, y = torch.load(a), torch.load(b)
    if x.shape != y.shape:
        return math.inf
    return float((x - y).abs().max())


def run(args) -> int:
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    for tag, tree in trees.items():
        if not (tree / "neurodyn" / "__init__.py").is_file():
            log(f"--{tag} {tree}: no neurodyn/__init__.py there; pass a checkout's src/ directory "
                f"(e.g. `git worktree add /tmp/nd-old <commit>` and --old /tmp/nd-old/src)")
            return 2
    names = args.workloads
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    data = {n: {"info": {"old": [], "new": []}, "errors": [],
                "wall": {"old": [], "new": []}, "cpu": {"old": [], "new": []}} for n in names}
    plan: dict[str, tuple[int, int]] = {}  # workload -> (inner calls per sample, samples per round)
    meta_worker = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="compare_commits-") as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            workers: dict[str, Worker] = {}
            try:
                setup = {}
                for tag in order:  # one after the other: they share the core
                    workers[tag] = Worker(tag, trees[tag], args.core, tmp / f"{tag}.log")
                    req = {"cmd": "setup", "workloads": names, "warmups": args.warmups, "tag": tag,
                           "save_dir": str(tmp) if r == 0 else None}
                    s = time.perf_counter()
                    setup[tag] = workers[tag].ask(req, SETUP_TIMEOUT_S)
                    if "fatal" in setup[tag]:
                        log(setup[tag].get("traceback", ""))
                        log(f"{tag} worker: {setup[tag]['fatal']}")
                        return 2
                    meta_worker[tag] = setup[tag]["meta"]
                    log(f"[round {r + 1}/{args.rounds}] {tag} worker ready in {time.perf_counter() - s:.0f} s "
                        f"(neurodyn from {setup[tag]['meta']['neurodyn_file']})")
                for n in names:
                    for tag in ("old", "new"):
                        info = setup[tag]["workloads"][n]
                        data[n]["info"][tag].append(info)
                        if "error" in info and args.verbose:
                            log(info.get("traceback", ""))
                if r == 0:
                    for n in names:
                        infos = [setup[t]["workloads"][n] for t in ("old", "new")]
                        if any("error" in i for i in infos):
                            continue
                        call = min(i["warm_call_cpu_s"] for i in infos)
                        inner = max(1, min(1000, math.ceil(args.slot_ms / 1e3 / max(call, 1e-6))))
                        plan[n] = (inner, args.slow_samples if inner * call >= SLOW_SAMPLE_S else args.samples)
                        log(f"  {n}: {call * 1e3:.3g} ms CPU per call -> {inner} call(s) per sample, "
                            f"{plan[n][1]} samples per round")
                live = [n for n in names if n in plan
                        and all("error" not in setup[t]["workloads"][n] for t in ("old", "new"))]
                rot = r % len(live) if live else 0
                for n in live[rot:] + live[:rot]:
                    inner, samples = plan[n]
                    got = {k: {"old": [], "new": []} for k in ("wall", "cpu")}
                    for i in range(samples):
                        for tag in (("old", "new") if (i + r) % 2 == 0 else ("new", "old")):
                            res = workers[tag].ask({"cmd": "time", "workload": n, "inner": inner}, SAMPLE_TIMEOUT_S)
                            if "error" in res:
                                data[n]["errors"].append(f"{tag}: {res['error']}")
                                continue
                            got["wall"][tag].append(res["wall"])
                            got["cpu"][tag].append(res["cpu"])
                    for k in ("wall", "cpu"):
                        for tag in ("old", "new"):
                            data[n][k][tag].append(got[k][tag])
                    wo, wn = _median(got["wall"]["old"]), _median(got["wall"]["new"])
                    if wo and wn:
                        log(f"[round {r + 1}/{args.rounds}] {n}: old {wo * 1e3:.3g} ms, new {wn * 1e3:.3g} ms, "
                            f"new/old {wn / wo:.3f} (wall)")
            except WorkerError as exc:
                log(f"[round {r + 1}] {exc}")
                for n in names:
                    data[n]["errors"].append(str(exc))
            finally:
                for w in workers.values():
                    w.close()
            loads.append(os.getloadavg()[0])
        for n in names:  # outputs of round 1, compared after all timing (this imports torch here)
            infos = [data[n]["info"][t][0] for t in ("old", "new") if data[n]["info"][t]]
            if len(infos) == 2 and not any("error" in i for i in infos):
                data[n]["max_abs_diff"] = _max_abs_diff(infos[0].get("saved"), infos[1].get("saved"))

    rows = [summarize(n, data[n], args.tol, args.clock) for n in names]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": (meta_worker.get("new") or meta_worker.get("old") or {}).get("machine"),
        "workers": meta_worker,
        "trees": {tag: tree_info(trees[tag]) for tag in ("old", "new")},
        "core": args.core, "rounds": args.rounds, "samples": args.samples, "slow_samples": args.slow_samples,
        "slot_ms": args.slot_ms, "warmups": args.warmups, "clock": args.clock, "tol": args.tol,
        "plan": {n: {"inner": p[0], "samples": p[1]} for n, p in plan.items()},
        "loadavg": {"start": load_start, "end": os.getloadavg()[0], "after_rounds": loads},
        "total_s": time.perf_counter() - t_start,
        "argv": sys.argv[1:],
    }
    md = format_markdown(meta, rows)
    out = Path(args.out)
    if out.is_dir():  # a folder: the default file name inside it
        out = out / DEFAULT_OUT.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Old vs new\n\n" + md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    print(md)
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0 if all(r["verdict"].startswith("PASS") for r in rows) else 1


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="source tree of the old commit (the directory holding neurodyn/, e.g. .../src)")
    ap.add_argument("--new", default=str(REPO_ROOT / "src"), help="source tree of the new code (default: ./src)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, a fresh worker per tree each (default 5)")
    ap.add_argument("--samples", type=int, default=None, help="timed samples per workload, tree and round (default 7)")
    ap.add_argument("--slow-samples", type=int, default=None,
                    help=f"the same for workloads whose sample takes >= {SLOW_SAMPLE_S:g} s CPU (default 5)")
    ap.add_argument("--slot-ms", type=float, default=50.0, help="minimum length of one sample (back-to-back calls)")
    ap.add_argument("--warmups", type=int, default=2, help="untimed calls per workload after the counted call")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated subset (default: all; see the module docstring for the names)")
    ap.add_argument("--grad-cases", default="small", help="cases of the gradient workloads: small and/or large")
    ap.add_argument("--core", type=int, default=1, help="core both workers are pinned to (-1: no pinning)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="the clock of the verdict (default cpu: one torch thread, far less sensitive to load "
                    "from other processes; the table shows both ratios)")
    ap.add_argument("--tol", type=float, default=0.03, help="allowed slow-down, new/old <= 1 + tol (default 0.03)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~2 min): 2 rounds, 3 samples, no large-case workloads")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="markdown output; the JSON goes next to it (.json)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing workloads")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    if not args.old:
        ap.error("--old is required: the old commit's source tree, e.g. `git worktree add /tmp/nd-old <commit>` "
                 "and --old /tmp/nd-old/src")
    grad_cases = [c.strip() for c in args.grad_cases.split(",") if c.strip()]
    bad = [c for c in grad_cases if c not in ("small", "large")]
    if bad:
        ap.error(f"--grad-cases: unknown case(s) {bad}; choose from small, large")
    valid = workload_names(grad_cases)
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        bad = [n for n in names if n not in valid]
        if bad:
            ap.error(f"--workloads: unknown workload(s) {bad}; choose from {', '.join(valid)} "
                     "(grad-large-* need --grad-cases small,large)")
    else:
        names = [n for n in valid if not (args.quick and "-large-" in n) and n not in TRAIN_WORKLOADS]
    args.workloads = names
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (2 if quick else 5)
    args.samples = args.samples if args.samples is not None else (3 if quick else 7)
    args.slow_samples = args.slow_samples if args.slow_samples is not None else (2 if quick else 5)
    for opt in ("rounds", "samples", "slow_samples", "warmups"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be at least 1 (the warm-up calls also size the samples)")
    if args.core is not None and args.core < 0:
        args.core = None
    elif args.core not in os.sched_getaffinity(0):
        ap.error(f"--core {args.core}: not one of the cores this process may use {sorted(os.sched_getaffinity(0))}")
    if not 0 < args.tol < 1:
        ap.error("--tol must be in (0, 1), e.g. 0.03 for 3%")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.tree, args.core)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
