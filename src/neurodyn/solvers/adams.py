"""Adams multistep methods: ``explicit_adams`` and ``implicit_adams`` (fixed step, as torchdiffeq's) and the
adaptive variable-step, variable-order ``adams`` (Adams--Bashforth--Moulton PECE, orders 1--12).

All three use the exact variable-step Adams formulas: the weights of the Adams--Bashforth (AB) and
Adams--Moulton (AM) formulas are recomputed every step from the actual past times (Newton form of the
interpolating polynomial, integrated exactly, turned into Lagrange weights in float64), so uneven
grids (an output grid, a short last step, an adaptive step sequence) are handled exactly. On an even
grid the weights are the classical constant ones.

History
-------
A multistep method needs past derivatives. Each stepper keeps its own history of ``(t_i, f_i)``
(``f_i = dy/dt`` at the start of the step from ``t_i``) across calls of :meth:`step` within one solve:

* a call whose ``y`` is the ``y1`` the previous call returned continues the history;
* a call with the previous call's ``(t, y)`` again is a retry after a rejected step: the rejected
  attempt leaves no trace (the history only ever holds accepted points);
* anything else (a new solve, another gradient method's solve) starts afresh, with the one-step starter
  (torchdiffeq's RK4 for the fixed methods, order 1 for ``adams``);
* a replay of the forward steps (``gradient="checkpoint"``) restores the history kept at its checkpoint and the
  order each step took (:meth:`MultistepBase.replay_record`, :meth:`MultistepBase.replay_prepare`), so it reproduces
  the forward steps exactly, and the gradient flows through the history as in ``gradient="direct"``;
* after a step that landed on a discontinuity (``jump_t``) the history is dropped too, so no formula
  interpolates across the jump. (With ``perturb=True`` every step is nudged: the history is dropped once,
  after the first step, and kept from then on; two consecutive steps landing on jumps look alike, and the
  second jump is then not restarted at.)

:func:`neurodyn.solvers.get_solver` returns a fresh stepper per solve for these names, so histories
never mix between solves.

Methods
-------
``explicit_adams`` (torchdiffeq's ``AdamsBashforth``)
    Adams--Bashforth with as many past points as available, up to ``max_order - 1`` (default 11);
    the first two steps (fewer than 3 points) are RK4 (3/8 rule). One ``func`` call per step.
    Global order 4 asymptotically: the single AB3 step (third step) has an O(h^4) local error (3 with
    ``max_order=4``). High-order AB formulas have tiny stability regions: AB11 (the default ``max_order=12``) is
    stable on the negative real axis only for ``h |lambda| < 0.0034`` (AB9: 0.0127, AB4: 0.3, AB3: 6/11), so
    ``y' = -y`` with ``h = 0.01`` grows a parasitic mode by 1.26 per step -- torchdiffeq returns 5e19 at ``t = 3``.
    neurodyn guards against it (both fixed methods): when the highest backward difference the formula uses grows
    for ``order`` steps in a row while no smaller than the one below it and well above rounding (the signature of
    a parasitic root near -1), the order is lowered for the rest of the solve -- to the highest formula whose real
    stability interval covers the ``h lambda`` implied by the measured growth -- with a ``RuntimeWarning``; when
    no formula of order 3 or more is stable there, the step returns NaN and the solve ends with status
    ``non_finite``. Where torchdiffeq's formulas are stable the guard never acts and the results are the same.
    It does not act during the first ``max_order`` steps (the order ramp) nor on a one-step RK4 (``max_order``
    below 4). The ramp has its own rule (``explicit_adams``): it climbs to a formula only where that formula is
    stable at the ``h |lambda|`` estimated from the solution's differences (``|grad^2 f| / |grad f|``), else it
    stops at the highest stable one with a ``RuntimeWarning`` -- a short solve has too few steps for the growth
    guard (``y' = -y``, ``h = 0.1`` to ``t = 2``: torchdiffeq returns 1.754 for ``e^-2``).
``implicit_adams`` (torchdiffeq's ``AdamsBashforthMoulton``)
    The same AB predictor, then the Adams--Moulton corrector with one more point, solved by functional
    iteration (at most ``max_iters``, default 4) until successive increments agree to ``rtol``/``atol``
    (max norm); if it does not converge a warning is issued and the oldest point is dropped.
    Global order 5 asymptotically (the AB3 step is corrected by AM4).
``adams`` (adaptive)
    PECE in variable step and variable order ``k = 1 .. max_order`` (default 12), after Shampine &
    Gordon: predict with AB of order ``k``, evaluate, correct with AM of order ``k + 1``, evaluate
    (``func(t1, y1)``, reused as the next step's first derivative: 2 calls per step). The local error
    estimate is that of the order-``k`` AM formula (the difference of the order ``k + 1`` and ``k``
    correctors), so the order ``k + 1`` value is propagated (local extrapolation). After every accepted
    step the order is lowered when the order ``k - 1`` estimate is no larger than the order ``k`` one,
    and raised when the order ``k + 1`` estimate is below half of it; the step size is the integrate
    loop's (PI control). The method starts at order 1 with the loop's initial step, so the first few
    steps are short. Dense output: the corrector polynomial itself (order ``k + 1``).

Examples
--------
>>> import torch, neurodyn
>>> A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
>>> f = lambda t, y: y @ A.T
>>> y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
>>> t = torch.linspace(0, 10, 11, dtype=torch.float64)
>>> exact = torch.linalg.matrix_exp(A * 10) @ y0
>>> sol = neurodyn.solve(f, y0, t, method="adams", rtol=1e-10, atol=1e-12)
>>> bool(torch.allclose(sol.ys[-1], exact, atol=1e-8))
True
>>> sol = neurodyn.solve(f, y0, t, method="implicit_adams", step_size=0.01)
>>> bool(torch.allclose(sol.ys[-1], exact, atol=1e-8))
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.interpolation import step_interpolant
from ..core.stepper import Step, StepperBase
from ..core.tensors import vmapped
from ..errors import InputError
from .explicit_rk import Term

MAX_ORDER = 12
# The fixed-step methods' stability guard (FixedAdams._growing): the highest backward difference the formula uses
# counts as parasitic only above NOISE_FACTOR times its rounding level 2^m eps max|f|.
NOISE_FACTOR = 100.0
CONFIRM = 3
# After a formula was found unstable: the highest one whose real stability interval exceeds SAFETY times the
# estimated |h lambda|.
SAFETY = 1.25


# ----------------------------------------------------------------------------------------------
# Weights of interpolatory quadrature: Newton form, integrated exactly, in float64.
# ----------------------------------------------------------------------------------------------
def _newton_polys(z: list[float]) -> list[list[float]]:
    """Ascending coefficients of ``prod_{i<j} (s - z_i)`` for ``j = 0 .. len(z) - 1``."""
    polys = [[1.0]]
    for j in range(len(z) - 1):
        p = polys[-1]
        q = [0.0] * (len(p) + 1)
        zj = z[j]
        for i, c in enumerate(p):
            q[i + 1] += c
            q[i] -= zj * c
        polys.append(q)
    return polys


def _dd_matrix(z: list[float]) -> list[list[float]]:
    """``M[j][i]`` with ``f[z_0..z_j] = sum_{i<=j} M[j][i] f(z_i)`` (lower triangular)."""
    m = len(z)
    M = [[0.0] * m for _ in range(m)]
    M[0][0] = 1.0
    for j in range(1, m):
        zj = z[j]
        prod = 1.0
        for i in range(j):
            M[j][i] = M[j - 1][i] / (z[i] - zj)
            prod *= zj - z[i]
        M[j][j] = 1.0 / prod
    return M


def quadrature_weights(z: list[float], upper: float = 1.0) -> list[list[float]]:
    """Weights ``W[p]`` (``p = 1 .. len(z)``) with ``int_0^upper P_p(s) ds = sum_i W[p][i] f(z_i)``, where
    ``P_p`` interpolates ``f`` at the first ``p`` nodes ``z[:p]`` (distinct floats). ``W[0]`` is empty."""
    polys = _newton_polys(z)
    M = _dd_matrix(z)
    c = []
    for p in polys:
        acc = 0.0
        u = upper
        for k, a in enumerate(p):
            acc += a * u / (k + 1)
            u *= upper
        c.append(acc)
    out = [[]]
    w = [0.0] * len(z)
    for j in range(len(z)):
        cj = c[j]
        row = M[j]
        for i in range(j + 1):
            w[i] += cj * row[i]
        out.append(w[: j + 1])
    return out


def dense_weight_polys(z: list[float]) -> list[list[float]]:
    """``A[i][k]``: ``int_0^theta P(s) ds = sum_i (sum_k A[i][k] theta^(k+1)) f(z_i)`` for the polynomial
    ``P`` through all nodes ``z``."""
    polys = _newton_polys(z)
    M = _dd_matrix(z)
    n = len(z)
    A = [[0.0] * n for _ in range(n)]
    for j, p in enumerate(polys):
        for i in range(j + 1):
            mij = M[j][i]
            if mij == 0.0:
                continue
            Ai = A[i]
            for k, a in enumerate(p):
                Ai[k] += mij * a / (k + 1)
    return A


# ----------------------------------------------------------------------------------------------
# History shared by the multistep steppers.
# ----------------------------------------------------------------------------------------------
@dataclass
class StepAttempt:
    """The last call of ``step``: enough to recognise what the loop did with it."""

    t0: float
    y0: Tensor
    t1: float
    y1: Tensor
    nudged: bool
    norms: tuple[float | None, float | None, float | None] = (None, None, None)  # e_{k-1}, e_k, e_{k+1}
    order: int = 1


@dataclass
class StepHistory:
    ts: list[float] = field(default_factory=list)  # newest first
    fs: list[Tensor] = field(default_factory=list)  # (n,) each, newest first


class MultistepBase(StepperBase):
    """History bookkeeping across :meth:`step` calls (see the module docstring)."""

    adaptive = False
    max_history = 1
    #: Keeps state (the history) across steps; a checkpoint replay restores it (:meth:`replay_prepare`).
    multistep = True
    replay = True

    def __init__(self) -> None:
        self._hist = StepHistory()
        self._last: StepAttempt | None = None
        self._nudge_run = 0  # consecutive accepted steps whose end was nudged (jump_t landing or perturb)
        self._fails = 0
        self._imposed = None  # decisions a replayed step must take (see replay_prepare)

    def _sync(self, t: float, y: Tensor, k1: Tensor) -> str:
        """Bring the history to the current step start ``(t, y)`` (with ``k1 = f(t, y)`` as its newest point);
        returns ``"continue"``, ``"restart"`` (after a jump), ``"retry"`` or ``"reset"`` (a new solve). A replayed
        step then takes the decisions its forward step took."""
        mode = self._follow(t, y, k1)
        if self._imposed is not None:
            self._impose(self._imposed)
            self._imposed = None
        return mode

    def _follow(self, t: float, y: Tensor, k1: Tensor) -> str:
        last = self._last
        f = k1.reshape(-1)
        if last is not None and y is last.y1 and abs(t - last.t1) <= 1e-12 * max(1.0, abs(t)):
            self._nudge_run = self._nudge_run + 1 if last.nudged else 0
            if last.nudged and self._nudge_run < 2:
                # The step landed on a discontinuity of func (jump_t): start afresh after it. Under perturb=True
                # every step is nudged; from the second one on that is recognised and the history kept.
                self._restart(t, f)
                return "restart"
            self._hist.ts.insert(0, t)
            self._hist.fs.insert(0, f)
            del self._hist.ts[self.max_history:], self._hist.fs[self.max_history:]
            self._fails = 0
            self._on_accept(last)
            return "continue"
        if last is not None and y is last.y0 and t == last.t0 and self._hist.ts and self._hist.ts[0] == t:
            self._hist.fs[0] = f
            self._fails += 1
            self._on_reject(last)
            return "retry"
        self._nudge_run = 0
        self._restart(t, f)
        return "reset"

    def _restart(self, t: float, f: Tensor) -> None:
        self._hist = StepHistory([t], [f])
        self._fails = 0
        self._on_reset()

    def _record(self, t: float, y: Tensor, h: float, y1: Tensor, nudge: float | None, **kw) -> None:
        self._last = StepAttempt(t, y, t + h, y1, nudge is not None, **kw)

    def _nodes(self, t: float, h: float, count: int) -> list[float]:
        """Offsets of the ``count`` newest history times from ``t`` in units of ``h`` (0 first)."""
        return [(s - t) / h for s in self._hist.ts[:count]]

    def _on_accept(self, last: StepAttempt) -> None:
        pass

    def _on_reject(self, last: StepAttempt) -> None:
        pass

    def _on_reset(self) -> None:
        pass

    def reset(self) -> None:
        """Forget the history (the next step starts afresh)."""
        self._hist = StepHistory()
        self._last = None

    # -- checkpoint replays (see gradients/checkpoint.py) ------------------------------------------
    def replay_record(self) -> tuple[Any, tuple[Tensor, ...], Any]:
        """After an accepted step: ``(decisions, tensors, meta)`` -- the decisions the step took (its order: a
        rejected attempt before it may have changed it), and the state the next step starts from, its tensors
        (differentiable: the past derivatives) and plain data."""
        last = self._last
        tensors, extra = self._carry(last)
        return self._decisions(last), tensors, (list(self._hist.ts), last.nudged, self._nudge_run, extra)

    def replay_prepare(self, t: float, y: Tensor, info: Any, carry: tuple | None = None) -> None:
        """Before a replayed step from ``(t, y)``: with ``carry = (tensors, meta)`` from :meth:`replay_record`
        (a replay starting at a checkpoint) continue from that state, as the forward step did; take the
        decisions ``info`` the forward step took."""
        if carry is not None:
            tensors, (ts, nudged, nudge_run, extra) = carry
            self._last = self._restore(t, y, list(ts), tuple(tensors), nudged, extra)
            self._nudge_run = nudge_run
            self._fails = 0
        self._imposed = info

    def _carry(self, last: StepAttempt) -> tuple[tuple[Tensor, ...], Any]:
        """The tensors (and plain data) the next step starts from: the history of derivatives."""
        return tuple(self._hist.fs), None

    def _restore(self, t: float, y: Tensor, ts: list[float], tensors: tuple[Tensor, ...], nudged: bool,
                 extra: Any) -> StepAttempt:
        """Install a state from :meth:`_carry`; returns the attempt the next step continues from (ending at
        ``(t, y)``)."""
        self._hist = StepHistory(ts, [x.reshape(-1) for x in tensors])
        return StepAttempt(t, y, t, y, nudged)

    def _decisions(self, last: StepAttempt) -> Any:
        return None

    def _impose(self, info: Any) -> None:
        pass

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> None:
        return None

    def make_buffers(self, y: Tensor, k1: Tensor) -> None:
        """No reusable stage buffers: the history keeps past derivatives, so stages are fresh tensors."""
        return None

    def interpolate_floats(self, term: Term, st: Step, thetas: list[float], co: None = None,
                           interp: str = "auto") -> Tensor:
        """:meth:`interpolate` at plain-float fractions (what the loop's output times use)."""
        th = torch.tensor(thetas, dtype=torch.float64, device=st.y0.device)
        return self.interpolate(term, st, th, co, interp)

    # -- dense output: cubic Hermite on the exact end derivatives ---------------------------------
    def end_derivative(self, term: Term, st: Step) -> Tensor:
        """dy/dt at the end of an accepted step, shape ``(n,)``."""
        if st.f1 is None:
            st.f1 = st.k[-1] if self.fsal else term(st.t0 + st.h, st.y1).reshape(-1)
        return st.f1

    def _hermite(self, term: Term, st: Step, thetas: Tensor, interp: str) -> Tensor:
        th = thetas.view(thetas.shape[0], 1).to(st.y0.dtype)
        return step_interpolant(interp, th, st.y0, st.y1, st.k[0], lambda: self.end_derivative(term, st).reshape(-1),
                                st.h)


_DIFFERENCES: dict[int, list[list[float]]] = {}
_INTERVALS: dict[tuple[int, bool], float] = {}


def _char_coefficients(order: int, implicit: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(rho, sigma)``, highest power first, of the order-``order`` formula on an even grid: Adams--Bashforth with
    ``order`` points, or (``implicit``) the Adams--Moulton corrector with ``order + 1``; on ``y' = lambda y`` its
    steps solve ``rho(zeta) = h lambda sigma(zeta)``."""
    rho = np.zeros(order + 1)
    rho[0], rho[1] = 1.0, -1.0
    sigma = np.zeros(order + 1)
    if implicit:
        sigma[:] = quadrature_weights([1.0 - i for i in range(order + 1)])[order + 1]
    else:
        sigma[1:] = quadrature_weights([-float(i) for i in range(order)])[order]
    return rho, sigma


def _lambda_h(order: int, implicit: bool, zeta: float) -> float:
    """The ``h lambda`` at which the formula has the root ``zeta`` (real)."""
    rho, sigma = _char_coefficients(order, implicit)
    return float(np.polyval(rho, zeta) / np.polyval(sigma, zeta))


def _real_interval(order: int, implicit: bool) -> float:
    """The length ``x`` of the formula's real stability interval ``[-x, 0]`` (at most 10), by bisection."""
    key = (order, implicit)
    if key not in _INTERVALS:
        rho, sigma = _char_coefficients(order, implicit)

        def stable(x: float) -> bool:
            return bool(np.abs(np.roots(rho + x * sigma)).max() <= 1.0 + 1e-9)

        grid = np.geomspace(1e-4, 10.0, 121)
        bad = next((float(x) for x in grid if not stable(float(x))), None)
        if bad is None:
            _INTERVALS[key] = 10.0
        else:
            lo, hi = bad / grid[1] * grid[0], bad
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if stable(mid) else (lo, mid)
            _INTERVALS[key] = lo
    return _INTERVALS[key]


def _difference_matrix(order: int, like: Tensor) -> Tensor:
    """``(order, order)``: row ``j`` maps the newest-first values ``f_0 .. f_{order-1}`` to their ``j``-th backward
    difference at ``f_0`` (``sum_i (-1)^i C(j, i) f_i``)."""
    rows = _DIFFERENCES.get(order)
    if rows is None:
        rows = _DIFFERENCES[order] = [[(-1.0) ** i * math.comb(j, i) if i <= j else 0.0 for i in range(order)]
                                      for j in range(order)]
    return torch.tensor(rows, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def _weights_tensor(rows: list[list[float]], width: int, like: Tensor) -> Tensor:
    data = [r + [0.0] * (width - len(r)) for r in rows]
    return torch.tensor(data, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------
# Fixed step: torchdiffeq's AdamsBashforth / AdamsBashforthMoulton.
# ----------------------------------------------------------------------------------------------
class FixedAdams(MultistepBase):
    """Fixed-step Adams--Bashforth (``implicit=False``) or Adams--Bashforth--Moulton (``implicit=True``).

    Parameters
    ----------
    implicit : bool
        Correct the AB prediction with Adams--Moulton by functional iteration.
    max_order : int
        At most ``max_order - 1`` past points (2 .. 12; default 12, as torchdiffeq). Below 4 every step
        is RK4, as in torchdiffeq. Lowered during a solve where the formula shows parasitic growth (see the
        module docstring).
    max_iters : int
        Corrector iterations per step (``implicit`` only; default 4).
    rtol, atol : float or Tensor
        Convergence test of the corrector: ``max |dy_new - dy_old| / (atol + rtol max(|dy_old|, |dy_new|))
        < 1``. :func:`neurodyn.odeint` passes its ``rtol``/``atol`` (as torchdiffeq does); a plain
        ``method="implicit_adams"`` uses 1e-7 / 1e-9.

    Notes
    -----
    Shapes: ``step`` takes ``y`` ``(1, n)`` and returns ``(y1 (1, n), k, None)`` with ``k[0] = k1``
    (``(1, n)`` for AB steps, ``(2, n)`` for corrected steps -- ``k[1]`` the last corrector evaluation --
    and ``(4, n)`` for RK4 starting steps).

    Examples
    --------
    >>> import math, torch, neurodyn
    >>> from neurodyn.solvers.adams import FixedAdams
    >>> y0 = torch.tensor([1.0], dtype=torch.float64)
    >>> t = torch.linspace(0, 1, 101, dtype=torch.float64)
    >>> sol = neurodyn.solve(lambda t, y: -y, y0, t, method=FixedAdams(implicit=True, max_order=6))
    >>> abs(float(sol.ys[-1, 0]) - math.exp(-1)) < 1e-10
    True
    """

    def __init__(self, implicit: bool = False, max_order: int = MAX_ORDER, max_iters: int = 4,
                 rtol: float | Tensor = 1e-7, atol: float | Tensor = 1e-9):
        super().__init__()
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= MAX_ORDER:
            raise InputError(f"max_order must be an integer in 1..{MAX_ORDER}, got {max_order!r}.")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise InputError(f"max_iters must be an integer >= 1, got {max_iters!r}.")
        self.implicit = bool(implicit)
        self.name = "implicit_adams" if implicit else "explicit_adams"
        self.max_order = max_order
        self.max_iters = max_iters
        self.rtol, self.atol = rtol, atol
        # Asymptotic global order: the startup (RK4, then one AB3 / AB3+AM4 step) caps it; RK4 only below 4.
        self.order = 4 if max_order <= 3 else (3 + implicit if max_order == 4 else 4 + implicit)
        self.error_order = None
        self.controller_order = self.order
        self.adaptive = False
        self.fsal = False
        self.stages = 2 if implicit else 1
        self.dense_order = 3
        self.has_own_dense = False
        self.max_history = max(1, max_order - 1)
        self._cap = max_order - 1  # the highest formula allowed (lowered by the stability guard)
        # (order, [|grad^(order-2) f|, |grad^(order-1) f|, max |f|]) at the previous step, and for how many
        # consecutive steps the formula of that order has looked unstable (see _stable_order).
        self._diffs: tuple[int, list[float]] | None = None
        self._run = 0
        self._run_start = 0.0  # |grad^(order-1) f| before the run began
        self._forced: int | None = None

    def _on_reset(self) -> None:
        self._cap = self.max_order - 1
        self._diffs = None
        self._run = 0

    def _decisions(self, last: StepAttempt) -> int:
        return last.order

    def _impose(self, order: int) -> None:
        self._forced = order

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: None = None,
             t_end_nudge: float | None = None, buf: None = None) -> tuple[Tensor, Tensor, None]:
        """One step from ``(t, y)`` (``(1, n)``) with ``k1 = func(t, y)``; returns ``(y1, k, None)``."""
        self._forced = None
        mode = self._sync(t, y, k1)
        hist = self._hist
        t1 = t + h if t_end_nudge is None else t_end_nudge
        f0 = k1.reshape(1, -1)
        if self._forced is not None:  # a checkpoint replay: the order the forward step took
            order = self._forced
        else:
            order = min(len(hist.fs), self._cap)
            if order >= 3:
                order = self._stable_order(t, h, order, mode)
                if order < 3:  # even AB3 is unstable at this step: stop (the loop reports non_finite)
                    y1 = y.detach() * math.nan
                    self._record(t, y, h, y1, t_end_nudge, order=order)
                    return y1, f0, None
        if order < 3:
            y1, k = self._rk4(term, t, y, h, f0, t1)
        else:
            x = self._nodes(t, h, order)
            F = torch.stack(hist.fs[:order])  # (order, n)
            wp = quadrature_weights(x)[order]
            y1 = torch.addmm(y, _weights_tensor([wp], order, y), F, alpha=h)
            k = f0
            if self.implicit:
                y1, f_last = self._correct(term, t1, y, y1, h, x, F, order)
                k = torch.cat([f0, f_last.reshape(1, -1)], 0)
        self._record(t, y, h, y1, t_end_nudge, order=order)
        return y1, k, None

    # -- stability guard ---------------------------------------------------------------------------
    def _stable_order(self, t: float, h: float, order: int, mode: str) -> int:
        """The order for this step: ``order``, or one less when the formula of that order has shown parasitic growth
        (:meth:`_growing`) on ``order`` consecutive steps (``CONFIRM`` once a higher order was found unstable; the cap
        then stays lowered for the rest of the solve); below 3 the step is refused."""
        if vmapped(self._hist.fs[0]):  # values cannot reach the host under vmap
            return order
        with torch.no_grad():
            F = torch.stack(self._hist.fs[:order]).detach()
            D = torch.mm(_difference_matrix(order, F)[-2:], F)  # the two highest backward differences at t
            vals = torch.cat([torch.linalg.vector_norm(D, dim=1), torch.linalg.vector_norm(F, dim=1).amax().view(1)])
            vals = vals.tolist()
        prev, self._diffs = self._diffs, (order, vals)
        if mode != "continue" or prev is None or prev[0] != order:  # a new formula: count afresh
            self._run = 0
            if not self.implicit and prev is not None and mode == "continue" and order > prev[0]:
                return self._ramp_order(F, order, h)
            return order
        if self._growing(vals, prev[1], order - 1, F.dtype):
            self._run += 1
            if self._run == 1:
                self._run_start = prev[1][1]
        else:
            self._run = 0
        # A formula is judged unstable after `order` steps of growth in a row (longer than the rise of a kink of f
        # or a start-up step passing through the differences), or after CONFIRM steps once a higher one was.
        if self._run < (CONFIRM if self._cap < self.max_order - 1 else order):
            return order
        # The parasitic root, taken as negative real (where Adams formulas leave their stability regions on the real
        # axis), from the growth over the run; the h lambda it implies; the highest formula stable there.
        growth = (vals[1] / self._run_start) ** (1.0 / self._run) if self._run_start > 0.0 else 2.0
        z = abs(_lambda_h(order, self.implicit, -max(growth, 1.0)))
        new = max([j for j in range(3, order) if _real_interval(j, self.implicit) >= SAFETY * z], default=2)
        self._cap = new
        self._run = 0
        self._diffs = None
        name = f"{'ABM' if self.implicit else 'AB'}{order}"
        if new >= 3:
            warnings.warn(f"{self.name}: the order-{order} formula ({name}) is unstable at step {abs(h):.3g} "
                          f"(parasitic growth up to t={t:.6g}); continuing with order {new}. Use a smaller "
                          f"step_size, or max_order={new + 1} (formulas up to order {new}) from the start.",
                          RuntimeWarning, stacklevel=4)
        else:
            warnings.warn(f"{self.name}: unstable at step {abs(h):.3g} (parasitic growth up to t={t:.6g}, about "
                          f"h*lambda = -{z:.2g}, beyond the order-3 formula's limit "
                          f"{_real_interval(3, self.implicit):.2g}): stopping. Use a smaller step_size, an adaptive "
                          f"method, or an implicit method for a stiff problem.", RuntimeWarning, stacklevel=4)
        return new

    def _ramp_order(self, F: Tensor, order: int, h: float) -> int:
        """The order ramp climbs to formula ``order`` only where it is stable for the solution seen so far: ``h
        |lambda|`` estimated as ``|grad^2 f| / |grad f|`` (a resolved mode ``e^(lambda t)`` has
        ``grad^(j+1) f ~ h lambda grad^j f``) must lie in its real stability interval (with ``SAFETY``). Otherwise
        the ramp stops at the highest formula that is (order 3 at least), for the rest of the solve: AB11 is
        stable only for ``h |lambda| < 0.0034``, and climbing into it on ``y' = -y`` at ``h = 0.1`` returned 1.75
        for ``e^-2`` before the growth guard had the steps to notice."""
        D = torch.linalg.vector_norm(torch.mm(_difference_matrix(3, F)[1:], F[:3]), dim=1).tolist()
        noise = NOISE_FACTOR * 4.0 * torch.finfo(F.dtype).eps * float(torch.linalg.vector_norm(F[0]))
        if D[0] <= noise or D[1] <= noise:
            return order
        est = D[1] / D[0]
        if _real_interval(order, self.implicit) >= SAFETY * est:
            return order
        self._cap = max([j for j in range(3, order) if _real_interval(j, self.implicit) >= SAFETY * est], default=3)
        self._diffs = None
        warnings.warn(f"{self.name}: the order-{order} formula (AB{order}) is unstable at step {abs(h):.3g} (h*lambda "
                      f"about -{est:.2g} from the solution's differences, beyond its limit "
                      f"{_real_interval(order, self.implicit):.2g}); continuing with order {self._cap}. Use a smaller "
                      f"step_size, or max_order={self._cap + 1} (formulas up to order {self._cap}) from the start.",
                      RuntimeWarning, stacklevel=4)
        return self._cap

    @staticmethod
    def _growing(vals: list[float], prev: list[float], m: int, dtype: torch.dtype) -> bool:
        """Whether the highest backward difference the formula uses, ``|grad^m f|`` (``vals[1]``; ``vals[0]`` is
        ``|grad^(m-1) f|``, ``vals[2]`` is ``max |f|`` over the points, ``prev`` the same at the previous step)
        looks parasitic and growing: it is not smaller than the difference below it (a resolved solution has
        ``|grad^m f| ~ |h lambda| |grad^(m-1) f|`` with ``|h lambda|`` well below 1 wherever an Adams formula of
        order 3 or more is stable; where an Adams--Bashforth formula leaves its stability region on the negative
        real axis its parasitic root crosses the unit circle at -1, and each difference doubles that mode), it is
        well above its rounding level ``2^m eps max|f|``, and it grew since the previous step."""
        below, d, scale = vals
        noise = NOISE_FACTOR * 2.0**m * torch.finfo(dtype).eps * scale
        return d >= below and d > noise and d > prev[1]

    def _rk4(self, term: Term, t: float, y: Tensor, h: float, f0: Tensor, t1: float) -> tuple[Tensor, Tensor]:
        """torchdiffeq's starting step: RK4 with the 3/8 rule."""
        third = 1.0 / 3.0
        k2 = term(t + h * third, y + (h * third) * f0).reshape(1, -1)
        k3 = term(t + h * (2.0 * third), y + h * (k2 - third * f0)).reshape(1, -1)
        k4 = term(t1, y + h * (f0 - k2 + k3)).reshape(1, -1)
        y1 = y + (f0 + 3.0 * (k2 + k3) + k4) * (h * 0.125)
        return y1, torch.cat([f0, k2, k3, k4], 0)

    def _tolerances(self, like: Tensor) -> tuple:
        r, a = self.rtol, self.atol
        if isinstance(r, Tensor):
            r = r.to(like.device, like.dtype).reshape(-1) if r.numel() > 1 else float(r)
        if isinstance(a, Tensor):
            a = a.to(like.device, like.dtype).reshape(-1) if a.numel() > 1 else float(a)
        return r, a

    def _correct(self, term: Term, t1: float, y: Tensor, yp: Tensor, h: float, x: list[float], F: Tensor,
                 order: int) -> tuple[Tensor, Tensor]:
        wc = quadrature_weights([1.0] + x)[order + 1]
        m0 = wc[0] * h
        delta = torch.mm(_weights_tensor([wc[1:]], order, y), F) * h  # (1, n)
        rtol, atol = self._tolerances(y)
        dy = yp - y
        converged = False
        f = None
        for _ in range(self.max_iters):
            dy_old = dy
            f = term(t1, y + dy).reshape(1, -1)
            dy = m0 * f + delta
            with torch.no_grad():
                tol = atol + rtol * torch.maximum(dy_old.detach().abs(), dy.detach().abs())
                converged = bool(((dy_old.detach() - dy.detach()).abs() / tol).max() < 1)
            if converged:
                break
        if not converged:
            warnings.warn("implicit_adams: functional iteration did not converge; the solution may be "
                          "inaccurate (use a smaller step or more max_iters).", RuntimeWarning, stacklevel=4)
            if len(self._hist.fs) > 1:
                self._hist.ts.pop()
                self._hist.fs.pop()
        return y + dy, f

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: None = None, interp: str = "auto") -> Tensor:
        """Cubic Hermite (or ``"linear"``) output at fractions ``thetas`` (``(m,)``) of a step: ``(m, n)``."""
        return self._hermite(term, st, thetas, interp)


# ----------------------------------------------------------------------------------------------
# Adaptive: variable-step, variable-order Adams--Bashforth--Moulton PECE.
# ----------------------------------------------------------------------------------------------
class VariableAdams(MultistepBase):
    """Adaptive variable-step, variable-order Adams PECE (``method="adams"``; see the module docstring).

    Parameters
    ----------
    max_order : int
        Highest order ``k`` of the AB predictor / error estimate, 1 .. 12 (default 12); the propagated
        solution has order ``k + 1``.
    start_order : int
        Order of the first step after a (re)start (default 1; the history must fill up before higher
        orders are possible anyway).

    Notes
    -----
    Shapes: ``step`` takes ``y`` ``(1, n)`` and returns ``(y1 (1, n), k (k + 2, n), err (1, n))`` with
    ``k = [f(t0, y0), f(t1, y_pred), f_{n-1} .. f_{n-k+1}, f(t1, y1)]`` (``err`` is the order-``k`` error
    estimate divided by ``h``).

    Examples
    --------
    >>> import math, torch, neurodyn
    >>> from neurodyn.solvers.adams import VariableAdams
    >>> sol = neurodyn.solve(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
    ...                      torch.tensor([0.0, 1.0], dtype=torch.float64), method=VariableAdams(max_order=5))
    >>> abs(float(sol.ys[-1, 0]) - math.exp(-1)) < 1e-6
    True
    """

    def __init__(self, max_order: int = MAX_ORDER, start_order: int = 1):
        super().__init__()
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= MAX_ORDER:
            raise InputError(f"max_order must be an integer in 1..{MAX_ORDER}, got {max_order!r}.")
        self.name = "adams"
        self.max_order = max_order
        self.start_order = max(1, min(int(start_order), max_order))
        self.order = 1  # the starting order: what the loop's initial step selection should assume
        self.error_order = 1
        # One controller exponent for every order (the loop's controller has one): 1/6 keeps PI control
        # stable from order 1 to 12 (gain (k + 1) / 6 * 0.8 < 2).
        self.controller_order = 5
        self.adaptive = True
        self.fsal = True
        self.stages = 3
        self.dense_order = max_order + 1
        self.has_own_dense = True
        self.max_history = max_order + 1
        self._k = self.start_order
        #: Attempted steps per order ``k`` since the stepper was built (diagnostics).
        self.order_counts: dict[int, int] = {}

    @property
    def current_order(self) -> int:
        """The order ``k`` the next step will use (before capping by the available history)."""
        return self._k

    def _on_reset(self) -> None:
        self._k = self.start_order

    def _decisions(self, last: StepAttempt) -> int:
        return last.order

    def _impose(self, order: int) -> None:
        self._k = order

    def _on_accept(self, last: StepAttempt) -> None:
        em1, ek, ep1 = last.norms
        k = last.order
        if k > 1 and em1 is not None and ek is not None and em1 <= ek:
            k -= 1
        elif ep1 is not None and ek is not None and ep1 < 0.5 * ek and k < self.max_order:
            k += 1
        self._k = k

    def _on_reject(self, last: StepAttempt) -> None:
        em1, ek, _ = last.norms
        k = last.order
        if self._fails >= 3:
            k = 1
        elif k > 1 and em1 is not None and ek is not None and em1 <= ek:
            k -= 1
        self._k = k

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: None = None,
             t_end_nudge: float | None = None, buf: None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One PECE step from ``(t, y)`` (``(1, n)``) with ``k1 = func(t, y)``; returns ``(y1, k, err)``."""
        self._sync(t, y, k1)
        hist = self._hist
        m = len(hist.fs)
        k = max(1, min(self._k, m))
        self.order_counts[k] = self.order_counts.get(k, 0) + 1
        big = k + 1 if (m >= k + 1 and k < self.max_order) else k  # past points used (E_{k+1} needs k + 1)
        x = self._nodes(t, h, big)
        F = torch.stack(hist.fs[:big])  # (big, n)
        t1 = t + h if t_end_nudge is None else t_end_nudge
        # Predict (AB order k) and evaluate.
        wp = quadrature_weights(x[:k])[k]
        yp = torch.addmm(y, _weights_tensor([wp], big, y), F, alpha=h)
        fp = term(t1, yp).reshape(1, -1)
        # Correct (AM with k + 1 points) and estimate errors with the AM prefixes of sizes k-1 .. k+2.
        G = torch.cat([fp, F], 0)  # nodes [1, x_0 = 0, x_1, ...]
        W = quadrature_weights([1.0] + x)
        rows = [W[k + 1], _diff(W[k + 1], W[k])]
        if k >= 2:
            rows.append(_diff(W[k], W[k - 1]))
        if big > k:
            rows.append(_diff(W[k + 2], W[k + 1]))
        R = torch.mm(_weights_tensor(rows, big + 1, y), G)  # (r, n), still to be multiplied by h
        y1 = torch.add(y, R[:1], alpha=h)
        err = R[1:2].detach().clone()
        with torch.no_grad():
            wt = torch.maximum(y.detach().abs(), y1.detach().abs())
            wt = wt + wt.mean() + torch.finfo(wt.dtype).tiny
            norms = (R[1:].detach() / wt).abs().pow(2).mean(dim=1).sqrt().tolist()
        em1 = norms[1] if k >= 2 else None
        ep1 = norms[-1] if big > k else None
        f1 = term(t1, y1).reshape(1, -1)
        kk = torch.cat([F[:1], fp, F[1:k], f1], 0)
        kk._adams_nodes = (0.0, 1.0, *x[1:k])  # for dense output
        self._record(t, y, h, y1, t_end_nudge, norms=(em1, norms[0], ep1), order=k)
        return y1, kk, err

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: None = None, interp: str = "auto") -> Tensor:
        """The step's corrector polynomial, integrated (``"auto"``), or cubic Hermite / linear output, at
        fractions ``thetas`` (``(m,)``) of the step; returns ``(m, n)``."""
        nodes = getattr(st.k, "_adams_nodes", None)
        if interp != "auto" or nodes is None:
            return self._hermite(term, st, thetas, interp)
        A = dense_weight_polys(list(nodes))  # (p, p)
        p = len(nodes)
        coef = torch.tensor(A, dtype=torch.float64, device=st.y0.device)  # (p nodes, p powers)
        th = thetas.reshape(-1, 1).to(torch.float64)
        powers = th ** torch.arange(1, p + 1, dtype=torch.float64, device=th.device)  # (m, p)
        weights = torch.mm(powers, coef.t()).to(st.y0.dtype)  # (m, p)
        return torch.addmm(st.y0.expand(thetas.shape[0], -1), weights, st.k[:p], alpha=st.h)


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - (b[i] if i < len(b) else 0.0) for i, x in enumerate(a)]


def make_adams(name: str) -> FixedAdams | VariableAdams:
    """A fresh stepper (own history) for ``"explicit_adams"``, ``"implicit_adams"`` or ``"adams"``."""
    if name == "adams":
        return VariableAdams()
    if name in ("explicit_adams", "implicit_adams"):
        return FixedAdams(implicit=name == "implicit_adams")
    raise InputError(f"unknown Adams method {name!r}.")


ADAMS_METHODS = ("adams", "explicit_adams", "implicit_adams")
"""The Adams method names: ``adams`` (adaptive), ``explicit_adams`` and ``implicit_adams`` (fixed step)."""

__all__ = ["ADAMS_METHODS", "FixedAdams", "VariableAdams", "make_adams", "quadrature_weights"]
