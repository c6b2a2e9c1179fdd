"""Symplectic integrators for separable Hamiltonian systems: ``leapfrog``, ``yoshida4``, ``semi_implicit_euler``.

State convention
----------------
For a Hamiltonian ``H(q, p) = T(p) + V(q)`` with ``d`` degrees of freedom, the state's **last dimension**
holds the two halves ``[q, p]``: ``y`` has shape ``(..., 2d)`` with ``q = y[..., :d]`` and ``p = y[..., d:]``
(any leading batch dimensions). The vector field is the usual one,

    func(t, y) = [dq/dt, dp/dt] = [dH/dp, -dH/dq]          (shape (..., 2d)),

so for a separable ``H`` the ``q``-half of ``func`` depends on ``p`` only and the ``p``-half on ``q`` only.
The steppers alternate *kicks* (``p += a h dp/dt(q)``) and *drifts* (``q += b h dq/dt(p)``); each kick or
drift needs one half of ``func``, and they take it from one call of ``func`` on the full current state.

Cost: with a whole field ``func``, every stage evaluation computes both halves and uses one (the other half is
wasted), so a step costs ``2m`` calls of ``func`` for ``m`` drifts -- ``leapfrog`` 2, ``semi_implicit_euler`` 2,
``yoshida4`` 6. Given the halves separately, as a :class:`neurodyn.SplitTerm` ``(dq_dt(t, p), dp_dt(t, q))``,
each drift calls ``dq_dt`` once and each kick ``dp_dt`` once: ``m`` calls of each half per step, nothing wasted
(same trajectory, to rounding). ``func`` must really be separable in this sense: for a non-separable ``H`` these
are no longer symplectic (they fall to first order).

Terms: ``ode`` (a whole field) and ``split`` (a :class:`~neurodyn.core.term.SplitTerm`); a controlled term is not
a Hamiltonian ``[q, p]`` system and is rejected.

Methods (fixed step; pass ``step_size``, else they step on the output grid like every fixed-step method):

=======================  =====  =================================================  ===============
name                     order  scheme                                             func calls/step
=======================  =====  =================================================  ===============
``semi_implicit_euler``  1      kick ``h`` then drift ``h`` (symplectic Euler)     2
``leapfrog``             2      velocity Verlet: kick ``h/2``, drift ``h``,        2
                                kick ``h/2``
``yoshida4``             4      Yoshida's triple-jump composition of three         6
                                leapfrog steps ``w1 h, w0 h, w1 h``
=======================  =====  =================================================  ===============

with ``w1 = 1 / (2 - 2^(1/3))`` and ``w0 = -2^(1/3) w1`` (Yoshida 1990). Consecutive half-kicks are
merged, and the kick at the end of a step reuses the ``dp/dt`` computed by the last stage (FSAL), so
the numbers above are per step in the steady state. All three conserve a modified energy: the energy
error stays bounded (no secular drift) over very long times, where non-symplectic methods of the same
cost (``rk4``, ``dopri5``) drift.

Time-dependent separable fields are allowed (``dq/dt = F(p, t)``, ``dp/dt = G(q, t)``); a drift is evaluated
at its midpoint time and a kick at the time its ``q`` has reached (``yoshida4``'s inner stages lie
outside ``[t, t + h]``, as the negative weight ``w0`` steps backwards).

Dense output is cubic Hermite on the true end derivatives. ``leapfrog`` and ``yoshida4`` (and every scheme given
the halves) carry ``[dq/dt at the last half-kick momentum, dp/dt at the new q]`` from one step to the next (all
the next kick needs) rather than ``func(t1, y1)``, so output times strictly inside a step cost two extra calls of
``func`` (at the step ends); times on the step grid cost nothing.

Examples
--------
A pendulum, ``H = p^2 / 2 - cos q`` (state ``[q, p]``):

>>> import torch, neurodyn
>>> f = lambda t, y: torch.cat([y[..., 1:], -torch.sin(y[..., :1])], -1)
>>> y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
>>> t = torch.linspace(0, 100, 11, dtype=torch.float64)
>>> sol = neurodyn.solve(f, y0, t, method="yoshida4", step_size=0.05)
>>> H = lambda y: 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])
>>> bool((H(sol.ys) - H(y0)).abs().max() < 1e-6)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.interpolation import hermite, linear
from ..core.stepper import Step, StepperBase
from ..core.term import split_halves
from ..errors import InputError
from .explicit_rk import Term


@dataclass(frozen=True)
class SymplecticScheme:
    """A kick--drift composition ``K(a_0) D(b_0) K(a_1) D(b_1) ... D(b_{m-1}) K(a_m)`` as data.

    ``K(a)``: ``p += a h dp/dt(q)``; ``D(b)``: ``q += b h dq/dt(p)``; ``sum(a) == sum(b) == 1``.
    """

    name: str
    order: int
    kicks: tuple[float, ...]  # m + 1 coefficients
    drifts: tuple[float, ...]  # m coefficients


_W1 = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
_W0 = -(2.0 ** (1.0 / 3.0)) * _W1

SCHEMES: dict[str, SymplecticScheme] = {
    "semi_implicit_euler": SymplecticScheme("semi_implicit_euler", 1, (1.0, 0.0), (1.0,)),
    "leapfrog": SymplecticScheme("leapfrog", 2, (0.5, 0.5), (1.0,)),
    "yoshida4": SymplecticScheme("yoshida4", 4, (0.5 * _W1, 0.5 * (_W1 + _W0), 0.5 * (_W0 + _W1), 0.5 * _W1),
                                 (_W1, _W0, _W1)),
}
"""The symplectic schemes by method name: ``semi_implicit_euler``, ``leapfrog``, ``yoshida4``."""


@dataclass
class _Coefficients:
    kicks: tuple[float, ...]
    drifts: tuple[float, ...]
    kick_times: tuple[float, ...]  # fractions of h at which kick i's dp/dt is evaluated
    drift_times: tuple[float, ...]  # fractions of h at which drift i's dq/dt is evaluated


class SymplecticStepper(StepperBase):
    """Fixed-step symplectic kick--drift stepper for separable Hamiltonian fields (see the module docstring).

    Plugs into the integrate loop like :class:`~neurodyn.solvers.explicit_rk.ExplicitRungeKutta`:
    :meth:`step` returns ``(y1 (1, n), k (2m + 1, n), None)`` where ``k[0]`` is the incoming ``k1`` and
    ``k[i]`` (``i >= 1``) the full ``func`` evaluations of the stages, in order. ``k[-1]`` is passed to the
    next step as its ``k1`` (``fsal``): only its ``dp/dt``-half is used, which is exact at ``(t1, q1)``.
    """

    #: Only meaningful for [q, p] states of a separable Hamiltonian field: a solve of another system with the
    #: same stepper (an adjoint's augmented state) needs a general method instead.
    symplectic = True
    #: A whole field ``f(t, y)``, or its halves as a SplitTerm (each evaluated only where needed).
    accepts = ("ode", "split")

    def __init__(self, scheme: SymplecticScheme):
        self.scheme = scheme
        self.name = scheme.name
        self.order = scheme.order
        self.error_order = None
        self.controller_order = scheme.order
        self.adaptive = False
        self.fsal = True
        self.stages = 2 * len(scheme.drifts) + 1
        self.dense_order = 3
        self.has_own_dense = False
        # The last stage is evaluated at (q1, p1) -- func(t1, y1) exactly -- when the final kick is empty.
        self._last_stage_exact = scheme.kicks[-1] == 0.0
        kt, dt = [], []
        tau = 0.0
        for b in scheme.drifts:
            kt.append(tau)
            dt.append(tau + 0.5 * b)
            tau += b
        kt.append(1.0)
        self._co = _Coefficients(scheme.kicks, scheme.drifts, tuple(kt), tuple(dt))

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> _Coefficients:
        return self._co

    @staticmethod
    def _halves(term: Term) -> tuple[tuple[int, ...], int]:
        shape = tuple(term.shape)
        if len(shape) == 0 or shape[-1] % 2 != 0:
            raise InputError(f"symplectic methods need the state's last dimension to hold the halves [q, p] "
                             f"(an even size 2d), got state shape {shape}. (With gradient='adjoint' or "
                             f"'interpolated', pass a general adjoint_method such as 'dopri5' or 'rk4': the "
                             f"backward solve is not a Hamiltonian [q, p] system.)")
        return shape, shape[-1] // 2

    def make_buffers(self, y: Tensor, k1: Tensor) -> None:
        """No reusable stage buffers: the stages are fresh tensors every step."""
        return None

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: _Coefficients,
             t_end_nudge: float | None = None, buf: None = None) -> tuple[Tensor, Tensor, None]:
        """One step of size ``h`` from ``(t, y)``; ``y`` of shape ``(1, n)``, ``k1`` in the user's shape.

        Only the ``dp/dt``-half of ``k1`` is read (``dp/dt`` at ``q``). Returns ``(y1, k, None)``.
        """
        shape, d = self._halves(term)
        halves = split_halves(term)
        if halves is None:  # the whole field at [q, p]: each kick or drift uses one half of it
            def evaluate(tt: float, q: Tensor, p: Tensor, drift: bool) -> tuple[Tensor, Tensor]:
                e = term(tt, torch.cat([q, p], -1)).reshape(shape)
                return (e[..., :d] if drift else e[..., d:]), e
        else:  # a SplitTerm: dq/dt(t, p) for a drift, dp/dt(t, q) for a kick, each counted in term.nfe
            dq_dt, dp_dt = halves

            def evaluate(tt: float, q: Tensor, p: Tensor, drift: bool) -> tuple[Tensor, None]:
                term.nfe += 1
                ts = torch.scalar_tensor(tt, dtype=term.t_dtype, device=term.device)
                return (dq_dt(ts, p) if drift else dp_dt(ts, q)), None

        yv = y.view(shape)
        q, p = yv[..., :d], yv[..., d:]
        k1v = k1.reshape(shape)
        fq, fp = k1v[..., :d], k1v[..., d:]
        # Row i of k: the field as last evaluated by stage i ([dq/dt, dp/dt] as last known, with halves).
        evals = [k1.reshape(1, -1)]
        m = len(co.drifts)
        for i in range(m):
            a = co.kicks[i]
            if a != 0.0:
                p = p + (a * h) * fp
            fq, e = evaluate(t + co.drift_times[i] * h, q, p, True)
            evals.append((e if e is not None else torch.cat([fq, fp], -1)).reshape(1, -1))
            q = q + (co.drifts[i] * h) * fq
            tk = t + co.kick_times[i + 1] * h
            if i == m - 1:
                tk = t + h if t_end_nudge is None else t_end_nudge
            fp, e = evaluate(tk, q, p, False)
            evals.append((e if e is not None else torch.cat([fq, fp], -1)).reshape(1, -1))
        a = co.kicks[m]
        if a != 0.0:
            p = p + (a * h) * fp
        y1 = torch.cat([q, p], -1).reshape(1, -1)
        return y1, torch.cat(evals, 0), None

    # -- dense output ----------------------------------------------------------------------------
    def _exact_ends(self, term: Term) -> bool:
        """Whether ``k[0]`` / ``k[-1]`` are the full dy/dt at the step ends (whole fields with an empty last kick;
        with halves the dq/dt entry was evaluated at a drift's midpoint time)."""
        return self._last_stage_exact and split_halves(term) is None

    def _start_derivative(self, term: Term, st: Step) -> Tensor:
        """dy/dt at the start of the step, shape ``(n,)`` (re-evaluated where ``k[0]`` is not exact)."""
        if self._exact_ends(term):
            return st.k[0]
        if st.k_full is None:
            st.k_full = term(st.t0, st.y0).reshape(-1)
        return st.k_full

    def end_derivative(self, term: Term, st: Step) -> Tensor:
        """dy/dt at the end of an accepted step, shape ``(n,)`` (one ``func`` call unless exact already)."""
        if st.f1 is None:
            st.f1 = st.k[-1] if self._exact_ends(term) else term(st.t0 + st.h, st.y1).reshape(-1)
        return st.f1

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: _Coefficients,
                    interp: str = "auto") -> Tensor:
        """Cubic Hermite (``"auto"``/``"hermite"``) or linear output at fractions ``thetas`` (``(m,)``) of the
        step; returns ``(m, n)``."""
        th = thetas.view(thetas.shape[0], 1).to(st.y0.dtype)
        if interp == "linear":
            return linear(th, st.y0, st.y1)
        f0 = self._start_derivative(term, st).reshape(-1)
        return hermite(th, st.y0, st.y1, f0, self.end_derivative(term, st).reshape(-1), st.h)


    def interpolate_floats(self, term: Term, st: Step, thetas: list[float], co: _Coefficients,
                           interp: str = "auto") -> Tensor:
        """:meth:`interpolate` at plain-float fractions (what the loop's output times use)."""
        th = torch.tensor(thetas, dtype=torch.float64, device=st.y0.device)
        return self.interpolate(term, st, th, co, interp)


def make_symplectic(name: str) -> SymplecticStepper:
    """The stepper for one of ``SCHEMES`` (``"leapfrog"``, ``"yoshida4"``, ``"semi_implicit_euler"``)."""
    return SymplecticStepper(SCHEMES[name])


__all__ = ["SCHEMES", "SymplecticScheme", "SymplecticStepper", "make_symplectic"]
