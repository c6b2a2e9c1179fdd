"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .neural_ode import NeuralODE

__all__ = ["AugmentedNeuralODE", "NeuralODE"]
