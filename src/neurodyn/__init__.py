"""neurodyn: neural differential equations in PyTorch.

Solvers, gradient methods and models for Neural ODEs, with a torchdiffeq drop-in API::

    import neurodyn
    sol = neurodyn.solve(func, y0, t, method="tsit5", rtol=1e-6, atol=1e-8)
    ys = neurodyn.odeint(func, y0, t)            # exactly torchdiffeq's odeint
"""

from . import data as data  # issue 14: irregular time series tooling (neurodyn.data)
from .analysis import jacobian_spectrum, lipschitz_estimate, reversibility, spectral_radius, stiffness_ratio
from .compat.torchcde import cdeint
from .compat.torchdiffeq import odeint, odeint_adjoint, odeint_dense, odeint_event
from .compat.torchsde import sdeint, sdeint_adjoint
from .core.control import PIDController
from .core.events import Event
from .core.term import ControlTerm, MultiTerm, ODETerm, SDETerm, SplitTerm, Term, sde_term
from .errors import (
    InputError,
    InputTypeError,
    MaxStepsReached,
    NeurodynError,
    NoEventError,
    NonFiniteError,
    PrecisionWarning,
    SolveFailure,
    StepSizeUnderflow,
    ZenoError,
)
from .models import (
    CNF,
    GRUD,
    HNN,
    LNN,
    ODERNN,
    AugmentedNeuralODE,
    DerivativeMLP,
    DiagonalSSM,
    GRUBaseline,
    LatentODE,
    LatentSDE,
    MultipleShooting,
    NeuralCDE,
    NeuralODE,
    NeuralSDE,
)
from .paths import (
    BrownianIncrement,
    BrownianInterval,
    BrownianPath,
    BrownianTree,
    CubicPath,
    LinearPath,
    ReverseBrownian,
)
from .progress import SolveProgress  # issue 17 (part 4): progress meters
from .regularizers import RegularizedField, regularized_solve, steer_time
from .solution import Events, Solution
from .solve import solve
from .solvers import available_methods
from .stepping import SolveState, init, step  # issue 17 (part 4): manual stepping
from .training import Trainer, seed_everything

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "AugmentedNeuralODE",
    "BrownianIncrement",
    "BrownianInterval",
    "BrownianPath",
    "BrownianTree",
    "ReverseBrownian",
    "DiagonalSSM",
    "GRUD",
    "GRUBaseline",
    "LatentODE",
    "LatentSDE",
    "ODERNN",
    "Event",
    "DerivativeMLP",
    "HNN",
    "LNN",
    "MultipleShooting",
    "ControlTerm",
    "Events",
    "CubicPath",
    "InputError",
    "LinearPath",
    "MaxStepsReached",
    "MultiTerm",
    "NeuralCDE",
    "NeuralODE",
    "NeuralSDE",
    "NeurodynError",
    "NoEventError",
    "NonFiniteError",
    "ODETerm",
    "PIDController",
    "PrecisionWarning",
    "RegularizedField",
    "SDETerm",
    "Solution",
    "SolveFailure",
    "SplitTerm",
    "StepSizeUnderflow",
    "Term",
    "Trainer",
    "ZenoError",
    "available_methods",
    "cdeint",
    "jacobian_spectrum",
    "lipschitz_estimate",
    "odeint",
    "odeint_adjoint",
    "odeint_dense",
    "odeint_event",
    "sdeint",
    "sdeint_adjoint",
    "regularized_solve",
    "reversibility",
    "sde_term",
    "seed_everything",
    "solve",
    "spectral_radius",
    "steer_time",
    "stiffness_ratio",
    # issue 17 (part 4): progress meters and manual stepping
    "InputTypeError",
    "SolveProgress",
    "SolveState",
    "init",
    "step",
]
