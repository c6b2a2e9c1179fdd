"""``AugmentedNeuralODE``: a :class:`NeuralODE` on the input padded with extra dimensions (Dupont et al., 2019).

A Neural ODE flow is a homeomorphism of its state space: trajectories cannot cross, so in the input's own
dimension some maps (the 1-d ``g(-1) = 1, g(1) = -1``; separating a disk from a ring around it in 2-d) are
out of reach, or only approximated by ever stiffer flows.  Integrating in ``in_dim + aug_dim`` dimensions
lifts that restriction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..solution import Solution
from .neural_ode import NeuralODE

AUGMENTATIONS = ("zero", "learned")


class AugmentedNeuralODE(nn.Module):
    """A Neural ODE on the input augmented with ``aug_dim`` extra dimensions, with an optional linear head.

    ``forward(x)``: ``z0 = [x, a(x)]`` (``a(x) = 0`` for ``augmentation="zero"``, a learned linear map
    ``a(x) = W x + b`` for ``"learned"``), ``z1 = NeuralODE(func)(z0)``, then ``head(z1)`` if ``out_dim``
    is given.

    Parameters
    ----------
    func : nn.Module or callable
        The vector field on the augmented state, ``f(t, z)`` or ``f(z)`` with ``z`` of shape
        ``(..., in_dim + aug_dim)``; passed to :class:`NeuralODE` unchanged.
    in_dim : int
        Size of the input's last dimension.
    aug_dim : int
        Number of extra dimensions (``>= 0``; 0 gives a plain Neural ODE, with the optional head).
    augmentation : ``"zero"`` or ``"learned"``
        How the extra dimensions start. ``"learned"``'s linear map is initialised to zero, so before
        training both variants compute the same thing.
    out_dim : int, optional
        If given, a linear head ``nn.Linear(in_dim + aug_dim, out_dim)`` is applied to the ODE's output.
    t : sequence of floats or Tensor
        Integration times, default ``(0, 1)`` (as in :class:`NeuralODE`).
    **neural_ode_kwargs :
        Any other keyword of :class:`NeuralODE` (``method``, ``rtol``, ``atol``, ``gradient``, ``output``,
        ``autonomous``, solver options).  With ``output="trajectory"`` the head is applied at every time;
        ``output="solution"`` returns the un-projected :class:`Solution` and cannot be combined with
        ``out_dim``.

    Shapes
    ------
    ``x``: ``(B, in_dim)`` (more generally ``(..., in_dim)``).  Returns ``(B, out_dim)`` with a head, else
    ``(B, in_dim + aug_dim)``; with ``output="trajectory"`` a leading ``T`` dimension is added.

    Attributes
    ----------
    ode : NeuralODE
        The wrapped Neural ODE on ``in_dim + aug_dim`` dimensions.
    augment_map : nn.Linear or None
        The learned augmentation (``"learned"`` only).
    head : nn.Linear or None
        The output projection (when ``out_dim`` is given).
    nfe_forward, nfe_backward : int
        Vector-field evaluations of the last forward solve / backward pass (see :class:`NeuralODE`).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = torch.nn.Sequential(torch.nn.Linear(7, 32), torch.nn.Tanh(), torch.nn.Linear(32, 7))
    >>> model = neurodyn.AugmentedNeuralODE(f, in_dim=2, aug_dim=5, out_dim=1, rtol=1e-3, atol=1e-4)
    >>> y = model(torch.randn(16, 2))           # (16, 1): ODE on (16, 7), then a linear head
    >>> y.shape
    torch.Size([16, 1])
    >>> y.pow(2).mean().backward()
    >>> model.nfe_forward > 0
    True
    """

    def __init__(self, func: Callable, in_dim: int, aug_dim: int, *, augmentation: str = "zero",
                 out_dim: int | None = None, t: Sequence[float] | Tensor = (0.0, 1.0), **neural_ode_kwargs: Any):
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise InputError(f"AugmentedNeuralODE: in_dim must be a positive int, got {in_dim!r}.")
        if not isinstance(aug_dim, int) or aug_dim < 0:
            raise InputError(f"AugmentedNeuralODE: aug_dim must be an int >= 0, got {aug_dim!r}.")
        if augmentation not in AUGMENTATIONS:
            raise InputError(f"AugmentedNeuralODE: augmentation must be one of {AUGMENTATIONS}, got "
                             f"{augmentation!r}.")
        if out_dim is not None and (not isinstance(out_dim, int) or out_dim < 1):
            raise InputError(f"AugmentedNeuralODE: out_dim must be a positive int or None, got {out_dim!r}.")
        if out_dim is not None and neural_ode_kwargs.get("output") == "solution":
            raise InputError("AugmentedNeuralODE: output='solution' returns the un-projected Solution; it "
                             "cannot be combined with out_dim (apply model.head yourself).")
        self.in_dim, self.aug_dim, self.augmentation, self.out_dim = in_dim, aug_dim, augmentation, out_dim
        self.ode = NeuralODE(func, t, **neural_ode_kwargs)
        self.augment_map: nn.Linear | None = None
        if augmentation == "learned" and aug_dim > 0:
            self.augment_map = nn.Linear(in_dim, aug_dim)
            nn.init.zeros_(self.augment_map.weight)
            nn.init.zeros_(self.augment_map.bias)
        self.head = nn.Linear(in_dim + aug_dim, out_dim) if out_dim is not None else None

    @property
    def func(self) -> Callable:
        """The user's vector field."""
        return self.ode.func

    @property
    def state_dim(self) -> int:
        """Dimension the ODE is solved in: ``in_dim + aug_dim``."""
        return self.in_dim + self.aug_dim

    @property
    def nfe_forward(self) -> int:
        return self.ode.nfe_forward

    @property
    def nfe_backward(self) -> int:
        return self.ode.nfe_backward

    @property
    def last_solution(self) -> Solution | None:
        return self.ode.last_solution

    def augment(self, x: Tensor) -> Tensor:
        """``(..., in_dim) -> (..., in_dim + aug_dim)``: the initial state of the ODE."""
        if not isinstance(x, Tensor):
            raise InputError(f"AugmentedNeuralODE: x must be a tensor, got {type(x).__name__}.")
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise InputError(f"AugmentedNeuralODE: x must have shape (..., {self.in_dim}), got {tuple(x.shape)}.")
        if self.aug_dim == 0:
            return x
        if self.augment_map is not None:
            extra = self.augment_map(x)
        else:
            extra = x.new_zeros(*x.shape[:-1], self.aug_dim)
        return torch.cat([x, extra], dim=-1)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor | Solution:
        """Augment ``x``, solve, project; ``t`` overrides the integration times (as in :class:`NeuralODE`)."""
        out = self.ode(self.augment(x), t)
        if self.head is not None:
            return self.head(out)
        return out

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, aug_dim={self.aug_dim}, augmentation={self.augmentation!r}, "
                f"out_dim={self.out_dim}")
