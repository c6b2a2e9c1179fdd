"""``torchcfm.utils.torch_wrapper``: an ``f(t, x)`` view of a network on ``[x, t]`` (for :func:`neurodyn.solve`
or ``odeint``). torchcfm's toy samplers and plotting helpers are not provided (its moons come from torchdyn)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, cat, nn

__all__ = ["torch_wrapper"]


class torch_wrapper(nn.Module):  # noqa: N801 (torchcfm's name)
    """``forward(t, x) = model(cat([x, t repeated (B, 1)], 1))`` for a 0-dim or 1-element ``t``, ``x`` ``(B, d)``.

    Example: ``neurodyn.solve(torch_wrapper(MLP(2, time_varying=True)), x0, torch.linspace(0, 1, 2))``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.model(cat([x, t.repeat(x.shape[0])[:, None]], 1))
