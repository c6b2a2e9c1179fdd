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


def _thomas(off: Tensor, diag: Tensor, rhs: Tensor, n: int) -> Tensor:
    """Solve the symmetric tridiagonal systems in slots ``0, ..., n - 1`` of the first dimension: off-diagonal
    ``off[k]`` between slots ``k`` and ``k + 1``, diagonal ``diag[k]``, right-hand side ``rhs[k]`` (the trailing
    dimensions broadcast). Thomas algorithm, a Python loop over the ``n`` slots (vectorised over the rest;
    differentiable). Returns the solution, shape ``(n, ...)``."""
    c_prev = off[0] / diag[0]
    d_prev = rhs[0] / diag[0]
    cp, dp = [c_prev], [d_prev]
    for k in range(1, n):
        denom = diag[k] - off[k - 1] * c_prev
        c_prev = off[k] / denom if k < n - 1 else None
        d_prev = (rhs[k] - off[k - 1] * d_prev) / denom
        cp.append(c_prev)
        dp.append(d_prev)
    m = [dp[-1]]
    for k in range(n - 2, -1, -1):
        m.append(dp[k] - cp[k] * m[-1])
    return torch.stack(m[::-1], 0)


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
    m = _thomas(r, diag, rhs.movedim(-2, 0), T).movedim(0, -2)  # (..., T, C)
    m0, m1 = m[..., :-1, :], m[..., 1:, :]
    two_c = (6 * dx * r - 4 * m0 - 2 * m1) * r
    three_d = (-6 * dx * r + 3 * (m0 + m1)) * r * r
    return torch.cat([x[..., :-1, :], m0, two_c, three_d], -1)


def _shift(coeffs: Tensor, offset: Tensor) -> Tensor:
    """Re-centre cubic pieces ``[a, b, two_c, three_d]`` (``(..., K, 4C)``) at ``s = offset`` (``(..., K, 1)``)."""
    a, b, c2, d3 = coeffs.chunk(4, -1)
    o = offset.to(coeffs.dtype)
    return torch.cat([a + (b + (0.5 * c2 + d3 * o / 3) * o) * o, b + (c2 + d3 * o) * o, c2 + 2 * d3 * o, d3], -1)


def _natural_rows(xs: Tensor, ts: Tensor, lengths: Tensor | None) -> Tensor:
    """:func:`natural_cubic_coeffs` with missing values (NaN) and/or per-series lengths: every (series, channel)
    row's spline through its own knots, all rows in one Thomas solve.

    A row's knots are its observed positions in ``[0, L)`` and the positions there before its first and after its
    last observation (which take those observations' values). They are moved to the front of the row (stable sort),
    and one Thomas solve runs on all rows with the rows' own knot spacings; the slots past a row's last knot are
    decoupled (zero off-diagonal, unit diagonal, zero right-hand side), so each row's operations are those of
    :func:`_natural_no_nan` on that row's knots alone and its result is the same to the bit. A row with two knots
    gets the line through them (as :func:`_natural_no_nan`). Each grid interval then takes the piece of the knot
    interval holding it, re-centred at its start (:func:`_shift`; only in rows with interior holes, the others'
    knots being the grid). From ``t[L - 1]`` on a row holds its value there (``[x, 0, 0, 0]``); a row with no
    observation in ``[0, L)`` is zero. The loop is over the knot slots (at most ``T``), never over rows.
    """
    T, C = xs.shape[-2], xs.shape[-1]
    batch = xs.shape[:-2]
    dev = xs.device
    tt = ts.to(xs.dtype)
    rows = xs.movedim(-1, -2).reshape(-1, T)  # (N, T): one row per (series, channel)
    pos = torch.arange(T, device=dev)
    if lengths is None:
        L = torch.full((rows.shape[0],), T, dtype=torch.long, device=dev)
    else:
        L = lengths.reshape(-1).to(device=dev, dtype=torch.long).repeat_interleave(C)
    valid = pos < L[:, None]
    obs = ~torch.isnan(rows) & valid
    first = torch.where(obs, pos, T).amin(-1, keepdim=True)
    last = torch.where(obs, pos, -1).amax(-1, keepdim=True)
    empty = last < 0  # (N, 1): no observation, zero coefficients
    x0 = torch.where(obs, rows, torch.zeros_like(rows))
    xf = torch.where(pos < first, x0.gather(-1, first.clamp(max=T - 1)), x0)
    xf = torch.where(pos > last, x0.gather(-1, last.clamp(min=0)), xf)  # the values the spline passes through
    knot = valid & (obs | (pos < first) | (pos > last)) & ~empty
    K = knot.sum(-1)  # (N,) knots per row
    order = torch.sort((~knot).to(torch.uint8), dim=-1, stable=True).indices  # the knots first, in time order
    real = pos < K[:, None]  # (N, T): slot j holds a knot
    tk = tt[order]  # (N, T) knot times (slots past K: unused)
    xk = xf.gather(-1, order)
    inside = real[:, 1:] & real[:, :-1]  # (N, T - 1): knot interval j exists
    h = torch.where(inside, tk[:, 1:] - tk[:, :-1], torch.ones_like(tk[:, 1:]))
    dx = torch.where(inside, xk[:, 1:] - xk[:, :-1], torch.zeros_like(h))
    r = torch.where(inside, h.reciprocal(), torch.zeros_like(h))
    s = 3 * dx * r * r
    zero = torch.zeros_like(r[:, :1])
    diag = 2 * (torch.cat([zero, r], -1) + torch.cat([r, zero], -1))  # (N, T)
    diag = torch.where(real, diag, torch.ones_like(diag))
    rhs = torch.cat([zero, s], -1) + torch.cat([s, zero], -1)
    n = max(int(K.max()), 1)
    m = _thomas(r.T, diag.T, rhs.T, n).T  # (N, n)
    m = torch.nn.functional.pad(m, (0, T - n))
    m0, m1 = m[:, :-1], m[:, 1:]
    two_c = (6 * dx * r - 4 * m0 - 2 * m1) * r
    three_d = (-6 * dx * r + 3 * (m0 + m1)) * r * r
    two = (K == 2)[:, None]  # two knots: the line through them
    z = torch.zeros_like(h)
    pieces = torch.stack([xk[:, :-1], torch.where(two, dx / h, m0), torch.where(two, z, two_c),
                          torch.where(two, z, three_d)], -1)  # (N, T - 1, 4) per knot interval
    # grid interval k: the piece of the knot interval containing it, re-centred at t[k]
    j = (knot.cumsum(-1)[:, :-1] - 1).clamp(min=0).minimum((K - 2).clamp(min=0)[:, None])  # (N, T - 1)
    out = pieces.gather(1, j[..., None].expand(-1, -1, 4))
    holes = (knot != valid).any(-1, keepdim=True)  # rows with interior holes
    out = torch.where(holes[..., None], _shift(out, (tt[:-1] - tk.gather(-1, j))[..., None]), out)
    if lengths is not None:  # from t[L - 1] on: the value at t[L - 1] held
        after = pos[:-1] >= (L - 1)[:, None]  # (N, T - 1)
        end = xf.gather(-1, (L - 1)[:, None]).expand(-1, T - 1)
        zt = torch.zeros_like(end)
        out = torch.where(after[..., None], torch.stack([end, zt, zt, zt], -1), out)
    out = torch.where(empty[..., None], torch.zeros_like(out), out)
    out = out.reshape(*batch, C, T - 1, 4).movedim(-3, -1)  # (..., T - 1, 4, C)
    return out.reshape(*batch, T - 1, 4 * C)


def natural_cubic_coeffs(xs: Tensor, ts: Tensor | None = None, *, lengths: Tensor | None = None) -> Tensor:
    """Coefficients of the natural cubic spline through ``xs``, in torchcde's layout.

    Parameters
    ----------
    xs : Tensor, shape ``(..., T, channels)``
        Observations; NaN marks a missing value. As torchcde's ``natural_cubic_coeffs``: per channel, missing values
        before the first (after the last) observation take its value, and the spline passes through the observed
        values only (so it is a spline in the observed knots, re-expressed on every interval). A channel with no
        observation gets zero coefficients.
    ts : Tensor, shape ``(T,)``, optional
        Strictly increasing times (default ``0, ..., T - 1``); may require grad.
    lengths : Tensor, shape ``xs.shape[:-2]``, optional
        Integer lengths in ``[2, T]`` for series of different lengths padded to ``T``: series ``b`` is the spline of
        ``xs[b, :L_b]`` on ``ts[:L_b]`` (what is after ``L_b`` is ignored, as if it were not there), and from
        ``ts[L_b - 1]`` on its pieces hold its value there (``[x, 0, 0, 0]``). Default: every series has length ``T``.

    Returns
    -------
    Tensor, shape ``(..., T - 1, 4 * channels)``: ``[a, b, two_c, three_d]`` per piece (see the module docstring).

    Notes
    -----
    Without NaN and ``lengths`` one Thomas solve runs on all series and channels with the shared knot spacings.
    Otherwise every (series, channel) row is solved on its own knots, all rows at once (one Thomas solve with
    per-row spacings, a loop over the knot slots only); each row's result is the same, to the bit, as the spline
    of that row alone on its knots.

    Examples
    --------
    >>> import torch
    >>> c = natural_cubic_coeffs(torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64))
    >>> c.shape, CubicPath(torch.arange(3.0, dtype=torch.float64), c).evaluate(1.0)
    (torch.Size([2, 4]), tensor([1.], dtype=torch.float64))
    >>> natural_cubic_coeffs(torch.tensor([[[0.0], [1.0], [0.0]]]), lengths=torch.tensor([2]))[0, -1]   # held
    tensor([1., 0., 0., 0.])
    """
    ts = check_data("natural_cubic_coeffs", xs, ts)
    if lengths is not None:
        T = xs.shape[-2]
        if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.is_complex() or \
                lengths.shape != xs.shape[:-2]:
            raise InputError(f"natural_cubic_coeffs: lengths must be an integer tensor of shape "
                             f"{tuple(xs.shape[:-2])} (the data's batch shape), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                             f"{tuple(getattr(lengths, 'shape', ()))}.")
        if lengths.numel() and (bool((lengths < 2).any()) or bool((lengths > T).any())):
            raise InputError(f"natural_cubic_coeffs: every length must be in [2, {T}], got "
                             f"{int(lengths.min())}..{int(lengths.max())}.")
        return _natural_rows(xs, ts, lengths)
    if not bool(torch.isnan(xs).any()):
        return _natural_no_nan(ts, xs)
    return _natural_rows(xs, ts, None)


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
