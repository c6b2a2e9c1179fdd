"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .neural_cde import CDEField, NeuralCDE
from .neural_ode import NeuralODE

__all__ = ["AugmentedNeuralODE", "CDEField", "NeuralCDE", "NeuralODE"]
