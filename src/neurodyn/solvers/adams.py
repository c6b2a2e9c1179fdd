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
    ``max_order=4``). High-order AB formulas have tiny stability regions: with the default ``max_order=12``
    (AB11) oscillatory or moderately damped problems blow up unless ``h |lambda|`` is very small (torchdiffeq's
    behaviour, reproduced); ``max_order=5`` (AB4) is far more robust.
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

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.interpolation import step_interpolant
from ..core.stepper import Step, StepperBase
from ..errors import InputError
from .explicit_rk import Term

MAX_ORDER = 12


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
        is RK4, as in torchdiffeq.
    max_iters : int
        Corrector iterations per step (``implicit`` only; default 4).
    rtol, atol : float or Tensor
        Convergence test of the corrector: ``max |dy_new - dy_old| / (atol + rtol max(|dy_old|, |dy_new|))
        < 1``. :func:`neurodyn.odeint` passes its ``rtol``/``atol`` (as torchdiffeq does); a plain
        ``method="implicit_adams"`` uses 1e-7 / 1e-9.

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

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: None = None,
             t_end_nudge: float | None = None, buf: None = None) -> tuple[Tensor, Tensor, None]:
        """One step from ``(t, y)`` (``(1, n)``) with ``k1 = func(t, y)``; returns ``(y1, k, None)``."""
        self._sync(t, y, k1)
        hist = self._hist
        order = min(len(hist.fs), self.max_order - 1)
        t1 = t + h if t_end_nudge is None else t_end_nudge
        f0 = k1.reshape(1, -1)
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
        self._record(t, y, h, y1, t_end_nudge)
        return y1, k, None

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

__all__ = ["ADAMS_METHODS", "FixedAdams", "VariableAdams", "make_adams", "quadrature_weights"]
