"""Piecewise-linear interpolation of observations: the simplest control path."""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

from ..errors import InputError
from .fill import fill_missing, rectilinear_data


class LinearPath:
    """``X(t)``: the piecewise-linear interpolant of observations ``xs`` at times ``ts``.

    Parameters
    ----------
    ts : Tensor, shape ``(T,)``, ``T >= 2``
        Observation times, strictly increasing, real floating point, not requiring grad (the knots are where the
        solve lands; their positions are not differentiated).
    xs : Tensor, shape ``(..., T, channels)``
        Observations (any batch dimensions in front), on ``ts``'s device. May require grad: gradients reach it
        through every gradient method (:meth:`grad_tensors`). NaN marks a missing value, filled as torchcde does
        (:func:`neurodyn.paths.fill.fill_missing`: linear between observations, constant before the first and after
        the last one).

    Notes
    -----
    ``left=True``: ``derivative`` on an interior knot is the slope of the piece ending there (torchcde's
    convention).

    Values and derivatives have shape ``(..., channels)``. Outside ``[ts[0], ts[-1]]`` the first and last pieces
    are extended linearly. ``derivative`` at an interior knot is the slope of the piece starting there (see
    :mod:`neurodyn.core.paths`); ``knots`` are the interior and end times as floats.

    Examples
    --------
    >>> import torch
    >>> ts = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    >>> xs = torch.tensor([[0.0], [2.0], [1.0]], dtype=torch.float64)   # (T=3, channels=1)
    >>> X = LinearPath(ts, xs)
    >>> X.evaluate(torch.tensor(2.0, dtype=torch.float64))
    tensor([1.5000], dtype=torch.float64)
    >>> X.derivative(torch.tensor(0.5, dtype=torch.float64)), X.increment(0.0, 3.0)
    (tensor([2.], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """

    def __init__(self, ts: Tensor, xs: Tensor, *, left: bool = False):
        if not isinstance(ts, Tensor) or not isinstance(xs, Tensor):
            raise InputError(f"LinearPath(ts, xs) takes tensors, got {type(ts).__name__} and {type(xs).__name__}.")
        if ts.dim() != 1 or ts.numel() < 2:
            raise InputError(f"LinearPath: ts must be 1-d with at least 2 times, got shape {tuple(ts.shape)}.")
        if not ts.is_floating_point():
            raise InputError(f"LinearPath: ts must be floating point, got {ts.dtype}.")
        if ts.requires_grad:
            raise InputError("LinearPath: ts requires grad, but knot times are not differentiated (the solve lands "
                             "on them); pass ts.detach().")
        if xs.dim() < 2 or xs.shape[-2] != ts.shape[0]:
            raise InputError(f"LinearPath: xs must have shape (..., T, channels) with T = len(ts) = {ts.shape[0]}, "
                             f"got {tuple(xs.shape)}.")
        if not (xs.is_floating_point() or xs.is_complex()):
            raise InputError(f"LinearPath: xs must be floating point, got {xs.dtype}.")
        if xs.device != ts.device:
            raise InputError(f"LinearPath: ts is on {ts.device} but xs is on {xs.device}: use one device.")
        knots = ts.detach().cpu().tolist()
        if not all(math.isfinite(v) for v in knots) or any(b <= a for a, b in zip(knots, knots[1:])):
            raise InputError(f"LinearPath: ts must be finite and strictly increasing, got "
                             f"{knots if len(knots) <= 20 else 'a sequence that is not'}.")
        if bool(torch.isnan(xs).any()):
            xs = fill_missing(xs, ts)
        self.ts = ts
        self.xs = xs
        self.knots: tuple[float, ...] = tuple(knots)
        self._inner = ts[1:-1].contiguous()  # searchsorted over the interior knots gives the piece index
        self._inner_list = list(knots[1:-1])
        self._bisect = bisect.bisect_left if left else bisect.bisect_right
        self._right = not left
        self._starts = ts[:-1]
        self._dt = (ts[1:] - ts[:-1]).to(xs.dtype)
        # Slopes precomputed for constant data; data requiring grad gets them per call, so that every evaluation
        # builds its own graph back to xs (a graph built once here would be freed by the first backward pass).
        self._slopes = None if xs.requires_grad else (xs[..., 1:, :] - xs[..., :-1, :]) / self._dt.unsqueeze(-1)

    @classmethod
    def rectilinear(cls, xs: Tensor, time_index: int) -> LinearPath:
        """The rectilinear interpolation of ``xs`` ``(..., T, channels)`` whose channel ``time_index`` holds the
        time (:func:`neurodyn.paths.fill.rectilinear_data`), on the times ``0, 1, ..., 2T - 2``: causal."""
        data = rectilinear_data(xs, time_index)
        return cls(torch.arange(data.shape[-2], dtype=data.dtype, device=data.device), data)

    def _piece(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        tt = torch.as_tensor(t, dtype=self.ts.dtype, device=self.ts.device)
        if tt.dim() == 0 and tt.device.type == "cpu":  # host bisection: no kernel launches
            return torch.tensor([self._bisect(self._inner_list, float(tt))]), tt
        return torch.searchsorted(self._inner, tt.reshape(1), right=self._right), tt

    def _slope(self, i: Tensor) -> Tensor:
        if self._slopes is not None:
            return self._slopes.index_select(-2, i).squeeze(-2)
        x = self.xs.index_select(-2, torch.cat([i, i + 1]))
        return (x[..., 1, :] - x[..., 0, :]) / self._dt.index_select(0, i)

    def evaluate(self, t: Tensor | float) -> Tensor:
        """``X(t)``, shape ``(..., channels)``."""
        i, tt = self._piece(t)
        x0 = self.xs.index_select(-2, i).squeeze(-2)
        return x0 + self._slope(i) * (tt - self._starts.index_select(0, i)).to(self.xs.dtype)

    def derivative(self, t: Tensor | float) -> Tensor:
        """``dX/dt(t)``, shape ``(..., channels)``: the slope of the piece containing ``t`` (of the piece starting
        at ``t`` on a knot)."""
        return self._slope(self._piece(t)[0])

    def derivative_grid(self, t: Tensor) -> Tensor:
        """``dX/dt`` at every time of ``t`` ``(N,)``, shape ``(N, ..., channels)``: ``derivative(t[i])`` in row ``i``
        (to rounding), from one evaluation (one gather, one node each in an autograd graph).

        Examples
        --------
        >>> import torch
        >>> X = LinearPath(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([[0.0], [2.0], [1.0]]))
        >>> X.derivative_grid(torch.tensor([0.5, 1.0, 2.0])).squeeze(-1)
        tensor([ 2.0000, -0.5000, -0.5000])
        """
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise InputError(f"LinearPath.derivative_grid: t must be a 1-d tensor of times, got "
                             f"{getattr(t, 'shape', type(t).__name__)}.")
        inner = torch.tensor(self._inner_list, dtype=torch.float64)
        i = torch.searchsorted(inner, t.detach().cpu().to(torch.float64), right=self._right).to(self.xs.device)
        if self._slopes is not None:
            return self._slopes.movedim(-2, 0).index_select(0, i)
        x = self.xs.movedim(-2, 0)
        dt = self._dt.index_select(0, i).view(-1, *([1] * (x.dim() - 1)))
        return (x.index_select(0, i + 1) - x.index_select(0, i)) / dt

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``X(t) - X(s)``, shape ``(..., channels)``."""
        return self.evaluate(t) - self.evaluate(s)

    def grad_tensors(self) -> list[Tensor]:
        """``[xs]`` when it requires grad, else ``[]``."""
        return [self.xs] if self.xs.requires_grad else []

    def __repr__(self) -> str:
        return f"LinearPath(T={len(self.knots)}, xs shape={tuple(self.xs.shape)})"
