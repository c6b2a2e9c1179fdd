"""Models: thin ``nn.Module`` wrappers over :func:`neurodyn.solve`."""

from .augmented import AugmentedNeuralODE
from .baselines import GRUD, GRUBaseline
from .cnf import CNF, CNFStack, ConcatSquashLinear, ODEnet
from .diffusion import VPSDE, ScoreModel
from .latent_ode import LatentODE
from .neural_cde import CDEField, NeuralCDE
from .neural_ode import NeuralODE
from .neural_sde import DiagonalDiffusion, LatentSDE, NeuralSDE
from .odernn import ODERNN, GatedMLPUpdate, GRUUpdate, LSTMUpdate
from .physics import HNN, LNN, DerivativeMLP
from .shooting import MultipleShooting, penalty_schedule
from .ssm import DiagonalSSM, linear_scan

__all__ = ["CNF", "GRUD", "HNN", "LNN", "AugmentedNeuralODE", "CDEField", "CNFStack", "ConcatSquashLinear",
           "DerivativeMLP", "DiagonalDiffusion", "DiagonalSSM", "GRUBaseline", "GRUUpdate", "GatedMLPUpdate",
           "LSTMUpdate", "LatentODE", "LatentSDE", "MultipleShooting", "NeuralCDE", "NeuralODE", "NeuralSDE", "ODERNN",
           "ODEnet", "ScoreModel", "VPSDE", "linear_scan", "penalty_schedule"]
