"""``torchcfm.models.models.MLP``: torchcfm's toy velocity network (same layers, same order of parameter
initialisation, so a seeded model starts from torchcfm's weights)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``dim (+1 for time) -> w -> w -> w -> out_dim`` with SELU between layers; input ``(B, dim [+ 1])``, output
    ``(B, out_dim)`` (``out_dim`` defaults to ``dim``). With ``time_varying=True`` the input is ``[x, t]``.

    Example: ``MLP(2, time_varying=True)(torch.randn(8, 3)).shape == (8, 2)``.
    """

    def __init__(self, dim: int, out_dim: int | None = None, w: int = 64, time_varying: bool = False) -> None:
        super().__init__()
        self.time_varying = time_varying
        out_dim = dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            nn.Linear(dim + (1 if time_varying else 0), w), nn.SELU(),
            nn.Linear(w, w), nn.SELU(),
            nn.Linear(w, w), nn.SELU(),
            nn.Linear(w, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
