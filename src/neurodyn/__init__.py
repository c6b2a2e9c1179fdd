"""neurodyn: neural differential equations in PyTorch.

Solvers, gradient methods and models for Neural ODEs, with a torchdiffeq drop-in API::

    import neurodyn
    sol = neurodyn.solve(func, y0, t, method="tsit5", rtol=1e-6, atol=1e-8)
    ys = neurodyn.odeint(func, y0, t)            # exactly torchdiffeq's odeint
"""

from .compat.torchdiffeq import odeint, odeint_adjoint, odeint_event
from .control import PIDController
from .errors import (
    InputError,
    MaxStepsReached,
    NeurodynError,
    NonFiniteError,
    SolveFailure,
    StepSizeUnderflow,
)
from .models import NeuralODE
from .solution import Solution
from .solve import solve
from .solvers import available_methods

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "MaxStepsReached",
    "NeuralODE",
    "NeurodynError",
    "NonFiniteError",
    "PIDController",
    "Solution",
    "SolveFailure",
    "StepSizeUnderflow",
    "available_methods",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "solve",
]
