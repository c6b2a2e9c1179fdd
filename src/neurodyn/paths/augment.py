"""Path augmentations for irregular series with missing values (NaN): channels and points added to the data before a
control path is built (the signature-methods literature's augmentations, Morrill et al. 2020, "A generalised
signature method for multivariate time series feature extraction").

:func:`cumulative_integral`: the running integral ``Z_c(t) = int_{t_c} ^t X_c(s) ds`` of each channel over its own
observed points (trapezoid rule), so that a CDE driven by ``Z`` sees ``dZ_c = X_c dt``: the channels' levels enter its
dynamics and not only their increments. :func:`basepoint`: a point of zeros before the first time, so that the first
observation becomes an increment of the path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from .fill import check_data


def cumulative_integral(xs: Tensor, ts: Tensor | None = None) -> Tensor:
    """The trapezoid-rule running integral of each channel of ``xs`` over its own observed points.

    ``xs`` ``(..., T, channels)`` with NaN where a value is missing, ``ts`` ``(T,)`` (default ``0, 1, ..., T - 1``).
    Returns ``Z`` of ``xs``'s shape: for a channel observed at ``s_0 < s_1 < ... < s_m`` (its non-NaN entries),
    ``Z(s_0) = 0`` and ``Z(s_j) = Z(s_{j-1}) + (s_j - s_{j-1}) (x(s_{j-1}) + x(s_j)) / 2``; NaN where ``xs`` is NaN
    (a path built on ``Z`` fills it like the data). The integral starts at each channel's first observation. Equals
    ``scipy.integrate.cumulative_trapezoid(x_obs, s, initial=0)`` per channel; differentiable with respect to the
    observed values and the times.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0], [float("nan")], [3.0], [5.0]])
    >>> cumulative_integral(x, torch.tensor([0.0, 1.0, 2.0, 4.0])).squeeze(-1)
    tensor([ 0., nan,  4., 12.])
    """
    ts = check_data("cumulative_integral", xs, ts)
    T = xs.shape[-2]
    obs = ~torch.isnan(xs)
    idx = torch.arange(T, device=xs.device).view(T, 1).expand_as(xs)
    # index of the previous observation strictly before each position (-1 where none)
    upto = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(-2).values
    prev = torch.cat([torch.full_like(upto[..., :1, :], -1), upto[..., :-1, :]], -2)
    has_prev = obs & (prev >= 0)
    prev_c = prev.clamp(min=0)
    x0 = torch.where(obs, xs, torch.zeros_like(xs))
    tt = ts.to(xs.dtype)
    dt = tt.view(T, 1).expand_as(xs) - tt[prev_c]
    pieces = torch.where(has_prev, 0.5 * dt * (x0 + x0.gather(-2, prev_c)), torch.zeros_like(xs))
    return torch.where(obs, pieces.cumsum(-2), torch.full_like(xs, float("nan")))


def basepoint(xs: Tensor, ts: Tensor | None = None, dt: float | None = None) -> tuple[Tensor, Tensor]:
    """``xs`` ``(..., T, channels)`` with a point of zeros prepended at the time ``ts[..., 0] - dt``: returns
    ``(xs', ts')`` of shapes ``(..., T + 1, channels)`` and ``ts``'s shape with ``T + 1`` times (``ts`` ``(T,)`` or
    ``(..., T)``, default ``0, 1, ..., T - 1``; ``dt`` default the first spacing ``ts[..., 1] - ts[..., 0]``). A path
    through ``xs'`` starts at 0, so its first piece carries ``xs[..., 0, :]`` as an increment (the basepoint
    augmentation).

    Examples
    --------
    >>> import torch
    >>> x, t = basepoint(torch.tensor([[2.0], [3.0]]), torch.tensor([0.0, 0.5]))
    >>> x.squeeze(-1), t
    (tensor([0., 2., 3.]), tensor([-0.5000,  0.0000,  0.5000]))
    """
    if dt is not None and not float(dt) > 0:
        raise InputError(f"basepoint: dt must be positive, got {dt!r}.")
    check_data("basepoint", xs, None)
    if ts is None:
        ts = torch.arange(xs.shape[-2], dtype=xs.dtype, device=xs.device)
    elif not isinstance(ts, Tensor) or not ts.is_floating_point() or ts.dim() < 1 or ts.shape[-1] != xs.shape[-2]:
        raise InputError(f"basepoint: t must be a floating tensor of shape (T,) or (..., T) with T = {xs.shape[-2]} "
                         f"(the data's time dimension), got {getattr(ts, 'shape', type(ts).__name__)}.")
    elif not bool(torch.isfinite(ts).all()) or not bool((ts[..., 1:] > ts[..., :-1]).all()):
        raise InputError("basepoint: t must be finite and strictly increasing.")
    step = ts[..., 1:2] - ts[..., :1] if dt is None else torch.full_like(ts[..., :1], float(dt))
    zero = torch.zeros_like(xs[..., :1, :])
    return torch.cat([zero, xs], -2), torch.cat([ts[..., :1] - step, ts], -1)
