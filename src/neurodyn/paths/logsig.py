"""Log-signatures of depth 1 and 2 over windows, for the log-ODE method (computed in torch; no extension).

Over a window the depth-2 log-signature of a piecewise-linear path with increments ``d_1, ..., d_m`` (``p_0`` its
first point) is its total increment ``p_m - p_0`` and its Levy areas

    A_ij = 1/2 sum_l ((p_{l-1} - p_0)_i d_{l,j} - (p_{l-1} - p_0)_j d_{l,i}),   i < j,

the antisymmetric part of the level-2 signature, ``log S = S_1 + (S_2 - S_1 (x) S_1 / 2)``. Channels are ordered as
signatory's Lyndon words (torchcde's ``logsig_windows``): the ``C`` letters, then the pairs ``(i, j)``, ``i < j``,
lexicographically, ``C + C (C - 1) / 2`` in all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from .fill import check_data, fill_missing


def logsig_channels(channels: int, depth: int) -> int:
    """The number of log-signature channels of a ``channels``-dimensional path to ``depth`` 1 or 2."""
    return channels if depth == 1 else channels + channels * (channels - 1) // 2


def logsig_windows(x: Tensor, depth: int, window_length: float, t: Tensor | None = None) -> Tensor:
    """torchcde's ``logsig_windows``: the path of cumulative log-signatures over consecutive windows.

    Parameters
    ----------
    x : Tensor, shape ``(..., T, channels)``
        Observations (NaN: missing, filled linearly as for a linear path).
    depth : int
        1 or 2.
    window_length : float
        Length of a window in the time of ``t``; the windows start at ``t[0]``, the last one is cut at ``t[-1]``.
    t : Tensor, shape ``(T,)``, optional
        Observation times (default ``0, ..., T - 1``).

    Returns
    -------
    Tensor, shape ``(..., W + 1, L)``, ``W`` windows and ``L = logsig_channels(channels, depth)``: row 0 is
    ``x`` at ``t[0]`` (zero areas), row ``k`` row ``k - 1`` plus the log-signature of window ``k``. Its times are
    ``0, 1, ..., W`` (torchcde's convention): interpolate it linearly and solve the CDE on it (the log-ODE method).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])     # right, then up: area 1/2
    >>> logsig_windows(x, 2, 2.0)
    tensor([[0.0000, 0.0000, 0.0000],
            [1.0000, 1.0000, 0.5000]])
    """
    if depth not in (1, 2):
        raise InputError(f"logsig_windows: depth must be 1 or 2 (log-signatures computed in torch), got {depth!r}.")
    if not (isinstance(window_length, (int, float)) or isinstance(window_length, Tensor)) or \
            not float(window_length) > 0 or not math.isfinite(float(window_length)):
        raise InputError(f"logsig_windows: window_length must be a positive finite number, got {window_length!r}.")
    t = check_data("logsig_windows", x, t)
    wl = float(window_length)
    span = float(t[-1] - t[0])
    n_win = max(1, math.ceil(span / wl))
    new_t = torch.linspace(float(t[0]), float(t[0]) + n_win * wl, n_win + 1, dtype=t.dtype, device=t.device)
    new_t = torch.minimum(new_t, t.detach().max())
    # Add the window ends that are not (close to) observation times, with missing values, then fill linearly.
    td = t.detach()
    near = torch.isclose(new_t.unsqueeze(-1), td.unsqueeze(0), rtol=1e-5, atol=1e-8).any(-1)
    extra = torch.unique(new_t[~near])
    if extra.numel():
        merged, order = torch.cat([t, extra.to(t.dtype)]).sort()
        pad = torch.full((*x.shape[:-2], extra.numel(), x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad], -2).index_select(-2, order)
        t = merged
    x = fill_missing(x, t)
    # index in the merged times of each window end (the nearest time)
    td = t.detach()
    j = torch.searchsorted(td, new_t).clamp(1, td.numel() - 1)
    ends = torch.where((td[j] - new_t).abs() < (td[j - 1] - new_t).abs(), j, j - 1)
    c = x.shape[-1]
    d = x[..., 1:, :] - x[..., :-1, :]  # (..., M-1, C): segment l joins points l and l+1
    seg = torch.arange(d.shape[-2], device=x.device)
    win = (torch.searchsorted(ends, seg, right=True) - 1).clamp(0, n_win - 1)  # window of each segment
    inside = (seg >= ends[0]) & (seg < ends[-1])
    level1 = torch.zeros(*x.shape[:-2], n_win, c, dtype=x.dtype, device=x.device)
    level1 = level1.index_add(-2, win[inside], d[..., inside, :])
    parts = [level1]
    if depth == 2:
        start = ends[win]  # first point of each segment's window
        r = x[..., :-1, :] - x.index_select(-2, start)  # p_{l-1} - p_0
        iu, ju = torch.triu_indices(c, c, 1, device=x.device)
        area = 0.5 * (r[..., iu] * d[..., ju] - r[..., ju] * d[..., iu])
        level2 = torch.zeros(*x.shape[:-2], n_win, iu.numel(), dtype=x.dtype, device=x.device)
        parts.append(level2.index_add(-2, win[inside], area[..., inside, :]))
    ls = torch.cat(parts, -1)
    first = torch.cat([x[..., 0, :], torch.zeros_like(ls[..., 0, c:])], -1).unsqueeze(-2)
    return torch.cat([first, ls], -2).cumsum(-2)
