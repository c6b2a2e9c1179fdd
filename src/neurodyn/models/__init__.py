"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .neural_ode import NeuralODE
from .physics import HNN, LNN, DerivativeMLP
from .shooting import MultipleShooting, penalty_schedule

__all__ = ["AugmentedNeuralODE", "DerivativeMLP", "HNN", "LNN", "MultipleShooting", "NeuralODE",
           "penalty_schedule"]
