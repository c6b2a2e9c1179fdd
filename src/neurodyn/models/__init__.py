"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .neural_ode import NeuralODE

__all__ = ["NeuralODE"]
