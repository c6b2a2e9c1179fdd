"""neurodyn: neural differential equations in PyTorch.

Solvers, gradient methods and models for Neural ODEs, with a torchdiffeq drop-in API::

    import neurodyn
    sol = neurodyn.solve(func, y0, t, method="tsit5", rtol=1e-6, atol=1e-8)
    ys = neurodyn.odeint(func, y0, t)            # exactly torchdiffeq's odeint

The public names are loaded on first use (``neurodyn.solve`` imports torch and the engine then), so that
``import neurodyn`` and the ``neurodyn --help`` command line stay fast. A new public name goes into
``_EXPORTS`` (name -> defining module), the ``TYPE_CHECKING`` imports (for type checkers) and ``__all__``;
tests/test_packaging.py checks the three agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
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

# public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "jacobian_spectrum": ".analysis",
    "lipschitz_estimate": ".analysis",
    "reversibility": ".analysis",
    "spectral_radius": ".analysis",
    "stiffness_ratio": ".analysis",
    "cdeint": ".compat.torchcde",
    "odeint": ".compat.torchdiffeq",
    "odeint_adjoint": ".compat.torchdiffeq",
    "odeint_dense": ".compat.torchdiffeq",
    "odeint_event": ".compat.torchdiffeq",
    "sdeint": ".compat.torchsde",
    "sdeint_adjoint": ".compat.torchsde",
    "PIDController": ".core.control",
    "Event": ".core.events",
    "ControlTerm": ".core.term",
    "MultiTerm": ".core.term",
    "ODETerm": ".core.term",
    "SDETerm": ".core.term",
    "SplitTerm": ".core.term",
    "Term": ".core.term",
    "sde_term": ".core.term",
    "InputError": ".errors",
    "MaxStepsReached": ".errors",
    "NeurodynError": ".errors",
    "NoEventError": ".errors",
    "NonFiniteError": ".errors",
    "PrecisionWarning": ".errors",
    "SolveFailure": ".errors",
    "StepSizeUnderflow": ".errors",
    "ZenoError": ".errors",
    "CNF": ".models",
    "GRUD": ".models",
    "HNN": ".models",
    "LNN": ".models",
    "ODERNN": ".models",
    "AugmentedNeuralODE": ".models",
    "DerivativeMLP": ".models",
    "DiagonalSSM": ".models",
    "GRUBaseline": ".models",
    "LatentODE": ".models",
    "LatentSDE": ".models",
    "MultipleShooting": ".models",
    "NeuralCDE": ".models",
    "NeuralODE": ".models",
    "NeuralSDE": ".models",
    "BrownianIncrement": ".paths",
    "BrownianInterval": ".paths",
    "BrownianPath": ".paths",
    "BrownianTree": ".paths",
    "CubicPath": ".paths",
    "LinearPath": ".paths",
    "ReverseBrownian": ".paths",
    "RegularizedField": ".regularizers",
    "regularized_solve": ".regularizers",
    "steer_time": ".regularizers",
    "Events": ".solution",
    "Solution": ".solution",
    "solve": ".solve",
    "available_methods": ".solvers",
    "Trainer": ".training",
    "seed_everything": ".training",
    # issue 17 (part 4): progress meters and manual stepping
    "InputTypeError": ".errors",
    "SolveProgress": ".progress",
    "SolveState": ".stepping",
    "init": ".stepping",
    "step": ".stepping",
}

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


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule, ``neurodyn.viz``) on first access."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule sets it as an attribute of the package; where a
    submodule shares its name with a public export (the module ``neurodyn.solve`` and the function
    ``neurodyn.solve``), the export keeps the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f".{name}":
            return  # the submodule stays in sys.modules; the export is loaded by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
