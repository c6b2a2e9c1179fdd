"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .baselines import GRUD, GRUBaseline
from .latent_ode import LatentODE
from .neural_cde import CDEField, NeuralCDE
from .neural_ode import NeuralODE
from .neural_sde import DiagonalDiffusion, LatentSDE, NeuralSDE
from .odernn import ODERNN, GatedMLPUpdate, GRUUpdate, LSTMUpdate
from .ssm import DiagonalSSM, linear_scan

__all__ = ["GRUD", "AugmentedNeuralODE", "CDEField", "DiagonalDiffusion", "DiagonalSSM", "GRUBaseline", "GRUUpdate",
           "GatedMLPUpdate", "LSTMUpdate", "LatentODE", "LatentSDE", "NeuralCDE", "NeuralODE", "NeuralSDE", "ODERNN",
           "linear_scan"]
