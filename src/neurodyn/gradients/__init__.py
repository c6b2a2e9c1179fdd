"""Gradient methods: each wraps the one integrate loop; none touches a solver.

``direct`` backpropagates through the solver steps; ``adjoint`` and ``interpolated`` integrate the
continuous adjoint backward; ``checkpoint`` replays the forward steps from checkpoints for the exact
discrete gradient with bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable

from .adjoint import solve_adjoint, solve_interpolated
from .checkpoint import solve_checkpoint
from .common import GradientOptions, check_hidden_tensors, find_params
from .direct import solve_direct

GRADIENTS: dict[str, Callable] = {
    "direct": solve_direct,
    "adjoint": solve_adjoint,
    "checkpoint": solve_checkpoint,
    "interpolated": solve_interpolated,
}

__all__ = ["GRADIENTS", "GradientOptions", "check_hidden_tensors", "find_params"]
