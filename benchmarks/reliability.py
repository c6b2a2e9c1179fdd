"""Randomized reliability run: a few hundred small seeded problems against scipy, every outcome classified.

Each problem draws a vector field (random linear with a random, sometimes mildly stiff, spectrum; a tanh MLP with
random weights; optional ``sin(t)`` forcing or a time input; Van der Pol with ``mu`` up to 50; Robertson for the
implicit methods; a separable Hamiltonian for every method and the only field the symplectic ones get), a state
dimension 1-6, a batch shape, float64 or float32, a time direction, an irregular output grid of 2-30 points, a
method from :func:`neurodyn.solvers.available_methods`, tolerances (fixed-step methods: a step size),
sometimes ``per_sample_steps`` (explicit Runge--Kutta) and sometimes a gradient method (then ``d loss / d y0`` is
checked too). The reference is :func:`scipy.integrate.solve_ivp` (``DOP853``, ``Radau`` for the stiff fields)
at ``rtol=1e-12, atol=1e-14`` on a numpy twin of the field (written independently of the torch one).

Classification (one class per problem)
--------------------------------------
``ok``        finished with status success, within the allowed error below (and the gradient too, if checked);
``refused``   an :class:`~neurodyn.InputError` (the generator only builds valid problems, so each is listed);
``failed``    a :class:`~neurodyn.SolveFailure` or a returned non-success status (``max_steps_reached``, ...):
              the solver said it failed -- not silent;
``crash``     any other exception;
``hang``      no answer within the wall-clock limit (``signal.setitimer``; the alarm is a ``BaseException``
              so no ``except Exception`` in the library swallows it);
``wrong``     status success but out of tolerance: a silent wrong result (the count to drive to zero).

The allowed error, per output time ``t_i`` and component ``j`` (``M_j`` = max over the output times of
``|y_ref[:, j]|``, ``eps`` = the dtype's machine epsilon, ``N`` = accepted steps)::

    adaptive:    |y - y_ref| <= C * kappa * (atol + (rtol + sqrt(N + 1) * eps) * M_j)
    fixed step:  |y - y_ref| <= C_R * max_j |y_h - y_{h/2}| * 2^p / (2^p - 1)      (Richardson, order p)
                                + C * kappa * sqrt(N + 1) * eps * M_j
                                [+ C * kappa * (atol + rtol * M_j) for implicit methods: Newton's tolerance]

with ``C = 100`` and ``C_R = 10`` fixed for every problem. ``kappa >= 1`` is the problem's conditioning: the
largest weighted norm ``|| W Phi(t, s) W^-1 ||_2`` of the variational equation's propagator between any two of
13 nodes ``s < t`` spread over the span (``W = diag(1 / (atol + rtol * M_j))``), computed by scipy along the
reference trajectory. Adaptive methods control the *local* error per step; ``kappa`` is how much an error made
at ``s`` can grow by ``t``, and ``C`` absorbs the accumulation over steps and dense-output error. The fixed-step
rule asks that the method converge to the right solution: its own step-halving estimate must account for its
error (a method converging to a wrong answer, or an interpolation error at output times, fails it).

Gradients (a subset, float64, adaptive methods): ``loss = sum(w * ys[-1])``, checked against
``g_ref = w^T Phi(t_end, t0)`` from the variational equation (solved at ``rtol=1e-11``); allowed error per entry::

    |g_j - g_ref_j| <= C * kappa * ((rtol + atol / M_j) * sum_i |w_i Phi_ij| + sum_i |w_i| (atol + rtol M_i) / M_j)

(``rtol + atol / M_j`` is the relative precision the tolerances ask of component ``j``: a component far below
``atol / rtol`` in size, Robertson's ``y2 ~ 1e-5``, is only controlled to ``atol``, and so is the sensitivity
to it. The second term is the absolute floor: moving ``y0_j`` by its scale ``M_j`` moves ``y_i(t_end)`` by an amount
the solver resolves only to ``atol + rtol M_i``; it matters where ``Phi`` has decayed to nothing.)

Run ``python benchmarks/reliability.py --n 300`` (writes ``benchmarks/out/reliability.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import neurodyn
from neurodyn.solvers import get_solver

C_ADAPTIVE = 100.0
C_RICHARDSON = 10.0
KAPPA_NODES = 13
OUT_DIR = Path(__file__).resolve().parent / "out"

# Method families (from the steppers' declared capabilities, checked at import below).
SYMPLECTIC = ("leapfrog", "semi_implicit_euler", "yoshida4")
IMPLICIT_ADAPTIVE = ("auto", "bdf", "kvaerno3", "kvaerno4", "kvaerno5", "radau", "trbdf2")
EXPLICIT_ADAPTIVE = ("adams", "adaptive_heun", "bosh3", "dopri5", "dopri8", "fehlberg2", "tsit5")
FIXED_EXPLICIT = ("euler", "explicit_adams", "heun2", "heun3", "midpoint", "ralston", "rk4")
FIXED_IMPLICIT = ("gl4", "gl6", "implicit_adams", "implicit_euler", "implicit_midpoint", "radauIIA3", "radauIIA5",
                  "sdirk2", "trapezoid")
FAMILY = {**dict.fromkeys(SYMPLECTIC, "symplectic"), **dict.fromkeys(IMPLICIT_ADAPTIVE, "implicit adaptive"),
          **dict.fromkeys(EXPLICIT_ADAPTIVE, "explicit adaptive"), **dict.fromkeys(FIXED_EXPLICIT, "fixed explicit"),
          **dict.fromkeys(FIXED_IMPLICIT, "fixed implicit")}
# The smallest rtol drawn per method: low-order methods at rtol=1e-10 need 1e5+ steps (a budget, not a bug).
RTOL_FLOOR = {"fehlberg2": 1e-6, "adaptive_heun": 1e-6, "trbdf2": 1e-7, "bosh3": 1e-8, "kvaerno3": 1e-8,
              "bdf": 1e-9, "auto": 1e-9, "kvaerno4": 1e-9}
# Global orders of the fixed-step methods (the multistep ones: their asymptotic order, see solvers/adams.py).
FIXED_ORDER = {"euler": 1, "explicit_adams": 4, "heun2": 2, "heun3": 3, "midpoint": 2, "ralston": 2, "rk4": 4,
               "gl4": 4, "gl6": 6, "implicit_adams": 5, "implicit_euler": 1, "implicit_midpoint": 2, "radauIIA3": 3,
               "radauIIA5": 5, "sdirk2": 2, "trapezoid": 2, "leapfrog": 2, "semi_implicit_euler": 1, "yoshida4": 4}


class Hang(BaseException):
    """Raised by the wall-clock alarm (a BaseException: ``except Exception`` does not swallow it)."""


@contextmanager
def wall_clock_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds`` of wall time."""
    def handler(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------------------
# Fields: a torch version (what neurodyn integrates) and an independent numpy twin with its Jacobian (scipy)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Field:
    """A vector field acting on the last dimension ``d`` of the state (batch rows independent).

    ``params`` holds float64 numpy arrays (already rounded to the run's dtype); ``forcing`` ``(c, w, phi)`` adds
    ``c * sin(w t + phi)``.
    """

    kind: str
    d: int
    params: dict
    stiff: bool = False
    forcing: tuple | None = None

    # numpy twin, y of shape (B, d)
    def np_f(self, t: float, y: np.ndarray) -> np.ndarray:
        p = self.params
        if self.kind == "linear":
            out = y @ p["A"].T
        elif self.kind == "mlp":
            h = np.tanh(y @ p["W1"].T + t * p["u"] + p["b1"])
            out = h @ p["W2"].T + p["b2"] - p["gamma"] * y
        elif self.kind == "vdp":
            mu = p["mu"]
            out = np.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)
        elif self.kind == "robertson":
            k1, k2, k3 = 0.04, 3e7, 1e4
            y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
            out = np.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 ** 2, k2 * y2 ** 2], -1)
        elif self.kind == "hamiltonian":
            m = self.d // 2
            q, pm = y[:, :m], y[:, m:]
            out = np.concatenate([pm / p["mass"], -(p["k"] * q + p["a"] * np.sin(q) + p["b"] * q ** 3)], -1)
        else:
            raise ValueError(self.kind)
        if self.forcing is not None:
            c, w, phi = self.forcing
            out = out + c * math.sin(w * t + phi)
        return out

    def np_jac(self, t: float, y: np.ndarray) -> np.ndarray:
        """Jacobian of one row ``y`` (shape ``(d,)``)."""
        p = self.params
        if self.kind == "linear":
            return p["A"]
        if self.kind == "mlp":
            h = np.tanh(p["W1"] @ y + t * p["u"] + p["b1"])
            return p["W2"] @ ((1 - h ** 2)[:, None] * p["W1"]) - p["gamma"] * np.eye(self.d)
        if self.kind == "vdp":
            mu = p["mu"]
            return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])
        if self.kind == "robertson":
            k1, k2, k3 = 0.04, 3e7, 1e4
            return np.array([[-k1, k3 * y[2], k3 * y[1]], [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
                             [0.0, 2 * k2 * y[1], 0.0]])
        if self.kind == "hamiltonian":
            m = self.d // 2
            q = y[:m]
            J = np.zeros((self.d, self.d))
            J[:m, m:] = np.eye(m) / p["mass"]
            J[m:, :m] = -np.diag(p["k"] + p["a"] * np.cos(q) + 3 * p["b"] * q ** 2)
            return J
        raise ValueError(self.kind)

    # torch version
    def torch_f(self, dtype: torch.dtype) -> Callable:
        P = {k: torch.as_tensor(v, dtype=dtype) for k, v in self.params.items()}
        kind, d = self.kind, self.d
        if kind == "linear":
            def f(t, y):
                return y @ P["A"].T
        elif kind == "mlp":
            def f(t, y):
                tt = t.reshape(*t.shape, *([1] * (y.dim() - t.dim())))  # per-sample t has shape (B,)
                h = torch.tanh(y @ P["W1"].T + tt * P["u"] + P["b1"])
                return h @ P["W2"].T + P["b2"] - P["gamma"] * y
        elif kind == "vdp":
            def f(t, y):
                y1, y2 = y[..., 0], y[..., 1]
                return torch.stack([y2, P["mu"] * (1 - y1 * y1) * y2 - y1], -1)
        elif kind == "robertson":
            def f(t, y):
                y1, y2, y3 = y.unbind(-1)
                r1, r2, r3 = 0.04 * y1, 3e7 * y2 * y2, 1e4 * y2 * y3
                return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)
        elif kind == "hamiltonian":
            m = d // 2

            def f(t, y):
                q, pm = y[..., :m], y[..., m:]
                return torch.cat([pm / P["mass"], -(P["k"] * q + P["a"] * torch.sin(q) + P["b"] * q ** 3)], -1)
        else:
            raise ValueError(kind)
        if self.forcing is None:
            return f
        c = torch.as_tensor(self.forcing[0], dtype=dtype)
        w, phi = self.forcing[1], self.forcing[2]

        def forced(t, y):
            tt = t.reshape(*t.shape, *([1] * (y.dim() - t.dim())))
            return f(t, y) + c * torch.sin(w * tt + phi)
        return forced

    def spectral_bound(self) -> float:
        """A rough bound on the Jacobian's spectral radius (to keep explicit fixed steps stable)."""
        p = self.params
        if self.kind == "linear":
            return float(np.abs(np.linalg.eigvals(p["A"])).max())
        if self.kind == "mlp":
            return float(np.linalg.norm(p["W2"], 2) * np.linalg.norm(p["W1"], 2) + p["gamma"])
        if self.kind == "vdp":
            return float(max(3.0, 3 * p["mu"]))
        if self.kind == "hamiltonian":
            return float(np.sqrt(np.max((p["k"] + abs(p["a"]) + 3 * abs(p["b"]) * 4) / p["mass"])))
        return 1e4


def _round(x, dtype: torch.dtype) -> np.ndarray:
    """Round to ``dtype`` and back to float64: the reference integrates exactly the numbers neurodyn sees."""
    return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype).to(torch.float64).numpy()


def make_field(rng: np.random.Generator, kind: str, d: int, stiff_ok: bool, dtype: torch.dtype,
               backward: bool) -> Field:
    stiff = False
    if kind == "linear":
        n_pairs = rng.integers(0, d // 2 + 1)
        re_lo = -rng.choice([0.5, 5.0, 50.0, 500.0]) if stiff_ok else -rng.choice([0.5, 2.0])
        if backward:
            re_lo = -0.3
        lam_re = rng.uniform(re_lo, 0.15, size=d)
        blocks = np.zeros((d, d))
        i = 0
        for _ in range(n_pairs):
            im = rng.uniform(0.3, 4.0)
            blocks[i:i + 2, i:i + 2] = [[lam_re[i], im], [-im, lam_re[i]]]
            i += 2
        for j in range(i, d):
            blocks[j, j] = lam_re[j]
        V = np.eye(d) + 0.4 * rng.standard_normal((d, d)) / math.sqrt(d)
        A = V @ blocks @ np.linalg.inv(V)
        stiff = bool(np.abs(np.linalg.eigvals(A).real).max() > 30)
        params = {"A": _round(A, dtype)}
    elif kind == "mlp":
        hdim = int(rng.integers(4, 17))
        s1, s2 = rng.uniform(0.5, 1.5, 2)
        params = {"W1": _round(s1 * rng.standard_normal((hdim, d)) / math.sqrt(d), dtype),
                  "b1": _round(0.5 * rng.standard_normal(hdim), dtype),
                  "u": _round(rng.standard_normal(hdim) * (rng.random() < 0.3), dtype),
                  "W2": _round(s2 * rng.standard_normal((d, hdim)) / math.sqrt(hdim), dtype),
                  "b2": _round(0.3 * rng.standard_normal(d), dtype),
                  "gamma": _round(rng.choice([0.0, 0.5, 1.0]), dtype)}
    elif kind == "vdp":
        mu = float(rng.choice([0.5, 2.0, 10.0, 30.0, 50.0])) if stiff_ok and not backward else \
            float(rng.choice([0.5, 1.0, 2.0]))
        stiff = mu >= 10
        params = {"mu": _round(mu, dtype)}
    elif kind == "robertson":
        stiff = True
        params = {}
    elif kind == "hamiltonian":
        m = d // 2
        params = {"mass": _round(rng.uniform(0.5, 2.0, m), dtype), "k": _round(rng.uniform(0.2, 2.0, m), dtype),
                  "a": _round(rng.uniform(0, 1.5, m) * (rng.random(m) < 0.5), dtype),
                  "b": _round(rng.uniform(0, 0.5, m) * (rng.random(m) < 0.4), dtype)}
    else:
        raise ValueError(kind)
    forcing = None
    if kind in ("linear", "mlp", "hamiltonian") and rng.random() < 0.3:
        c = rng.standard_normal(d)
        if kind == "hamiltonian":  # a force on p only keeps it separable
            c[: d // 2] = 0.0
        forcing = (_round(c, dtype), float(rng.uniform(0.5, 3.0)), float(rng.uniform(0, 2 * math.pi)))
    return Field(kind, d, params, stiff, forcing)


# ------------------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    index: int
    seed: int
    method: str
    family: str
    dtype: str
    field: Field
    batch: tuple
    t: list  # output times (already rounded to dtype)
    y0: list  # flat (batch * d), rounded to dtype
    rtol: float
    atol: float
    step_size: float | None = None
    per_sample: bool = False
    gradient: str | None = None
    weights: list | None = None
    max_steps: int = 20_000

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        f = self.field
        extra = ""
        if f.kind == "vdp":
            extra = f" mu={f.params['mu']:g}"
        if f.kind == "linear":
            ev = np.linalg.eigvals(f.params["A"]).real
            extra = f" Re(lambda) in [{ev.min():.3g}, {ev.max():.3g}]"
        t = np.asarray(self.t)
        span = f"[{t[..., 0].min():.6g} -> {t[..., -1].max():.6g}]" + (" per-sample times" if t.ndim == 2 else "")
        parts = [f"#{self.index}", self.method, self.dtype, f"{f.kind}{extra}", f"d={f.d}", f"batch={self.batch}",
                 f"T={len(self.t)}", span, f"rtol={self.rtol:.1e}", f"atol={self.atol:.1e}"]
        if f.forcing is not None:
            parts.append("sin(t) forcing")
        if self.step_size is not None:
            parts.append(f"h={self.step_size:.3g}")
        if self.per_sample:
            parts.append("per_sample_steps")
        if self.gradient:
            parts.append(f"gradient={self.gradient}")
        return " ".join(parts)


# torchdiffeq's step rules as neurodyn.odeint runs them (its error estimates, interpolants and, for fehlberg2 and
# adaptive_heun, its reuse of the last stage): held to torchdiffeq's own steps in tests/test_torchdiffeq_steps.py.
TORCHDIFFEQ_RULES = ("adaptive_heun_torchdiffeq", "bosh3_torchdiffeq", "dopri5_shampine", "fehlberg2_torchdiffeq")


def _methods() -> list[str]:
    """The ODE methods (SDE methods have their own tests: tests/test_sde_solvers.py; the torchdiffeq rules theirs)."""
    return [m for m in neurodyn.solvers.methods_accepting("ode") if m not in TORCHDIFFEQ_RULES]


def make_problem(index: int, seed: int = 0) -> Problem:
    """The ``index``-th random problem of the seeded stream ``seed`` (independent of the others)."""
    rng = np.random.default_rng([seed, index])
    methods = _methods()
    method = str(rng.choice(methods))
    family = FAMILY.get(method, "other")
    dtype = torch.float32 if rng.random() < 0.3 else torch.float64
    # implicit_adams solves its corrector by functional iteration: no more stable than an explicit method.
    implicit = family in ("implicit adaptive", "fixed implicit") and method != "implicit_adams"
    backward = rng.random() < 0.3
    if family == "symplectic":
        kind = "hamiltonian"
    elif family == "implicit adaptive":
        kind = str(rng.choice(["linear", "mlp", "vdp", "robertson", "hamiltonian"], p=[.3, .2, .25, .15, .1]))
    else:
        kind = str(rng.choice(["linear", "mlp", "vdp", "hamiltonian"], p=[.35, .35, .15, .15]))
    if kind == "robertson":
        backward = False
    if kind == "vdp":
        d = 2
    elif kind == "robertson":
        d = 3
    elif kind == "hamiltonian":
        d = 2 * int(rng.integers(1, 4))
    else:
        d = int(rng.integers(1, 7))
    field_ = make_field(rng, kind, d, stiff_ok=implicit, dtype=dtype, backward=backward)

    # batch shape
    r = rng.random()
    batch: tuple = () if r < 0.35 else ((int(rng.integers(1, 5)),) if r < 0.8 else
                                       (int(rng.integers(1, 3)), int(rng.integers(1, 4))))
    per_sample = bool(get_solver(method).rows and get_solver(method).adaptive and len(batch) >= 1
                      and rng.random() < 0.4)
    nb = int(np.prod(batch)) if batch else 1

    # initial state
    if kind == "robertson":
        a = rng.uniform(0, 0.3, nb)
        y0 = np.stack([1 - a, np.zeros(nb), a], -1)
    elif kind == "vdp":  # backward in time the limit cycle repels: start inside it, where y -> 0 backward
        a = 1.0 if backward else 2.2
        y0 = np.stack([rng.uniform(-a, a, nb), rng.uniform(-1, 1, nb)], -1)
    else:
        y0 = rng.standard_normal((nb, d))
    y0 = _round(y0.reshape(-1), dtype)

    # time span and output grid
    if kind == "robertson":
        span = float(10 ** rng.uniform(-1, 2))
        t0 = 0.0
    elif kind == "vdp":
        span = float(rng.uniform(1, 3) if backward else rng.uniform(1, 8)) if field_.params["mu"] < 10 else \
            float(rng.uniform(1, 3)) * field_.params["mu"] / 10
        t0 = float(rng.uniform(-2, 2))
    else:
        span = float(rng.uniform(0.5, 8))
        t0 = float(rng.uniform(-3, 3))
    if kind != "robertson" and dtype == torch.float64 and rng.random() < 0.1:
        t0 = float(rng.choice([-1, 1]) * rng.uniform(100, 1000))  # far from 0: time resolution matters
    n_out = int(rng.integers(2, 31))
    close = n_out >= 3 and rng.random() < 0.15  # two output times very close together
    gap = 1e-3 if dtype == torch.float32 else 1e-7
    per_sample_times = per_sample and len(batch) == 1 and rng.random() < 0.5

    def grid(span_: float) -> np.ndarray:
        while True:
            if not close:
                inner = np.sort(rng.random(n_out - 2))
            elif n_out == 3:
                inner = np.array([gap * rng.uniform(1, 3)])  # right after t0
            else:
                x = rng.uniform(0, 1 - 4 * gap)
                inner = np.sort(np.concatenate([rng.random(n_out - 4), [x, x + gap * rng.uniform(1, 3)]]))
            frac = np.concatenate([[0.0], inner, [1.0]])
            ts_ = _round(t0 + (-1 if backward else 1) * span_ * frac, dtype)
            dmin = np.abs(np.diff(ts_)).min()
            if dmin > (0.5 * gap if close else 1e-3) * span_ and np.all(np.diff(ts_) * (-1 if backward else 1) > 0):
                return ts_

    if per_sample_times:  # per-sample output grids (same length and direction, spans differ)
        ts = np.stack([grid(span * rng.uniform(0.5, 1.0)) for _ in range(batch[0])])
    else:
        ts = grid(span)

    # tolerances
    floor = max(RTOL_FLOOR.get(method, 1e-10), 1e-6 if dtype == torch.float32 else 1e-10)
    if implicit and field_.stiff:
        floor = max(floor, 1e-8)
    rtol = float(10 ** rng.uniform(math.log10(floor), -3))
    atol = float(rtol * 10 ** rng.uniform(-3, -1))
    if dtype == torch.float32:
        atol = max(atol, 1e-9)
    if kind == "robertson":
        atol = min(atol, 1e-8)  # y2 is ~1e-5

    step_size = None
    if not get_solver(method).adaptive:
        rho = field_.spectral_bound()
        n_steps = int(rng.integers(20, 300))
        h = span / n_steps
        limit = 0.05 if method == "explicit_adams" else 1.0
        if not implicit and h * rho > limit:
            h = limit / rho
        step_size = float(h * rng.uniform(0.9, 1.1))

    gradient = None
    weights = None
    if (dtype == torch.float64 and get_solver(method).adaptive and rng.random() < 0.3):
        gradient = str(rng.choice(["direct", "adjoint", "checkpoint", "interpolated"]))
        if gradient in ("adjoint", "interpolated") and field_.stiff:
            gradient = "checkpoint"  # the continuous adjoints reconstruct y backward: ill-posed on stiff fields
        weights = rng.standard_normal(nb * d).tolist()
    return Problem(index=index, seed=seed, method=method, family=family, dtype=str(dtype).split(".")[1],
                   field=field_, batch=batch, t=ts.tolist(), y0=y0.tolist(), rtol=rtol, atol=atol,
                   step_size=step_size, per_sample=per_sample, gradient=gradient, weights=weights,
                   max_steps=20_000 if step_size is None else 100_000)


# ------------------------------------------------------------------------------------------------------------
# Reference and conditioning
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    ys: np.ndarray  # (T, nb * d)
    kappa: float
    grad: np.ndarray | None  # (2, nb * d): the gradient, and sum_i |w_i Phi_ij|
    seconds: float


def _reference_group(f: Field, ts: np.ndarray, y0: np.ndarray, rtol: float, atol: float,
                     weights: np.ndarray | None) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Reference outputs ``(T, nb * d)``, conditioning ``kappa`` and (with ``weights``) the gradient of
    ``sum(weights * y(t_end))`` with respect to ``y0``, for rows sharing the output grid ``ts``."""
    d = f.d
    nb = len(y0) // d
    n = nb * d
    fun = lambda t, y: f.np_f(t, y.reshape(nb, d)).reshape(-1)

    def jac(t, y):
        rows = y.reshape(nb, d)
        J = np.zeros((n, n))
        for b in range(nb):
            J[b * d:(b + 1) * d, b * d:(b + 1) * d] = f.np_jac(t, rows[b])
        return J

    method = "Radau" if f.stiff else "DOP853"
    ys = [np.asarray(y0, dtype=np.float64)]
    if method == "DOP853":  # 7th-order dense output at the output times
        sol = solve_ivp(fun, (ts[0], ts[-1]), ys[0], method=method, t_eval=ts, rtol=1e-12, atol=1e-14)
        if not sol.success:
            raise RuntimeError(f"reference failed: {sol.message}")
        ys = sol.y.T.copy()
    else:  # Radau's continuous output is of low order: restart at every output time instead
        for a, b in zip(ts[:-1], ts[1:]):
            sol = solve_ivp(fun, (a, b), ys[-1], method=method, jac=jac, rtol=1e-12, atol=1e-14)
            if not sol.success:
                raise RuntimeError(f"reference failed: {sol.message}")
            ys.append(sol.y[:, -1])
        ys = np.stack(ys)

    # Propagators between consecutive nodes: [y, Phi]' = [f, J(t, y) Phi], Phi(a) = I, chained node to node.
    tight = weights is not None
    nodes = np.linspace(ts[0], ts[-1], KAPPA_NODES)

    def aug(t, x):
        y = x[:n]
        return np.concatenate([fun(t, y), (jac(t, y) @ x[n:].reshape(n, n)).reshape(-1)])

    def aug_jac(t, x):  # the Phi-to-y coupling left out: Newton's iteration matrix only
        J = jac(t, x[:n])
        out = np.zeros((n + n * n, n + n * n))
        out[:n, :n] = J
        out[n:, n:] = np.kron(J, np.eye(n))
        return out

    seg, y = [], ys[0]
    for a, b in zip(nodes[:-1], nodes[1:]):
        kwv = {"jac": aug_jac} if method == "Radau" else {}
        r = solve_ivp(aug, (a, b), np.concatenate([y, np.eye(n).reshape(-1)]), method=method,
                      rtol=1e-11 if tight else 1e-7, atol=1e-13 if tight else 1e-9, **kwv)
        if not r.success:
            raise RuntimeError(f"reference (variational equation) failed: {r.message}")
        y = r.y[:n, -1]
        seg.append(r.y[n:, -1].reshape(n, n))
    M = np.abs(ys).max(0)
    w = 1.0 / (atol + rtol * M)
    kappa = 1.0
    for i in range(len(seg)):
        P = np.eye(n)
        for j in range(i, len(seg)):
            P = seg[j] @ P
            kappa = max(kappa, float(np.linalg.norm(w[:, None] * P / w[None, :], 2)))
    grad = None
    if weights is not None:
        P = np.eye(n)
        for S in seg:
            P = S @ P
        grad = np.stack([P.T @ weights, np.abs(P).T @ np.abs(weights)])  # the gradient, and without cancellation
    return ys, kappa, grad


def reference(p: Problem) -> Reference:
    """scipy's solution of ``p`` at its output times, its conditioning and (if asked) the reference gradient."""
    start = time.perf_counter()
    d = p.field.d
    y0 = np.asarray(p.y0)
    w = None if p.weights is None else np.asarray(p.weights)
    ts = np.asarray(p.t)
    if ts.ndim == 1:
        ys, kappa, grad = _reference_group(p.field, ts, y0, p.rtol, p.atol, w)
    else:  # per-sample output times: one group per sample (leading dimension)
        nb = len(p.y0) // d
        per = nb // ts.shape[0] * d  # elements per sample
        parts = [_reference_group(p.field, ts[b], y0[b * per:(b + 1) * per], p.rtol, p.atol,
                                  None if w is None else w[b * per:(b + 1) * per]) for b in range(ts.shape[0])]
        ys = np.concatenate([q[0] for q in parts], 1)
        kappa = max(q[1] for q in parts)
        grad = None if w is None else np.concatenate([q[2] for q in parts], 1)
    return Reference(ys=ys, kappa=kappa, grad=grad, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------------
# Running and classifying
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    index: int
    method: str
    family: str
    dtype: str
    kind: str
    outcome: str
    detail: str = ""
    ratio: float = float("nan")  # max error / allowed error (<= 1 is within tolerance)
    grad_ratio: float = float("nan")
    kappa: float = float("nan")
    seconds: float = float("nan")
    steps: int = 0
    description: str = ""
    extra: dict = field(default_factory=dict)


def _steps(sol) -> int:
    s = sol.stats.get("steps", 0)
    if isinstance(s, torch.Tensor):
        return int(s.max())
    if isinstance(s, (list, tuple)):
        return int(max(s)) if s else 0
    return int(s)


def _solve(p: Problem, step_size: float | None, grad: bool):
    dt = p.torch_dtype
    d = p.field.d
    y0 = torch.tensor(p.y0, dtype=dt).reshape(*p.batch, d)
    t = torch.tensor(p.t, dtype=dt)
    kw = dict(method=p.method, rtol=p.rtol, atol=p.atol, max_steps=p.max_steps, on_failure="return")
    if step_size is not None:
        kw["step_size"] = step_size
    if p.per_sample:
        kw["per_sample_steps"] = True
    f = p.field.torch_f(dt)
    if not grad:
        with torch.no_grad():
            return neurodyn.solve(f, y0, t, **kw), None
    y0.requires_grad_(True)
    sol = neurodyn.solve(f, y0, t, gradient=p.gradient, **kw)
    if not sol.success:
        return sol, None
    w = torch.tensor(p.weights, dtype=dt).reshape(y0.shape)
    (g,) = torch.autograd.grad((w * sol.ys[-1]).sum(), y0)
    return sol, g.detach().reshape(-1).numpy().astype(np.float64)


def _status(sol) -> str | None:
    """None when the solve (every sample) succeeded, else the failing status."""
    if sol.status != "success":
        return sol.status
    if sol.sample_status is not None and any(s != "success" for s in sol.sample_status):
        return next(s for s in sol.sample_status if s != "success")
    return None


def run_problem(p: Problem, timeout: float = 30.0, ref: Reference | None = None) -> Result:
    """Solve ``p`` with neurodyn under a wall-clock limit and classify the outcome."""
    res = Result(index=p.index, method=p.method, family=p.family, dtype=p.dtype, kind=p.field.kind,
                 outcome="ok", description=p.describe())
    if ref is None:
        try:
            ref = reference(p)
        except RuntimeError as e:  # the generator made a problem scipy cannot solve: a harness defect, not counted
            res.outcome, res.detail = "no_reference", str(e)
            return res
    res.kappa = ref.kappa
    start = time.perf_counter()
    try:
        with wall_clock_limit(timeout):
            sol, g = _solve(p, p.step_size, p.gradient is not None)
            half = None
            if p.step_size is not None and _status(sol) is None:
                half, _ = _solve(p, p.step_size / 2, False)
    except Hang as e:
        res.outcome, res.detail = "hang", str(e)
        return res
    except neurodyn.InputError as e:
        res.outcome, res.detail = "refused", f"InputError: {e}"
        return res
    except neurodyn.SolveFailure as e:
        res.outcome, res.detail = "failed", f"{type(e).__name__} ({e.status}): {e}"
        return res
    except Exception as e:  # noqa: BLE001 -- a crash is what we count
        tb = traceback.extract_tb(e.__traceback__)[-1]
        res.outcome = "crash"
        res.detail = f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno} in {tb.name})"
        return res
    finally:
        res.seconds = time.perf_counter() - start
    st = _status(sol)
    if st is None and half is not None:
        st = _status(half)
    if st is not None:
        res.outcome, res.detail = "failed", f"status {st}: {sol.message}"
        return res
    res.steps = _steps(sol)
    n_times = np.asarray(p.t).shape[-1]
    ys = sol.ys.detach().reshape(n_times, -1).numpy().astype(np.float64)
    M = np.abs(ref.ys).max(0)
    eps = float(torch.finfo(p.torch_dtype).eps)
    fp = C_ADAPTIVE * ref.kappa * math.sqrt(res.steps + 1) * eps * M
    tol = C_ADAPTIVE * ref.kappa * (p.atol + p.rtol * M)
    if p.step_size is None:
        allowed = tol + fp
    else:
        order = FIXED_ORDER[p.method]
        yh2 = half.ys.detach().reshape(n_times, -1).numpy().astype(np.float64)
        # per output time, the largest component's estimate (one component's estimate can vanish by accident)
        rich = (np.abs(ys - yh2) * 2 ** order / (2 ** order - 1)).max(1, keepdims=True)
        allowed = C_RICHARDSON * rich + fp + (tol if p.family == "fixed implicit" else 0.0)
    err = np.abs(ys - ref.ys)
    ratio = np.where(np.isfinite(err), err / np.maximum(allowed, 1e-300), np.inf)
    res.ratio = float(ratio.max())
    i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    res.extra = {"worst_time_index": int(i), "worst_component": int(j), "error": float(err[i, j]),
                 "allowed": float(np.broadcast_to(allowed, err.shape)[i, j]), "ref_seconds": ref.seconds}
    if g is not None and ref.grad is not None:
        gerr = np.abs(g - ref.grad[0])
        rel = p.rtol + p.atol / np.maximum(M, 1e-300)  # the relative precision asked of each component
        w = np.abs(np.asarray(p.weights))
        floor = float(w @ (p.atol + p.rtol * M)) / np.maximum(M, 1e-300)
        gallowed = C_ADAPTIVE * ref.kappa * (rel * ref.grad[1] + floor)
        res.grad_ratio = float(np.where(np.isfinite(gerr), gerr / gallowed, np.inf).max())
        res.extra["grad_error"] = float(gerr.max())
        res.extra["grad_allowed"] = float(gallowed[int(np.argmax(gerr / gallowed))])
    if not res.ratio <= 1.0:
        res.outcome = "wrong"
        res.detail = (f"max error {err[i, j]:.3g} > allowed {res.extra['allowed']:.3g} at t[{i}], "
                      f"component {j} ({res.ratio:.3g}x)")
    elif not (math.isnan(res.grad_ratio) or res.grad_ratio <= 1.0):
        res.outcome = "wrong"
        res.detail = (f"gradient error {res.extra['grad_error']:.3g} > allowed {res.extra['grad_allowed']:.3g} "
                      f"({res.grad_ratio:.3g}x)")
    return res


def run_suite(n: int, seed: int = 0, timeout: float = 30.0, start: int = 0,
              progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Generate and run problems ``start .. start + n - 1`` of stream ``seed``."""
    out = []
    for k in range(start, start + n):
        p = make_problem(k, seed)
        r = run_problem(p, timeout)
        out.append(r)
        if progress:
            progress(r)
    return out


OUTCOMES = ("ok", "refused", "failed", "crash", "hang", "wrong", "no_reference")


def summarize(results: list[Result]) -> str:
    """A markdown table of outcome counts by method family and dtype, then every non-ok case."""
    groups: dict[tuple, Counter] = {}
    for r in results:
        groups.setdefault((r.family, r.dtype), Counter())[r.outcome] += 1
    total = Counter(r.outcome for r in results)
    lines = ["| family | dtype | problems | " + " | ".join(OUTCOMES) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in OUTCOMES) + " |"]
    for (fam, dt), c in sorted(groups.items()):
        lines.append(f"| {fam} | {dt} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | | {len(results)} | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " |")
    ratios = [r.ratio for r in results if r.outcome == "ok"]
    if ratios:
        q = np.quantile(ratios, [0.5, 0.9, 0.99, 1.0])
        lines.append("")
        lines.append(f"error / allowed among ok problems: median {q[0]:.2g}, 90% {q[1]:.2g}, 99% {q[2]:.2g}, "
                     f"max {q[3]:.2g}")
    bad = [r for r in results if r.outcome != "ok"]
    if bad:
        lines += ["", "Non-ok cases:", ""]
        for r in bad:
            lines.append(f"- **{r.outcome}** {r.description}: {r.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", default=str(OUT_DIR / "reliability"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    def show(r: Result) -> None:
        print(f"{r.index:4d} {r.outcome:8s} {r.seconds:6.2f}s ratio={r.ratio:9.3g} kappa={r.kappa:8.3g} "
              f"{r.description} {r.detail}", flush=True)

    t0 = time.perf_counter()
    results = run_suite(args.n, args.seed, args.timeout, args.start, show)
    text = summarize(results)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    return 0


# Every method is in one family (a new method must be placed before this run can cover it).
_unknown = sorted(set(_methods()) - set(FAMILY))
if _unknown:
    raise RuntimeError(f"reliability.py: methods without a family: {_unknown}")

if __name__ == "__main__":
    sys.exit(main())
