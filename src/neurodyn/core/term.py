"""Terms: what the loop integrates, and how it calls the user's vector field."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ODETerm:
    """Wraps ``func(t, y)`` for the engine: flat ``(1, n)`` states in, flat ``(n,)`` derivatives out.

    ``t`` reaches ``func`` as a 0-dim tensor of the state's real dtype on the state's device, ``y`` in
    its own shape. Counts evaluations in ``nfe``. ``inline``: steppers may call ``func`` themselves the way
    :meth:`__call__` does (same time tensor, same state view, ``nfe`` counted), saving a frame per stage.
    """

    __slots__ = ("func", "shape", "t_dtype", "device", "nfe", "flat")
    inline = True

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], shape: torch.Size,
                 t_dtype: torch.dtype, device: torch.device):
        self.func = func
        self.shape = shape
        self.t_dtype = t_dtype
        self.device = device
        self.nfe = 0
        n = shape.numel()
        self.flat = tuple(shape) == (1, n)  # the engine's (1, n) layout is already the user's shape
        self.shape = tuple(shape)

    def __call__(self, t: float, y: Tensor) -> Tensor:
        """dy/dt at ``(t, y)``; ``y`` of shape ``(1, n)``; the result has the user's shape (a view of
        ``(n,)`` elements, so it can be stored straight into a stage buffer row after ``view(-1)``)."""
        self.nfe += 1
        tt = torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)
        if self.flat:
            return self.func(tt, y)
        return self.func(tt, y.view(self.shape))
