"""``torchcfm.optimal_transport``: ``OTPlanSampler`` and ``wasserstein`` with torchcfm 1.0.7's signatures."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...errors import InputError
from ...models.flow_matching import OTPlanSampler
from ...transport import wasserstein as _wasserstein_distance

__all__ = ["OTPlanSampler", "wasserstein"]


def wasserstein(x0: Tensor, x1: Tensor, method: str | None = None, reg: float = 0.05, power: int = 2,
                **kwargs: Any) -> float:
    """Wasserstein-``power`` distance between the samples ``x0`` ``(n, *dim)`` and ``x1`` ``(m, *dim)``
    (``method`` None/"exact" or "sinkhorn"), as torchcfm's ``wasserstein``.

    Example: ``wasserstein(torch.randn(100, 2), torch.randn(100, 2) + 2)``.
    """
    if kwargs:
        raise InputError(f"unexpected keyword arguments {sorted(kwargs)} (torchcfm's wasserstein ignores them "
                         "silently; neurodyn refuses them).")
    return _wasserstein_distance(x0, x1, power=power, method="exact" if method is None else method, reg=reg)
