"""Piecewise-cubic control paths: natural cubic splines and cubic Hermite with backward differences.

A piecewise cubic on knots ``t_0 < ... < t_{T-1}`` is stored as torchcde stores it: coefficients of shape
``(..., T - 1, 4 * channels)``, the concatenation ``[a, b, two_c, three_d]`` along the last dimension, so that on
piece ``k`` with ``s = t - t_k``

    X(t) = a + b s + (two_c / 2) s^2 + (three_d / 3) s^3,     dX/dt(t) = b + two_c s + three_d s^2.

Both interpolants are C^1 (the natural spline C^2): ``dX/dt`` is continuous at the knots, so a controlled equation
driven by them has a continuous right-hand side, and only its higher time derivatives jump at the knots. The path
is therefore ``smooth``: the solve lands on its knots as ``step_t`` (keeping the method's order; no
re-evaluation), not as ``jump_t`` -- except when its coefficients or times require grad: the sensitivities of
``dX/dt`` to them jump at the knots, and a gradient method must integrate them piece by piece (``jump_t``: landed
on in the backward solve too, no stage evaluated across a knot). Its knot times may require grad: the solution
depends on them only through ``X`` itself (no moving discontinuity of ``dX/dt``), which every gradient method
sees.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .fill import check_data, fill_missing


def _natural_no_nan(ts: Tensor, x: Tensor) -> Tensor:
    """Natural cubic spline coefficients ``(..., T - 1, 4C)`` of ``x`` ``(..., T, C)`` (no NaN) on ``ts``."""
    T = x.shape[-2]
    h = (ts[1:] - ts[:-1]).to(x.dtype).unsqueeze(-1)  # (T-1, 1)
    dx = x[..., 1:, :] - x[..., :-1, :]
    if T == 2:
        z = torch.zeros_like(dx)
        return torch.cat([x[..., :1, :], dx / h, z, z], -1)
    r = h.reciprocal()
    s = 3 * dx * r * r  # (..., T-1, C)
    # Tridiagonal system for the knot derivatives m: lower/upper r_k, diagonal 2 (r_{k-1} + r_k), rhs s_{k-1} + s_k.
    zero_r = torch.zeros_like(r[:1])
    diag = 2 * (torch.cat([zero_r, r], 0) + torch.cat([r, zero_r], 0))  # (T, 1)
    zero_s = torch.zeros_like(s[..., :1, :])
    rhs = torch.cat([zero_s, s], -2) + torch.cat([s, zero_s], -2)  # (..., T, C)
    # Thomas algorithm along the time dimension (vectorised over batch and channels; differentiable).
    cp, dp = [], []
    c_prev = r[0] / diag[0]
    d_prev = rhs[..., 0, :] / diag[0]
    cp.append(c_prev)
    dp.append(d_prev)
    for k in range(1, T):
        denom = diag[k] - r[k - 1] * c_prev
        c_prev = r[k] / denom if k < T - 1 else None
        d_prev = (rhs[..., k, :] - r[k - 1] * d_prev) / denom
        cp.append(c_prev)
        dp.append(d_prev)
    m = [dp[-1]]
    for k in range(T - 2, -1, -1):
        m.append(dp[k] - cp[k] * m[-1])
    m = torch.stack(m[::-1], -2)  # (..., T, C)
    m0, m1 = m[..., :-1, :], m[..., 1:, :]
    two_c = (6 * dx * r - 4 * m0 - 2 * m1) * r
    three_d = (-6 * dx * r + 3 * (m0 + m1)) * r * r
    return torch.cat([x[..., :-1, :], m0, two_c, three_d], -1)


def _shift(coeffs: Tensor, offset: Tensor) -> Tensor:
    """Re-centre cubic pieces ``[a, b, two_c, three_d]`` (``(..., K, 4C)``) at ``s = offset`` (``(K, 1)``)."""
    a, b, c2, d3 = coeffs.chunk(4, -1)
    o = offset.to(coeffs.dtype)
    return torch.cat([a + (b + (0.5 * c2 + d3 * o / 3) * o) * o, b + (c2 + d3 * o) * o, c2 + 2 * d3 * o, d3], -1)


def natural_cubic_coeffs(xs: Tensor, ts: Tensor | None = None) -> Tensor:
    """Coefficients of the natural cubic spline through ``xs``, in torchcde's layout.

    Parameters
    ----------
    xs : Tensor, shape ``(..., T, channels)``
        Observations; NaN marks a missing value. As torchcde's ``natural_cubic_coeffs``: per channel, missing values
        before the first (after the last) observation take its value, and the spline passes through the observed
        values only (so it is a spline in the observed knots, re-expressed on every interval).
    ts : Tensor, shape ``(T,)``, optional
        Strictly increasing times (default ``0, ..., T - 1``); may require grad.

    Returns
    -------
    Tensor, shape ``(..., T - 1, 4 * channels)``: ``[a, b, two_c, three_d]`` per piece (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> c = natural_cubic_coeffs(torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64))
    >>> c.shape, CubicPath(torch.arange(3.0, dtype=torch.float64), c).evaluate(1.0)
    (torch.Size([2, 4]), tensor([1.], dtype=torch.float64))
    """
    ts = check_data("natural_cubic_coeffs", xs, ts)
    nan = torch.isnan(xs)
    if not bool(nan.any()):
        return _natural_no_nan(ts, xs)
    T, C = xs.shape[-2], xs.shape[-1]
    batch = xs.shape[:-2]
    # Fill before the first and after the last observation with those observations (constant ends).
    idx = torch.arange(T, device=xs.device).view(T, 1).expand_as(xs)
    obs = ~nan
    first = torch.where(obs, idx, torch.full_like(idx, T)).amin(-2, keepdim=True)
    last = torch.where(obs, idx, torch.full_like(idx, -1)).amax(-2, keepdim=True)
    x0 = torch.where(nan, torch.zeros_like(xs), xs)
    xf = torch.where(idx < first, x0.gather(-2, first.clamp(max=T - 1)), xs)
    xf = torch.where(idx > last, x0.gather(-2, last.clamp(min=0)), xf)
    # series: (N, T) with N = batch * channels
    series = xf.movedim(-1, -2).reshape(-1, T)
    holes = torch.isnan(series)
    empty = (last < 0).movedim(-1, -2).reshape(-1)
    out = series.new_zeros(series.shape[0], T - 1, 4)
    full = ~holes.any(-1) & ~empty
    if bool(full.any()):
        out[full] = _natural_no_nan(ts, series[full].unsqueeze(-1))
    tt = ts.to(xs.dtype)
    for i in torch.nonzero(holes.any(-1) & ~empty).reshape(-1).tolist():
        keep = ~holes[i]
        t_o, x_o = tt[keep], series[i][keep]
        pieces = _natural_no_nan(t_o, x_o.unsqueeze(-1))  # (T_o - 1, 4)
        j = torch.searchsorted(t_o[1:-1].detach().contiguous(), tt[:-1].detach(), right=True)
        out[i] = _shift(pieces[j], (tt[:-1] - t_o[j]).unsqueeze(-1))
    out = out.reshape(*batch, C, T - 1, 4).movedim(-3, -1)  # (..., T-1, 4, C)
    return out.reshape(*batch, T - 1, 4 * C)


def hermite_coeffs(xs: Tensor, ts: Tensor | None = None) -> Tensor:
    """Coefficients of the cubic Hermite interpolant with backward differences, in torchcde's layout.

    On ``[t_k, t_{k+1}]`` the cubic matches ``x_k``, ``x_{k+1}`` and the slopes ``(x_k - x_{k-1}) / (t_k - t_{k-1})``
    at ``t_k`` and ``(x_{k+1} - x_k) / (t_{k+1} - t_k)`` at ``t_{k+1}`` (the first piece starts with its own
    slope): C^1, and causal -- ``X`` up to ``t_{k+1}`` uses no observation after ``x_{k+1}`` (online use).
    Missing values (NaN) are first filled linearly as for a linear path (as torchcde does).

    Parameters
    ----------
    xs : Tensor, shape ``(..., T, channels)``
    ts : Tensor, shape ``(T,)``, optional (default ``0, ..., T - 1``; may require grad)

    Returns
    -------
    Tensor, shape ``(..., T - 1, 4 * channels)``.

    Examples
    --------
    >>> import torch
    >>> c = hermite_coeffs(torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64))
    >>> CubicPath(torch.arange(3.0, dtype=torch.float64), c).derivative(2.0)   # the last slope
    tensor([2.], dtype=torch.float64)
    """
    ts = check_data("hermite_coeffs", xs, ts)
    x = fill_missing(xs, ts)
    h = (ts[1:] - ts[:-1]).to(x.dtype).unsqueeze(-1)
    dx = x[..., 1:, :] - x[..., :-1, :]
    slope = dx / h
    prev = torch.cat([slope[..., :1, :], slope[..., :-1, :]], -2)
    two_c = 2 * (3 * (slope - prev) - slope + prev) / h
    three_d = (slope - prev) / (h * h) - two_c / h
    return torch.cat([x[..., :-1, :], prev, two_c, three_d], -1)


class CubicPath:
    """``X(t)``: a piecewise cubic from its coefficients (torchcde's layout), e.g. a natural cubic spline.

    Parameters
    ----------
    ts : Tensor, shape ``(T,)``, ``T >= 2``
        Knot times, strictly increasing; may require grad (gradients reach them through every gradient method).
    coeffs : Tensor, shape ``(..., T - 1, 4 * channels)``
        ``[a, b, two_c, three_d]`` per piece (:func:`natural_cubic_coeffs`, :func:`hermite_coeffs`, or saved
        torchcde coefficients). May require grad (it is what :meth:`grad_tensors` gives the gradient methods).
    land : bool
        Land the solve on the knots (``step_t``; default True). False: the knots are not landed on (torchcde's
        behaviour; ``knots == ()``).
    left : bool
        On a knot, use the piece ending there (torchcde's convention) instead of the one starting there (the
        protocol's; the two agree up to rounding, ``dX/dt`` being continuous).

    Notes
    -----
    Values and derivatives have shape ``(..., channels)``; outside ``[t_0, t_{T-1}]`` the first and last pieces
    are extended. ``smooth``: ``dX/dt`` is continuous at the knots (see :mod:`neurodyn.paths.cubic`).

    A path holds the graph from its coefficients to the data they were computed from: build it in each forward
    pass (as with torchcde), from coefficients computed there or loaded.

    Examples
    --------
    >>> import torch
    >>> ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> X = CubicPath.natural(ts, (ts ** 3).unsqueeze(-1))    # (T=5, channels=1)
    >>> X.evaluate(0.5), X.derivative(torch.tensor(0.0, dtype=torch.float64)).shape
    (tensor([0.1250], dtype=torch.float64), torch.Size([1]))
    """

    @property
    def smooth(self) -> bool:
        """True (knots landed on as ``step_t``) unless the coefficients or the times require grad: the sensitivity
        of ``dX/dt`` to them jumps at the knots, so the knots are then ``jump_t`` -- no stage of a step, forward or
        in an adjoint's backward solve, is evaluated on the far side of a knot (one more evaluation per knot)."""
        return not (self.coeffs.requires_grad or self.ts.requires_grad)

    def __init__(self, ts: Tensor, coeffs: Tensor, *, land: bool = True, left: bool = False):
        if not isinstance(coeffs, Tensor) or coeffs.dim() < 2:
            raise InputError(f"CubicPath: coeffs must be a tensor of shape (..., T - 1, 4 * channels), got "
                             f"{getattr(coeffs, 'shape', type(coeffs).__name__)}.")
        if coeffs.shape[-1] % 4:
            raise InputError(f"CubicPath: the last dimension of coeffs ({coeffs.shape[-1]}) must be 4 * channels "
                             f"([a, b, two_c, three_d]); pass the output of natural_cubic_coeffs / hermite_coeffs.")
        if not isinstance(ts, Tensor) or ts.dim() != 1 or ts.shape[0] != coeffs.shape[-2] + 1:
            raise InputError(f"CubicPath: ts must have shape (T,) with T = {coeffs.shape[-2] + 1} (one more than the "
                             f"pieces of coeffs), got {getattr(ts, 'shape', type(ts).__name__)}.")
        check_data("CubicPath", coeffs.new_zeros(ts.shape[0], 1), ts)
        self.ts = ts
        self.coeffs = coeffs
        self.channels = coeffs.shape[-1] // 4
        knots = tuple(ts.detach().cpu().tolist())
        self.grid = knots
        self.knots: tuple[float, ...] = knots if land else ()
        self._inner_list = list(knots[1:-1])
        self._inner = ts.detach()[1:-1].contiguous()
        self._n = ts.shape[0] - 1
        self._bisect = bisect.bisect_left if left else bisect.bisect_right
        self._right = not left
        self._rows: tuple[Tensor, ...] | None = None
        self._split: dict[int, tuple[Tensor, ...]] = {}
        self._fast: Callable[[float, int], float] | None = None
        if coeffs.dtype == torch.float64:
            k64 = ts.detach().to(torch.float64).tolist()
            self._fast = lambda tf, i: tf - k64[i]
        elif coeffs.dtype == torch.float32:
            k32 = [np.float32(v) for v in ts.detach().to(torch.float32).tolist()]
            self._fast = lambda tf, i: float(np.float32(tf) - k32[i])
        self._tview: Tensor | None = None

    def _times(self) -> Tensor:
        """The knot times the evaluations use: under grad mode a view of ``ts`` of its own, so that a gradient
        method differentiating with respect to it (and to the rows) does not reach ``ts`` again through the
        coefficients computed from it (counted once, by the solve's backward pass)."""
        if not (self.ts.requires_grad and torch.is_grad_enabled()):
            return self.ts
        if self._tview is None:
            self._tview = self.ts.view(self.ts.shape)
        return self._tview

    def _row(self, i: int) -> Tensor:
        """Piece ``i``'s coefficients ``(..., 4C)``. With coefficients requiring grad the rows are split off once
        (``unbind``), so that a backward pass accumulates each evaluation's gradient into its own row instead of
        a zero-filled tensor of the coefficients' full size per evaluation (``select``'s backward)."""
        if not (self.coeffs.requires_grad and torch.is_grad_enabled()):
            return self.coeffs.select(-2, i)
        if self._rows is None:
            self._rows = self.coeffs.unbind(-2)
        return self._rows[i]

    @classmethod
    def natural(cls, ts: Tensor, xs: Tensor, *, land: bool = True) -> CubicPath:
        """The natural cubic spline through ``xs`` ``(..., T, channels)`` at ``ts`` (:func:`natural_cubic_coeffs`)."""
        return cls(ts, natural_cubic_coeffs(xs, ts), land=land)

    @classmethod
    def hermite(cls, ts: Tensor, xs: Tensor, *, land: bool = True) -> CubicPath:
        """The causal cubic Hermite interpolant with backward differences (:func:`hermite_coeffs`)."""
        return cls(ts, hermite_coeffs(xs, ts), land=land)

    def _parts(self, i: int) -> tuple[Tensor, ...]:
        """Piece ``i``'s ``(a, b, two_c, three_d)``, each ``(..., C)``; split once per piece when the coefficients
        require grad (one split node in the graph per piece instead of one per evaluation)."""
        if not (self.coeffs.requires_grad and torch.is_grad_enabled()):
            return self.coeffs.select(-2, i).split(self.channels, -1)
        parts = self._split.get(i)
        if parts is None:
            parts = self._split[i] = self._row(i).split(self.channels, -1)
        return parts

    def _piece(self, t: Tensor | float) -> tuple[tuple[Tensor, ...], Tensor]:
        """``(parts, s)``: ``(a, b, two_c, three_d)`` of the piece holding ``t`` and ``s = t - t_k``."""
        if isinstance(t, Tensor) and t.dim() == 0 and t.device.type == "cpu":
            i = self._bisect(self._inner_list, float(t))
            return self._parts(i), t.to(self.coeffs.dtype) - self._times()[i].to(self.coeffs.dtype)
        tt = torch.as_tensor(t, dtype=self.ts.dtype, device=self.ts.device)
        if tt.dim() != 0:
            raise InputError(f"CubicPath: t must be a scalar time, got shape {tuple(tt.shape)}.")
        i = torch.searchsorted(self._inner, tt.reshape(1), right=self._right)
        row = self.coeffs.index_select(-2, i).squeeze(-2) if self._rows is None else \
            torch.stack(self._rows, -2).index_select(-2, i).squeeze(-2)
        return row.split(self.channels, -1), (tt - self._times().index_select(0, i).squeeze(0)).to(self.coeffs.dtype)

    def evaluate(self, t: Tensor | float) -> Tensor:
        """``X(t)``, shape ``(..., channels)``."""
        (a, b, c2, d3), s = self._piece(t)
        return a + (b + (0.5 * c2 + d3 * (s / 3)) * s) * s

    def derivative(self, t: Tensor | float) -> Tensor:
        """``dX/dt(t)``, shape ``(..., channels)``."""
        if self._fast is not None and isinstance(t, Tensor) and t.dim() == 0 and t.device.type == "cpu" and \
                not t.requires_grad and not (self.ts.requires_grad and torch.is_grad_enabled()):
            # t and the knots plain numbers: s = t - t_k in the coefficients' precision on the host, then two fused
            # kernels (b + s (two_c + s three_d)); at a knot (s = 0) b itself.
            tf = float(t)
            i = self._bisect(self._inner_list, tf)
            s = self._fast(tf, i)
            _, b, c2, d3 = self._parts(i)
            return b if s == 0.0 else torch.add(b, torch.add(c2, d3, alpha=s), alpha=s)
        (_, b, c2, d3), s = self._piece(t)
        return b + (c2 + d3 * s) * s

    def derivative_grid(self, t: Tensor) -> Tensor:
        """``dX/dt`` at every time of ``t`` ``(N,)``, shape ``(N, ..., channels)``: ``derivative(t[i])`` in row ``i``
        (to rounding; the same piece on a knot), from one evaluation -- one gather of the pieces' coefficients and one
        polynomial, one node each in an autograd graph, which reaches the coefficients and the knot times.

        Examples
        --------
        >>> import torch
        >>> ts = torch.arange(4.0, dtype=torch.float64)
        >>> X = CubicPath.natural(ts, (ts ** 2).unsqueeze(-1))
        >>> t = torch.tensor([0.5, 2.0], dtype=torch.float64)
        >>> bool(torch.allclose(X.derivative_grid(t), torch.stack([X.derivative(x) for x in t])))
        True
        """
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise InputError(f"CubicPath.derivative_grid: t must be a 1-d tensor of times, got "
                             f"{getattr(t, 'shape', type(t).__name__)}.")
        idx = torch.searchsorted(torch.tensor(self._inner_list, dtype=torch.float64),
                                 t.detach().cpu().to(torch.float64), right=self._right).to(self.coeffs.device)
        s = t.to(self.coeffs.dtype) - self._times().index_select(0, idx).to(self.coeffs.dtype)
        rows = self.coeffs.movedim(-2, 0).index_select(0, idx)  # (N, ..., 4C)
        s = s.view(-1, *([1] * (rows.dim() - 1)))
        _, b, c2, d3 = rows.split(self.channels, -1)
        return torch.addcmul(b, torch.addcmul(c2, d3, s), s)

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``X(t) - X(s)``, shape ``(..., channels)``."""
        return self.evaluate(t) - self.evaluate(s)

    def grad_tensors(self) -> list[Tensor]:
        """The coefficients (as the per-piece rows the evaluations use, under grad mode) and the knot times, those
        that require grad. The gradient methods differentiate the field with respect to these tensors, possibly many
        times; the rows' graph back to ``coeffs`` is then traversed once, by the solve's own backward pass."""
        out = []
        if self.coeffs.requires_grad:
            if torch.is_grad_enabled():
                if self._rows is None:
                    self._rows = self.coeffs.unbind(-2)
                out += list(self._rows)
            else:
                out.append(self.coeffs)
        if self.ts.requires_grad:
            out.append(self._times())
        return out

    def __repr__(self) -> str:
        return f"CubicPath(T={self._n + 1}, coeffs shape={tuple(self.coeffs.shape)})"
