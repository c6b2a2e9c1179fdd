"""``method="auto"``: explicit while the problem is not stiff, implicit where stiffness limits the step.

:class:`AutoSwitch` is one stepper made of two: a non-stiff explicit Runge--Kutta method (``tsit5``) and a stiff
implicit one (``kvaerno5``, or ``radau``). It starts explicit and, after every accepted step, asks which one
should take the next:

* Explicit -> implicit. Hairer's stiffness detection (DOPRI5, Hairer & Wanner II, IV.2): two stages at the same
  abscissa (``tsit5``'s last two, both at ``c = 1``) give the dominant eigenvalue magnitude of ``J = df/dy``
  for free, ``rho ~ |k_j - k_i| / |Y_j - Y_i|``. A step counts as stiff when ``|h| rho`` exceeds
  ``stiff_threshold`` (0.9) times the explicit method's stability boundary on the negative real axis (``beta``,
  3.51 for ``tsit5``, computed from the tableau) -- stability, not accuracy, limits the step -- or when the
  solution changes ``stiff_ratio`` (1000) times slower than that eigenvalue, ``rho > stiff_ratio sigma`` with
  ``sigma = |f(t1, y1) - f(t0, y0)| / (|h| |f(t0, y0)|)`` (and ``|h| rho > 0.01 beta``): at tight tolerances the
  explicit steps are then held far below ``beta / rho`` by the errors of the fast components, a small fraction of
  what the solution's own time scale allows (Robertson at rtol 1e-9: ``|h| rho ~ 0.05 beta``, ``rho / sigma``
  1e3 to 6e3, and tsit5 would take 11000 steps to t = 15). Non-stiff problems have ``rho / sigma`` of 1 to 15
  (DETEST, MLP fields), a few hundred at most while an MLP field settles onto a stable equilibrium. After
  ``stiff_steps`` (10) such accepted steps -- a run that ends only after 3 steps in a row that are not -- switch.
* Implicit -> explicit. After every accepted implicit step, ``rho`` is re-estimated at the step's end by one
  power-iteration step on ``J`` (a forward-difference Jacobian-vector product, warm-started from the previous
  direction: 2 extra evaluations of ``f``, counted in ``nfe``). When ``|h| rho`` stays below
  ``nonstiff_threshold`` (0.5) ``beta`` and ``rho`` below ``stiff_ratio sigma`` for ``nonstiff_steps`` (5)
  accepted steps in a row, the explicit method would be stable well inside its region at the current step size,
  and no fast scale is left to make it inefficient: switch back.

Every step record knows which method produced it (its stacked stages carry the index), so dense output, event
location and the interpolated adjoint use the right method; a replayed step (``gradient="checkpoint"``) runs the
method the forward solve used at that ``(t, h)``. For the loop the stepper is FSAL: the last row of every step's
stages is dy/dt at the step's end (the implicit method's own last stage for a stiffly accurate DIRK, else an
evaluation of ``f`` appended to its stages).

``sol.stats`` gets the implicit method's counters (``jacobian_evals``, ``newton_iters``, ...), ``"switches"``
(a list of ``(t, from, to)``: from ``t`` on the method ``to`` stepped) and ``"steps_per_method"`` (accepted steps
of each method; the last attempt of a failed solve counts when its state is finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.stepper import Step, StepperBase
from ..core.tensors import ordinary_tensors
from ..errors import InputError
from .explicit_rk import ExplicitRungeKutta, StageBuffers, Term
from .implicit_rk import ImplicitRungeKutta, new_stats
from .implicit_tableaus import IMPLICIT_TABLEAUS
from .tableaus import TABLEAUS, ButcherTableau

_TAG = "_neurodyn_auto_method"  # attribute of a step's stacked stages: the index of the method that made it
_IMPLICIT_OPTIONS = ("jac", "newton_tol", "max_newton_iter", "jac_rate", "refactor_ratio", "dense_error")
_STIFF_METHODS = ("kvaerno5", "kvaerno4", "kvaerno3", "radau")


def stability_boundary(tableau: ButcherTableau) -> float:
    """Where the stability region of an explicit RK method ends on the negative real axis: the largest ``x`` with
    ``|R(-x')| <= 1`` for all ``0 <= x' <= x`` (3.3066 for ``dopri5``, 3.5069 for ``tsit5``).

    Examples
    --------
    >>> from neurodyn.solvers.tableaus import TABLEAUS
    >>> round(stability_boundary(TABLEAUS["dopri5"]), 3)
    3.307
    """
    s = tableau.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        a[i, :len(row)] = [float(v) for v in row]
    b = np.array([float(v) for v in tableau.b])
    # R(z) = 1 + z b^T (I - z A)^{-1} 1 is a polynomial (A is nilpotent): its coefficients b^T A^(m-1) 1.
    coeffs, v = [1.0], np.ones(s)
    for _ in range(s):
        coeffs.append(float(b @ v))
        v = a @ v
    xs = np.linspace(0.0, 4.0 * s, 40001)
    r = np.abs(np.polynomial.polynomial.polyval(-xs, coeffs))
    bad = np.nonzero(r > 1.0 + 1e-12)[0]
    if bad.size == 0:
        return float(xs[-1])
    lo, hi = xs[bad[0] - 1], xs[bad[0]]
    for _ in range(60):  # bisection to full precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if abs(np.polynomial.polynomial.polyval(-mid, coeffs)) <= 1.0 else (lo, mid)
    return float(lo)


def _same_abscissa_pair(tableau: ButcherTableau) -> tuple[int, int] | None:
    """The last two stages ``(i, j)``, ``i < j``, at the same abscissa ``c`` (Hairer's stiffness estimate)."""
    c = [float(x) for x in tableau.c]
    for j in range(len(c) - 1, 0, -1):
        for i in range(j - 1, -1, -1):
            if c[i] == c[j]:
                return i, j
    return None


@dataclass
class _AutoState:
    """Switching state of one solve (the stepper follows the term of the solve in progress)."""

    term: Any
    current: int = 0  # index into (explicit, implicit) of the method taking the next step
    stiff_hits: int = 0
    calm_run: int = 0
    nonstiff_run: int = 0
    methods: dict = field(default_factory=dict)  # (t, h) of every attempt -> method index (replays look it up)
    last: tuple | None = None  # (t, h, y, y1, index, (rho, sigma)) of the last attempt, until confirmed
    switches: list = field(default_factory=list)
    accepted: list = field(default_factory=lambda: [0, 0])
    direction: Tensor | None = None  # power-iteration vector (1, n)


class AutoSwitch(StepperBase):
    """Automatic stiffness detection and switching between an explicit and an implicit method (``method="auto"``).

    Plugs into the one integrate loop like any stepper; see the module docstring for the switching rules. States
    are flat ``(1, n)`` rows as for the methods it wraps.

    Parameters
    ----------
    nonstiff : str
        The explicit method (default ``"tsit5"``); it needs two stages at one abscissa (``tsit5``, ``dopri5``,
        ``dopri8``).
    stiff : str
        The implicit method: ``"kvaerno5"`` (default), ``"radau"``, ``"kvaerno4"`` or ``"kvaerno3"``.
    rtol, atol : float or Tensor, optional
        The solve's tolerances (Newton's norm of the implicit method); ``solve`` passes its own.
    stiff_threshold, nonstiff_threshold : float
        Fractions of the explicit stability boundary ``beta``: switch to the implicit method when ``|h| rho``
        exceeds ``stiff_threshold * beta`` repeatedly, back when it stays below ``nonstiff_threshold * beta``.
    stiff_ratio : float
        Also switch to the implicit method when ``rho`` exceeds this many times the solution's own rate of change
        (see the module docstring); ``math.inf`` leaves only the stability test.
    stiff_steps, nonstiff_steps : int
        How many accepted steps must say so first (10 and 5).
    **implicit_options
        Options of the implicit method: ``jac``, ``newton_tol``, ``max_newton_iter``, ``jac_rate``,
        ``refactor_ratio`` (see :class:`~neurodyn.solvers.implicit_rk.ImplicitRungeKutta`).

    Attributes
    ----------
    stats : dict
        The implicit method's counters for the current (last) solve, ``"switches"`` (``[(t, from, to), ...]``)
        and ``"steps_per_method"`` (``{name: accepted steps}``).

    Examples
    --------
    >>> import torch, neurodyn
    >>> def vdp(t, y, mu=1000.0):
    ...     return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    >>> y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    >>> sol = neurodyn.solve(vdp, y0, torch.tensor([0.0, 100.0], dtype=torch.float64), method="auto",
    ...                      rtol=1e-6, atol=1e-8, solver_options={"stiff": "radau"})
    >>> sol.stats["switches"][0][1:]
    ('tsit5', 'radau')
    >>> sol.stats["steps_per_method"]["radau"] > 0
    True
    """

    implicit = True
    bind_tolerances = True  # solve() passes its tolerances (and solver_options) through bind()
    interior_error = True
    adaptive = True
    fsal = True  # the last row of every step's stages is dy/dt at the step's end
    name = "auto"

    def __init__(self, nonstiff: str = "tsit5", stiff: str = "kvaerno5", *, rtol: float | Tensor | None = None,
                 atol: float | Tensor | None = None, stiff_threshold: float = 0.9, nonstiff_threshold: float = 0.5,
                 stiff_ratio: float = 1000.0, stiff_steps: int = 10, nonstiff_steps: int = 5,
                 **implicit_options: Any):
        if nonstiff not in TABLEAUS or not TABLEAUS[nonstiff].adaptive:
            raise InputError(f"auto: nonstiff={nonstiff!r} is not an adaptive explicit method; use 'tsit5' or "
                             f"'dopri5'.")
        pair = _same_abscissa_pair(TABLEAUS[nonstiff])
        if pair is None:
            raise InputError(f"auto: nonstiff={nonstiff!r} has no two stages at one abscissa, which the stiffness "
                             f"estimate needs; use 'tsit5', 'dopri5' or 'dopri8'.")
        if stiff not in _STIFF_METHODS or stiff not in IMPLICIT_TABLEAUS:
            raise InputError(f"auto: stiff={stiff!r} is not supported; valid: {', '.join(_STIFF_METHODS)}.")
        unknown = sorted(set(implicit_options) - set(_IMPLICIT_OPTIONS))
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for method='auto'; valid: nonstiff, stiff, rtol, atol, "
                             f"stiff_threshold, nonstiff_threshold, stiff_ratio, stiff_steps, nonstiff_steps, "
                             f"{', '.join(_IMPLICIT_OPTIONS)}.")
        for nm, v in (("stiff_threshold", stiff_threshold), ("nonstiff_threshold", nonstiff_threshold),
                      ("stiff_ratio", stiff_ratio)):
            if not (isinstance(v, (int, float)) and 0 < v and (math.isfinite(v) or nm == "stiff_ratio")):
                raise InputError(f"auto: {nm} must be a number > 0 (finite but for stiff_ratio), got {v!r}.")
        if nonstiff_threshold >= stiff_threshold:
            raise InputError(f"auto: nonstiff_threshold ({nonstiff_threshold}) must be below stiff_threshold "
                             f"({stiff_threshold}), or the method would switch back and forth.")
        for nm, v in (("stiff_steps", stiff_steps), ("nonstiff_steps", nonstiff_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"auto: {nm} must be an integer >= 1, got {v!r}.")
        self.explicit = ExplicitRungeKutta(TABLEAUS[nonstiff])
        self.stiff = ImplicitRungeKutta(stiff, rtol=rtol, atol=atol, **implicit_options)
        self.inner = (self.explicit, self.stiff)
        self.options = {"nonstiff": nonstiff, "stiff": stiff, "rtol": rtol, "atol": atol,
                        "stiff_threshold": stiff_threshold, "nonstiff_threshold": nonstiff_threshold,
                        "stiff_ratio": stiff_ratio, "stiff_steps": stiff_steps, "nonstiff_steps": nonstiff_steps,
                        **implicit_options}
        self.stiff_threshold, self.nonstiff_threshold = float(stiff_threshold), float(nonstiff_threshold)
        self.stiff_ratio = float(stiff_ratio)
        self.stiff_steps, self.nonstiff_steps = stiff_steps, nonstiff_steps
        self.beta = stability_boundary(TABLEAUS[nonstiff])
        tb = TABLEAUS[nonstiff]
        i, j = pair
        rows = [[0.0] * tb.stages for _ in range(2)]
        for r, stage in zip(rows, (i, j)):
            for m, v in enumerate(tb.a[stage]):
                r[m] = float(v)
        self._pair = (i, j)
        self._pair_w = [rj - ri for ri, rj in zip(*rows)]  # Y_j - Y_i = h * sum_m w_m k_m
        self._estimate_weights: dict[tuple, Tensor] = {}
        # What the loop reads: the explicit method's orders (initial step, controller) and stages.
        self.order = self.explicit.order
        self.error_order = self.explicit.error_order
        self.controller_order = self.explicit.controller_order
        self.stages = self.explicit.stages
        self.dense_order = min(self.explicit.dense_order, self.stiff.dense_order)
        self.has_own_dense = False
        self._state: _AutoState | None = None

    # -- options -----------------------------------------------------------------------------------
    def bind(self, **options: Any) -> AutoSwitch:
        """A new stepper with some options replaced (any of the constructor's, e.g. ``stiff="radau"``,
        ``rtol``, ``atol``, ``jac``)."""
        kw = dict(self.options)
        kw.update(options)
        return AutoSwitch(**kw)

    def __repr__(self) -> str:
        return f"AutoSwitch(nonstiff={self.explicit.name!r}, stiff={self.stiff.name!r})"

    @property
    def stats(self) -> dict:
        """The implicit method's counters, ``"switches"`` and ``"steps_per_method"`` of the current (last) solve."""
        st = self._state
        inner = self.stiff.solve_state
        out = dict(inner.stats) if (st is not None and inner is not None and inner.term is st.term) else new_stats()
        accepted = list(st.accepted) if st is not None else [0, 0]
        if st is not None and st.last is not None and bool(torch.isfinite(st.last[3].detach()).all()):
            accepted[st.last[4]] += 1  # the solve's last attempt: accepted unless the solve failed on it
        out["switches"] = list(st.switches) if st is not None else []
        out["steps_per_method"] = {m.name: a for m, a in zip(self.inner, accepted)}
        return out

    def reset(self) -> None:
        """Forget the switching state, Jacobian and counters of the last solve."""
        self._state = None
        self.stiff.reset()

    # -- what the loop calls -------------------------------------------------------------------------
    def coefficients(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """Both methods' coefficients, ``(explicit, implicit)``."""
        return self.explicit.coefficients(dtype, device), self.stiff.coefficients(dtype, device)

    def make_buffers(self, y: Tensor, k1: Tensor) -> StageBuffers:
        """The explicit method's stage buffers (the implicit method allocates its own)."""
        return self.explicit.make_buffers(y, k1)

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: tuple,
             t_end_nudge: float | None = None, buf: StageBuffers | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Advance ``y`` (shape ``(1, n)``) from ``t`` by ``h`` with the method in charge.

        ``k1`` (the user's state shape) is dy/dt at ``(t, y)``. Returns ``(y1, k, err)`` as the inner method does
        (``k``: its stacked stages, dy/dt at the end appended for a method that is not FSAL; ``err``: the error
        estimate divided by ``h``, ``(1, n)``).
        """
        st = self._state
        if st is None or term is not st.term:
            replay = st.methods.get((t, h)) if st is not None else None
            if replay is not None:  # a recorded step replayed with another term (gradient="checkpoint")
                return self._inner_step(replay, term, t, y, h, k1, co, t_end_nudge, buf, False)[:3]
            if y.is_complex():
                raise InputError("method='auto' supports real states only (its implicit method does); use an "
                                 "explicit method for complex states.")
            st = self._state = _AutoState(term=term)
        elif st.last is not None:
            self._confirm(st, term, t, y)
        idx = st.current
        st.methods[(t, h)] = idx
        y1, k, err, est = self._inner_step(idx, term, t, y, h, k1, co, t_end_nudge, buf, True)
        st.last = (t, h, y, y1, idx, est)
        return y1, k, err

    def end_derivative(self, term: Term, st: Step) -> Tensor:
        """dy/dt at the end of an accepted step: the last row of its stages (every inner step ends with it)."""
        if st.f1 is None:
            st.f1 = st.k[-1]
        return st.f1

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: tuple, interp: str = "auto") -> Tensor:
        """The continuous extension of the method that took the step, at fractions ``thetas`` (``(m,)``) ->
        ``(m, n)``."""
        idx = self._method_of(st)
        return self.inner[idx].interpolate(term, self._inner_record(st, idx), thetas, co[idx], interp)

    def interpolate_floats(self, term: Term, st: Step, thetas: list[float], co: tuple,
                           interp: str = "auto") -> Tensor:
        """:meth:`interpolate` at plain-float fractions."""
        idx = self._method_of(st)
        return self.inner[idx].interpolate_floats(term, self._inner_record(st, idx), thetas, co[idx], interp)

    # -- internals ---------------------------------------------------------------------------------
    def _inner_step(self, idx: int, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: tuple,
                    nudge: float | None, buf: StageBuffers | None, estimate: bool):
        """One step of inner method ``idx``: ``(y1, k, err, est)`` with ``k`` tagged with ``idx``; ``est`` (when
        ``estimate``) is ``(rho, sigma)``: Hairer's eigenvalue estimate (explicit steps; None for implicit ones)
        and the solution's rate of change ``|f(t1, y1) - f(t0, y0)| / (|h| |f(t0, y0)|)``."""
        method = self.inner[idx]
        y1, k, err = method.step(term, t, y, h, k1, co[idx], nudge, buf if idx == 0 else None)
        if idx == 1 and not method.fsal:  # radau: append dy/dt at the end, the next step's first stage
            if err is None or math.isfinite(float(err.reshape(-1)[0])):
                f1 = term(nudge if nudge is not None else t + h, y1).reshape(1, -1)
            else:  # a failed Newton iteration (NaN state): nothing to evaluate
                f1 = torch.full_like(k[:1], math.nan)
            k = torch.cat([k, f1])
        setattr(k, _TAG, idx)
        return y1, k, err, (self._estimates(k, h, idx) if estimate else None)

    def _estimates(self, k: Tensor, h: float, idx: int) -> tuple[float | None, float]:
        """``(rho, sigma)`` from the stages ``k`` (one ``mm``, one host sync); ``rho`` for explicit steps only."""
        kd = k.detach()
        key = (idx, kd.shape[0], kd.dtype, kd.device)
        w = self._estimate_weights.get(key)
        if w is None:  # rows: f(t1) - f(t0), f(t0) [, k_j - k_i, (Y_j - Y_i) / h]
            s = kd.shape[0]
            rows = [[0.0] * s for _ in range(2)]
            rows[0][0], rows[0][s - 1], rows[1][0] = -1.0, 1.0, 1.0
            if idx == 0:
                i, j = self._pair
                pair = [0.0] * s
                pair[i], pair[j] = -1.0, 1.0
                rows += [pair, list(self._pair_w)]
            with ordinary_tensors():  # cached for later solves, with or without autograd
                w = torch.tensor(rows, dtype=torch.float64).to(dtype=kd.dtype, device=kd.device)
            self._estimate_weights[key] = w
        norms = torch.linalg.vector_norm(torch.mm(w, kd), dim=1).tolist()
        ah = abs(h)
        sigma = norms[0] / (ah * norms[1]) if norms[1] > 0 else math.inf
        rho = None
        if idx == 0:
            rho = norms[2] / (ah * norms[3]) if norms[3] > 0 else 0.0
            rho = rho if math.isfinite(rho) else 0.0
        return rho, (sigma if math.isfinite(sigma) else math.inf)

    def _jacobian_estimate(self, st: _AutoState, term: Term, t: float, y: Tensor) -> float:
        """``|J v|`` for the unit power-iteration vector ``v`` (forward difference at ``(t, y)``); updates ``v``."""
        with torch.no_grad():
            yd = y.detach()
            n = yd.shape[1]
            v = st.direction
            if v is None or v.shape != yd.shape:
                g = torch.Generator().manual_seed(0)
                v = torch.randn((1, n), generator=g, dtype=torch.float64).to(yd.dtype).to(yd.device)
                v = v / torch.linalg.vector_norm(v)
            f0 = term(t, yd).reshape(1, -1)
            delta = math.sqrt(torch.finfo(yd.dtype).eps) * (1.0 + float(torch.linalg.vector_norm(yd)))
            jv = (term(t, yd + delta * v).reshape(1, -1) - f0) / delta
            rho = float(torch.linalg.vector_norm(jv))
            if rho > 0 and math.isfinite(rho):
                st.direction = jv / rho
            else:
                rho = 0.0 if rho == 0 else math.inf
        return rho

    def _confirm(self, st: _AutoState, term: Term, t: float, y: Tensor) -> None:
        """At the start of a step: was the last attempt accepted? If so, count it and decide the next method."""
        lt, lh, ly, ly1, idx, (rho, sigma) = st.last
        if y is not ly1:
            if y is not ly:  # neither a retry nor the continuation: the loop restarted; forget the attempt
                st.last = None
            return
        st.last = None
        st.accepted[idx] += 1
        h_beta = abs(lh) / self.beta
        if idx == 0:
            if h_beta * rho > self.stiff_threshold or (rho > self.stiff_ratio * sigma and h_beta * rho > 0.01):
                st.stiff_hits += 1
                st.calm_run = 0
                if st.stiff_hits >= self.stiff_steps:
                    self._switch(st, t, 1)
            else:
                st.calm_run += 1
                if st.calm_run >= 3:
                    st.stiff_hits = 0
        else:
            rho = self._jacobian_estimate(st, term, t, y)
            if h_beta * rho < self.nonstiff_threshold and rho <= self.stiff_ratio * sigma:
                st.nonstiff_run += 1
                if st.nonstiff_run >= self.nonstiff_steps:
                    self._switch(st, t, 0)
            else:
                st.nonstiff_run = 0

    def _switch(self, st: _AutoState, t: float, to: int) -> None:
        st.switches.append((t, self.inner[st.current].name, self.inner[to].name))
        st.current = to
        st.stiff_hits = st.calm_run = st.nonstiff_run = 0
        if to == 1:
            self.stiff.invalidate_jacobian()  # J from an earlier stiff phase (if any) is stale

    @staticmethod
    def _method_of(st: Step) -> int:
        idx = getattr(st.k, _TAG, None)
        if idx is None:
            raise RuntimeError("method='auto': this step record was not produced by the auto stepper (its stages "
                               "carry no method index).")
        return idx

    def _inner_record(self, st: Step, idx: int) -> Step:
        """The step record as the inner method made it (without an appended end derivative)."""
        if idx == 0 or self.stiff.fsal:
            return st
        return Step(st.t0, st.h, st.y0, st.y1, st.k[:-1], f1=st.k[-1])


def make_auto(name: str = "auto") -> AutoSwitch:
    """A fresh :class:`AutoSwitch` with the default methods (``get_solver("auto")``; one per solve)."""
    return AutoSwitch()
