"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .baselines import GRUD, GRUBaseline
from .cnf import CNF, CNFStack, ConcatSquashLinear, ODEnet
from .latent_ode import LatentODE
from .neural_cde import CDEField, NeuralCDE
from .neural_ode import NeuralODE
from .odernn import ODERNN, GatedMLPUpdate, GRUUpdate, LSTMUpdate
from .ssm import DiagonalSSM, linear_scan

__all__ = ["CNF", "GRUD", "AugmentedNeuralODE", "CNFStack", "ConcatSquashLinear", "ODEnet", "CDEField", "DiagonalSSM", "GRUBaseline", "GRUUpdate", "GatedMLPUpdate",
           "LSTMUpdate", "LatentODE", "NeuralCDE", "NeuralODE", "ODERNN", "linear_scan"]
