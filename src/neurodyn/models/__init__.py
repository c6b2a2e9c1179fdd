"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .baselines import GRUD, GRUBaseline
from .latent_ode import LatentODE
from .neural_cde import CDEField, NeuralCDE
from .neural_ode import NeuralODE
from .odernn import ODERNN, GatedMLPUpdate, GRUUpdate, LSTMUpdate
from .physics import HNN, LNN, DerivativeMLP
from .shooting import MultipleShooting, penalty_schedule
from .ssm import DiagonalSSM, linear_scan

__all__ = ["GRUD", "HNN", "LNN", "AugmentedNeuralODE", "CDEField", "DerivativeMLP", "DiagonalSSM", "GRUBaseline",
           "GRUUpdate", "GatedMLPUpdate", "LSTMUpdate", "LatentODE", "MultipleShooting", "NeuralCDE", "NeuralODE",
           "ODERNN", "linear_scan", "penalty_schedule"]
