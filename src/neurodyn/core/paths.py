"""The control-path protocol: what a :class:`~neurodyn.core.term.ControlTerm` asks of its path ``X``.

A path is a function of time with values of shape ``(..., channels)`` (any batch dimensions in front). The
engine needs four things from it:

``evaluate(t)``
    ``X(t)``, shape ``(..., channels)``.
``derivative(t)``
    ``dX/dt(t)``, shape ``(..., channels)`` (the control's ODE form ``f(t, y) @ dX/dt`` integrates with any ODE
    method). Where the derivative jumps (a knot of a piecewise-linear path) it returns the one-sided value of the
    piece that *starts* at ``t`` (the last piece at the final knot); the loop never evaluates exactly on an
    interior knot otherwise: it lands on the knots and evaluates just past them, in the direction of travel.
``increment(s, t)``
    ``X(t) - X(s)``, shape ``(..., channels)`` (the control of one step, ``contr``).
``knots``
    The times where the path is not smooth, a tuple of floats: the solve steps exactly onto them. They join its
    ``jump_t`` (re-evaluated just past them), unless the path sets ``smooth = True``: then ``dX/dt`` is continuous
    there (a cubic spline, only a higher derivative jumps) and they join ``step_t`` (landed on, the last evaluation
    kept). A path may give ``()`` (nothing landed on; torchcde's default).
``grad_tensors()``
    The path's tensors that need gradients (its data), for the adjoint and checkpoint gradients.

Concrete paths: :class:`neurodyn.paths.LinearPath` (piecewise-linear interpolation of data),
:class:`neurodyn.paths.CubicPath` (natural cubic splines, cubic Hermite with backward differences; ``smooth``);
:class:`neurodyn.paths.BrownianInterval` and its relatives (Brownian motion: ``derivative`` raises, SDE steppers use
``increment`` and ``levy``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Path(Protocol):
    """A control path ``X(t)`` with values of shape ``(..., channels)`` (see the module docstring)."""

    knots: tuple[float, ...]

    def evaluate(self, t: Tensor | float) -> Tensor: ...

    def derivative(self, t: Tensor | float) -> Tensor: ...

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor: ...

    def grad_tensors(self) -> list[Tensor]: ...
