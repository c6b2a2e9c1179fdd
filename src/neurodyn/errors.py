"""One exception hierarchy for neurodyn.

Every message says what went wrong, where (the time reached, for solve failures) and what to try.
"""

from __future__ import annotations

from typing import Any


class NeurodynError(Exception):
    """Base class of every error neurodyn raises on purpose."""


class InputError(NeurodynError, ValueError):
    """Bad input detected before any work is done (shapes, dtypes, devices, times, options)."""


class InputTypeError(InputError, TypeError):
    """Bad input of the wrong type (e.g. ``progress="yes"``), detected before any work; an :class:`InputError` and a
    ``TypeError``."""


class SolveFailure(NeurodynError, RuntimeError):
    """The integration stopped before the final time.

    Attributes
    ----------
    status : str
        One of ``"max_steps_reached"``, ``"step_size_underflow"``, ``"non_finite"``, ``"zeno"``.
    t : float
        The time reached (the last accepted step).
    solution : Solution
        Everything computed up to the failure: outputs before ``t`` are valid, later rows are NaN.
    """

    def __init__(self, message: str, *, status: str, t: float, solution: Any = None):
        super().__init__(message)
        self.status = status
        self.t = t
        self.solution = solution


class MaxStepsReached(SolveFailure):
    """The step budget (``max_steps``) ran out before the final time."""


class StepSizeUnderflow(SolveFailure):
    """The step size fell below ``min_step`` or below the floating-point resolution of t."""


class NonFiniteError(SolveFailure):
    """NaN or inf appeared in the state or its derivative."""


class ZenoError(SolveFailure):
    """Events accumulated (status ``"zeno"``): more than ``max_events`` occurrences, or two closer in time than
    ``min_event_gap`` (a bouncing ball coming to rest, a chattering switch)."""


class NoEventError(NeurodynError, RuntimeError):
    """:func:`neurodyn.odeint_event` (or ``odeint(..., event_fn=...)``) stopped searching before ``event_fn``
    crossed zero: ``t_max`` was reached, or the step budget (``options={"max_num_steps": ...}``) ran out.

    Attributes
    ----------
    status : str
        ``"success"`` (the search reached ``t_max``) or ``"max_steps_reached"``.
    t : float
        The time the search reached.
    solution : Solution
        The solve that searched (its ``t_final``, ``y_final``, ``stats``).
    """

    def __init__(self, message: str, *, status: str, t: float, solution: Any = None):
        super().__init__(message)
        self.status = status
        self.t = t
        self.solution = solution


class PrecisionWarning(UserWarning):
    """A tolerance was raised to what the state's dtype resolves (see :func:`neurodyn.options.clamp_rtol`)."""
