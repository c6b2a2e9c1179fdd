"""One exception hierarchy for neurodyn.

Every message says what went wrong, where (the time reached, for solve failures) and what to try.
"""

from __future__ import annotations

from typing import Any


class NeurodynError(Exception):
    """Base class of every error neurodyn raises on purpose."""


class InputError(NeurodynError, ValueError):
    """Bad input detected before any work is done (shapes, dtypes, devices, times, options)."""


class SolveFailure(NeurodynError, RuntimeError):
    """The integration stopped before the final time.

    Attributes
    ----------
    status : str
        One of ``"max_steps_reached"``, ``"step_size_underflow"``, ``"non_finite"``.
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
