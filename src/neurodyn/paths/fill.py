"""Data preparation for control paths: checks, missing values (NaN), rectilinear data, observation channels.

Missing values are filled as torchcde does: per channel, a value missing between two observations is the linear
interpolation of its neighbours in time; missing values before the first (after the last) observation of a channel
take that observation's value; a channel with no observation is zero. Everything is vectorised and differentiable
with respect to the observed values and the times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError


def check_data(name: str, xs: Tensor, ts: Tensor | None, *, allow_t_grad: bool = True) -> Tensor:
    """Check ``xs`` of shape ``(..., T, channels)`` and times ``ts`` of shape ``(T,)``; return ``ts`` (default
    ``0, 1, ..., T - 1`` in ``xs``'s dtype). Raises :class:`~neurodyn.errors.InputError` naming the problem."""
    if not isinstance(xs, Tensor):
        raise InputError(f"{name}: the data must be a tensor of shape (..., T, channels), got {type(xs).__name__}.")
    if not xs.is_floating_point():
        raise InputError(f"{name}: the data must be floating point, got {xs.dtype}.")
    if xs.dim() < 2:
        raise InputError(f"{name}: the data must have shape (..., T, channels), got {tuple(xs.shape)}.")
    if xs.shape[-2] < 2:
        raise InputError(f"{name}: at least 2 observation times are needed, got data of shape {tuple(xs.shape)}.")
    if ts is None:
        return torch.arange(xs.shape[-2], dtype=xs.dtype, device=xs.device)
    if not isinstance(ts, Tensor):
        raise InputError(f"{name}: t must be a tensor of shape (T,), got {type(ts).__name__}.")
    if not ts.is_floating_point():
        raise InputError(f"{name}: t must be floating point, got {ts.dtype}.")
    if ts.dim() != 1 or ts.shape[0] != xs.shape[-2]:
        raise InputError(f"{name}: t must have shape (T,) with T = {xs.shape[-2]} (the data's time dimension), got "
                         f"{tuple(ts.shape)}.")
    if ts.device != xs.device:
        raise InputError(f"{name}: t is on {ts.device} but the data on {xs.device}: use one device.")
    if ts.requires_grad and not allow_t_grad:
        raise InputError(f"{name}: t requires grad, but this path's knot times cannot be differentiated (its "
                         f"derivative jumps there); use a cubic path (CubicPath.natural / CubicPath.hermite) for "
                         f"knot-time gradients, or pass t.detach().")
    v = ts.detach().cpu().tolist()
    if not all(math.isfinite(a) for a in v) or any(b <= a for a, b in zip(v, v[1:])):
        raise InputError(f"{name}: t must be finite and strictly increasing.")
    return ts


def fill_missing(xs: Tensor, ts: Tensor | None = None) -> Tensor:
    """Fill NaN entries of ``xs`` (shape ``(..., T, channels)``) as torchcde does (see the module docstring).

    Returns a tensor of ``xs``'s shape without NaN (``xs`` itself when it has none).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[float("nan")], [1.0], [float("nan")], [3.0], [float("nan")]])
    >>> fill_missing(x, torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0])).squeeze(-1)
    tensor([1.0000, 1.0000, 1.6667, 3.0000, 3.0000])
    """
    ts = check_data("fill_missing", xs, ts)
    nan = torch.isnan(xs)
    if not bool(nan.any()):
        return xs
    T = xs.shape[-2]
    obs = ~nan
    idx = torch.arange(T, device=xs.device).view(T, 1).expand_as(xs)
    # index of the previous (next) observation at or before (after) each position; -1 / T where none
    prev = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(-2).values
    nxt = torch.where(obs, idx, torch.full_like(idx, T)).flip(-2).cummin(-2).values.flip(-2)
    has_any = obs.any(-2, keepdim=True)
    prev_c = torch.where(prev < 0, nxt, prev).clamp(0, T - 1)  # before the first observation: the first one
    nxt_c = torch.where(nxt >= T, prev, nxt).clamp(0, T - 1)  # after the last: the last one
    x0 = torch.where(nan, torch.zeros_like(xs), xs)
    xp = x0.gather(-2, prev_c)
    xn = x0.gather(-2, nxt_c)
    tt = ts.to(xs.dtype)
    tp, tn, tc = tt[prev_c], tt[nxt_c], tt.view(T, 1).expand_as(xs)
    same = prev_c == nxt_c
    ratio = torch.where(same, torch.zeros_like(xs), (tc - tp) / torch.where(same, torch.ones_like(tn), tn - tp))
    filled = xp + ratio * (xn - xp)
    out = torch.where(nan, filled, xs)
    return torch.where(has_any, out, torch.zeros_like(out))


def forward_fill(xs: Tensor) -> Tensor:
    """Carry the last observation forward over NaN entries along the time dimension ``-2`` of ``xs``
    ``(..., T, channels)`` (leading NaN stay NaN).

    Examples
    --------
    >>> import torch
    >>> forward_fill(torch.tensor([[1.0], [float("nan")], [3.0]])).squeeze(-1)
    tensor([1., 1., 3.])
    """
    nan = torch.isnan(xs)
    if not bool(nan.any()):
        return xs
    T = xs.shape[-2]
    idx = torch.arange(T, device=xs.device).view(T, 1).expand_as(xs)
    prev = torch.where(~nan, idx, torch.zeros_like(idx)).cummax(-2).values
    return xs.gather(-2, prev)


def rectilinear_data(xs: Tensor, time_index: int) -> Tensor:
    """The data whose linear interpolation is the rectilinear (lead-lag in time) interpolation of ``xs``.

    ``xs`` of shape ``(..., T, channels)`` holds the time in channel ``time_index``; the result has shape
    ``(..., 2T - 1, channels)``: between observations the path first moves in time with the other channels held
    (forward-filled), then jumps in the other channels at fixed time. Causal: the path up to an observation time
    uses no later observation. The times of the result are ``0, 1, ..., 2T - 2`` (torchcde's convention).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 1.0], [2.0, 5.0]])     # (T=2, channels=[time, value])
    >>> rectilinear_data(x, 0)
    tensor([[0., 1.],
            [2., 1.],
            [2., 5.]])
    """
    if not isinstance(time_index, int) or isinstance(time_index, bool):
        raise InputError(f"rectilinear: the index of the time channel must be an int, got {type(time_index).__name__}.")
    check_data("rectilinear", xs, None)
    c = xs.shape[-1]
    if not 0 <= time_index < c:
        raise InputError(f"rectilinear: the time channel index must be in [0, {c - 1}], got {time_index}.")
    if bool(torch.isnan(xs[..., time_index]).any()):
        raise InputError("rectilinear: the time channel has missing values (NaN); fill it (e.g. forward-fill the "
                         "final time over padding) before building the path.")
    filled = forward_fill(xs)
    rep = filled.repeat_interleave(2, dim=-2)
    time_col = rep[..., :, time_index]
    shifted = torch.cat([time_col[..., 1:], time_col[..., -1:]], -1)
    rep = torch.cat([rep[..., :time_index], shifted.unsqueeze(-1), rep[..., time_index + 1:]], -1)
    return rep[..., :-1, :]


def observation_channels(xs: Tensor, kind: str = "intensity") -> Tensor:
    """``xs`` ``(..., T, channels)`` with one channel per data channel appended that records where values were
    observed: ``"intensity"``: the cumulative count of observations up to each time (the observational intensity
    of Kidger et al. 2020); ``"mask"``: 1 where observed, 0 where NaN. Result ``(..., T, 2 * channels)``; the NaN
    in the data channels are left for the path to fill.

    Examples
    --------
    >>> import torch
    >>> observation_channels(torch.tensor([[1.0], [float("nan")], [2.0]]))
    tensor([[1., 1.],
            [nan, 1.],
            [2., 2.]])
    """
    if kind not in ("intensity", "mask"):
        raise InputError(f"observation_channels: kind must be 'intensity' or 'mask', got {kind!r}.")
    check_data("observation_channels", xs, None)
    mask = (~torch.isnan(xs)).to(xs.dtype)
    extra = mask.cumsum(-2) if kind == "intensity" else mask
    return torch.cat([xs, extra], -1)
