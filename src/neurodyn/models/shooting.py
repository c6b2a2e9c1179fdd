"""Multiple shooting for fitting long trajectories: ``MultipleShooting``, a thin ``nn.Module`` over
:func:`neurodyn.solve`.

The observation grid ``t_0 < t_1 < ... < t_{T-1}`` (uniform) is cut into ``K`` segments of ``n = (T - 1) / K``
intervals each. Segment ``k`` starts at ``t_{kn}`` from its own initial state ``s_k`` (a parameter, initialised
from the observations or given) and covers ``t_{kn} .. t_{(k+1)n}``. All ``K`` segments are integrated in
**one batched solve** on the common local grid ``tau_j = t_j - t_0`` (``j = 0..n``), as a batch of ``K`` states:
the field must be autonomous (``f(t, y)`` ignoring ``t``; a time-dependent field can carry time as a state
component) and must accept the extra leading dimension ``K``.

The fit adds the **continuity defects** ``d_k = y_k(t_{(k+1)n}) - s_{k+1}`` (``k = 0..K-2``) to the data loss as a
penalty, ``loss = data_loss + weight * mean(d^2)`` (:meth:`MultipleShooting.loss`); raising ``weight`` along a
schedule (:func:`penalty_schedule`) drives ``d -> 0``, where the segments join into one trajectory and the
objective is single shooting's. Short segments keep each solve inside the horizon where the trajectory still
depends smoothly on its start, which removes the local minima that long single-shooting fits of oscillatory or
chaotic systems fall into.

Example
-------
Fit the decay rate of ``dy/dt = -a y`` with 4 segments:

>>> import torch, neurodyn
>>> from neurodyn.models import MultipleShooting
>>> a = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
>>> field = lambda t, y: -a * y
>>> t = torch.linspace(0, 4, 9, dtype=torch.float64)
>>> obs = torch.exp(-0.7 * t).unsqueeze(-1)            # (9, 1)
>>> ms = MultipleShooting(field, t, num_segments=4, y_obs=obs, params=[a], rtol=1e-9, atol=1e-11)
>>> opt = torch.optim.LBFGS(list(ms.parameters()) + [a], max_iter=200, line_search_fn="strong_wolfe")
>>> def closure():
...     opt.zero_grad(); loss = ms.loss(obs, weight=100.0); loss.backward(); return loss
>>> _ = opt.step(closure)
>>> round(float(a), 4)
0.7
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..fields import takes_time
from ..solve import solve


def penalty_schedule(start: float = 1.0, factor: float = 10.0, rounds: int = 4) -> list[float]:
    """Continuity weights ``start * factor**i`` for ``i = 0..rounds-1`` (a penalty schedule: fit, raise the
    weight, fit again from the previous optimum).

    >>> penalty_schedule(1.0, 10.0, 3)
    [1.0, 10.0, 100.0]
    """
    if not (start > 0 and factor >= 1 and isinstance(rounds, int) and rounds >= 1):
        raise InputError(f"penalty_schedule: need start > 0, factor >= 1 and rounds >= 1, got {start}, {factor}, "
                         f"{rounds}.")
    return [start * factor ** i for i in range(rounds)]


class MultipleShooting(nn.Module):
    """Multiple shooting over a uniform grid (see the module docstring).

    Parameters
    ----------
    func : callable ``f(t, y)`` or ``f(y)``
        An autonomous vector field that accepts a leading batch of ``K`` segments: called with ``y`` of shape
        ``(K, *state_shape)``.
    t : Tensor, shape ``(T,)``
        Uniform, increasing observation times; ``T - 1`` must be a multiple of ``num_segments``.
    num_segments : int
        ``K >= 1`` (``K = 1`` is single shooting with a learned initial state).
    y_obs : Tensor, shape ``(T, *state_shape)``, optional
        Observations: the segments' initial states start at ``y_obs[k n]``. Else give ``init``.
    init : Tensor, shape ``(K, *state_shape)``, optional
        The segments' initial states.
    params : sequence of Tensor, optional
        Tensors the field uses that need gradients, when ``func`` is not an ``nn.Module`` (passed to ``solve``).
    **solve_options :
        Any keyword of :func:`neurodyn.solve` (``method``, ``rtol``, ``atol``, ``gradient``, ``step_size``, ...).

    Attributes
    ----------
    starts : nn.Parameter, shape ``(K, *state_shape)``
        The segments' initial states ``s_k``.
    """

    def __init__(self, func: Callable, t: Tensor, num_segments: int, *, y_obs: Tensor | None = None,
                 init: Tensor | None = None, params: Sequence[Tensor] | None = None, **solve_options: Any):
        super().__init__()
        if not callable(func):
            raise InputError(f"MultipleShooting: func must be callable, got {type(func).__name__}.")
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() < 2:
            raise InputError("MultipleShooting: t must be a 1-D tensor of at least 2 increasing times.")
        if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
            raise InputError(f"MultipleShooting: num_segments must be a positive integer, got {num_segments!r}.")
        T = t.numel()
        if (T - 1) % num_segments:
            divisors = [k for k in range(1, T) if (T - 1) % k == 0]
            raise InputError(f"MultipleShooting: the {T - 1} intervals of t must split into num_segments equal "
                             f"segments; {num_segments} does not divide {T - 1} (choose one of {divisors}).")
        dt = t.diff()
        if bool((dt <= 0).any()):
            raise InputError("MultipleShooting: t must be strictly increasing.")
        if float((dt - dt.mean()).abs().max()) > 1e-9 * float(t[-1] - t[0]) + 1e2 * torch.finfo(t.dtype).eps:
            raise InputError("MultipleShooting: t must be uniform (every segment is solved on the same local grid "
                             "in one batched solve); resample the observations onto a uniform grid.")
        n = (T - 1) // num_segments
        if init is None:
            if y_obs is None:
                raise InputError("MultipleShooting: give y_obs (observations, (T, *state_shape)) or init (the "
                                 "segments' initial states, (K, *state_shape)).")
            if y_obs.shape[0] != T:
                raise InputError(f"MultipleShooting: y_obs must have len(t) = {T} rows, got {tuple(y_obs.shape)}.")
            init = y_obs[::n][:num_segments]
        elif init.shape[0] != num_segments:
            raise InputError(f"MultipleShooting: init must have num_segments = {num_segments} rows, got "
                             f"{tuple(init.shape)}.")
        self.func = func
        self._with_time = takes_time(func)
        self.t = t.detach()
        self.num_segments = num_segments
        self.segment_length = n
        self.starts = nn.Parameter(init.detach().clone())
        self.params = list(params) if params is not None else None
        self.solve_options = dict(solve_options)
        self.last_solution = None

    def _field(self, t: Tensor, y: Tensor) -> Tensor:
        return self.func(t, y) if self._with_time else self.func(y)

    def segments(self) -> Tensor:
        """All segments in one batched solve: shape ``(n + 1, K, *state_shape)`` (row ``j`` is local time
        ``tau_j``)."""
        tau = self.t[: self.segment_length + 1] - self.t[0]
        opts = dict(self.solve_options)
        if self.params is not None:
            opts["params"] = self.params
        sol = solve(self._field, self.starts, tau, **opts)
        self.last_solution = sol
        return sol.ys

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(trajectory, defects)``: the piecewise trajectory on ``t`` (``(T, *state_shape)``; point ``k n + j``
        from segment ``k``, the last point from the last segment's end) and the continuity defects
        ``y_k(end) - s_{k+1}`` (``(K - 1, *state_shape)``)."""
        ys = self.segments()
        n, K = self.segment_length, self.num_segments
        body = ys[:n].transpose(0, 1).reshape(K * n, *ys.shape[2:])
        traj = torch.cat([body, ys[n, K - 1:K]], 0)
        defects = ys[n, : K - 1] - self.starts[1:]
        return traj, defects

    def loss(self, y_obs: Tensor, weight: float = 1.0,
             data_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """``data_loss(trajectory, y_obs) + weight * mean(defects^2)`` (``data_loss`` defaults to the mean
        squared error; with ``K = 1`` there are no defects)."""
        traj, defects = self()
        fit = data_loss(traj, y_obs) if data_loss is not None else (traj - y_obs).pow(2).mean()
        if defects.numel() == 0:
            return fit
        return fit + weight * defects.pow(2).mean()

    def single_shooting(self, t: Tensor | None = None) -> Tensor:
        """One solve from the first segment's start ``s_0`` at ``t[0]`` over ``t`` (default: the fit's grid; any
        increasing times from ``t[0]``, e.g. beyond the data): shape ``(len(t), *state_shape)``."""
        tt = self.t if t is None else t
        opts = dict(self.solve_options)
        if self.params is not None:
            opts["params"] = self.params
        return solve(self._field, self.starts[0], tt, **opts).ys


__all__ = ["MultipleShooting", "penalty_schedule"]
