"""The stepper contract: what the loop may ask of a method, and what every method declares.

A *stepper* advances a :class:`~neurodyn.core.term.Term` by one step. The loops (:mod:`neurodyn.core.loop`,
:mod:`neurodyn.core.rows`), the gradient methods and the compiled paths use a stepper only through the
:class:`Stepper` protocol below; what a stepper can do beyond the minimum is *declared* as class attributes
(``implicit``, ``symplectic``, ``rows``, ``replay``, ...), never probed with ``hasattr``.

Rules every stepper follows
---------------------------
1. States reach :meth:`Stepper.step` flattened to shape ``(1, n)``; ``k1`` is ``dy/dt`` at the step start in the
   user's state shape. ``step`` returns ``(y1, k, err)``: the new state ``(1, n)``, the stacked stage derivatives
   ``(s, n)`` (whatever :meth:`Stepper.interpolate` needs later), and the local error estimate *divided by h*
   (``(1, n)``, ``(2, n)`` for a combined estimate, ``None`` for fixed-step methods). The loop owns the step size,
   the accept/reject decision, the error norm (:func:`neurodyn.core.control.make_error_ratio`), output times and
   statuses; a stepper never reads tolerances unless it declares ``implicit`` (Newton tolerances, via ``bind``).
2. ``step`` must not keep references to its inputs that it later mutates: a rejected attempt is retried from the
   same ``(t, y, k1)``. The buffers the loop passes (``buf``, from :meth:`Stepper.make_buffers`) alternate between
   attempts for this reason, and later solves of the same layout reuse them (:func:`neurodyn.core.loop.take_buffers`):
   ``y1`` and what ``step`` and ``interpolate`` return to be kept are fresh tensors, never views of a buffer.
3. With ``fsal`` the last row of ``k`` is ``dy/dt`` at ``(t + h, y1)``: the loop passes it on as the next ``k1``.
4. Dense output: :meth:`Stepper.interpolate` evaluates the step's continuous extension at fractions
   ``theta`` of an accepted :class:`Step` (``"auto"``: the method's own, else cubic Hermite, see
   :mod:`neurodyn.core.interpolation`). It may evaluate the term (extra stages) and caches them in the Step.
5. A stepper that carries state between steps (``multistep``) resets it in ``reset()`` and, with ``replay``,
   exposes it to checkpoint replays through ``replay_record()`` / ``replay_prepare()``
   (see :mod:`neurodyn.gradients.checkpoint`).
6. ``accepts`` lists the term kinds the stepper integrates (``"ode"``: :class:`~neurodyn.core.term.ODETerm`;
   ``"control"``: :class:`~neurodyn.core.term.ControlTerm`; ``"split"``: a separable Hamiltonian's two halves,
   :class:`~neurodyn.core.term.SplitTerm`; ``"sde"``: a ControlTerm driven by Brownian motion, see
   :mod:`neurodyn.solvers.sde`). A stepper that integrates the terms' ODE form
   (``dy/dt``, what every ``step`` receives as the bound term) accepts ``ODE_FORM_KINDS`` (the default); one that
   uses a term's structure declares what it needs. :func:`~neurodyn.core.term.check_accepts` rejects any other
   term before work (:func:`neurodyn.solve` calls it).

A new explicit Runge--Kutta method is a new tableau (:mod:`neurodyn.solvers.tableaus`), not a new stepper.
A new family (SDE steppers, say) implements this protocol and needs no change to the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .term import ODE_FORM_KINDS


@dataclass
class Step:
    """One accepted step: what dense output needs, with the pieces it may compute lazily.

    ``f1`` is dy/dt at the end of the step (free for FSAL methods); ``k_full`` holds the main stages
    followed by any extra dense-output stages (computed on first use).
    """

    t0: float
    h: float
    y0: Tensor  # (1, n)
    y1: Tensor  # (1, n)
    k: Tensor  # (s, n)
    f1: Tensor | None = None  # (n,) or the user's shape (same elements)
    k_full: Tensor | None = None


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16}


def nextafter(t: float, direction: float, dtype: torch.dtype | None = None) -> float:
    """The time one unit in the last place after ``t`` in ``direction`` (> 0: later), in the precision of the time
    tensor the field receives.

    ``dtype`` is that tensor's dtype (a term's ``t_dtype``; ``None``: float64). Below float64 the result is the
    next ``dtype`` number after ``t`` rounded to ``dtype`` (as torchdiffeq's ``perturb``): a float64 ulp would be
    rounded away when the time is cast to float32. The result is exactly representable in ``dtype``.

    >>> nextafter(1.0, 1.0) - 1.0 == 2.0 ** -52
    True
    >>> nextafter(1.0, -1.0, torch.float32) == 1.0 - 2.0 ** -24
    True
    """
    inf = math.inf if direction > 0 else -math.inf
    if dtype is None or dtype == torch.float64:
        return math.nextafter(t, inf)
    np_type = _NUMPY_FLOATS.get(dtype)
    if np_type is not None:
        return float(np.nextafter(np_type(t), np_type(inf)))
    x = torch.tensor(t, dtype=dtype)  # bfloat16 and other dtypes numpy lacks
    return float(torch.nextafter(x, torch.full((), inf, dtype=dtype)))


@runtime_checkable
class Stepper(Protocol):
    """The interface the loops use (see the module docstring for the rules).

    Attributes
    ----------
    name : str
        The method's name (``method=``).
    order, error_order, controller_order : int
        Order of the solution, of the error estimate (None: fixed step), and the order the step-size
        controller assumes (``error_order + 1`` is the exponent's denominator).
    adaptive, fsal : bool
        Has an error estimate; first stage of a step is the last of the previous one.
    stages : int
        Derivative evaluations per step (the loop counts NFE from it for compiled steps).
    has_own_dense : bool
        Has its own continuous extension (else cubic Hermite on the step ends).
    """

    name: str
    order: int
    error_order: int | None
    controller_order: int
    adaptive: bool
    fsal: bool
    stages: int
    has_own_dense: bool

    def coefficients(self, dtype: Any, device: Any) -> Any: ...

    def make_buffers(self, y: Tensor, k1: Tensor) -> Any: ...

    def step(self, term: Any, t: float, y: Tensor, h: float, k1: Tensor, co: Any,
             t_end_nudge: float | None = None, buf: Any = None) -> tuple[Tensor, Tensor, Tensor | None]: ...

    def interpolate(self, term: Any, st: Step, thetas: Tensor, co: Any, interp: str = "auto") -> Tensor: ...

    def interpolate_floats(self, term: Any, st: Step, thetas: list[float], co: Any,
                           interp: str = "auto") -> Tensor: ...


class StepperBase:
    """Default declarations of the optional capabilities; every stepper derives from it and overrides
    what it has.

    ``implicit``: solves stage equations (Newton); has ``bind(**options)`` returning a stepper bound to the
    tolerances and solver options, and ``stats`` (Jacobians, factorisations, Newton iterations).
    ``symplectic``: preserves a symplectic form for separable Hamiltonian fields (fixed step).
    ``multistep``: keeps a history between steps (``reset()``).
    ``replay``: ``replay_record()`` / ``replay_prepare()`` for exact checkpoint replays of its carried state.
    ``rows``: ``step_rows`` / ``interpolate_rows`` / ``dense_stages_rows`` for per-sample stepping.
    ``own_controller``: ``default_controller()`` returns the controller the method needs (``bdf``).
    ``bind_tolerances``: ``bind(**options)`` returns a per-solve stepper bound to the tolerances and solver options
    (Newton's convergence test is measured in them); the implicit Runge--Kutta methods, ``bdf`` and ``auto``.
    ``interior_error``: ``bind(dense_error=...)`` switches the error control of the continuous extension between the
    step ends on or off (a solve whose outputs all fall on step ends, like the adjoint's backward solves, needs none).
    ``compilable``: an explicit Runge--Kutta tableau the compiled paths can generate code for.
    ``driven``: fixed steps driven by inputs queried on the host (an SDE's Brownian increments), which the compiled
    driven loop (:mod:`neurodyn.compile.driven`) runs: ``step_inputs(term, t0, t1)`` (the step's inputs, tensors),
    ``driven_start(term, t, y, k1) -> (k1, carried)``, ``driven_step(term, t, y, h, k1, carried, inputs, counts=None)
    -> (y1, k or None, carried)`` (tensor code, the same formula as ``step``; ``k``: the next ``k1`` of an FSAL method)
    ``driven_finish(term, t, y, k, carried)`` and ``driven_key(user_term) -> (anchor, key)`` (the compiled code's
    cache entry: the functions a step evaluates, and a weak-referenceable object it lives as long as).
    ``accepts``: the term kinds it integrates (rule 6).
    ``gradients``: the gradient methods it supports (None: all); :func:`neurodyn.solve` refuses the others.
    ``time_gradients``: gradients with respect to the output times ``t`` (they move outputs along ``dy/dt``, which
    a term without an ODE form lacks).
    ``interpolations``: the ``interp=`` values its dense output implements.
    ``optional_error``: its error estimate costs extra work (SDE step doubling): ``fixed_step()`` returns the
    stepper for a fixed-step solve, without it.
    ``check_term(term, y0, t0, adaptive)``: raises an InputError, before any work, for a term it cannot integrate
    beyond its kind (an SDE's type, noise type, Brownian path); the default checks nothing.
    ``stage_times(t, h)``: the times at which :meth:`Stepper.step` from ``t`` by ``h`` (without ``t_end_nudge``)
    evaluates the term, as the floats it computes them, beyond ``k1`` at ``t``; None (the default) where they are not
    known before the step. A fixed-step solve then knows every evaluation time before its first step
    (:meth:`neurodyn.core.term.Term.on_grid`).
    ``quadrature_weights()``: the weights ``b`` of a step that is a weighted sum of the given ``k1`` and the term's
    evaluations inside ``step``, in order (explicit Runge--Kutta); None (the default) otherwise.
    """

    implicit: ClassVar[bool] = False
    symplectic: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    replay: ClassVar[bool] = False
    rows: ClassVar[bool] = False
    own_controller: ClassVar[bool] = False
    compilable: ClassVar[bool] = False
    driven: ClassVar[bool] = False
    bind_tolerances: ClassVar[bool] = False
    interior_error: ClassVar[bool] = False
    accepts: ClassVar[tuple[str, ...]] = ODE_FORM_KINDS
    gradients: ClassVar[tuple[str, ...] | None] = None
    time_gradients: ClassVar[bool] = True
    interpolations: ClassVar[tuple[str, ...]] = ("auto", "hermite", "linear")
    optional_error: ClassVar[bool] = False
    # Counters of the solve in progress that go into ``sol.stats`` (implicit methods: Jacobians, Newton iterations).
    stats: dict | None = None

    def make_buffers(self, y: Tensor, k1: Tensor) -> Any:
        """No reusable stage buffers (the default): the stages are fresh tensors every step."""
        return None

    def check_term(self, term: Any, y0: Tensor, t0: Tensor, adaptive: bool) -> None:
        """Raise an InputError before any work when the stepper cannot integrate ``term`` (default: no check)."""

    def stage_times(self, t: float, h: float) -> list[float] | None:
        """The times of the term's evaluations inside :meth:`Stepper.step` from ``t`` by ``h`` (``k1`` at ``t``
        excluded), computed as the step computes them; None (the default): not known before the step."""
        return None

    def quadrature_weights(self) -> tuple[float, ...] | None:
        """``(b_1, ..., b_s)`` where every step is ``y1 = y + h sum_i b_i k_i`` with ``k_1`` the ``k1`` the loop
        passes to :meth:`step` and ``k_2, ..., k_s`` the derivatives of the term's evaluations inside :meth:`step`,
        one each, in this order (an explicit Runge--Kutta method's weights ``b``); None (the default) for any other
        form. A channel whose derivative does not depend on the state can then be integrated outside the state, as
        ``h sum_i b_i`` times its values at the step's evaluations, with the values the state's own combination
        would give (the continuous adjoint's parameter gradients, :mod:`neurodyn.gradients.adjoint`)."""
        return None
