"""Gradient methods: each wraps the one integrate loop; none touches a solver.

``direct`` backpropagates through the solver steps; ``adjoint`` and ``interpolated`` integrate the
continuous adjoint backward; ``checkpoint`` replays the forward steps from checkpoints for the exact
discrete gradient with bounded memory.

Second derivatives (``create_graph=True``): ``direct`` gives exact ones with every method family (explicit,
implicit Runge--Kutta, BDF); the others compute their gradient outside autograd and raise a clear error when it is
differentiated again. Tensors requiring grad that the field uses but ``params`` lacks are refused (checked at the
first time and in every backward evaluation of the field); a field's own tensors (``t.requires_grad_()`` inside the
call, FFJORD-style) are not parameters and pass.
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
