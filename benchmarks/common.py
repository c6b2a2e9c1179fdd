"""Shared pieces of the neurodyn benchmark protocol.

Everything that defines *what* is measured lives here (vector field, initial
values, cases, reference solution, NFE counter, bare-call timing, the runners
for each library), so that ``bench_core.py`` and ``profile_small.py`` measure
exactly the same problem.

Protocol (see benchmarks/README.md):

* vector field: MLP ``dim -> hidden -> hidden -> dim`` with tanh, float64,
  weights drawn from a seeded ``torch.Generator`` with PyTorch's default
  ``nn.Linear`` bounds, weight matrices then scaled by 2 (non-trivial dynamics);
* ``y0 ~ N(0, 1)`` from a seeded generator, shape ``(batch, dim)``;
* output at 11 equally spaced times in ``[0, T]``; ``atol = rtol / 100``;
* one thread (``torch.set_num_threads(1)``), ``torch.no_grad()``;
* reference: scipy ``DOP853`` at ``rtol=1e-12, atol=1e-14`` (independent of
  neurodyn, torchdiffeq and torchode).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

DTYPE = torch.float64
FIELD_SEED = 0
Y0_SEED = 1
N_TIMES = 11
WEIGHT_SCALE = 2.0
REF_RTOL = 1e-12
REF_ATOL = 1e-14
# Bump when the field / y0 / reference definition changes (invalidates caches).
PROTOCOL_VERSION = 1

METHODS = ("dopri5", "tsit5")


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Case:
    name: str
    dim: int
    hidden: int
    batch: int
    T: float
    rtol: float

    @property
    def atol(self) -> float:
        return self.rtol / 100.0

    def describe(self) -> str:
        return (
            f"dim={self.dim} hidden={self.hidden} batch={self.batch} "
            f"T={self.T:g} rtol={self.rtol:g} atol={self.atol:g}"
        )


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("small", dim=2, hidden=64, batch=1, T=10.0, rtol=1e-6),
        Case("batched", dim=2, hidden=64, batch=256, T=10.0, rtol=1e-6),
        Case("medium", dim=16, hidden=128, batch=1024, T=10.0, rtol=1e-5),
        Case("large", dim=64, hidden=256, batch=512, T=5.0, rtol=1e-6),
    )
}


def setup_torch() -> None:
    """Single-threaded float64 CPU, as in the protocol."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set / parallel work already started
        pass


# --------------------------------------------------------------------------- #
# Problem definition
# --------------------------------------------------------------------------- #
class MLPField(nn.Module):
    """``dy/dt = MLP(y)``; ``t`` is accepted and ignored (any shape)."""

    def __init__(self, dim: int, hidden: int, seed: int = FIELD_SEED):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden, dtype=DTYPE),
            nn.Tanh(),
            nn.Linear(hidden, hidden, dtype=DTYPE),
            nn.Tanh(),
            nn.Linear(hidden, dim, dtype=DTYPE),
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    # Same bounds as nn.Linear.reset_parameters (kaiming_uniform
                    # with a=sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))), but
                    # drawn from our own generator so the field is reproducible.
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=g)
                    layer.bias.uniform_(-bound, bound, generator=g)
                    layer.weight.mul_(WEIGHT_SCALE)
        self.requires_grad_(False)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class CountingField(nn.Module):
    """Identical NFE counter wrapped around the field for every library."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.f(t, y)


@dataclass
class Problem:
    case: Case
    field: MLPField
    y0: torch.Tensor
    t: torch.Tensor


def make_problem(case: Case) -> Problem:
    field = MLPField(case.dim, case.hidden)
    g = torch.Generator().manual_seed(Y0_SEED)
    y0 = torch.randn(case.batch, case.dim, generator=g, dtype=DTYPE)
    t = torch.linspace(0.0, case.T, N_TIMES, dtype=DTYPE)
    return Problem(case, field, y0, t)


# --------------------------------------------------------------------------- #
# Reference solution (scipy DOP853, cached under benchmarks/out/*.tmp)
# --------------------------------------------------------------------------- #
def _ref_cache_path(case: Case) -> Path:
    key = json.dumps(
        [PROTOCOL_VERSION, asdict(case), FIELD_SEED, Y0_SEED, N_TIMES,
         WEIGHT_SCALE, REF_RTOL, REF_ATOL],
        sort_keys=True,
    )
    h = hashlib.sha1(key.encode()).hexdigest()[:12]
    return OUT_DIR / f"ref-{case.name}-{h}.npy.tmp"


def reference_solution(prob: Problem, use_cache: bool = True) -> tuple[np.ndarray, dict]:
    """Return ``ys_ref`` with shape ``(N_TIMES, batch, dim)`` and info."""
    from scipy.integrate import solve_ivp

    path = _ref_cache_path(prob.case)
    if use_cache and path.exists():
        with open(path, "rb") as fh:
            ys = np.load(fh)
        return ys, {"solver": "scipy DOP853", "cached": True}

    shape = tuple(prob.y0.shape)
    field = prob.field
    nfe = 0

    def fun(t, y):
        nonlocal nfe
        nfe += 1
        yt = torch.from_numpy(y).view(shape)
        return field(torch.tensor(t, dtype=DTYPE), yt).reshape(-1).numpy()

    t_eval = prob.t.numpy()
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = solve_ivp(
            fun, (float(t_eval[0]), float(t_eval[-1])), prob.y0.reshape(-1).numpy(),
            method="DOP853", t_eval=t_eval, rtol=REF_RTOL, atol=REF_ATOL,
        )
    wall = time.perf_counter() - t0
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    ys = sol.y.T.reshape(len(t_eval), *shape).copy()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if use_cache:
        tmp = path.with_name(path.name + ".part.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, ys)
        os.replace(tmp, path)
    return ys, {"solver": "scipy DOP853", "cached": False, "nfe": nfe, "wall_s": wall}


# --------------------------------------------------------------------------- #
# Timing helpers
# --------------------------------------------------------------------------- #
class FieldTimer:
    """Times bare ``field(t, y)`` calls in blocks of back-to-back calls.

    Each block gives the per-call time in wall-clock seconds (``perf_counter``)
    and in CPU seconds of this process (``process_time``; with one torch thread
    this is the wall time the call would take on an idle machine).
    """

    def __init__(self, field: nn.Module, t0: torch.Tensor, y: torch.Tensor,
                 block_s: float = 0.02):
        self.field, self.t0, self.y = field, t0, y
        with torch.no_grad():
            for _ in range(20):
                field(t0, y)
            n = 1
            while True:  # calibrate calls per block
                s = time.perf_counter()
                for _ in range(n):
                    field(t0, y)
                el = time.perf_counter() - s
                if el >= block_s / 4 or n >= 1 << 20:
                    break
                n *= 2
        self.n = max(1, int(n * block_s / max(el, 1e-9)))

    def blocks(self, k: int, scale: float = 1.0) -> tuple[list[float], list[float]]:
        """``k`` blocks (of ``scale`` x the calibrated length): (wall per call, CPU per call)."""
        n = max(1, int(self.n * scale))
        f, t0, y = self.field, self.t0, self.y
        walls, cpus = [], []
        with torch.no_grad():
            for _ in range(k):
                s, c = time.perf_counter(), time.process_time()
                for _ in range(n):
                    f(t0, y)
                walls.append((time.perf_counter() - s) / n)
                cpus.append((time.process_time() - c) / n)
        return walls, cpus


def time_field_call(field: nn.Module, t0: torch.Tensor, y: torch.Tensor,
                    blocks: int = 31, block_s: float = 0.02) -> tuple[float, float]:
    """Median (over blocks) time of one bare ``field(t, y)`` call: (wall s, CPU s)."""
    walls, cpus = FieldTimer(field, t0, y, block_s).blocks(blocks)
    return statistics.median(walls), statistics.median(cpus)


# --------------------------------------------------------------------------- #
# neurodyn import (appears automatically once importable)
# --------------------------------------------------------------------------- #
def import_neurodyn():
    """Return ``(module, None)`` or ``(None, reason)``.

    Tries an installed ``neurodyn`` first, then ``<repo>/src``.
    """
    reasons = []
    for attempt in ("installed", "src"):
        if attempt == "src":
            src = str(REPO_ROOT / "src")
            if src not in sys.path:
                sys.path.insert(0, src)
            for k in [k for k in sys.modules if k == "neurodyn" or k.startswith("neurodyn.")]:
                del sys.modules[k]
        try:
            import neurodyn  # noqa: PLC0415

            missing = [a for a in ("solve", "odeint") if not hasattr(neurodyn, a)]
            if "solve" in missing:
                reasons.append(f"{attempt}: neurodyn has no `solve`")
                continue
            return neurodyn, None
        except Exception as exc:  # noqa: BLE001 - any import failure means "not ready"
            reasons.append(f"{attempt}: {type(exc).__name__}: {exc}")
    return None, "; ".join(reasons)


# --------------------------------------------------------------------------- #
# Runners: each returns run(field) -> (ys[N_TIMES, batch, dim], reported_nfe|None)
# --------------------------------------------------------------------------- #
Runner = Callable[[nn.Module], "tuple[torch.Tensor, int | None]"]


@dataclass
class Entry:
    """One thing that is timed: a (library, entry point, method) triple."""

    library: str  # "neurodyn" | "torchdiffeq" | "torchode"
    entry: str  # "solve" | "odeint" | "solve_ivp-style" ...
    method: str  # method actually run
    make: Callable[[], Runner]  # built lazily (after imports succeed)

    @property
    def key(self) -> str:
        return f"{self.library}:{self.entry}:{self.method}"


def _as_time_major(ys: torch.Tensor, prob: Problem) -> torch.Tensor:
    n_t, (b, d) = len(prob.t), prob.y0.shape
    if tuple(ys.shape) == (n_t, b, d):
        return ys
    if tuple(ys.shape) == (b, n_t, d):
        return ys.transpose(0, 1)
    raise ValueError(f"unexpected ys shape {tuple(ys.shape)}; expected ({n_t}, {b}, {d})")


def _nfe_from_stats(stats) -> int | None:
    if not isinstance(stats, dict) or "nfe" not in stats:
        return None
    v = stats["nfe"]
    if isinstance(v, torch.Tensor):
        v = int(v.max().item()) if v.numel() > 1 else int(v.item())
    return int(v)


def torchdiffeq_runner(prob: Problem, method: str) -> Runner:
    import torchdiffeq

    c = prob.case

    def run(field):
        ys = torchdiffeq.odeint(field, prob.y0, prob.t, rtol=c.rtol, atol=c.atol, method=method)
        return ys, None

    return run


def torchode_runner(prob: Problem, method: str) -> Runner:
    """torchode's documented API; each batch row gets its own step size (by design)."""
    import torchode as to

    c = prob.case
    step_cls = {"dopri5": to.Dopri5, "tsit5": to.Tsit5}[method]
    t_eval = prob.t.unsqueeze(0).expand(c.batch, -1).contiguous()
    solvers: dict[int, tuple] = {}

    def build(field):
        term = to.ODETerm(field)
        step = step_cls(term=term)
        ctrl = to.IntegralController(atol=c.atol, rtol=c.rtol, term=term)
        return term, to.AutoDiffAdjoint(step, ctrl)

    def run(field):
        # Solver objects are built once per field (like a model's __init__),
        # outside the timed region after the first call.
        key = id(field)
        if key not in solvers:
            solvers[key] = (field, *build(field))
        _, term, solver = solvers[key]
        sol = solver.solve(to.InitialValueProblem(y0=prob.y0, t_eval=t_eval))
        if not bool((sol.status == 0).all()):
            raise RuntimeError(f"torchode status {sol.status.tolist()}")
        return sol.ys.transpose(0, 1), None

    return run


def neurodyn_solve_runner(prob: Problem, method: str, nd, compile: bool = False) -> Runner:
    c = prob.case

    def run(field):
        sol = nd.solve(field, prob.y0, prob.t, method=method, rtol=c.rtol, atol=c.atol, compile=compile)
        return _as_time_major(sol.ys, prob), _nfe_from_stats(getattr(sol, "stats", None))

    return run


def neurodyn_odeint_runner(prob: Problem, method: str, nd) -> Runner:
    c = prob.case

    def run(field):
        ys = nd.odeint(field, prob.y0, prob.t, rtol=c.rtol, atol=c.atol, method=method)
        return _as_time_major(ys, prob), None

    return run


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import scipy
    import torchdiffeq
    import torchode

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
        "torchode": getattr(torchode, "__version__", "?"),
        "scipy": scipy.__version__,
    }


def at_error(points, err: float, index: int = 2) -> float | None:
    """Log-log interpolation of a work-precision sweep at the error ``err``.

    ``points``: tuples ``(rtol, error, value, ...)`` of one solver's sweep (any order; read loose to tight rtol);
    ``index``: which entry is interpolated (2: NFE; 3: a time, say). The first pair of neighbouring points whose
    errors bracket ``err`` is used (errors need not fall monotonically with rtol); an exact hit returns its value.
    None when no pair brackets ``err`` (outside the sweep's range) or an entry is missing.
    """
    pts = sorted((p for p in points if p[1] is not None and p[1] > 0 and p[index] is not None),
                 key=lambda p: -p[0])
    if not (err > 0):
        return None
    le = math.log(err)
    for a, b in zip(pts, pts[1:]):
        ea, eb = math.log(a[1]), math.log(b[1])
        if min(ea, eb) <= le <= max(ea, eb):
            if ea == eb:
                return float(min(a[index], b[index]))
            w = (le - ea) / (eb - ea)
            return math.exp((1 - w) * math.log(a[index]) + w * math.log(b[index]))
    for p in pts:
        if p[1] == err:
            return float(p[index])
    return None
