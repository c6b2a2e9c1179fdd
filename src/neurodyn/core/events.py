"""Events: watching ``event_fn`` along accepted steps, locating its first sign change, and the differentiable
event time and state.

How a root is found
-------------------
1. ``event_fn(t0, y0)`` is evaluated (and its return type checked) before the first step.
2. After every accepted step, ``event_fn`` is evaluated at the interior fractions :data:`EVENT_FRACTIONS` of the
   step and at the step end, on the step's dense output where that needs no field evaluation (``dopri5``,
   ``tsit5``, ``bdf``, ``adams``, collocation methods), else on its cubic Hermite interpolant (whose end derivative
   is the next step's first stage). Two roots closer together than a step but further apart than a quarter step
   are therefore both seen; roots closer than that may still cancel out. A step where a sign changes is checked
   again on the dense output the solve uses (``interp``: the method's own by default).
3. In the first sub-interval where some component changes sign, the root of each such component is bracketed
   and shrunk (Illinois regula falsi, with a bisection whenever an iteration fails to halve the bracket) down to
   the resolution of ``t``. The earliest wins.

The reported point is the end of the final bracket on the far side of the crossing (or an exact zero): it is a
true sign change of ``g`` to the resolution of ``t``, so a continuous ``g`` is ~0 there, and a discontinuous
``g`` (a jump, a sign-type function, a pole) gets its crossing time.

A component that is exactly zero at ``t0`` is watched from its first nonzero value on (``solve`` does not stop
at its initial time; :func:`neurodyn.odeint_event` does, as torchdiffeq).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError
from .config import LoopConfig
from .stepper import Step, Stepper
from .term import ODETerm

# Interior fractions of each accepted step where event_fn is checked, besides the step end.
EVENT_FRACTIONS = (0.25, 0.5, 0.75)
# Up to this many event components, the per-step sign logic runs on Python floats (fewer small tensor ops).
_FEW = 8
# Bracket iterations are bounded by the bisections needed to reach the resolution of t (about 2 x 53).
_MAX_ITERATIONS = 400


def event_values(event_fn: Callable, t: Tensor, y: Tensor, n: int | None = None, check_nan: bool = True) -> Tensor:
    """``event_fn(t, y)`` checked and flattened: a real tensor of ``n`` finite-or-infinite values, shape ``(n,)``.

    Parameters
    ----------
    event_fn : callable ``(t, y) -> Tensor``
    t : Tensor, 0-dim
        The time.
    y : Tensor
        The state in the user's shape.
    n : int, optional
        The number of event components seen at the initial time (None: this is the initial evaluation).
    check_nan : bool
        Raise on NaN values (one host synchronisation; a caller checking many values at once passes False).

    Returns
    -------
    Tensor, shape ``(n,)`` (the components, in the graph if ``event_fn`` built one)

    Raises
    ------
    InputError
        ``event_fn`` returned something other than a real tensor (a Python number, None, a bool or complex
        tensor), an empty tensor, a different number of components than at the initial time, or NaN.

    Examples
    --------
    >>> import torch
    >>> event_values(lambda t, y: y[0] - 0.5, torch.tensor(0.0), torch.tensor([1.0, 2.0]))
    tensor([0.5000])
    """
    v = event_fn(t, y)
    if not isinstance(v, Tensor):
        raise InputError(f"event_fn must return a tensor (one value per event component), got "
                         f"{type(v).__name__} at {_at(t)}: return a tensor built from y, e.g. `y[0] - 1.0`, not a "
                         f"Python number or None (a number carries no gradient for the event time).")
    if v.dtype == torch.bool or v.is_complex() or not (v.is_floating_point() or v.dtype.is_signed):
        raise InputError(f"event_fn must return a real tensor whose sign changes at the event, got dtype {v.dtype} "
                         f"at {_at(t)}: return e.g. `y[0] - 1.0` rather than a comparison.")
    if v.numel() == 0:
        raise InputError(f"event_fn returned an empty tensor at {_at(t)}: return at least one event value.")
    if n is not None and v.numel() != n:
        raise InputError(f"event_fn returned {v.numel()} values at {_at(t)} but {n} at the initial time: it must "
                         f"return the same number of event components at every time.")
    flat = v.reshape(-1)
    if check_nan and bool(torch.isnan(flat.detach()).any()):
        _nan_error(t, flat, initial=n is None)
    return flat


def _at(t: Tensor | float) -> str:
    return f"t={float(t):.6g}"


def _nan_error(t: Tensor | float, values: Tensor, initial: bool = False) -> None:
    where = "at the initial time " if initial else ""
    raise InputError(f"event_fn returned NaN {where}at {_at(t)} (values {values.detach().tolist()[:4]}): an event "
                     f"function must be a number everywhere along the solution; check it (e.g. a sqrt or log of a "
                     f"negative, 0/0).")


class EventWatch:
    """The sign of ``event_fn`` along the accepted steps of one solve (see the module docstring).

    ``EventWatch(term, cfg, t0, y0)`` evaluates and checks ``event_fn(t0, y0)``; :meth:`check` after each
    accepted step returns ``(step, theta, component)`` of the first root in it, or None.
    """

    def __init__(self, term: ODETerm, cfg: LoopConfig, t0: float, y0: Tensor):
        self.fn = cfg.event_fn
        self.term = term
        self.interp = cfg.interp
        # The dense output the sign checks use: ``interp``, until the method's own ("auto") turns out to evaluate
        # the field (DOP853's three extra stages); then cubic Hermite, which costs none (its end derivative is the
        # next step's first stage). A flagged step is confirmed on ``interp``.
        self.detect = cfg.interp
        with torch.no_grad():
            self.g = event_values(self.fn, self._time(t0), y0.detach().view(term.shape)).detach()
        self.n = self.g.numel()
        self._fr: Tensor | None = None  # EVENT_FRACTIONS as a tensor on the state's device

    def _time(self, t: float) -> Tensor:
        return torch.scalar_tensor(t, dtype=self.term.t_dtype, device=self.term.device)

    def _g(self, t: float, y: Tensor) -> Tensor:
        return event_values(self.fn, self._time(t), y.detach().view(self.term.shape), self.n).detach()

    def check(self, solver: Stepper, st: Step, co, t1: float) -> tuple[Step, float, int] | None:
        """The first root of any component in the accepted step ``st`` (ending at ``t1``), or None."""
        with torch.no_grad():
            nfe = self.term.nfe
            G, times = self._table(solver, st, co, t1, self.detect)
            if self.detect == "auto" and self.term.nfe > nfe:
                self.detect = "hermite"
            j = self._first_change(G, times)
            if j is not None and self.detect != self.interp:
                # Confirmed on the dense output the root is located on (the sub-point values again).
                G, times = self._table(solver, st, co, t1, self.interp)
                j = self._first_change(G, times)
            if j is None:
                self.g = G[-1]
                return None
            thetas = (0.0, *EVENT_FRACTIONS, 1.0)
            a, b = thetas[j], thetas[j + 1]
            gj, gj1 = G[j].tolist(), G[j + 1].tolist()
            comps = [c for c in range(self.n) if gj[c] != 0 and ((gj1[c] > 0) != (gj[c] > 0) or gj1[c] == 0)]
            best_theta, best_comp = math.inf, -1
            res = _resolution(st.t0, st.h)
            for comp in comps:
                theta = _crossing(lambda th, c=comp: self._g_at(solver, st, co, th)[c], a, gj[comp], b, gj1[comp],
                                  res)
                if theta < best_theta:
                    best_theta, best_comp = theta, comp
        return st, best_theta, best_comp

    def _table(self, solver: Stepper, st: Step, co, t1: float, interp: str) -> tuple[Tensor, list[float]]:
        """``event_fn`` at the step start (kept), the interior fractions on the ``interp`` dense output and the step
        end: shape ``(len(EVENT_FRACTIONS) + 2, n_components)``, and the times of rows 1 onward."""
        fr = EVENT_FRACTIONS
        if self._fr is None:
            self._fr = torch.tensor(fr, dtype=torch.float64).to(st.y0.device)
        ys = solver.interpolate(self.term, st, self._fr, co, interp)
        # The interior points and the step end as views of two tensors (no per-point tensor construction).
        states = torch.cat([ys, st.y1.detach()]).view(len(fr) + 1, *self.term.shape).unbind(0)
        times = [st.t0 + th * st.h for th in fr] + [t1]
        tts = torch.tensor(times, dtype=self.term.t_dtype).to(self.term.device).unbind(0)
        fn, n = self.fn, self.n
        G = torch.stack([self.g] + [event_values(fn, tt, yy, n, False) for tt, yy in zip(tts, states)])
        return G, times

    def _first_change(self, G: Tensor, times: list[float]) -> int | None:
        """The first sub-interval (row ``j`` to ``j + 1`` of ``G``) where a component leaves its nonzero sign."""
        k = G.shape[0] - 1
        if self.n <= _FEW:  # a few components: the sign logic on Python floats after one host sync
            rows = G.tolist()
            nan_rows = [any(v != v for v in r) for r in rows[1:]]
            per_interval = [any((q > 0) != (p > 0) or q == 0 for p, q in zip(rows[i], rows[i + 1]) if p != 0)
                            for i in range(k)]
        else:
            sg = torch.sign(G)
            changed = (sg[1:] != sg[:-1]) & (G[:-1] != 0)  # (k, n_components)
            flags = torch.cat([changed.any(dim=1), torch.isnan(G[1:]).any(dim=1)]).tolist()  # one host sync
            per_interval, nan_rows = flags[:k], flags[k:]
        if any(nan_rows):
            i = nan_rows.index(True)
            _nan_error(times[i], G[i + 1])
        return per_interval.index(True) if any(per_interval) else None

    def _g_at(self, solver: Stepper, st: Step, co, theta: float) -> Tensor:
        y = solver.interpolate_floats(self.term, st, [theta], co, self.interp)
        return self._g(st.t0 + theta * st.h, y)


def _resolution(t0: float, h: float) -> float:
    """The smallest meaningful fraction of the step ``[t0, t0 + h]``: two ulps of its times."""
    return 2.0 * math.ulp(max(abs(t0), abs(t0 + h), 1e-300)) / abs(h)


def _crossing(g: Callable[[float], Tensor], a: float, fa: float, b: float, fb: float, res: float) -> float:
    """A sign change of ``g`` in ``[a, b]`` (``fa = g(a) != 0``, ``fb = g(b)``, opposite signs or ``fb = 0``).

    Illinois regula falsi on the bracket; an iteration that fails to halve the bracket is followed by a bisection,
    so the bracket halves at least every second iteration and reaches width ``res`` whatever ``g`` is (continuous,
    jumping, or with a pole). Returns an exact zero if one is hit, else the bracket end past the crossing.
    """
    if fb == 0:
        return b
    side = 0
    bisect = False
    for _ in range(_MAX_ITERATIONS):
        if b - a <= res:
            break
        if bisect:
            m = 0.5 * (a + b)
        else:
            m = a + (b - a) * (fa / (fa - fb))
            if not (a < m < b):  # inf / nan weights, or the secant point on an end
                m = 0.5 * (a + b)
        if not (a < m < b):  # no float between the ends
            break
        fm = float(g(m))
        if fm == 0:
            return m
        width = b - a
        if (fm > 0) == (fb > 0):
            b, fb = m, fm
            if side == -1:
                fa *= 0.5
            side = -1
        else:
            a, fa = m, fm
            if side == 1:
                fb *= 0.5
            side = 1
        bisect = (b - a) > 0.5 * width
    return b


def implicit_event(event_fn: Callable, t: Tensor, y: Tensor, f: Tensor, comp: int) -> tuple[Tensor, Tensor]:
    """The event time and state at a root ``(t, y)`` of component ``comp`` of ``event_fn``, with the gradients of
    the implicit function theorem.

    With ``g(t*, y(t*)) = 0``, ``t_e = t* - (g - g.detach()) / (dg/dt)`` has the value ``t*`` and the gradient
    ``-dg/dtheta / (dg/dt)`` (``dg/dt = g_t + g_y . f``); the state is moved along ``f``. When ``t`` itself
    carries a gradient (a trajectory that starts at ``t``), ``g`` sees the state carried back along ``f``.

    Parameters
    ----------
    event_fn : callable ``(t, y) -> Tensor``
    t : Tensor, 0-dim
        The root's time (may be in the graph).
    y : Tensor
        The state there, in the user's shape, in the graph.
    f : Tensor
        ``dy/dt`` at ``(t, y)`` (same number of elements as ``y``; used detached).
    comp : int
        The component of ``event_fn`` that crossed zero.

    Returns
    -------
    (Tensor, Tensor)
        ``t_e`` (0-dim) and ``y_e`` (``y``'s shape), equal to ``(t, y)`` in value.

    Examples
    --------
    >>> import torch
    >>> c = torch.tensor(0.5, requires_grad=True)
    >>> y = torch.tensor([0.5])                     # y' = -y reaches c at t = log(1/c): here t = 0
    >>> t_e, _ = implicit_event(lambda t, y: y[0] - c, torch.tensor(0.0), y, -y, 0)
    >>> torch.autograd.grad(t_e, c)[0]              # d log(1/c) / dc = -1/c
    tensor(-2.)
    """
    f = f.detach().reshape(y.shape)
    td = t.detach()
    y_at = y - f * (t - td).to(f.dtype) if t.requires_grad else y
    g = event_values(event_fn, td, y_at)[comp]
    with torch.enable_grad():
        tg = td.clone().requires_grad_(True)
        yg = y.detach().clone().requires_grad_(True)
        gd = event_fn(tg, yg).reshape(-1)[comp]
        if gd.requires_grad:
            gt, gy = torch.autograd.grad(gd, (tg, yg), allow_unused=True)
        else:
            gt, gy = None, None
    dgdt = (gt if gt is not None else 0.0) + ((gy * f).sum() if gy is not None else 0.0)
    dgdt = torch.as_tensor(dgdt, dtype=td.dtype, device=td.device).detach()
    if float(dgdt.abs()) == 0.0 or not g.requires_grad:
        t_e = td if not t.requires_grad else t
    else:
        t_e = td - (g - g.detach()).to(td.dtype) / dgdt
    y_e = y_at + f * (t_e - td).to(f.dtype)
    return t_e, y_e


def differentiable_event(term: ODETerm, solver: Stepper, cfg: LoopConfig,
                         event: tuple[Step, float, int]) -> tuple[Tensor, Tensor]:
    """Event time (0-dim) and state ``(1, n)`` of a located root, with gradients by the implicit function theorem
    (see :func:`implicit_event`)."""
    st, theta, comp = event
    co = solver.coefficients(st.y0.dtype, st.y0.device)
    t_star = st.t0 + theta * st.h
    th = torch.tensor([theta], dtype=term.t_dtype, device=st.y0.device)
    y_star = solver.interpolate(term, st, th, co, cfg.interp)  # (1, n), in the graph
    tt = torch.scalar_tensor(t_star, dtype=term.t_dtype, device=term.device)
    f_star = term(t_star, y_star.detach()).view(term.shape)
    t_e, y_e = implicit_event(cfg.event_fn, tt, y_star.view(term.shape), f_star, comp)
    return t_e, y_e.reshape(1, -1)
