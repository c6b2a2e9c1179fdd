#!/usr/bin/env python
"""Benchmark suite: neurodyn (eager and compiled) against torchdiffeq, torchode, torchdyn and diffrax (JAX).

One run, one table: every library solves the same problems in the same process, and the timed repeats are
interleaved round-robin across the libraries (a rotating order), so that load from other processes on a
shared machine hits all of them alike. Ratios within one run are what counts; CPU time is reported next to
wall time.

Usage::

    .venv/bin/python benchmarks/bench_suite.py                   # everything (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_suite.py --quick           # smoke run: 1 repeat, fewer points (~3-8 min)
    .venv/bin/python benchmarks/bench_suite.py --update-readme   # also rewrite the suite section of README.md
    .venv/bin/python benchmarks/bench_suite.py --cases small,large --sections table,wp
    .venv/bin/python benchmarks/bench_suite.py --sections ee --libs neurodyn,torchdiffeq,diffrax   # equal error
    .venv/bin/python benchmarks/bench_suite.py --libs neurodyn,torchdiffeq,diffrax --no-plots
    .venv/bin/python benchmarks/bench_suite.py --render benchmarks/out/suite.json   # re-render only, no solving
    make bench-suite                                             # installs the peers (bench extra), full run

Sections (``--sections``, default all):

* ``table``: the protocol cases of ``common.py`` (``--cases``), the Van der Pol batch of
  ``bench_per_sample.py`` (256 oscillators, mu 1..25, rtol 1e-5, atol 1e-7) and one training step
  (forward + backward of ``mean(ys**2)`` through the solve of ``--train-cases``); columns NFE, error,
  wall (median), CPU time, overhead = wall / (NFE x one call of the library's own vector field), and the
  speed-up against torchdiffeq.
* ``ee``: equal error: each table problem (cases, Van der Pol batch, training step) at rtol x 10, 3.16, 1, 0.316,
  0.1 (``--quick``: 3.16, 1, 0.316); per library NFE, wall and CPU time interpolated log-log
  (``common.at_error``) at the error diffrax reaches at the problem's own rtol, beside the equal-rtol figures of
  the same sweep (``suite_equal_error.csv``).
* ``wp``: work-precision, max error vs wall (and CPU time) for rtol 1e-3 ... 1e-10 (atol = rtol/100), small
  and large case.
* ``scaling``: wall (and CPU time) vs batch size, vs state dimension, vs horizon T.

Libraries (``--libs``): ``neurodyn`` (``neurodyn.solve(..., method="dopri5")``), ``neurodyn-compiled``
(``compile=True``), ``torchdiffeq`` (``odeint``), ``torchode`` (``AutoDiffAdjoint`` + ``IntegralController``),
``torchdyn`` (``NeuralODE`` with a float64 ``DormandPrince45``), ``diffrax`` (JAX on the CPU, float64, one XLA thread:
the same weights as JAX arrays, the whole ``diffeqsolve`` jitted, ``Dopri5`` + ``PIDController``,
``SaveAt(ts=...)``, timed after compilation with ``block_until_ready``). A missing peer gives a
"not installed" row, never a crash. All dopri5.

Outputs in ``benchmarks/out/``: ``suite.json`` (everything), ``suite.md`` (the tables), ``suite_table.csv``,
``suite_work_precision.{png,csv}``, ``suite_scaling.{png,csv}``; cached reference solutions as ``*.tmp``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_gradients  # noqa: E402
import common  # noqa: E402
from common import (  # noqa: E402
    CASES,
    DTYPE,
    N_TIMES,
    OUT_DIR,
    Case,
    CountingField,
    FieldTimer,
    Problem,
    make_problem,
    neurodyn_solve_runner,
    reference_solution,
    torchdiffeq_runner,
    torchode_runner,
)

LIBS = ("neurodyn", "neurodyn-compiled", "torchdiffeq", "torchode", "torchdyn", "diffrax")
TORCH_PEERS = ("torchdiffeq", "torchode", "torchdyn")
SECTIONS = ("table", "ee", "wp", "scaling")
README_START = "<!-- bench-suite:start -->"
README_END = "<!-- bench-suite:end -->"
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"

# The Van der Pol batch of bench_per_sample.py.
VDP_B, VDP_MU, VDP_RTOL, VDP_ATOL, VDP_T = 256, (1.0, 25.0), 1e-5, 1e-7, 10.0

WP_RTOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
WP_RTOLS_QUICK = (1e-3, 1e-6, 1e-9)
# The equal-error sweep: each table problem's rtol times these (1 included: the equal-rtol point of the same run).
EE_FACTORS = (10.0, 10 ** 0.5, 1.0, 10 ** -0.5, 0.1)
EE_FACTORS_QUICK = (10 ** 0.5, 1.0, 10 ** -0.5)
# (sweep, base case, parameter, values, quick values)
SWEEPS = (
    ("batch", Case("batch", dim=2, hidden=64, batch=1, T=10.0, rtol=1e-6), "batch",
     (1, 16, 256, 4096), (1, 256)),
    ("dim", Case("dim", dim=2, hidden=128, batch=256, T=5.0, rtol=1e-6), "dim",
     (2, 8, 32, 128), (2, 32)),
    ("T", Case("T", dim=2, hidden=64, batch=1, T=10.0, rtol=1e-6), "T",
     (1.0, 3.0, 10.0, 30.0, 100.0), (1.0, 10.0)),
)

GRAD_REF = {"method": "dopri8", "rtol": 1e-12, "atol": 1e-14}
SLOT_S = 0.02  # a timing sample: back-to-back calls of one entry filling at least this long (see interleave)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Libraries: each peer optional
# --------------------------------------------------------------------------- #
@dataclass
class Lib:
    name: str
    module: object = None
    version: str | None = None
    missing: str | None = None  # why it cannot run ("not installed: ...")


def _import_peer(name: str) -> Lib:
    dist = {"neurodyn-compiled": "neurodyn"}.get(name, name)
    if dist == "neurodyn":
        nd, reason = common.import_neurodyn()
        if nd is None:
            return Lib(name, missing=f"not importable: {reason}")
        return Lib(name, nd, getattr(nd, "__version__", None) or _dist_version("neurodyn"))
    if importlib.util.find_spec(dist) is None:
        return Lib(name, missing="not installed (pip install -e '.[bench]', see the Makefile's bench target)")
    try:
        if dist == "torchdyn":
            # torchdyn 1.0.6 declares torchvision, pytorch-lightning, ipykernel, ... as dependencies; it is
            # installed with --no-deps plus what its import really needs (attrs, torchcde, torchsde, lightning).
            from torchdyn.core import NeuralODE  # noqa: F401
        elif dist == "diffrax":
            _jax_setup()
        mod = __import__(dist)
    except Exception as exc:  # noqa: BLE001 - a broken peer is a row, never a crash
        return Lib(name, missing=f"installed but not importable: {type(exc).__name__}: {exc}")
    return Lib(name, mod, getattr(mod, "__version__", None) or _dist_version(dist))


def _dist_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _jax_versions() -> str:
    return ", ".join(f"{d} {_dist_version(d)}" for d in ("jax", "jaxlib", "equinox"))


def load_libs(names) -> dict[str, Lib]:
    libs = {n: _import_peer(n) for n in names}
    for lib in libs.values():
        log(f"{lib.name}: " + (lib.missing or f"{lib.version} ({getattr(lib.module, '__file__', '?')})"))
    return libs


def _jax_setup():
    """JAX on the CPU, float64, one intra-op thread (like torch.set_num_threads(1)); must precede the import."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_ONE_THREAD not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + XLA_ONE_THREAD).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


# --------------------------------------------------------------------------- #
# Jobs and the interleaved timing
# --------------------------------------------------------------------------- #
@dataclass
class Job:
    """One timed thing: a library's solve (or training step) of one problem."""

    label: str  # row label ("neurodyn eager", "torchode (per-sample steps)", ...)
    lib: str  # library key (LIBS), for the plots
    group: str  # the problem ("small", "vdp", "train-small", "wp-large-1e-08", ...)
    fn: Callable[[], object] | None = None  # one timed call, returning once the result is ready
    tf_key: str = "torch"  # which bare vector-field timing the overhead is relative to
    note: str = ""
    nfe: int | None = None
    nfe_bwd: int | None = None
    err: float | None = None
    first_s: float | None = None
    walls: list = field(default_factory=list)
    cpus: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def wall(self):
        return statistics.median(self.walls) if self.walls else None

    @property
    def cpu(self):
        return statistics.median(self.cpus) if self.cpus else None

    def record(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "fn"}
        d.update(wall_s=self.wall, cpu_s=self.cpu)
        return d


def _warning_note(caught) -> str:
    """RuntimeWarnings of a validation run (neurodyn's compile fallback, say) go into the row's note."""
    return "; ".join(sorted({str(w.message).splitlines()[0] for w in caught
                             if issubclass(w.category, RuntimeWarning)}))[:200]


def _fail(job: Job, exc: BaseException) -> Job:
    job.fn = None
    job.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    log(f"[{job.group}] {job.label} {job.note}")
    return job


def interleave(jobs: list[Job], repeats: int, timers: dict, tag: str, slot_s: float = SLOT_S) -> dict:
    """Time every job ``repeats`` times, round-robin with a rotating order; returns the bare-call timings.

    One sample of a job is one slot of ``inner`` back-to-back calls (enough to fill ``slot_s``; 1 for
    anything slower), divided by ``inner``: a sub-millisecond solve timed once right after another library's
    work would mostly measure cold caches and sleeping threads, not what a loop of such calls costs.
    Each round starts with two short blocks of bare vector-field calls per timer (torch field, JAX field),
    so ``t_f`` is sampled across the whole run, under the same load as the solves.
    """
    live = [j for j in jobs if j.fn is not None]
    for j in live:  # calibrate the slot (the jobs are warm already)
        try:
            s = time.perf_counter()
            j.fn()
            j.extra["inner"] = max(1, min(1000, math.ceil(slot_s / max(time.perf_counter() - s, 1e-6))))
        except Exception as exc:  # noqa: BLE001
            _fail(j, exc)
    tf = {k: ([], []) for k in timers}
    for r in range(repeats):
        for k, timer in timers.items():
            w, c = timer.blocks(2, scale=0.5)
            tf[k][0].extend(w)
            tf[k][1].extend(c)
        n = len(live)
        for j in (live[r % n:] + live[: r % n]) if n else []:
            if j.fn is None:
                continue
            inner = j.extra["inner"]
            try:
                s, c = time.perf_counter(), time.process_time()
                for _ in range(inner):
                    j.fn()
                j.walls.append((time.perf_counter() - s) / inner)
                j.cpus.append((time.process_time() - c) / inner)
            except Exception as exc:  # noqa: BLE001
                _fail(j, exc)
        log(f"[{tag}] round {r + 1}/{repeats}")
    return {k: (statistics.median(w), statistics.median(c)) if w else (None, None) for k, (w, c) in tf.items()}


def add_overheads(jobs: list[Job], tfs: dict) -> None:
    for j in jobs:
        tfw, tfc = tfs.get(j.tf_key, (None, None))
        if j.wall is not None and j.nfe and tfw:
            j.extra["overhead"] = j.wall / (j.nfe * tfw)
            j.extra["overhead_cpu"] = j.cpu / (j.nfe * tfc)


# --------------------------------------------------------------------------- #
# Forward solves: one runner per library, run(field) -> (ys[N_TIMES, batch, ...], reported nfe)
# --------------------------------------------------------------------------- #
class _NoTime(nn.Module):
    """``x -> f(t0, x)``: torchdyn's NeuralODE calls ``vf(t, x, args=...)`` on modules that take ``t``;
    time-independent fields are handed to it without ``t`` (its documented ``nn.Sequential`` use)."""

    def __init__(self, f, t0):
        super().__init__()
        self.f, self.t0 = f, t0

    def forward(self, x):
        return self.f(self.t0, x)


def torchdyn_runner(prob: Problem, sensitivity: str = "autograd"):
    from torchdyn.core import NeuralODE
    from torchdyn.numerics.solvers.ode import DormandPrince45

    c = prob.case
    models: dict[int, tuple] = {}

    def run(f):
        if id(f) not in models:  # built once per field, like a model's __init__
            with contextlib.redirect_stdout(io.StringIO()):  # "we've wrapped it for you"
                # A solver instance in the state's dtype: NeuralODE(solver="dopri5") builds the tableau in
                # float32 (str_to_solver's default) and only casts it, which puts a ~3e-7 floor under the error
                # of a float64 solve (and, below it, thousands of rejected steps). The adjoint solve runs at the
                # forward tolerances, as torchdiffeq's and neurodyn's adjoints do (torchdyn's default: 1e-4).
                node = NeuralODE(_NoTime(f, prob.t[:1]), solver=DormandPrince45(dtype=prob.y0.dtype),
                                 rtol=c.rtol, atol=c.atol, sensitivity=sensitivity,
                                 rtol_adjoint=c.rtol, atol_adjoint=c.atol, return_t_eval=False)
            models[id(f)] = (f, node)
        return models[id(f)][1](prob.y0, prob.t), None

    return run


def neurodyn_per_sample_runner(prob: Problem, nd, compile: bool = False):
    c = prob.case

    def run(f):
        sol = nd.solve(f, prob.y0, prob.t, method="dopri5", rtol=c.rtol, atol=c.atol, per_sample_steps=True,
                       compile=compile)
        return sol.ys, common._nfe_from_stats(sol.stats)

    return run


class JaxSide:
    """The diffrax side: the same vector fields in JAX, jitted solves, NFE counting."""

    def __init__(self):
        self.jax = _jax_setup()
        import diffrax
        import jax.numpy as jnp

        self.jnp, self.dfx = jnp, diffrax
        self.count = [0]
        self._cache: dict = {}

    # vector fields -------------------------------------------------------
    @staticmethod
    def mlp(t, y, p):
        import jax.numpy as jnp

        (w1, b1), (w2, b2), (w3, b3) = p
        h = jnp.tanh(y @ w1 + b1)
        h = jnp.tanh(h @ w2 + b2)
        return h @ w3 + b3

    @staticmethod
    def vdp(t, y, mu):
        import jax.numpy as jnp

        x, v = y[..., 0], y[..., 1]
        return jnp.stack([v, mu * (1 - x * x) * v - x], -1)

    def mlp_params(self, mlp: nn.Module):
        lin = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        return [(self.jnp.asarray(m.weight.detach().numpy().T), self.jnp.asarray(m.bias.detach().numpy()))
                for m in lin]

    def counted(self, f):
        def g(t, y, a):
            self.jax.debug.callback(self._tick)
            return f(t, y, a)

        return g

    def _tick(self):
        self.count[0] += 1

    # solves ---------------------------------------------------------------
    def solver(self, f, *, vmap: bool = False, counted: bool = False, max_steps: int = 16384):
        """Jitted ``solve(y0, args, rtol, atol, t1) -> (ys[batch?, n_t, ...], num_steps)``."""
        key = (f, vmap, counted, max_steps)
        if key in self._cache:
            return self._cache[key]
        dfx, jnp = self.dfx, self.jnp
        term = dfx.ODETerm(self.counted(f) if counted else f)

        def solve(y0, args, rtol, atol, t1):
            sol = dfx.diffeqsolve(term, dfx.Dopri5(), t0=0.0, t1=t1, dt0=None, y0=y0, args=args,
                                  saveat=dfx.SaveAt(ts=jnp.linspace(0.0, t1, N_TIMES)),
                                  stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                                  max_steps=max_steps)
            return sol.ys, sol.stats["num_steps"]

        if vmap:
            solve = self.jax.vmap(solve, in_axes=(0, 0, None, None, None))
        out = self._cache[key] = self.jax.jit(solve)
        return out

    def field_timer(self, f, args, y0) -> FieldTimer:
        jf = self.jax.jit(f)
        return FieldTimer(lambda t, y: jf(t, y, args).block_until_ready(), self.jnp.zeros(()), y0)


def _installed(specs, libs: dict[str, Lib], group: str, jobs: list[Job]):
    """Append a Job per ``(label, library, make)`` spec to ``jobs`` (a missing library's with its reason as
    the note) and yield ``(job, library, make)`` for the installed ones."""
    for label, name, make in specs:
        job = Job(label, name, group)
        jobs.append(job)
        if make is None:
            job.note = libs[name].missing
        else:
            yield job, name, make


def _counter(name: str, f: nn.Module) -> nn.Module:
    """The NFE-counting wrapper, except for neurodyn compiled: its compiled steps are cached per field object, so
    a wrapper would compile a second graph; it runs the bare field and its NFE is taken from sol.stats."""
    return f if name == "neurodyn-compiled" else CountingField(f)


def forward_jobs(prob: Problem, ref: np.ndarray | None, libs: dict[str, Lib], group: str,
                 jax_side: JaxSide | None, jax_field=None, vdp: bool = False) -> list[Job]:
    """Build, validate (NFE, error) and warm up the forward-solve jobs of every library for ``prob``.

    ``jax_field``: (f, args) of the same vector field in JAX. ``vdp``: the Van der Pol batch, which adds
    the per-sample rows (neurodyn ``per_sample_steps=True``, diffrax vmapped over the rows).
    """
    nd = libs.get("neurodyn") or libs.get("neurodyn-compiled")
    specs: list[tuple[str, str, Callable | None]] = []
    for name, lib in libs.items():
        if name == "diffrax":
            continue  # below
        if lib.missing:
            specs.append((name, name, None))
        elif name == "neurodyn":
            specs.append(("neurodyn eager", name, lambda: neurodyn_solve_runner(prob, "dopri5", nd.module)))
            if vdp:
                specs.append(("neurodyn per_sample_steps", name, lambda: neurodyn_per_sample_runner(prob, nd.module)))
        elif name == "neurodyn-compiled":
            specs.append(("neurodyn compiled", name,
                          lambda: neurodyn_solve_runner(prob, "dopri5", nd.module, compile=True)))
            if vdp:  # the compiled row step (compile.rows)
                specs.append(("neurodyn compiled per_sample_steps", name,
                              lambda: neurodyn_per_sample_runner(prob, nd.module, compile=True)))
        elif name == "torchdiffeq":
            specs.append((name, name, lambda: torchdiffeq_runner(prob, "dopri5")))
        elif name == "torchode":
            specs.append(("torchode (per-sample steps)" if vdp else name, name,
                          lambda: torchode_runner(prob, "dopri5")))
        elif name == "torchdyn":
            specs.append((name, name, lambda: torchdyn_runner(prob)))
    jobs: list[Job] = []
    for job, name, make in _installed(specs, libs, group, jobs):
        try:
            run = make()
            counted = _counter(name, prob.field)
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = time.perf_counter()
                ys, reported = run(counted)
                job.first_s = time.perf_counter() - s
                run(prob.field)  # warm-up with the bare field, which is what is timed
            job.note = _warning_note(caught)
            job.nfe = reported if counted is prob.field else counted.nfe
            job.extra["nfe_reported"] = reported
            if ref is not None:
                job.err = float(np.abs(ys.detach().numpy() - ref).max())

            def fn(run=run, f=prob.field):
                with torch.no_grad():
                    run(f)

            job.fn = fn
        except Exception as exc:  # noqa: BLE001
            _fail(job, exc)
    if "diffrax" in libs:
        if libs["diffrax"].missing:
            jobs.append(Job("diffrax", "diffrax", group, note=libs["diffrax"].missing))
        else:
            jobs += diffrax_forward_jobs(prob, ref, group, jax_side, jax_field, vdp)
    for j in jobs:
        if j.fn is not None:
            log(f"[{group}] {j.label}: nfe={j.nfe} err={j.err if j.err is None else f'{j.err:.2e}'} "
                f"first={j.first_s:.3f}s {j.note}")
    return jobs


def diffrax_forward_jobs(prob, ref, group, js: JaxSide, jax_field, vdp) -> list[Job]:
    f, args = jax_field
    c = prob.case
    y0 = js.jnp.asarray(prob.y0.numpy())
    variants = [("diffrax", False)] + ([("diffrax vmap (per-sample steps)", True)] if vdp else [])
    jobs = []
    for label, vmap in variants:
        job = Job(label, "diffrax", group, tf_key="jax")
        jobs.append(job)
        try:
            solve = js.solver(f, vmap=vmap)
            call = (y0, args, c.rtol, c.atol, c.T)
            s = time.perf_counter()
            ys, steps = js.jax.block_until_ready(solve(*call))
            job.first_s = time.perf_counter() - s  # includes the compilation
            ys = np.asarray(ys)
            if vmap:  # (batch, n_t, ...) -> (n_t, batch, ...); batched calls run until the slowest row is done
                ys = np.moveaxis(ys, 1, 0)
                job.nfe = 6 * int(np.max(np.asarray(steps))) + 1
                job.extra["nfe_how"] = "6 x max(num_steps) + 1 (batched calls)"
            else:
                js.count[0] = 0
                js.jax.block_until_ready(js.solver(f, counted=True)(*call))
                job.nfe = js.count[0]
                job.extra["num_steps"] = int(steps)
            if ref is not None:
                job.err = float(np.abs(ys - ref).max())

            def fn(solve=solve, call=call):
                js.jax.block_until_ready(solve(*call))

            fn()
            job.fn = fn
        except Exception as exc:  # noqa: BLE001
            _fail(job, exc)
    return jobs


def make_timers(prob: Problem, jobs: list[Job], js: JaxSide | None, jax_field) -> dict:
    timers = {"torch": FieldTimer(prob.field, prob.t[:1].clone(), prob.y0)}
    if js is not None and jax_field is not None and any(j.tf_key == "jax" and j.fn for j in jobs):
        f, args = jax_field
        timers["jax"] = js.field_timer(f, args, js.jnp.asarray(prob.y0.numpy()))
    return timers


# --------------------------------------------------------------------------- #
# Problems: the protocol cases and the Van der Pol batch
# --------------------------------------------------------------------------- #
class VanDerPol(nn.Module):
    """``x' = v, v' = mu (1 - x^2) v - x`` for a batch of ``mu`` (one per row); as in bench_per_sample.py."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def vdp_problem() -> Problem:
    mu = torch.linspace(*VDP_MU, VDP_B, dtype=DTYPE)
    y0 = torch.stack([torch.full((VDP_B,), 2.0, dtype=DTYPE), torch.zeros(VDP_B, dtype=DTYPE)], -1)
    case = Case("vdp", dim=2, hidden=0, batch=VDP_B, T=VDP_T, rtol=VDP_RTOL)  # atol = rtol/100 = 1e-7
    assert math.isclose(case.atol, VDP_ATOL)
    return Problem(case, VanDerPol(mu), y0, torch.linspace(0.0, VDP_T, N_TIMES, dtype=DTYPE))


def vdp_reference(prob: Problem) -> np.ndarray:
    """scipy Radau at rtol 1e-11 per oscillator (as bench_per_sample.py), cached in benchmarks/out/*.tmp."""
    from scipy.integrate import solve_ivp

    mu = prob.field.mu.numpy()
    key = hashlib.sha1(json.dumps([VDP_B, VDP_MU, VDP_T, N_TIMES, "radau-1e-11"]).encode()).hexdigest()[:12]
    path = OUT_DIR / f"ref-vdp-{key}.npy.tmp"
    if path.exists():
        with open(path, "rb") as fh:
            return np.load(fh)
    t_eval = prob.t.numpy()
    ys = np.stack([
        solve_ivp(lambda tt, yy, m=float(m): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (0.0, VDP_T),
                  [2.0, 0.0], method="Radau", rtol=1e-11, atol=1e-12, t_eval=t_eval).y.T for m in mu], axis=1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file handle: np.save(path) would append ".npy"
        np.save(fh, ys)
    return ys


def run_forward_group(prob, ref, libs, group, js, jax_field, repeats, vdp=False) -> list[Job]:
    jobs = forward_jobs(prob, ref, libs, group, js, jax_field, vdp=vdp)
    tfs = interleave(jobs, repeats, make_timers(prob, jobs, js, jax_field), group)
    add_overheads(jobs, tfs)
    for j in jobs:
        j.extra["t_f"] = tfs.get(j.tf_key)
    return jobs


def mlp_jax_field(js: JaxSide | None, prob: Problem):
    return None if js is None else (JaxSide.mlp, js.mlp_params(prob.field))


# --------------------------------------------------------------------------- #
# One training step: forward + backward of mean(ys**2) (an MSE against zero, as in bench_gradients.py)
# --------------------------------------------------------------------------- #
def _flat_grad(f: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in f.parameters()])


def reference_gradient(prob: Problem, libs: dict[str, Lib]) -> tuple[torch.Tensor, str]:
    """Backprop through a tight solve (dopri8, rtol 1e-12): torchdiffeq if installed, else neurodyn."""
    c, f = prob.case, prob.field
    bench_gradients.clear_grads(f)
    if "torchdiffeq" in libs and not libs["torchdiffeq"].missing:
        ys = libs["torchdiffeq"].module.odeint(f, prob.y0, prob.t, **GRAD_REF)
        how = "torchdiffeq.odeint"
    else:
        nd = bench_gradients.import_neurodyn()[0]
        ys = nd.solve(f, prob.y0, prob.t, **GRAD_REF).ys
        how = "neurodyn.solve"
    ys.pow(2).mean().backward()
    g = _flat_grad(f).clone()
    bench_gradients.clear_grads(f)
    log(f"[train-{c.name}] reference gradient: {how} {GRAD_REF}")
    return g, f"{how} {GRAD_REF['method']} rtol={GRAD_REF['rtol']:g} atol={GRAD_REF['atol']:g}"


def train_jobs(case: Case, libs: dict[str, Lib], js: JaxSide | None, repeats: int) -> tuple[list[Job], dict]:
    prob = bench_gradients.make_trainable_problem(case)
    group = f"train-{case.name}"
    g_ref, how = reference_gradient(prob, libs)
    jobs = build_train_jobs(prob, group, g_ref, libs, js)
    timers = train_timers(prob, js)
    tfs = interleave(jobs, repeats, timers, group)
    for j in jobs:
        j.extra["t_f"] = tfs.get("torch")
    bench_gradients.clear_grads(prob.field)
    return jobs, {"case": case.name, "reference_gradient": how, "loss": "mean(ys**2)"}


def train_timers(prob: Problem, js: JaxSide | None) -> dict:
    timers = {"torch": FieldTimer(prob.field, prob.t[:1].clone(), prob.y0.detach())}
    if js is not None:
        timers["jax"] = js.field_timer(JaxSide.mlp, js.mlp_params(prob.field), js.jnp.asarray(prob.y0.numpy()))
    return timers


def build_train_jobs(prob: Problem, group: str, g_ref: torch.Tensor, libs: dict[str, Lib], js: JaxSide | None
                     ) -> list[Job]:
    """Build, validate (NFE, gradient error) and warm up the training-step jobs of every library for ``prob``."""
    c = prob.case
    nd = (libs.get("neurodyn") or libs.get("neurodyn-compiled") or Lib("")).module

    def bg(entry):
        return lambda f: bench_gradients.forward(entry, f, prob)[0]

    last_stats: dict = {}
    specs: list[tuple[str, str, Callable | None]] = []
    for name, lib in libs.items():
        if lib.missing:
            specs.append((name, name, None))
        elif name == "neurodyn":
            specs += [("neurodyn direct", name, bg("neurodyn:direct")),
                      ("neurodyn adjoint", name, bg("neurodyn:adjoint"))]
        elif name == "neurodyn-compiled":
            def compiled(f, last=last_stats):
                sol = nd.solve(f, prob.y0, prob.t, method="dopri5", rtol=c.rtol, atol=c.atol, compile=True)
                last["nfe"] = common._nfe_from_stats(sol.stats)
                return sol.ys

            def compiled_checkpoint(f, last=last_stats):
                sol = nd.solve(f, prob.y0, prob.t, method="dopri5", rtol=c.rtol, atol=c.atol, compile=True,
                               gradient="checkpoint")
                last["nfe"] = common._nfe_from_stats(sol.stats)
                return sol.ys

            specs += [("neurodyn compiled direct", name, compiled),
                      ("neurodyn compiled checkpoint", name, compiled_checkpoint)]
        elif name == "torchdiffeq":
            specs += [("torchdiffeq odeint", name, bg("torchdiffeq:odeint")),
                      ("torchdiffeq odeint_adjoint", name, bg("torchdiffeq:odeint_adjoint"))]
        elif name == "torchode":
            run = torchode_runner(prob, "dopri5")
            specs.append(("torchode (backprop)", name, lambda f, run=run: run(f)[0]))
        elif name == "torchdyn":
            for sens in ("autograd", "adjoint"):
                run = torchdyn_runner(prob, sens)
                specs.append((f"torchdyn {sens}", name, lambda f, run=run: run(f)[0]))
    jobs: list[Job] = []
    for job, name, fwd in _installed(specs, libs, group, jobs):
        try:
            counted = _counter(name, prob.field)
            bench_gradients.clear_grads(prob.field)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = time.perf_counter()
                ys = fwd(counted)
                job.nfe = last_stats["nfe"] if counted is prob.field else counted.nfe
                ys.pow(2).mean().backward()
                job.first_s = time.perf_counter() - s
            job.note = _warning_note(caught)
            job.nfe_bwd = 0 if counted is prob.field else counted.nfe - job.nfe
            job.err = float((_flat_grad(prob.field) - g_ref).norm() / g_ref.norm())

            def fn(fwd=fwd, f=prob.field):
                bench_gradients.clear_grads(f)
                fwd(f).pow(2).mean().backward()

            fn()  # warm-up with the bare field
            job.fn = fn
            log(f"[{group}] {job.label}: nfe={job.nfe}+{job.nfe_bwd} grad rel err={job.err:.2e} "
                f"first={job.first_s:.3f}s {job.note}")
        except Exception as exc:  # noqa: BLE001
            _fail(job, exc)
    if "diffrax" in libs and not libs["diffrax"].missing:
        jobs.append(diffrax_train_job(prob, group, js, g_ref))
    return jobs


def diffrax_train_job(prob, group, js: JaxSide, g_ref) -> Job:
    """jit(value_and_grad(loss)) through diffeqsolve with its default adjoint (RecursiveCheckpointAdjoint)."""
    job = Job("diffrax (RecursiveCheckpointAdjoint)", "diffrax", group, tf_key="jax")
    try:
        jax, c = js.jax, prob.case
        params = js.mlp_params(prob.field)
        y0 = js.jnp.asarray(prob.y0.detach().numpy())

        def make(counted):
            solve = js.solver(JaxSide.mlp, counted=counted, max_steps=4096)  # diffrax's default max_steps

            def loss(p):
                return js.jnp.mean(solve(y0, p, c.rtol, c.atol, c.T)[0] ** 2)

            return jax.jit(jax.value_and_grad(loss)), solve

        vg, _ = make(False)
        s = time.perf_counter()
        _, grads = jax.block_until_ready(vg(params))
        job.first_s = time.perf_counter() - s
        vgc, solve_c = make(True)
        js.count[0] = 0
        jax.block_until_ready(solve_c(y0, params, c.rtol, c.atol, c.T))
        job.nfe = js.count[0]
        js.count[0] = 0
        jax.block_until_ready(vgc(params))
        job.nfe_bwd = js.count[0] - job.nfe
        g = torch.cat([torch.from_numpy(np.array(x)).reshape(-1) for gw, gb in grads for x in (np.asarray(gw).T, gb)])
        job.err = float((g - g_ref).norm() / g_ref.norm())

        def fn():
            jax.block_until_ready(vg(params))

        fn()
        job.fn = fn
        log(f"[{group}] {job.label}: nfe={job.nfe}+{job.nfe_bwd} grad rel err={job.err:.2e} first={job.first_s:.2f}s")
    except Exception as exc:  # noqa: BLE001
        _fail(job, exc)
    return job


# --------------------------------------------------------------------------- #
# The sections
# --------------------------------------------------------------------------- #
def section_table(args, libs, js) -> dict:
    groups = []
    for name in args.case_names:
        prob = make_problem(CASES[name])
        ref, _ = reference_solution(prob, use_cache=not args.no_ref_cache)
        jobs = run_forward_group(prob, ref, libs, name, js, mlp_jax_field(js, prob), args.repeats)
        groups.append({"group": name, "kind": "forward", "describe": prob.case.describe(), "jobs": jobs})
    if not args.no_vdp:
        prob = vdp_problem()
        ref = vdp_reference(prob)
        jax_field = None if js is None else (JaxSide.vdp, js.jnp.asarray(prob.field.mu.numpy()))
        jobs = run_forward_group(prob, ref, libs, "vdp", js, jax_field, args.repeats, vdp=True)
        groups.append({"group": "vdp", "kind": "forward", "jobs": jobs,
                       "describe": f"Van der Pol batch={VDP_B} mu={VDP_MU[0]:g}..{VDP_MU[1]:g} T={VDP_T:g} "
                                   f"rtol={VDP_RTOL:g} atol={VDP_ATOL:g}"})
    for name in args.train_names:
        jobs, info = train_jobs(CASES[name], libs, js, args.repeats)
        groups.append({"group": f"train-{name}", "kind": "train", "describe": CASES[name].describe(),
                       "jobs": jobs, **info})
    return {"groups": groups}


def section_wp(args, libs, js) -> dict:
    out = {}
    for name in ("small", "large"):
        base = make_problem(CASES[name])
        ref, _ = reference_solution(base, use_cache=not args.no_ref_cache)
        jf = mlp_jax_field(js, base)
        jobs, timers = [], None
        for rtol in args.wp_rtols:
            # one field object for all tolerances: compiled steps are cached per field (no recompilation)
            prob = dataclasses.replace(base, case=dataclasses.replace(base.case, rtol=rtol))
            jobs += forward_jobs(prob, ref, libs, f"wp-{name}-{rtol:.0e}", js, jf)
            timers = timers or make_timers(prob, jobs, js, jf)
        for j in jobs:
            j.extra["rtol"] = float(j.group.rsplit("-", 1)[1]) if "e" in j.group else None
        tfs = interleave(jobs, args.wp_repeats, timers, f"wp-{name}")
        add_overheads(jobs, tfs)
        out[name] = jobs
    return out


def section_ee(args, libs, js) -> dict:
    """Equal error: every table problem solved at the sweep ``rtol x EE_FACTORS`` (own rtol included, so the
    equal-rtol figures come from the same run); per library NFE and wall are interpolated log-log
    (``common.at_error``) at the error diffrax reaches at the problem's own rtol (torchdiffeq's without diffrax).
    The timed runs of one problem's whole sweep are interleaved; training steps: one interleaved run per rtol."""
    factors = EE_FACTORS_QUICK if args.quick else EE_FACTORS
    groups = []
    todo = [(n, "forward") for n in args.case_names] + ([("vdp", "forward")] if not args.no_vdp else []) + \
        [(n, "train") for n in args.train_names]
    for name, kind in todo:
        jobs: list[Job] = []
        if kind == "forward":
            base = vdp_problem() if name == "vdp" else make_problem(CASES[name])
            ref = vdp_reference(base) if name == "vdp" else reference_solution(base, use_cache=not args.no_ref_cache)[0]
            jf = (None if js is None else (JaxSide.vdp, js.jnp.asarray(base.field.mu.numpy()))) if name == "vdp" \
                else mlp_jax_field(js, base)
            timers = None
            for fac in factors:
                rtol = base.case.rtol * fac
                prob = dataclasses.replace(base, case=dataclasses.replace(base.case, rtol=rtol))
                point = forward_jobs(prob, ref, libs, f"ee-{name}-{rtol:.2e}", js, jf, vdp=name == "vdp")
                for j in point:
                    j.extra.update(rtol=rtol, factor=fac)
                jobs += point
                timers = timers or make_timers(prob, jobs, js, jf)
            interleave(jobs, args.ee_repeats, timers, f"ee-{name}")
            describe = groups_describe(name, base)
        else:
            base = bench_gradients.make_trainable_problem(CASES[name])
            g_ref, _ = reference_gradient(base, libs)
            for fac in factors:
                rtol = base.case.rtol * fac
                prob = dataclasses.replace(base, case=dataclasses.replace(base.case, rtol=rtol))
                point = build_train_jobs(prob, f"ee-train-{name}-{rtol:.2e}", g_ref, libs, js)
                for j in point:
                    j.extra.update(rtol=rtol, factor=fac)
                interleave(point, args.ee_repeats, train_timers(prob, js), f"ee-train-{name}-{rtol:.2e}")
                jobs += point
            bench_gradients.clear_grads(base.field)
            name, describe = f"train-{name}", CASES[name].describe() + " (error: relative gradient error)"
        groups.append({"group": name, "describe": describe, "rtol": base.case.rtol, "jobs": jobs})
    return {"groups": groups}


def groups_describe(name: str, prob: Problem) -> str:
    return (f"Van der Pol batch={VDP_B} mu={VDP_MU[0]:g}..{VDP_MU[1]:g} T={VDP_T:g} rtol={VDP_RTOL:g} "
            f"atol={VDP_ATOL:g}") if name == "vdp" else prob.case.describe()


def equal_error_rows(ee: dict) -> list[dict]:
    """Per problem and library: NFE, error, wall at the own rtol and NFE, wall, CPU interpolated at the reference
    error (diffrax's at the own rtol), with the ratios against diffrax at equal rtol and at equal error."""
    rows = []
    for g in ee.get("groups", []):
        by_label: dict[str, list[Job]] = {}
        for j in g["jobs"]:
            by_label.setdefault(j.label, []).append(j)

        def own(js_):
            return next((j for j in js_ if j.extra.get("factor") == 1 and j.err is not None), None)

        # the reference: diffrax's shared-step solve (or training step), else torchdiffeq's odeint
        cands = [lab for lab, js_ in by_label.items() if js_[0].lib == "diffrax" and "vmap" not in lab] + \
            ["torchdiffeq", "torchdiffeq odeint"]
        ref_label = next((lab for lab in cands if lab in by_label and own(by_label[lab]) is not None), None)
        e_ref = own(by_label[ref_label]).err if ref_label else None
        ref_row = None
        out = []
        for label, js_ in by_label.items():
            pts = [(j.extra["rtol"], j.err, j.nfe, j.wall, j.cpu) for j in js_]
            o = own(js_)
            r = {"problem": g["group"], "library": label, "ref_error": e_ref, "ref_library": ref_label,
                 "nfe_rtol": o.nfe if o else None, "err_rtol": o.err if o else None,
                 "wall_rtol": o.wall if o else None,
                 "nfe_ee": None, "wall_ee": None, "cpu_ee": None, "note": (o.note if o else "")}
            if e_ref is not None:
                r.update(nfe_ee=common.at_error(pts, e_ref, 2), wall_ee=common.at_error(pts, e_ref, 3),
                         cpu_ee=common.at_error(pts, e_ref, 4))
            out.append(r)
            if label == ref_label:
                ref_row = r
        for r in out:
            for k in ("nfe_rtol", "wall_rtol", "nfe_ee", "wall_ee", "cpu_ee"):
                r[k + "_vs_ref"] = _ratio(r[k], ref_row[k]) if ref_row else None
        rows += out
    return rows


def format_equal_error(ee: dict) -> list[str]:
    rows = equal_error_rows(ee)
    if not rows:
        return []
    lines = ["", "Equal error (sweep rtol x " + ", ".join(f"{f:g}" for f in sorted(
        {j.extra["factor"] for g in ee["groups"] for j in g["jobs"]}, reverse=True)) + " around each problem's own "
             "rtol, atol = rtol/100; NFE and wall interpolated log-log at the error the reference library (diffrax) "
             "reaches at the own rtol (training: diffrax's gradient error); ratio = this / reference; — where the "
             "sweep does not bracket that error). "
             "Problems: " + "; ".join(f"**{g['group']}** ({g['describe']})" for g in ee["groups"]) + ".", "",
             "| problem | library | error level | NFE @rtol | error @rtol | wall ms @rtol | NFE ratio @rtol "
             "| NFE @error | wall ms @error | CPU ms @error | NFE ratio @error | wall ratio @error "
             "| CPU ratio @error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nfe_e = "—" if r["nfe_ee"] is None else f"{r['nfe_ee']:.0f}"
        lines.append(f"| {r['problem']} | {r['library']} | {_f(r['ref_error'], '.1e')} | {r['nfe_rtol'] or '—'} "
                     f"| {_f(r['err_rtol'], '.1e')} | {_ms(r['wall_rtol'])} | {_f(r['nfe_rtol_vs_ref'], '.2f')} "
                     f"| {nfe_e} | {_ms(r['wall_ee'])} | {_ms(r['cpu_ee'])} | {_f(r['nfe_ee_vs_ref'], '.2f')} "
                     f"| {_f(r['wall_ee_vs_ref'], '.2f')} | {_f(r['cpu_ee_vs_ref'], '.2f')} |")
    return lines


def section_scaling(args, libs, js) -> dict:
    out = {}
    for sweep, base, param, values, quick_values in SWEEPS:
        jobs = []
        fields: dict = {}
        for v in (quick_values if args.quick else values):
            prob = make_problem(dataclasses.replace(base, name=f"{sweep}={v:g}", **{param: v}))
            # the same field object wherever the field is the same (compiled steps are cached per field)
            prob.field = fields.setdefault((prob.case.dim, prob.case.hidden), prob.field)
            jf = mlp_jax_field(js, prob)
            point = forward_jobs(prob, None, libs, f"scaling-{sweep}-{v:g}", js, jf)
            # every point has its own field cost: its bare calls are timed here, before the interleaved runs
            tfs = {k: tuple(statistics.median(x) for x in tm.blocks(5))
                   for k, tm in make_timers(prob, point, js, jf).items()}
            for j in point:
                j.extra.update(x=v, t_f=tfs.get(j.tf_key))
            jobs += point
        interleave(jobs, args.scaling_repeats, {}, f"scaling-{sweep}")
        for j in jobs:
            add_overheads([j], {j.tf_key: j.extra["t_f"]} if j.extra.get("t_f") else {})
        out[sweep] = {"param": param, "base": dataclasses.asdict(base), "jobs": jobs}
    return out


# --------------------------------------------------------------------------- #
# Targets, tables, files, plots
# --------------------------------------------------------------------------- #
def _baseline(jobs: list[Job]) -> Job | None:
    return next((j for j in jobs if j.lib == "torchdiffeq" and j.label in ("torchdiffeq", "torchdiffeq odeint")
                 and j.wall is not None), None)


def _job(jobs, label) -> Job | None:
    return next((j for j in jobs if j.label == label and j.wall is not None), None)


def _ratio(a, b):
    return a / b if a is not None and b else None


def evaluate_targets(table: dict) -> list[dict]:
    out = []

    def add(target, group, a: Job | None, b: list[Job], kind, thr):
        """``a`` against the fastest of ``b`` (on each clock); speed-up = b / a >= thr, ratio = a / b <= thr."""
        t = {"target": target, "group": group, "kind": kind, "threshold": thr}
        b = [j for j in b if j is not None and j.wall is not None]
        if a is None or not b:
            t.update(vs=None, vs_cpu=None, measured=None, measured_cpu=None, status="n/a", status_cpu="n/a")
            out.append(t)
            return
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            best = min(b, key=lambda j: getattr(j, clock))
            m = _ratio(getattr(best, clock), getattr(a, clock)) if kind == "speedup" else \
                _ratio(getattr(a, clock), getattr(best, clock))
            ok = m >= thr if kind == "speedup" else m <= thr
            t.update({"vs" + suffix: best.label, "measured" + suffix: m, "status" + suffix: "PASS" if ok else "FAIL"})
        out.append(t)

    for g in table.get("groups", []):
        jobs, name = g["jobs"], g["group"]
        nd = _job(jobs, "neurodyn direct" if g["kind"] == "train" else "neurodyn eager")
        peers = [j for j in jobs if j.lib in TORCH_PEERS]
        add("neurodyn eager faster than every PyTorch peer", name, nd, peers, "speedup", 1.0)
        if name == "small":
            add("neurodyn eager >= 3x torchdiffeq", name, nd, [_baseline(jobs)], "speedup", 3.0)
        if name in ("small", "large"):
            add("neurodyn compiled within " + ("3x" if name == "small" else "1.2x") + " of diffrax", name,
                _job(jobs, "neurodyn compiled"), [_job(jobs, "diffrax")], "ratio", 3.0 if name == "small" else 1.2)
    return out


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def _ms(v):
    return "—" if v is None else (f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}")


def table_rows(table: dict) -> list[dict]:
    rows = []
    for g in table.get("groups", []):
        base = _baseline(g["jobs"])
        for j in g["jobs"]:
            rows.append({
                "problem": g["group"], "library": j.label,
                "nfe": None if j.nfe is None else (f"{j.nfe}+{j.nfe_bwd}" if j.nfe_bwd is not None else str(j.nfe)),
                "error": j.err, "wall_ms": None if j.wall is None else j.wall * 1e3,
                "cpu_ms": None if j.cpu is None else j.cpu * 1e3,
                "overhead": j.extra.get("overhead"), "overhead_cpu": j.extra.get("overhead_cpu"),
                "speedup_vs_torchdiffeq": _ratio(base.wall, j.wall) if base else None,
                "speedup_vs_torchdiffeq_cpu": _ratio(base.cpu, j.cpu) if base else None,
                "note": j.note,
            })
    return rows


def format_markdown(meta: dict, table: dict, targets: list[dict], files: list[str]) -> str:
    m = meta["machine"]
    libs = meta["libs"]
    vers = ", ".join(f"{k} {v['version']}" if not v["missing"] else f"{k}: {v['missing']}"
                     for k, v in libs.items() if k != "neurodyn-compiled")
    la = m.get("loadavg_start"), m.get("loadavg_end")
    lines = [
        f"Run {m['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, shared with other jobs; 1-min load "
        f"average {_f(la[0], '.1f')} at start, {_f(la[1], '.1f')} at end), Python {m['python']}, torch "
        f"{m['torch']} (1 thread), {vers}; {meta.get('jax_versions') or _jax_versions()} on the CPU, float64, "
        f"`XLA_FLAGS={meta['xla_flags']}`"
        + (f"; the process pinned to core {meta['pinned_cpu']} (every library on one core). "
           if meta.get("pinned_cpu") is not None else ". ") +
        f"Median of {meta['args']['repeats']} timed runs per entry after a warm-up, all entries interleaved "
        f"round-robin{' (--quick)' if meta['args']['quick'] else ''}. dopri5 everywhere.",
        "",
    ]
    descr = "; ".join(f"**{g['group']}** ({g['describe']})" for g in table.get("groups", []))
    if descr:
        lines += ["Problems: " + descr + ".", ""]
    if table.get("groups"):
        lines += [
            "Columns: NFE = vector-field calls (counted; training: forward + backward); error = max abs error "
            "against the reference at the 11 output times (training: relative 2-norm error of the parameter "
            "gradient against backprop through a dopri8 solve at rtol 1e-12); overhead = wall / (NFE x one "
            "call of the library's own vector field), wall and CPU; speed-up = torchdiffeq wall / this wall (> 1: "
            "faster than torchdiffeq), wall and CPU.",
            "",
            "| problem | library | NFE | error | wall ms | CPU ms | overhead (wall / CPU) "
            "| speed-up vs torchdiffeq (wall / CPU) | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table_rows(table):
            ov = "—" if r["overhead"] is None else f"{r['overhead']:.2f} / {r['overhead_cpu']:.2f}"
            sp = "—" if r["speedup_vs_torchdiffeq"] is None else \
                f"{r['speedup_vs_torchdiffeq']:.2f}x / {r['speedup_vs_torchdiffeq_cpu']:.2f}x"
            lines.append(f"| {r['problem']} | {r['library']} | {r['nfe'] or '—'} | {_f(r['error'], '.1e')} "
                         f"| {_ms(None if r['wall_ms'] is None else r['wall_ms'] / 1e3)} "
                         f"| {_ms(None if r['cpu_ms'] is None else r['cpu_ms'] / 1e3)} | {ov} | {sp} | {r['note']} |")
    lines += format_equal_error({"groups": table.get("equal_error", [])})
    if targets:
        lines += ["", "Targets (speed-up = other / neurodyn; ratio = neurodyn / other; against the fastest of the "
                  "named peers on each clock; wall is the protocol's verdict, CPU tells whether a failure is load "
                  "noise):", "",
                  "| target | problem | threshold | against (wall) | measured (wall) | result (wall) "
                  "| against (CPU) | measured (CPU) | result (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            thr = ("speed-up >= " if t["kind"] == "speedup" else "ratio <= ") + f"{t['threshold']:g}"
            lines.append(f"| {t['target']} | {t['group']} | {thr} | {t['vs'] or '—'} | {_f(t['measured'], '.2f')} "
                         f"| {t['status']} | {t['vs_cpu'] or '—'} | {_f(t['measured_cpu'], '.2f')} "
                         f"| {t['status_cpu']} |")
    if files:
        lines += ["", "Plots and raw numbers: " + ", ".join(f"[`{f}`](out/{f})" for f in files) + "."]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_rows(wp: dict, scaling: dict) -> tuple[list[dict], list[dict]]:
    wp_rows = [{"case": case, "library": j.label, "rtol": j.extra.get("rtol"), "nfe": j.nfe,
                "max_abs_err": j.err, "wall_s": j.wall, "cpu_s": j.cpu}
               for case, jobs in wp.items() for j in jobs if j.wall is not None]
    sc_rows = [{"sweep": sweep, "param": d["param"], "x": j.extra.get("x"), "library": j.label, "nfe": j.nfe,
                "wall_s": j.wall, "cpu_s": j.cpu, "overhead": j.extra.get("overhead")}
               for sweep, d in scaling.items() for j in d["jobs"] if j.wall is not None]
    return wp_rows, sc_rows


def make_plots(out_dir: Path, wp_rows: list[dict], sc_rows: list[dict], title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter, ScalarFormatter

    order = ("neurodyn eager", "neurodyn compiled", "torchdiffeq", "torchode", "torchdyn", "diffrax")
    labels = sorted({r["library"] for r in wp_rows + sc_rows}, key=lambda x: (order + (x,)).index(x))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    written = []

    def lines(ax, rows, key_x, key_y, sort_key):
        for lab in labels:
            pts = sorted(((r[sort_key], r[key_x], r[key_y]) for r in rows
                          if r["library"] == lab and r[key_x] and r[key_y]), key=lambda p: p[0])
            if pts:
                _, xs, ys = zip(*pts)
                ax.plot(xs, [y * 1e3 for y in ys], "o-", color=colors[lab], label=lab, ms=4,
                        lw=2.2 if lab.startswith("neurodyn") else 1.4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
        ax.grid(True, which="both", alpha=0.3)

    def finish(fig, axes, what, name):
        for row, clock in zip(axes, ("wall", "CPU")):
            for ax in row:
                ax.set_ylabel(f"{clock} ms (median)")
            row[0].legend(fontsize=8)
        fig.suptitle(f"{what}, dopri5, {title}. Top: wall time; bottom: process CPU time of the same runs "
                     "(one thread: the wall time an idle machine would show)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    clocks = (("wall_s", "wall"), ("cpu_s", "CPU"))
    cases = sorted({r["case"] for r in wp_rows}, key=lambda c: list(CASES).index(c))
    if cases:
        fig, axes = plt.subplots(2, len(cases), figsize=(6.5 * len(cases), 9.5), squeeze=False)
        for (key, _), row in zip(clocks, axes):
            for ax, case in zip(row, cases):
                lines(ax, [r for r in wp_rows if r["case"] == case], "max_abs_err", key, "rtol")
                ax.set_xlabel("max abs error vs reference (DOP853, rtol 1e-12)")
                ax.set_title(f"{case}: {CASES[case].describe().split(' rtol')[0]}, rtol 1e-3..1e-10", fontsize=9)
        finish(fig, axes, "Work-precision", "suite_work_precision.png")
    sweeps = [s for s in SWEEPS if any(r["sweep"] == s[0] for r in sc_rows)]
    if sweeps:
        fig, axes = plt.subplots(2, len(sweeps), figsize=(6 * len(sweeps), 9.5), squeeze=False)
        for (key, clock), row in zip(clocks, axes):
            for ax, (sweep, base, param, _, _) in zip(row, sweeps):
                rows = [r for r in sc_rows if r["sweep"] == sweep]
                lines(ax, rows, "x", key, "x")
                ax.set_xticks(sorted({r["x"] for r in rows}))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(param)
                ax.set_title(f"{clock} vs {param} ({base.describe()})".replace(
                    f"{param}={getattr(base, param):g} ", ""), fontsize=8)
        finish(fig, axes, "Scaling", "suite_scaling.png")
    return written


def machine_info() -> dict:
    keep = ("date", "cpu", "logical_cpus", "platform", "python", "torch", "torch_threads", "scipy")
    return {k: v for k, v in common.machine_info().items() if k in keep}


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repeat, small+batched, 3 tolerances, 2 points per sweep")
    ap.add_argument("--cases", default=None, help=f"protocol cases for the table ({','.join(CASES)}; default all; "
                    "--quick: small,batched)")
    ap.add_argument("--train-cases", default="small", help="cases for the training-step rows (default small)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"subset of {','.join(LIBS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per table entry (default 5; --quick 1)")
    ap.add_argument("--wp-repeats", type=int, default=None, help="per work-precision point (default 3; --quick 1)")
    ap.add_argument("--ee-repeats", type=int, default=None, help="per equal-error sweep point (default 3; --quick 1)")
    ap.add_argument("--scaling-repeats", type=int, default=None, help="per scaling point (default 3; --quick 1)")
    ap.add_argument("--no-vdp", action="store_true", help="skip the Van der Pol batch")
    ap.add_argument("--no-plots", action="store_true", help="write the CSV/JSON but no PNG")
    ap.add_argument("--no-ref-cache", action="store_true", help="recompute the DOP853 references")
    ap.add_argument("--all-cores", action="store_true",
                    help="do not pin the process to one core (by default it is: torch runs one thread, and XLA's "
                         "CPU runtime would otherwise run helper threads beside its one intra-op thread)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--update-readme", action="store_true",
                    help="replace the suite section of benchmarks/README.md with this run's table")
    ap.add_argument("--render", type=Path, default=None, metavar="SUITE_JSON",
                    help="run nothing: rewrite the tables, CSVs and plots from an earlier suite.json")
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 5)
    args.wp_repeats = args.wp_repeats or (1 if q else 3)
    args.scaling_repeats = args.scaling_repeats or (1 if q else 3)
    args.ee_repeats = args.ee_repeats or (1 if q else 3)
    args.wp_rtols = WP_RTOLS_QUICK if q else WP_RTOLS
    args.case_names = [c for c in (args.cases or ("small,batched" if q else ",".join(CASES))).split(",") if c]
    args.train_names = [c for c in args.train_cases.split(",") if c]
    args.section_names = [s for s in args.sections.split(",") if s]
    args.lib_names = [n for n in args.libs.split(",") if n]
    for what, got, valid in (("case", args.case_names + args.train_names, CASES),
                             ("section", args.section_names, SECTIONS), ("library", args.lib_names, LIBS)):
        bad = [x for x in got if x not in valid]
        if bad:
            ap.error(f"unknown {what}(s) {bad}; choose from {list(valid)}")
    return args


def _jobs(records: list[dict]) -> list[Job]:
    names = {f.name for f in dataclasses.fields(Job)}
    return [Job(**{k: v for k, v in r.items() if k in names}) for r in records]


def render(path: Path) -> tuple[dict, dict, dict, dict]:
    """(meta, table, wp, scaling) of an earlier run, from its suite.json."""
    payload = json.loads(path.read_text())
    table = {"groups": [{**g, "jobs": _jobs(g["jobs"])} for g in payload["table"]],
             "equal_error": [{**g, "jobs": _jobs(g["jobs"])} for g in payload.get("equal_error", [])]}
    wp = {k: _jobs(v) for k, v in payload["work_precision"].items()}
    scaling = {k: {**d, "jobs": _jobs(d["jobs"])} for k, d in payload["scaling"].items()}
    meta = {k: v for k, v in payload.items()
            if k not in ("table", "equal_error", "work_precision", "scaling", "targets")}
    return meta, table, wp, scaling


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        meta, table, wp, scaling = render(args.render)
        return write_outputs(args, meta, table, wp, scaling)
    pinned = None
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})  # every library on one core, like torch.set_num_threads(1)
    common.setup_torch()
    libs = load_libs(args.lib_names)
    js = JaxSide() if "diffrax" in libs and not libs["diffrax"].missing else None
    meta = {
        "machine": {**machine_info(), "loadavg_start": os.getloadavg()[0]},
        "libs": {k: {"version": v.version, "missing": v.missing} for k, v in libs.items()},
        "xla_flags": os.environ.get("XLA_FLAGS") if js else None,
        "pinned_cpu": pinned,
        "jax_versions": _jax_versions() if js else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "protocol": {"dtype": "float64", "method": "dopri5", "field_seed": common.FIELD_SEED,
                     "y0_seed": common.Y0_SEED, "weight_scale": common.WEIGHT_SCALE,
                     "reference": f"scipy DOP853 rtol={common.REF_RTOL:g} atol={common.REF_ATOL:g}; "
                                  "Van der Pol: scipy Radau rtol=1e-11 atol=1e-12"},
    }
    t_start = time.perf_counter()
    table = section_table(args, libs, js) if "table" in args.section_names else {}
    if "ee" in args.section_names:
        table = {**table, "equal_error": section_ee(args, libs, js)["groups"]}
    wp = section_wp(args, libs, js) if "wp" in args.section_names else {}
    scaling = section_scaling(args, libs, js) if "scaling" in args.section_names else {}
    meta["machine"]["loadavg_end"] = os.getloadavg()[0]
    meta["elapsed_s"] = time.perf_counter() - t_start
    return write_outputs(args, meta, table, wp, scaling)


def write_outputs(args, meta: dict, table: dict, wp: dict, scaling: dict) -> int:
    targets = evaluate_targets(table)

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    wp_rows, sc_rows = plot_rows(wp, scaling)
    files = []
    for name, rows in (("suite_table.csv", table_rows(table)),
                       ("suite_equal_error.csv", equal_error_rows({"groups": table.get("equal_error", [])})),
                       ("suite_work_precision.csv", wp_rows),
                       ("suite_scaling.csv", sc_rows)):
        if rows:
            _write_csv(out / name, rows)
            files.append(name)
    if not args.no_plots:
        title = f"{meta['machine']['cpu']}, 1 thread, {meta['machine']['date']}"
        files = make_plots(out, wp_rows, sc_rows, title) + files
    md = format_markdown(meta, table, targets, files + ["suite.json"])
    payload = {
        **meta, "targets": targets,
        "table": [{**{k: v for k, v in g.items() if k != "jobs"}, "jobs": [j.record() for j in g["jobs"]]}
                  for g in table.get("groups", [])],
        "equal_error": [{**{k: v for k, v in g.items() if k != "jobs"}, "jobs": [j.record() for j in g["jobs"]]}
                        for g in table.get("equal_error", [])],
        "work_precision": {k: [j.record() for j in v] for k, v in wp.items()},
        "scaling": {k: {**{kk: vv for kk, vv in d.items() if kk != "jobs"}, "jobs": [j.record() for j in d["jobs"]]}
                    for k, d in scaling.items()},
    }
    (out / "suite.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "suite.md").write_text("# Benchmark suite\n\n" + md)
    print(md)
    if args.update_readme:
        ok = bench_core.update_readme(md, start=README_START, end=README_END)
        log("README updated" if ok else "README suite markers not found")
    log(f"wrote {', '.join(files + ['suite.json', 'suite.md'])} to {out} (run took {meta['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
