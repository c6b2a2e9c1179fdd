"""``bdf``: the variable-order (1--5), variable-step BDF/NDF method for stiff problems, after scipy's ``BDF``.

The formulation is Shampine & Reichelt's (MATLAB's ode15s; "The MATLAB ODE Suite", SIAM J. Sci. Comput. 18,
1997), the quasi-constant step size one that scipy's ``BDF`` implements:

* The past is held as modified divided differences ``D`` (rows ``D[j] = nabla^j y_n`` of the interpolating
  polynomial through the last ``k + 1`` solution points, at a constant spacing ``h``). The prediction is
  ``y_pred = sum_{j<=k} D[j]``; the corrector solves, for ``d = y_{n+1} - y_pred``,

      (1 - kappa_k) gamma_k d - h f(t_{n+1}, y_pred + d) = -sum_{j=1..k} gamma_j D[j],   gamma_j = sum_{i<=j} 1/i,

  i.e. ``y - c f(t1, y) = y_pred - psi`` with ``c = h / alpha_k``, ``alpha_k = (1 - kappa_k) gamma_k`` and
  ``psi = sum_j gamma_j D[j] / alpha_k``. ``kappa`` gives the NDFs (``ndf=True``, the default, scipy's and
  ode15s' ``kappa = (-0.185, -1/9, -0.0823, -0.0415, 0)``: up to ~25 % longer steps than the BDFs for the same
  accuracy, at a small cost in stability at orders 3 and 4); ``ndf=False`` gives the classical BDFs.
* A change of step size by a factor ``r`` rescales ``D`` (the same polynomial at spacing ``r h``); after an
  accepted step ``D`` is updated with ``d``, and ``D[k + 1] = d``, ``D[k + 2] = d - d_prev`` (the next
  differences) give the error estimates of orders ``k - 1`` and ``k + 1``.
* The local error of order ``k`` is ``(kappa_k gamma_k + 1 / (k + 1)) d``. After ``k + 1`` steps at one step
  size and order, the order among ``k - 1, k, k + 1`` allowing the largest step is chosen, with the step
  (factor at most 10); a rejected step is retried ``max(0.2, 0.9 r^(-1/(k + 1)))`` times smaller. These
  proposals reach the integrate loop through :meth:`BDF.default_controller` (``solve`` uses it unless a
  ``controller`` is given; with a user's :class:`~neurodyn.PIDController` the loop's PI control sizes the
  steps and ``D`` is rescaled at every step).
* Newton: simplified Newton with the iteration matrix ``I - c J``, at most ``max_newton_iter`` (4) iterations,
  scipy's convergence test with ``newton_tol = max(10 eps / rtol, min(0.03, sqrt(rtol)))``. ``J`` (autograd,
  per-sample ``jac="batched"``, ``"fd"`` or a callable: :class:`~neurodyn.solvers.implicit_rk.ImplicitRungeKutta`'s
  machinery) is kept for the whole solve and recomputed only when Newton fails with an old ``J``; the LU
  factorisation is redone when ``c`` changes. A step whose Newton iteration fails with a fresh ``J`` is
  rejected (never accepted unconverged) and retried with half the step.

Dense output is the BDF interpolating polynomial of the step (degree ``k``, from ``D``), as scipy's
``BdfDenseOutput``. Gradients (``gradient="direct"``): Newton runs without autograd; the converged ``y*`` passes
through the implicit-function-theorem correction (the implicit RK stepper's ``correct_stage``), so the gradient is
that of the discrete method, with no backpropagation through Newton (exact to second order as well, for
``create_graph=True``). ``"adjoint"`` and ``"interpolated"`` work as for any method. ``"checkpoint"`` keeps the
differences ``D`` with every checkpoint and replays each step with the order the forward step took; the replay
solves the corrector afresh (a Jacobian at the step start, Newton past the forward's tolerance, see
:class:`~neurodyn.solvers.implicit_rk.ImplicitRungeKutta`), so the gradient agrees with ``"direct"`` to the
forward's Newton tolerance.

The stepper starts at order 1 with the loop's initial step. With a constant ``step_size`` (no error control) it
still raises its order as above, but its order-1 start limits the accuracy to O(h^2): use it adaptively.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.control import StepperController
from ..core.stepper import Step
from ..core.tensors import ordinary_tensors
from ..errors import InputError
from .adams import MultistepBase, StepAttempt, StepHistory
from .explicit_rk import Term
from .implicit_rk import (
    JAC_MODES,
    ImplicitRungeKutta,
    SolveState,
    correct_stage,
    dirk_residual,
    new_stats,
    replay_newton,
)

MAX_ORDER = 5
NEWTON_MAXITER = 4
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0
# Klopfenstein--Shampine NDF coefficients (order 1..5; index 0 unused), as ode15s and scipy.
NDF_KAPPA = (0.0, -0.1850, -1.0 / 9.0, -0.0823, -0.0415, 0.0)


def _difference_matrix(order: int, rho: float) -> list[list[float]]:
    """``R(rho)``, ``(k + 1) x (k + 1)``: ``R[0][j] = 1``, ``R[i][0] = 0`` and ``R[i][j] = prod_{l=1..i} (l - 1 - rho j)
    / l`` for ``i, j >= 1`` (Shampine & Reichelt, section 2.1)."""
    rows = [[1.0] * (order + 1)]
    for i in range(1, order + 1):
        prev = rows[-1]
        rows.append([0.0] + [prev[j] * (i - 1 - rho * j) / i for j in range(1, order + 1)])
    return rows


@functools.cache
def _unit_difference_matrix(order: int) -> tuple[tuple[float, ...], ...]:
    return tuple(map(tuple, _difference_matrix(order, 1.0)))


def _rescale_matrix(order: int, factor: float) -> list[list[float]]:
    """``M = (R(factor) R(1))^T``: ``M D[:k+1]`` are the differences of the same interpolating polynomial at the
    spacing ``factor * h``."""
    r = _difference_matrix(order, factor)
    u = _unit_difference_matrix(order)
    size = range(order + 1)
    return [[sum(r[b][c] * u[c][a] for c in size) for b in size] for a in size]


def _choose_order(order: int, norms: tuple[float, float, float]) -> tuple[int, float]:
    """(order change in -1, 0, 1; its step factor) from the error norms of orders ``k - 1, k, k + 1``."""
    best, best_i = -1.0, 1
    for i, e in enumerate(norms):
        fac = math.inf if e == 0.0 else e ** (-1.0 / (order + i))
        if fac > best:
            best, best_i = fac, i
    return best_i - 1, best


@dataclass
class _BdfAttempt(StepAttempt):
    """One :meth:`BDF.step` call: what the loop's accept/reject turns into the next state."""

    h: float = 0.0
    D: Tensor | None = None  # the differences after the step, at spacing h: (order + 3, n)
    n_equal: int = 0  # steps at this step size and order, this one included
    n_iter: int = 0  # Newton iterations of the successful attempt
    failed: bool = False  # Newton did not converge
    next_order: int | None = None  # decided by the controller (propose_step), else at acceptance


@dataclass
class _Coefficients:
    """Per order ``k``: tensors of one dtype/device (internal)."""

    predict: Tensor  # (2, k + 1): rows give y_pred and psi from D[:k + 1]
    update: Tensor  # (k + 2, k + 2): upper-triangular ones, [D[:k + 1]; d] -> D_new[:k + 2]


class BDF(MultistepBase):
    """Variable-order (1--5), variable-step BDF/NDF for stiff problems (``method="bdf"``; see the module docstring).

    States are flat ``(1, n)`` rows; ``J`` is ``(n, n)`` or, with ``jac="batched"`` and a ``(B, ...)`` state whose
    rows are independent problems, block-diagonal ``(B, D, D)`` (``D = n / B``).

    Parameters
    ----------
    jac : ``"full"``, ``"batched"``, ``"fd"`` or callable
        How ``J = df/dy`` is computed (as :class:`~neurodyn.solvers.implicit_rk.ImplicitRungeKutta`): autograd of
        the whole state, autograd per sample (block diagonal), forward differences, or ``jac(t, y) -> (n, n) |
        (B, D, D)`` with ``y`` in the state's shape.
    rtol, atol : float or Tensor, optional
        The tolerances of Newton's norm; ``solve`` passes its own (default ``1e-7``/``1e-9``).
    newton_tol : float, optional
        Newton's stopping tolerance in that norm; default ``max(10 eps / rtol, min(0.03, sqrt(rtol)))``.
    max_newton_iter : int
        Newton iterations per attempt before ``J`` is recomputed or the step rejected (default 4, as scipy).
    max_order : int
        Highest order, 1 .. 5 (default 5).
    ndf : bool
        Numerical differentiation formulas (default, as scipy's ``BDF`` and ode15s) or classical BDFs.

    Attributes
    ----------
    stats : dict
        Counters of the current (last) solve: ``jacobian_evals``, ``factorizations``, ``linear_solves``,
        ``newton_iters``, ``newton_failures``, ``adjoint_solves``/``adjoint_refinements`` (backward passes),
        ``orders`` (attempted steps per order, ``{k: count}``) and ``order`` (the order of the last attempt).

    Shapes: ``step`` takes ``y`` ``(1, n)`` and returns ``(y1 (1, n), k (order + 3, n), err (1, n))`` with
    ``k = [f(t0, y0), D_new[0], ..., D_new[order], f(t1, y1)]`` (``D_new`` the differences after the step, for
    dense output; ``f(t1, y1)`` from the corrector equation) and ``err`` the local error estimate divided by ``h``.

    Examples
    --------
    >>> import torch, neurodyn
    >>> k = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)
    >>> def rober(t, y):
    ...     r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
    ...     return torch.stack([-r1 + r3, r1 - r2 - r3, r2])
    >>> y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    >>> t = torch.tensor([0.0, 40.0], dtype=torch.float64)
    >>> sol = neurodyn.solve(rober, y0, t, method="bdf", rtol=1e-6, atol=1e-10)
    >>> round(float(sol.ys[-1, 0]), 4)
    0.7158
    >>> sol.stats["jacobian_evals"] > 0 and max(sol.stats["orders"]) > 1
    True
    """

    implicit = True
    bind_tolerances = True
    own_controller = True
    adaptive = True
    #: ``k[-1]`` is ``f(t1, y1)`` (from the corrector equation): the loop passes it back as the next ``k1``
    #: instead of evaluating ``f`` again (the BDF step itself needs ``f(t0, y0)`` only at a (re)start).
    fsal = True
    has_own_dense = True
    stages = 1

    # The implicit Runge--Kutta stepper's per-solve state, Newton norm and adjoint solve (of a stage equation
    # Y - c f(t, Y) = rhs, which the BDF corrector is), shared.
    begin_solve = ImplicitRungeKutta.begin_solve
    dirk_adjoint = ImplicitRungeKutta.dirk_adjoint
    rms = staticmethod(ImplicitRungeKutta.rms)

    def __init__(self, *, jac: str | Callable = "full", rtol: float | Tensor | None = None,
                 atol: float | Tensor | None = None, newton_tol: float | None = None,
                 max_newton_iter: int = NEWTON_MAXITER, max_order: int = MAX_ORDER, ndf: bool = True):
        super().__init__()
        if not (callable(jac) or jac in JAC_MODES):
            raise InputError(f"jac must be one of {JAC_MODES} or a callable jac(t, y), got {jac!r}.")
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= MAX_ORDER:
            raise InputError(f"max_order must be an integer in 1..{MAX_ORDER}, got {max_order!r}.")
        if isinstance(max_newton_iter, bool) or not isinstance(max_newton_iter, int) or max_newton_iter < 1:
            raise InputError(f"max_newton_iter must be an integer >= 1, got {max_newton_iter!r}.")
        if newton_tol is not None and not (newton_tol > 0 and math.isfinite(newton_tol)):
            raise InputError(f"newton_tol must be a finite number > 0, got {newton_tol!r}.")
        self.name = "bdf"
        self.jac = jac
        # Jacobians (autograd, per sample, forward differences, callable, and their fallbacks) come from the implicit
        # Runge--Kutta stepper's machinery, through an instance of it configured with this jac.
        self._jac_source = ImplicitRungeKutta("implicit_euler", jac=jac)
        self._jac_source.name = self.name  # for its messages
        self.rtol = 1e-7 if rtol is None else rtol
        self.atol = 1e-9 if atol is None else atol
        self.newton_tol = newton_tol
        self.max_newton_iter = max_newton_iter
        self.max_order = max_order
        self.ndf = bool(ndf)
        self.order = 1  # the starting order: what the loop's initial step selection assumes
        self.error_order = 1
        # The loop's PI control, when it sizes the steps (a user's controller), with one exponent for every order.
        self.controller_order = 4
        self.dense_order = max_order
        self.max_history = 1
        kappa = NDF_KAPPA if self.ndf else (0.0,) * (MAX_ORDER + 1)
        self._gamma = [0.0] + [sum(1.0 / i for i in range(1, j + 1)) for j in range(1, MAX_ORDER + 1)]
        self._alpha = [(1.0 - kappa[j]) * self._gamma[j] for j in range(MAX_ORDER + 1)]
        self._error_const = [kappa[j] * self._gamma[j] + 1.0 / (j + 1) for j in range(MAX_ORDER + 1)]
        self._co: dict[tuple[int, torch.dtype, torch.device], _Coefficients] = {}
        self._state: SolveState | None = None
        self._idle_stats = {**new_stats(), "orders": {}, "order": 1}
        self._D: Tensor | None = None  # accepted differences, at spacing self._hD
        self._hD = 0.0
        self._k = 1
        self._n_equal = 0
        self._pending: _BdfAttempt | None = None  # the attempt whose step size the controller has to propose
        self._driven = False  # the controller of this solve is ours (step sizes held for k + 1 steps)
        self._tols: tuple = ((self.rtol, self.atol), 0.0)  # Newton's (rtol, atol) and tolerance, per solve

    # -- options and state -------------------------------------------------------------------------------
    def bind(self, **options: Any) -> BDF:
        """A new stepper with some options replaced (``jac``, ``rtol``, ``atol``, ``newton_tol``,
        ``max_newton_iter``, ``max_order``, ``ndf``)."""
        kw = {"jac": self.jac, "rtol": self.rtol, "atol": self.atol, "newton_tol": self.newton_tol,
              "max_newton_iter": self.max_newton_iter, "max_order": self.max_order, "ndf": self.ndf}
        unknown = sorted(set(options) - set(kw))
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for method 'bdf'; valid: {', '.join(kw)}.")
        kw.update(options)
        return BDF(**kw)

    def default_controller(self) -> StepperController:
        """The controller ``solve`` uses with this stepper: the step sizes (and orders) it proposes itself."""
        return StepperController(self)

    @property
    def stats(self) -> dict:
        """Counters of the current (last) solve."""
        return self._state.stats if self._state is not None else self._idle_stats

    @property
    def current_order(self) -> int:
        """The order the next step will use."""
        return self._k

    def reset(self) -> None:
        """Forget the history, Jacobian, factorisations and counters of the last solve."""
        super().reset()
        self._state = None
        self._D = None
        self._pending = None

    def __repr__(self) -> str:
        jac = self.jac if isinstance(self.jac, str) else "callable"
        return (f"BDF(jac={jac!r}, rtol={self.rtol}, atol={self.atol}, max_order={self.max_order}, "
                f"ndf={self.ndf})")

    def _solve_state(self, term: Any, y: Tensor) -> SolveState:
        """The state of the solve in progress; a new one (Jacobian, factorisation, counters) for a new term."""
        st = self.begin_solve(term, y)
        if "orders" not in st.stats:  # just created
            st.stats.update(orders={}, order=1)
            self._driven = False
            self._tols = self._tolerances(y)
        return st

    def _tolerances(self, y: Tensor) -> tuple[tuple, float]:
        """``((rtol, atol), newton_tol)`` for a state ``y`` (``(1, n)``): floats, or ``(1, n)`` rows (per-element
        tolerances of another size, e.g. an adjoint's augmented state, use their smallest value)."""
        n = y.shape[1]
        tols = tuple(v.reshape(1, n).to(dtype=y.dtype, device=y.device) if isinstance(v, Tensor) and v.numel() == n
                     else float(v.min() if isinstance(v, Tensor) else v) for v in (self.rtol, self.atol))
        tol = self.newton_tol
        if tol is None:  # scipy's BDF
            rmin = max(float(tols[0].min()) if isinstance(tols[0], Tensor) else tols[0], 1e-300)
            tol = max(10 * torch.finfo(y.dtype).eps / rmin, min(0.03, math.sqrt(rmin)))
        return tols, tol

    def _coefficients(self, order: int, like: Tensor) -> _Coefficients:
        key = (order, like.dtype, like.device)
        co = self._co.get(key)
        if co is None:
            with ordinary_tensors():  # cached for later solves, with or without autograd
                predict = [[1.0] * (order + 1), [0.0] + [g / self._alpha[order] for g in self._gamma[1:order + 1]]]
                co = _Coefficients(
                    predict=torch.tensor(predict, dtype=torch.float64).to(dtype=like.dtype, device=like.device),
                    update=torch.ones(order + 2, order + 2, dtype=like.dtype, device=like.device).triu())
            self._co[key] = co
        return co

    # -- history: what the loop did with the last attempt ----------------------------------------------------
    def _on_reset(self) -> None:
        self._D = None
        self._k = 1
        self._n_equal = 0

    def _on_accept(self, last: _BdfAttempt) -> None:
        self._D, self._hD = last.D, last.h
        k, n_equal = last.order, last.n_equal
        new_k = last.next_order
        if new_k is None and n_equal >= k + 1:  # no proposal from our controller: choose the order here
            em, ek, ep = last.norms
            delta, _ = _choose_order(k, (math.inf if em is None else em, ek,
                                         math.inf if ep is None else ep))
            new_k = k + delta
        if new_k is not None or n_equal >= k + 1:
            n_equal = 0  # a decision was taken: the next one after k + 1 more steps
        self._k = k if new_k is None else max(1, min(self.max_order, new_k))
        self._n_equal = n_equal

    # -- checkpoint replays: the differences D are the state a step starts from; its order the decision it took ----
    def _carry(self, last: _BdfAttempt) -> tuple[tuple[Tensor, ...], Any]:
        return (last.D,), last.h

    def _restore(self, t: float, y: Tensor, ts: list[float], tensors: tuple[Tensor, ...], nudged: bool,
                 extra: Any) -> _BdfAttempt:
        self._hist = StepHistory()
        return _BdfAttempt(t, y, t, y, nudged, h=extra, D=tensors[0])

    def _decisions(self, last: _BdfAttempt) -> int:
        return last.order

    def _impose(self, order: int) -> None:
        self._k = order

    # -- the controller's side -----------------------------------------------------------------------------
    def begin_control(self) -> None:
        """Called by :class:`~neurodyn.core.control.StepperController` when an integration starts."""
        self._pending = None

    def propose_step(self, h_abs: float, ratio: float, accepted: bool) -> float | None:
        """The next step size after the attempt of size ``h_abs`` with the loop's error ratio ``ratio``, or None
        when the attempt was not this stepper's (then the controller's PI rule applies)."""
        last = self._pending
        self._pending = None
        if last is None or abs(last.h) != h_abs:
            return None
        self._driven = True
        k = last.order
        if last.failed or not math.isfinite(ratio):
            return 0.5 * h_abs
        safety = 0.9 * (2 * self.max_newton_iter + 1) / (2 * self.max_newton_iter + last.n_iter)
        if not accepted:
            return h_abs * max(MIN_FACTOR, safety * ratio ** (-1.0 / (k + 1)))
        if last.n_equal < k + 1:
            return h_abs  # keep the step (and the LU factorisation) for k + 1 steps
        em, ek, ep = last.norms
        s = ratio / ek if ek else 1.0  # our norms of orders k -/+ 1 in the units of the loop's error norm
        delta, factor = _choose_order(k, (math.inf if em is None else em * s, ratio,
                                          math.inf if ep is None else ep * s))
        last.next_order = k + delta
        return h_abs * min(MAX_FACTOR, safety * factor)

    # -- one step ------------------------------------------------------------------------------------------
    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: None = None,
             t_end_nudge: float | None = None, buf: None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One BDF step from ``(t, y)`` (``(1, n)``) of size ``h``, with ``k1 = f(t, y)`` (used at a (re)start);
        returns ``(y1, k, err)`` (see the class docstring). A failed Newton iteration gives a NaN ``y1`` and an
        infinite ``err``, which the loop rejects."""
        st = self._solve_state(term, y)
        self._sync(t, y, k1)
        n = y.shape[1]
        if self._D is None:  # (re)start: order 1 from f(t, y)
            self._D = torch.cat([y, h * k1.reshape(1, n), torch.zeros_like(y)])
            self._hD, self._k, self._n_equal = h, 1, 0
        k = self._k
        D = self._D
        n_equal = self._n_equal
        if h != self._hD:
            D = self._rescale(D, k, h / self._hD)
            if self._driven:
                n_equal = 0
        stats = st.stats
        stats["orders"][k] = stats["orders"].get(k, 0) + 1
        stats["order"] = k
        co_k = self._coefficients(k, y)
        t1 = t + h if t_end_nudge is None else t_end_nudge
        c = h / self._alpha[k]
        tols, tol = self._tols
        with torch.no_grad():
            P = co_k.predict @ D[:k + 1].detach()  # (2, n): y_pred, psi
            y_pred, psi = P[0:1], P[1:2]
            ystar, dstar, n_iter, lu = self._newton(term, t, t1, y, y_pred, psi, c, tols, tol, st)
        last = _BdfAttempt(t, y, t + h, None, t_end_nudge is not None, order=k, h=h, n_equal=n_equal + 1)
        self._last = self._pending = last
        if ystar is None:
            last.failed = True
            stats["newton_failures"] += 1
            nan = y.detach().new_full((1, n), math.nan)
            last.y1 = nan
            return nan, y.detach().new_zeros((k + 3, n)), y.detach().new_full((1, n), math.inf)
        last.n_iter = n_iter

        if torch.is_grad_enabled() and (y.requires_grad or k1.requires_grad or D.requires_grad):
            P = co_k.predict @ D[:k + 1]
            y_pred, psi = P[0:1], P[1:2]
            y1 = correct_stage(ystar, dirk_residual(term, t1, y_pred - psi, c),
                               self.dirk_adjoint(term, t1, c, ystar, lu, st))
            d = y1 - y_pred
        else:
            y1, d = ystar, dstar
        D_new = torch.cat([co_k.update @ torch.cat([D[:k + 1], d]), d - D[k + 1:k + 2]])
        f1 = (psi + d) / c
        with torch.no_grad():
            dd = d.detach()
            err = dd * (self._error_const[k] / h)
            # Error norms of orders k - 1, k, k + 1, in the loop's scale (only when the order may change next).
            rows = [dd * self._error_const[k]]
            decide = n_equal + 1 >= k + 1
            if decide and k > 1:
                rows.append(D_new[k:k + 1].detach() * self._error_const[k - 1])
            if decide and k < self.max_order:
                rows.append(D_new[k + 2:k + 3].detach() * self._error_const[k + 1])
            scale = torch.maximum(y.detach().abs(), y1.detach().abs()) * tols[0] + tols[1]
            E = torch.cat(rows) / scale
            norms = (torch.linalg.vector_norm(E, dim=1) / math.sqrt(n)).tolist()
        em = norms[1] if decide and k > 1 else None
        ep = norms[-1] if decide and k < self.max_order else None
        last.norms = (em, norms[0], ep)
        last.y1 = y1
        last.D = D_new
        kk = torch.cat([k1.reshape(1, n), D_new[:k + 1], f1])
        return y1, kk, err

    def _rescale(self, D: Tensor, k: int, factor: float) -> Tensor:
        """``D`` at the spacing ``factor * h``: the polynomial's differences exactly, the last correction
        ``D[k + 1]`` to leading order (``factor^(k + 1)``)."""
        m = torch.tensor(_rescale_matrix(k, factor), dtype=D.dtype, device=D.device)
        return torch.cat([m @ D[:k + 1], D[k + 1:k + 2] * factor ** (k + 1), D[k + 2:]])

    def _newton(self, term: Any, t: float, t1: float, y_key: Tensor, y_pred: Tensor, psi: Tensor, c: float,
                tols: tuple, tol: float, st: SolveState) -> tuple[Tensor | None, Tensor | None, int, Any]:
        """Solve ``y - c f(t1, y) = y_pred - psi`` from ``y_pred``: ``(y*, d* = y* - y_pred, iterations, LU)``, or
        ``(None, None, iterations, LU)`` when it fails with a Jacobian computed for this attempt."""
        scale = y_pred.abs() * tols[0] + tols[1]
        iters, floor = self.max_newton_iter, None
        if st.replay:  # a checkpoint replay: J at the step start, Newton past the forward's tolerance, no early give-up
            st.J = None
            tol, floor, iters = replay_newton(tol, tols[0], y_pred.dtype, self.max_newton_iter)
        fresh = rescued = False
        if st.J is None:
            st.J = self._jac_source._jacobian(term, t, y_key.detach(), st)
            st.lus.clear()
            fresh = True
        stats = st.stats
        total = 0
        while True:
            entry = st.lus.get("bdf")
            if entry is None or entry[1] != c:
                lu = torch.linalg.lu_factor(st.layout.eye(st.J) - c * st.J)
                st.lus["bdf"] = (lu, c)
                stats["factorizations"] += 1
            else:
                lu = entry[0]
            layout_solve = st.layout.solve
            yk = y_pred
            d = torch.zeros_like(y_pred)
            dn_old = None
            converged = False
            for it in range(iters):
                f = term(t1, yk).reshape(1, -1)
                dy = layout_solve(lu, c * f - psi - d)
                stats["newton_iters"] += 1
                stats["linear_solves"] += 1
                total += 1
                dn = self.rms(dy, scale)
                if not math.isfinite(dn):
                    break
                rate = None if dn_old is None else (dn / dn_old if dn_old > 0 else 0.0)
                if rate is not None and (rate >= 1.0 or
                                         (floor is None and rate ** (iters - it) / (1.0 - rate) * dn > tol)):
                    converged = floor is not None and dn <= floor  # a replay stalled within the forward's test
                    break
                yk = yk + dy
                d = d + dy
                if dn == 0.0 or (rate is not None and rate / (1.0 - rate) * dn < tol):
                    converged = True
                    break
                dn_old = dn
            else:
                converged = floor is not None and dn <= floor
            if converged:
                return yk, d, it + 1, lu
            if fresh and (floor is None or rescued or not bool(torch.isfinite(yk).all())):
                return None, None, total, lu
            if fresh:  # a replay cannot shrink the step: once more with J where Newton got stuck
                rescued = True
                st.J = self._jac_source._jacobian(term, t1, yk, st)
                st.lus.clear()
                continue
            # Failed with an old Jacobian: recompute it at the prediction and try once more.
            st.J = self._jac_source._jacobian(term, t1, y_pred, st)
            st.lus.clear()
            fresh = True

    # -- dense output ----------------------------------------------------------------------------------------
    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: None = None, interp: str = "auto") -> Tensor:
        """The step's BDF interpolating polynomial (``"auto"``), or cubic Hermite / linear output, at fractions
        ``thetas`` (``(m,)``) of the step; returns ``(m, n)``."""
        if interp != "auto":
            return self._hermite(term, st, thetas, interp)
        k = st.k.shape[0] - 3
        D = st.k[1:k + 2]  # (k + 1, n): differences at the step's spacing, D[0] = y1
        th = thetas.reshape(-1, 1).to(torch.float64)
        j = torch.arange(k, dtype=torch.float64, device=th.device)
        p = torch.cumprod((th - 1.0 + j) / (j + 1.0), dim=1).to(D.dtype)  # (m, k)
        return torch.addmm(D[0:1], p, D[1:])


def make_bdf(name: str = "bdf") -> BDF:
    """A fresh :class:`BDF` stepper (own history, Jacobian and counters) for ``method="bdf"``."""
    if name != "bdf":
        raise InputError(f"unknown BDF method {name!r}.")
    return BDF()


__all__ = ["BDF", "make_bdf"]
