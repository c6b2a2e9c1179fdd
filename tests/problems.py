"""Non-stiff test problems (DETEST-style) as torch vector fields, with independent references.

Every problem is a :class:`Problem`: a torch vector field ``f(t, y)`` (``t`` a 0-dim tensor, ``y`` a
1-d tensor), an initial value at ``t0``, an end time ``t1``, and a reference solution:

* exact, where a closed form exists (``exact(t) -> ndarray (len(t), n)``);
* otherwise ``scipy.integrate.solve_ivp(method="DOP853", rtol=1e-12, atol=1e-14, dense_output=True)``
  evaluated at the requested times (cached per problem).

References
----------
Hull, Enright, Fellen & Sedgwick, "Comparing numerical methods for ordinary differential equations",
SIAM J. Numer. Anal. 9 (1972) -- the DETEST classes A (scalar), B (small systems), C (linear chains),
D (Kepler orbits), E (second-order equations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.integrate
import scipy.special
import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    name: str
    f: Field
    y0: tuple
    t0: float
    t1: float
    exact: Callable[[np.ndarray], np.ndarray] | None = None
    #: How much worse than "tolerance-sized" a sound solver's global error is on this problem: 1 for
    #: the well-conditioned ones; more for the Kepler orbits (see ``kepler``).
    amplification: float = 1.0

    @property
    def n(self) -> int:
        return len(self.y0)

    def y0_tensor(self, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype)

    def f_numpy(self, t: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.f(torch.tensor(t, dtype=torch.float64), torch.from_numpy(np.asarray(y, dtype=np.float64)))
        return out.numpy()

    def reference(self, t) -> np.ndarray:
        """Reference solution at times ``t`` (any order, inside [t0, t1]); shape (len(t), n)."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        if self.exact is not None:
            return np.asarray(self.exact(t), dtype=np.float64).reshape(len(t), self.n)
        return _dense_reference(self)(t).T

    def scale(self, rtol: float, atol: float) -> float:
        """``atol + rtol * max |y|`` over the interval: the size a tolerance-``rtol`` error is measured in."""
        return atol + rtol * _max_abs(self)


_DENSE_CACHE: dict = {}
_MAX_ABS_CACHE: dict = {}


def _max_abs(problem: Problem) -> float:
    if problem.name not in _MAX_ABS_CACHE:
        tt = np.linspace(problem.t0, problem.t1, 801)
        _MAX_ABS_CACHE[problem.name] = float(np.abs(problem.reference(tt)).max())
    return _MAX_ABS_CACHE[problem.name]


def _dense_reference(problem: Problem):
    if problem.name not in _DENSE_CACHE:
        sol = scipy.integrate.solve_ivp(
            problem.f_numpy, (problem.t0, problem.t1), np.asarray(problem.y0, dtype=np.float64),
            method="DOP853", rtol=1e-12, atol=1e-14, dense_output=True,
        )
        assert sol.success, sol.message
        _DENSE_CACHE[problem.name] = sol.sol
    return _DENSE_CACHE[problem.name]


# ----------------------------------------------------------------------------------------- class A
def _a1(t, y):
    return -y


def _a2(t, y):
    return -0.5 * y**3


def _a3(t, y):
    return y * torch.cos(t)


def _a4(t, y):  # logistic
    return 0.25 * y * (1.0 - y / 20.0)


A1 = Problem("A1_decay", _a1, (1.0,), 0.0, 20.0, exact=lambda t: np.exp(-t)[:, None])
A2 = Problem("A2_cubic", _a2, (1.0,), 0.0, 20.0, exact=lambda t: (1.0 / np.sqrt(1.0 + t))[:, None])
A3 = Problem("A3_cos", _a3, (1.0,), 0.0, 20.0, exact=lambda t: np.exp(np.sin(t))[:, None])
A4 = Problem("A4_logistic", _a4, (1.0,), 0.0, 20.0,
             exact=lambda t: (20.0 / (1.0 + 19.0 * np.exp(-t / 4.0)))[:, None])


# ----------------------------------------------------------------------------------------- class B
def _b1(t, y):  # Lotka--Volterra (DETEST B1)
    return torch.stack([2.0 * (y[0] - y[0] * y[1]), -(y[1] - y[0] * y[1])])


def _rigid(t, y):  # Euler's equations of a rigid body without external forces (DETEST B5)
    return torch.stack([y[1] * y[2], -y[0] * y[2], -0.51 * y[0] * y[1]])


def _rigid_exact(t):
    sn, cn, dn, _ = scipy.special.ellipj(t, 0.51)
    return np.stack([sn, cn, dn], axis=1)


B1 = Problem("B1_lotka_volterra", _b1, (1.0, 3.0), 0.0, 20.0)
B5 = Problem("B5_rigid_body", _rigid, (0.0, 1.0, 1.0), 0.0, 20.0, exact=_rigid_exact)


# ----------------------------------------------------------------------------------------- class C
def _c1_matrix(n=10) -> np.ndarray:
    """DETEST C1: y1' = -y1, y_i' = y_{i-1} - y_i (i = 2..n-1), y_n' = y_{n-1}."""
    a = np.zeros((n, n))
    for i in range(n - 1):
        a[i, i] = -1.0
    for i in range(1, n):
        a[i, i - 1] = 1.0
    return a


def _c2_matrix(n=10) -> np.ndarray:
    """DETEST C2: y1' = -y1, y_i' = (i-1) y_{i-1} - i y_i (i = 2..n-1), y_n' = (n-1) y_{n-1}."""
    a = np.zeros((n, n))
    for i in range(n - 1):
        a[i, i] = -(i + 1.0)
    for i in range(1, n):
        a[i, i - 1] = float(i)
    return a


def _linear_problem(name: str, a: np.ndarray, y0, t0: float, t1: float) -> Problem:
    at = torch.from_numpy(a)

    def f(t, y):
        return at.to(y.dtype) @ y

    y0a = np.asarray(y0, dtype=np.float64)

    def exact(t):  # y(t) = expm(A (t - t0)) y0, batched over t
        dt = torch.from_numpy(np.asarray(t, dtype=np.float64) - t0)
        return (torch.linalg.matrix_exp(at[None] * dt[:, None, None]) @ torch.from_numpy(y0a)).numpy()

    return Problem(name, f, tuple(float(v) for v in y0a), t0, t1, exact=exact)


C1 = _linear_problem("C1_chain", _c1_matrix(), [1.0] + [0.0] * 9, 0.0, 20.0)
C2 = _linear_problem("C2_chain", _c2_matrix(), [1.0] + [0.0] * 9, 0.0, 20.0)


# ----------------------------------------------------------------------------------------- class D
def _kepler(t, y):
    r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
    return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])


def kepler_anomaly(m: np.ndarray, e: float) -> np.ndarray:
    """Solve Kepler's equation E - e sin E = M for E by Newton's method (to full double precision)."""
    m = np.asarray(m, dtype=np.float64)
    k = np.round(m / (2.0 * np.pi))
    mr = m - 2.0 * np.pi * k  # reduced to [-pi, pi]
    ecc = mr + e * np.sin(mr) if e < 0.8 else np.pi * np.sign(mr)  # Danby's starting values
    for _ in range(100):
        delta = (ecc - e * np.sin(ecc) - mr) / (1.0 - e * np.cos(ecc))
        ecc = ecc - delta
        if np.all(np.abs(delta) < 1e-15 * (1.0 + np.abs(ecc))):
            break
    ecc = ecc + 2.0 * np.pi * k
    assert np.all(np.abs(ecc - e * np.sin(ecc) - m) < 1e-13 * (1 + np.abs(m)))
    return ecc


def _kepler_exact(e: float):
    def exact(t):
        ecc = kepler_anomaly(t, e)  # period 2 pi, semi-major axis 1, mean anomaly M = t
        s, c = np.sin(ecc), np.cos(ecc)
        q = np.sqrt(1.0 - e * e)
        den = 1.0 - e * c
        return np.stack([c - e, q * s, -s / den, q * c / den], axis=1)

    return exact


def kepler(e: float, t1: float = 20.0) -> Problem:
    """DETEST D: y(0) = (1 - e, 0, 0, sqrt((1 + e) / (1 - e))), exact via Kepler's equation.

    Amplification: an error in the orbit's energy makes a phase error that grows linearly in time
    (about 3 periods to t = 20), and near pericenter (distance 1 - e, acceleration 1/(1 - e)^2) a
    phase error turns into a large state error.  Measured with scipy's RK45/DOP853/RK23 and
    torchdiffeq's dopri5/bosh3/adaptive_heun, error / (tol * scale) is 3-10x the well-conditioned
    problems' for e <= 0.5, ~20x at e = 0.7 and up to ~100x at e = 0.9 (pericenter 0.1, speed 4.4).
    """
    y0 = (1.0 - e, 0.0, 0.0, math.sqrt((1.0 + e) / (1.0 - e)))
    amp = 10.0 if e <= 0.5 else (20.0 if e <= 0.7 else 100.0)
    return Problem(f"D_kepler_e{e}", _kepler, y0, 0.0, t1, exact=_kepler_exact(e), amplification=amp)


KEPLER = [kepler(e) for e in (0.1, 0.3, 0.5, 0.7, 0.9)]


# ----------------------------------------------------------------------------------------- class E
def _vdp(t, y, mu=1.0):
    return torch.stack([y[1], mu * (1.0 - y[0] ** 2) * y[1] - y[0]])


def _duffing(t, y):
    # x'' + delta x' + alpha x + beta x^3 = gamma cos(omega t), hardening and damped (not chaotic)
    delta, alpha, beta, gamma, omega = 0.1, 1.0, 1.0, 0.3, 1.4
    return torch.stack([y[1], -delta * y[1] - alpha * y[0] - beta * y[0] ** 3 + gamma * torch.cos(omega * t)])


E_VDP = Problem("E_van_der_pol_mu1", _vdp, (2.0, 0.0), 0.0, 20.0)
E_DUFFING = Problem("E_duffing", _duffing, (1.0, 0.0), 0.0, 20.0)


ALL_PROBLEMS = [A1, A2, A3, A4, B1, B5, C1, C2, *KEPLER, E_VDP, E_DUFFING]
PROBLEMS = {p.name: p for p in ALL_PROBLEMS}


# Nominal orders of the propagated solutions (independent of the library's own tables).
FIXED_ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "ralston": 2, "heun3": 3, "rk4": 4}
ADAPTIVE_ORDERS = {"adaptive_heun": 2, "fehlberg2": 2, "bosh3": 3, "dopri5": 5, "tsit5": 5, "dopri8": 8}
FIXED_METHODS = list(FIXED_ORDERS)
ADAPTIVE_METHODS = list(ADAPTIVE_ORDERS)

#: Global-error constants: a sound adaptive solver with rtol=tol, atol=tol*1e-3 has
#: max error <= C[method] * problem.amplification * tol * problem.scale(tol, atol)
#: at output times placed between its steps.  Global error is NOT bounded by the local tolerance; these
#: come from running independent implementations of the same pairs on these problems at these
#: tolerances (scipy RK23/RK45/DOP853 and torchdiffeq bosh3/dopri5/adaptive_heun/fehlberg2), taking the
#: worst error/(tol*scale*amplification) seen and leaving a factor 3-8 of headroom:
#:   adaptive_heun  worst seen ~18  -> 100
#:   fehlberg2      worst seen ~1450 -> 5000  (RKF1(2) propagates the 2nd-order solution, but its error
#:                  estimate is the deliberately tiny error of the 1st-order companion (constant 1/512),
#:                  so steps are ~sqrt(512)x too long for the 2nd-order result: err/tol is O(1e3) at any tol)
#:   bosh3          worst seen ~116 -> 500
#:   dopri5/tsit5   worst seen ~31  -> 200
#:   dopri8         worst seen ~25  -> 100  (torchdiffeq's dopri8 reaches 4000 at rtol 1e-10 because its
#:                  interpolant is only 4th order; a DOP853 7th-order dense output gives <10)
GLOBAL_C = {"adaptive_heun": 100.0, "fehlberg2": 5000.0, "bosh3": 500.0, "dopri5": 200.0, "tsit5": 200.0,
            "dopri8": 100.0}


def irregular_times(problem: Problem, n: int = 37, seed: int = 0) -> torch.Tensor:
    """``n`` irregular output times: t0, t1 and ``n - 2`` random times strictly between (sorted)."""
    g = np.random.default_rng(seed)
    inner = np.sort(g.uniform(problem.t0, problem.t1, size=n - 2))
    return torch.tensor(np.concatenate([[problem.t0], inner, [problem.t1]]), dtype=torch.float64)


def max_error(ys: torch.Tensor, problem: Problem, ts) -> float:
    ref = problem.reference(np.asarray(ts.detach().cpu().numpy() if torch.is_tensor(ts) else ts))
    return float(np.abs(ys.detach().cpu().numpy().reshape(ref.shape) - ref).max())


class TanhMLP(torch.nn.Module):
    """dy/dt = MLP(y): ``2 -> width -> 2`` with ``tanh``, float64, weights from seed 0 (a small neural field for the
    tests of the compiled and repeated solves)."""

    def __init__(self, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, width, dtype=torch.float64), torch.nn.Tanh(),
                                       torch.nn.Linear(width, 2, dtype=torch.float64))

    def forward(self, t, y):
        return self.net(y)
