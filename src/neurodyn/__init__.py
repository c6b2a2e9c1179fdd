"""neurodyn: neural differential equations in PyTorch.

Solvers, gradient methods and models for Neural ODEs, with a torchdiffeq drop-in API::

    import neurodyn
    sol = neurodyn.solve(func, y0, t, method="tsit5", rtol=1e-6, atol=1e-8)
    ys = neurodyn.odeint(func, y0, t)            # exactly torchdiffeq's odeint
"""

from .analysis import jacobian_spectrum, lipschitz_estimate, reversibility, spectral_radius, stiffness_ratio
from .compat.torchdiffeq import odeint, odeint_adjoint, odeint_dense, odeint_event
from .core.control import PIDController
from .core.term import ControlTerm, MultiTerm, ODETerm, SplitTerm, Term
from .errors import (
    InputError,
    MaxStepsReached,
    NeurodynError,
    NoEventError,
    NonFiniteError,
    PrecisionWarning,
    SolveFailure,
    StepSizeUnderflow,
)
from .models import HNN, LNN, AugmentedNeuralODE, DerivativeMLP, MultipleShooting, NeuralODE
from .paths import LinearPath
from .regularizers import RegularizedField, regularized_solve, steer_time
from .solution import Solution
from .solve import solve
from .solvers import available_methods
from .training import Trainer, seed_everything

__version__ = "0.1.0"

__all__ = [
    "AugmentedNeuralODE",
    "DerivativeMLP",
    "HNN",
    "LNN",
    "MultipleShooting",
    "ControlTerm",
    "InputError",
    "LinearPath",
    "MaxStepsReached",
    "MultiTerm",
    "NeuralODE",
    "NeurodynError",
    "NoEventError",
    "NonFiniteError",
    "ODETerm",
    "PIDController",
    "PrecisionWarning",
    "RegularizedField",
    "Solution",
    "SolveFailure",
    "SplitTerm",
    "StepSizeUnderflow",
    "Term",
    "Trainer",
    "available_methods",
    "jacobian_spectrum",
    "lipschitz_estimate",
    "odeint",
    "odeint_adjoint",
    "odeint_dense",
    "odeint_event",
    "regularized_solve",
    "reversibility",
    "seed_everything",
    "solve",
    "spectral_radius",
    "steer_time",
    "stiffness_ratio",
]
