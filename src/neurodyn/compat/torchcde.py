"""The torchcde drop-in: ``import neurodyn.compat.torchcde as torchcde`` runs torchcde code on neurodyn's engine.

Coefficient tensors have torchcde's layout (``(..., T, C)`` for linear, ``(..., T - 1, 4C)`` ``[a, b, two_c,
three_d]`` for the cubics), so coefficients saved with torchcde load here and the reverse. :func:`cdeint` solves
``z(t) = z(t_0) + int f(s, z) dX(s)`` through :func:`neurodyn.solve` (``backend="torchdiffeq"``: torchdiffeq's
methods and options via :func:`neurodyn.odeint`; ``"torchsde"``: its fixed-step methods with ``dt``).

Differences from torchcde: with ``adjoint=True`` the path's tensors that require grad (its coefficients and times)
always receive their gradient, with or without ``adjoint_params`` (torchcde warns and leaves them out); the knot
times of the linear interpolation cannot require grad (its derivative jumps there: an InputError says so; the cubic
paths' can); ``logsig_windows`` computes depths 1 and 2 in torch (no signatory).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..compat.torchdiffeq import odeint, odeint_adjoint
from ..core.term import ControlTerm, field_params
from ..errors import InputError
from ..paths.cubic import CubicPath, hermite_coeffs
from ..paths.cubic import natural_cubic_coeffs as _natural
from ..paths.fill import check_data, fill_missing, rectilinear_data
from ..paths.linear import LinearPath
from ..paths.logsig import logsig_windows
from ..solve import solve

__all__ = ["CubicSpline", "LinearInterpolation", "NaturalCubicSpline", "TupleControl", "cdeint",
           "hermite_cubic_coefficients_with_backward_differences", "linear_interpolation_coeffs",
           "logsig_windows", "natural_cubic_coeffs", "natural_cubic_spline_coeffs"]


# ----------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------
def natural_cubic_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """torchcde's ``natural_cubic_coeffs``: ``x`` ``(..., T, C)`` (NaN: missing) -> ``(..., T - 1, 4C)``.

    Examples
    --------
    >>> import torch
    >>> natural_cubic_coeffs(torch.rand(2, 5, 3)).shape
    torch.Size([2, 4, 12])
    """
    return _natural(x, t)


def natural_cubic_spline_coeffs(x: Tensor, t: Tensor | None = None) -> Tensor:
    """Deprecated torchcde alias of :func:`natural_cubic_coeffs` with its older end rule: a channel's missing first
    (last) value is set to its first (last) observation, and the spline passes through the observed values (the
    other leading/trailing NaN included). Warns ``DeprecationWarning``. Shapes as :func:`natural_cubic_coeffs`.

    Examples
    --------
    >>> import torch, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     natural_cubic_spline_coeffs(torch.rand(5, 3)).shape
    torch.Size([4, 12])
    """
    warnings.warn("natural_cubic_spline_coeffs is deprecated (as in torchcde): use natural_cubic_coeffs, which "
                  "handles missing values at the start and end better.", DeprecationWarning, stacklevel=2)
    t = check_data("natural_cubic_spline_coeffs", x, t)
    nan = torch.isnan(x)
    if bool(nan[..., 0, :].any()) or bool(nan[..., -1, :].any()):
        obs = ~nan
        T = x.shape[-2]
        idx = torch.arange(T, device=x.device).view(T, 1).expand_as(x)
        first = torch.where(obs, idx, torch.full_like(idx, T)).amin(-2, keepdim=True).clamp(max=T - 1)
        last = torch.where(obs, idx, torch.full_like(idx, -1)).amax(-2, keepdim=True).clamp(min=0)
        x0 = x.gather(-2, first)
        x1 = x.gather(-2, last)
        x = torch.cat([torch.where(nan[..., :1, :], x0, x[..., :1, :]), x[..., 1:-1, :],
                       torch.where(nan[..., -1:, :], x1, x[..., -1:, :])], -2)
    return _natural(x, t)


def hermite_cubic_coefficients_with_backward_differences(x: Tensor, t: Tensor | None = None) -> Tensor:
    """torchcde's Hermite coefficients (causal): ``x`` ``(..., T, C)`` -> ``(..., T - 1, 4C)``
    (:func:`neurodyn.paths.hermite_coeffs`).

    Examples
    --------
    >>> import torch
    >>> hermite_cubic_coefficients_with_backward_differences(torch.rand(5, 3)).shape
    torch.Size([4, 12])
    """
    return hermite_coeffs(x, t)


def linear_interpolation_coeffs(x: Tensor, t: Tensor | None = None, rectilinear: int | None = None) -> Tensor:
    """torchcde's ``linear_interpolation_coeffs``: ``x`` ``(..., T, C)`` with NaN filled (``(..., T, C)``), or with
    ``rectilinear=i`` (channel ``i`` holds the time) the rectilinear data ``(..., 2T - 1, C)``.

    Examples
    --------
    >>> import torch
    >>> linear_interpolation_coeffs(torch.tensor([[0.0], [float("nan")], [2.0]])).squeeze(-1)
    tensor([0., 1., 2.])
    """
    if rectilinear is not None:
        if isinstance(x, Tensor) and x.dim() >= 2 and bool(torch.isnan(x[..., 0, :]).any()):
            warnings.warn("The data x begins with missing values in some channels: the rectilinear path backward-fills "
                          "the first observation, which is not causal; fill the start of each channel yourself (e.g. "
                          "with the channel's mean) if causality matters.", UserWarning, stacklevel=2)
        x = rectilinear_data(x, rectilinear)
    return fill_missing(x, t)


# ----------------------------------------------------------------------------------------------
# Interpolations
# ----------------------------------------------------------------------------------------------
def _default_t(n: int, like: Tensor) -> Tensor:
    return torch.linspace(0, n - 1, n, dtype=like.dtype, device=like.device)


class _Interpolation(nn.Module):
    """Shared parts: ``grid_points``, ``interval``, vector times, the Path protocol (no knots landed on)."""

    knots: tuple[float, ...] = ()

    @property
    def grid_points(self) -> Tensor:
        """The knot times, shape ``(T,)``."""
        return self._t

    @property
    def interval(self) -> Tensor:
        """``[t_0, t_{T-1}]``, shape ``(2,)``."""
        return torch.stack([self._t[0], self._t[-1]])

    def as_path(self, land: bool = False) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def evaluate(self, t: Tensor | float) -> Tensor:
        """``X(t)``: shape ``(..., C)`` for a scalar ``t``; ``(..., *t.shape, C)`` for a tensor of times."""
        t = torch.as_tensor(t, dtype=self._t.dtype, device=self._t.device)
        if t.dim():
            return self._vector(t, derivative=False)
        return self.as_path().evaluate(t)

    def derivative(self, t: Tensor | float) -> Tensor:
        """``dX/dt(t)``: shapes as :meth:`evaluate`. On a knot: the piece ending there (torchcde's convention)."""
        t = torch.as_tensor(t, dtype=self._t.dtype, device=self._t.device)
        if t.dim():
            return self._vector(t, derivative=True)
        return self.as_path().derivative(t)

    def _index(self, t: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.bucketize(t.detach(), self._t.detach()).sub(1).clamp(0, self._t.shape[0] - 2)
        return idx, t - self._t[idx]


class LinearInterpolation(_Interpolation):
    """torchcde's ``LinearInterpolation(coeffs, t=None)``: coefficients ``(..., T, C)`` from
    :func:`linear_interpolation_coeffs` on times ``t`` ``(T,)`` (default ``0, ..., T - 1``).

    Examples
    --------
    >>> import torch
    >>> X = LinearInterpolation(linear_interpolation_coeffs(torch.tensor([[0.0], [2.0], [3.0]])))
    >>> X.evaluate(0.5), X.derivative(torch.tensor([0.5, 1.5])), X.interval
    (tensor([1.]), tensor([[2.],
            [1.]]), tensor([0., 2.]))
    """

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        t = check_data("LinearInterpolation", coeffs, t, allow_t_grad=False)
        self.register_buffer("_t", t)
        self.register_buffer("_coeffs", coeffs)

    def as_path(self, land: bool = False) -> LinearPath:
        """A :class:`neurodyn.LinearPath` on the current buffers (torchcde's knot convention)."""
        path = LinearPath(self._t, self._coeffs, left=True)
        if not land:
            path.knots = ()
        return path

    def _vector(self, t: Tensor, derivative: bool) -> Tensor:
        idx, frac = self._index(t)
        x0, x1 = self._coeffs[..., idx, :], self._coeffs[..., idx + 1, :]
        dt = (self._t[idx + 1] - self._t[idx]).unsqueeze(-1)
        slope = (x1 - x0) / dt
        return slope if derivative else x0 + frac.unsqueeze(-1) * slope


class CubicSpline(_Interpolation):
    """torchcde's ``CubicSpline(coeffs, t=None)``: any cubic coefficients ``(..., T - 1, 4C)``
    (:func:`natural_cubic_coeffs`, :func:`hermite_cubic_coefficients_with_backward_differences`) on times ``t``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 7, 3)
    >>> X = CubicSpline(natural_cubic_coeffs(x))
    >>> X.derivative(torch.tensor(0.4)).shape, bool(torch.allclose(X.evaluate(3.0), x[:, 3]))
    (torch.Size([2, 3]), True)
    """

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(coeffs, Tensor) or coeffs.dim() < 2 or coeffs.shape[-1] % 4:
            raise InputError(f"CubicSpline: coeffs must have shape (..., T - 1, 4 * channels) (as returned by "
                             f"natural_cubic_coeffs), got {getattr(coeffs, 'shape', type(coeffs).__name__)}.")
        if t is None:
            t = torch.linspace(0, coeffs.shape[-2], coeffs.shape[-2] + 1, dtype=coeffs.dtype, device=coeffs.device)
        self.register_buffer("_t", t)
        self.register_buffer("_coeffs", coeffs)
        # checks the times against the coefficients; the first as_path() returns it (a path is used by one solve: it
        # keeps the graph of the evaluations' rows)
        self._unused_path: CubicPath | None = CubicPath(t, coeffs, land=False, left=True)

    def as_path(self, land: bool = False) -> CubicPath:
        """A :class:`neurodyn.paths.CubicPath` on the current buffers (torchcde's knot convention)."""
        path, self._unused_path = self._unused_path, None
        if path is not None and not land and path.ts is self._t and path.coeffs is self._coeffs:
            return path
        return CubicPath(self._t, self._coeffs, land=land, left=True)

    def _vector(self, t: Tensor, derivative: bool) -> Tensor:
        idx, frac = self._index(t)
        a, b, c2, d3 = self._coeffs[..., idx, :].chunk(4, -1)
        s = frac.unsqueeze(-1)
        if derivative:
            return b + (c2 + d3 * s) * s
        return a + (b + (0.5 * c2 + d3 * s / 3) * s) * s


class NaturalCubicSpline(CubicSpline):
    """Deprecated torchcde alias of :class:`CubicSpline` (warns ``DeprecationWarning``).

    Examples
    --------
    >>> import torch, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     NaturalCubicSpline(natural_cubic_coeffs(torch.rand(4, 2))).evaluate(1.0).shape
    torch.Size([2])
    """

    def __init__(self, coeffs: Tensor, t: Tensor | None = None, **kwargs: Any):
        warnings.warn("NaturalCubicSpline is deprecated (as in torchcde): use CubicSpline.", DeprecationWarning,
                      stacklevel=2)
        super().__init__(coeffs, t, **kwargs)


class TupleControl(nn.Module):
    """torchcde's ``TupleControl(*controls)``: several controls over one interval; ``evaluate``/``derivative``
    return tuples (for a tuple state ``z0`` in :func:`cdeint`).

    Examples
    --------
    >>> import torch
    >>> X = TupleControl(LinearInterpolation(torch.rand(3, 2)), CubicSpline(natural_cubic_coeffs(torch.rand(3, 1))))
    >>> [d.shape for d in X.derivative(torch.tensor(0.5))]
    [torch.Size([2]), torch.Size([1])]
    """

    def __init__(self, *controls: Any):
        super().__init__()
        if not controls:
            raise InputError("TupleControl needs one or more controls.")
        self._interval = controls[0].interval
        grid = controls[0].grid_points
        same = True
        for c in controls[1:]:
            if c.interval.shape != self._interval.shape or bool((c.interval != self._interval).any()):
                raise InputError("TupleControl: the controls must share one interval.")
            if same and (c.grid_points.shape != grid.shape or bool((c.grid_points != grid).any())):
                same = False
        self._grid_points = grid if same else None
        self.controls = nn.ModuleList(controls)

    @property
    def interval(self) -> Tensor:
        return self._interval

    @property
    def grid_points(self) -> Tensor:
        if self._grid_points is None:
            raise InputError("TupleControl: the controls have different grid points.")
        return self._grid_points

    def evaluate(self, t: Tensor | float) -> tuple[Tensor, ...]:
        return tuple(c.evaluate(t) for c in self.controls)

    def derivative(self, t: Tensor | float) -> tuple[Tensor, ...]:
        return tuple(c.derivative(t) for c in self.controls)


# ----------------------------------------------------------------------------------------------
# cdeint
# ----------------------------------------------------------------------------------------------
class _ForeignPath:
    """Any object with ``derivative(t)`` (a torchcde interpolation itself) as a path: no knots landed on; its
    buffers that require grad are its gradient tensors."""

    knots: tuple[float, ...] = ()

    def __init__(self, X: Any):
        self.X = X

    def evaluate(self, t: Tensor | float) -> Tensor:
        return self.X.evaluate(t)

    def derivative(self, t: Tensor | float) -> Tensor:
        return self.X.derivative(t)

    def increment(self, s: Tensor | float, t: Tensor | float) -> Tensor:
        return self.X.evaluate(t) - self.X.evaluate(s)

    def grad_tensors(self) -> list[Tensor]:
        if isinstance(self.X, nn.Module):
            return [b for b in self.X.buffers() if b.requires_grad] + \
                [p for p in self.X.parameters() if p.requires_grad]
        return []


def _path_of(X: Any, land: bool) -> Any:
    if isinstance(X, _Interpolation):
        return X.as_path(land)
    if not callable(getattr(X, "derivative", None)):
        raise InputError(f"cdeint: X must have a derivative(t) method (e.g. torchcde.CubicSpline(coeffs)), got "
                         f"{type(X).__name__}.")
    return _ForeignPath(X)


class _ProdTerm(ControlTerm):
    """A ControlTerm whose product ``f(t, z) dX/dt`` is the user's fused ``func.prod(t, z, dXdt)``."""

    __slots__ = ()

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        return self.vector_field.prod(t, y, self.path.derivative(t))

    def vf_prod(self, t: Tensor, y: Tensor, control: Tensor) -> Tensor:
        return self.vector_field.prod(t, y, control)

    def ode_at(self, t: Tensor, y: Tensor, dxdt: Tensor) -> Tensor:
        return self.vector_field.prod(t, y, dxdt.squeeze(-2))


def _check_shapes(dX: Tensor, out: Tensor, z0: Tensor, is_prod: bool) -> None:
    if not isinstance(dX, Tensor) or not isinstance(out, Tensor):
        raise InputError("cdeint: X.derivative and func must return tensors for a tensor z0.")
    if dX.shape[:-1] != z0.shape[:-1]:
        raise InputError(f"cdeint: X.derivative returned shape {tuple(dX.shape)} but z0 has shape {tuple(z0.shape)}: "
                         f"their batch dimensions (all but the last) must be equal.")
    if is_prod:
        if out.shape != z0.shape:
            raise InputError(f"cdeint: func.prod returned shape {tuple(out.shape)}, not z0's {tuple(z0.shape)}.")
        return
    want = (*z0.shape, dX.shape[-1])
    if out.shape != want:
        raise InputError(f"cdeint: func(t, z) returned shape {tuple(out.shape)}; it must be (..., hidden_channels, "
                         f"input_channels) = {want} for z0 of shape {tuple(z0.shape)} and a control of "
                         f"{dX.shape[-1]} channels.")


_SDE_METHODS = {"euler": "euler", "milstein": "euler", "midpoint": "midpoint", "heun": "heun2"}


def cdeint(X: Any, func: Callable | nn.Module, z0: Tensor | tuple[Tensor, ...], t: Tensor, adjoint: bool = True,
           backend: str = "torchdiffeq", **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
    """torchcde's ``cdeint``: solve ``z(t) = z(t_0) + int_{t_0}^t f(s, z(s)) dX(s)``.

    Parameters
    ----------
    X : a control
        :class:`CubicSpline`, :class:`LinearInterpolation`, :class:`TupleControl`, a torchcde interpolation, or any
        object with ``derivative(t)`` returning ``(..., input_channels)``.
    func : callable or ``nn.Module``
        ``func(t, z)`` returning ``(..., hidden_channels, input_channels)``, or an object with
        ``func.prod(t, z, dXdt)`` returning ``(..., hidden_channels)`` (the product fused).
    z0 : Tensor, shape ``(..., hidden_channels)`` (or a tuple with a :class:`TupleControl`)
    t : Tensor, shape ``(T,)``
        Output times; ``t[0]`` is the initial time. May require grad.
    adjoint : bool
        Continuous adjoint gradients (default, as torchcde) or backpropagation through the steps.
    backend : ``"torchdiffeq"`` or ``"torchsde"``
        ``"torchdiffeq"``: ``method`` (default ``"dopri5"``), ``rtol`` (1e-4), ``atol`` (1e-6), ``options`` and the
        ``adjoint_*`` arguments as :func:`neurodyn.odeint_adjoint`; ``options=dict(jump_t=..., step_t=...,
        grid_points=...)`` land on times. ``"torchsde"``: the CDE is an SDE without noise; ``method`` ``"midpoint"``
        (default), ``"euler"``, ``"heun"``, ``"milstein"`` (= Euler without noise), fixed steps ``dt`` (1e-3).
    **kwargs
        The backend's options (above), and ``adjoint_params`` (sequence of Tensor, optional): the tensors needing
        gradients with ``adjoint=True`` (default: ``func``'s parameters). The path's tensors that require grad are
        always added.

    Returns
    -------
    Tensor, shape ``(..., T, hidden_channels)`` (the time dimension second to last, as torchcde), or a tuple.

    Examples
    --------
    >>> import torch
    >>> class F(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(4, 4 * 3)
    ...     def forward(self, t, z):
    ...         return self.lin(z).tanh().view(*z.shape, 3)
    >>> X = CubicSpline(natural_cubic_coeffs(torch.randn(8, 10, 3)))
    >>> z = cdeint(X, F(), torch.zeros(8, 4), X.interval)
    >>> z.shape
    torch.Size([8, 2, 4])
    """
    if backend not in ("torchdiffeq", "torchsde"):
        raise InputError(f"cdeint: backend must be 'torchdiffeq' or 'torchsde', got {backend!r}.")
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] < 1:
        raise InputError(f"cdeint: t must be a 1-d tensor of output times, got "
                         f"{getattr(t, 'shape', type(t).__name__)}.")
    adjoint_params = kwargs.pop("adjoint_params", None)
    kwargs.setdefault("atol", 1e-6)
    kwargs.setdefault("rtol", 1e-4)
    is_prod = callable(getattr(func, "prod", None))
    if isinstance(X, TupleControl) or isinstance(z0, (tuple, list)):
        if not (isinstance(X, TupleControl) and isinstance(z0, (tuple, list)) and len(X.controls) == len(z0)):
            raise InputError("cdeint: a tuple z0 needs a TupleControl X with one control per tensor of z0.")
        paths = [_path_of(c, False) for c in X.controls]
        field = _tuple_field(func, paths, is_prod)
        grad_tensors = [x for p in paths for x in p.grad_tensors()] if adjoint else []
        z0 = tuple(z0)
        with torch.no_grad():
            dXs = [p.derivative(t[0].detach()) for p in paths]
            outs = func.prod(t[0], z0, dXs) if is_prod else func(t[0], z0)
            if not isinstance(outs, (tuple, list)) or len(outs) != len(z0):
                raise InputError("cdeint: with a tuple z0, func must return a tuple of the same length.")
            for dX, out, z in zip(dXs, outs, z0):
                _check_shapes(dX, out, z, is_prod)
    else:
        if not isinstance(z0, Tensor):
            raise InputError(f"cdeint: z0 must be a tensor or a tuple of tensors, got {type(z0).__name__}.")
        land = any(k in (kwargs.get("options") or {}) for k in ("jump_t", "step_t", "grid_points"))
        path = _path_of(X, False)
        term = (_ProdTerm if is_prod else ControlTerm)(func, path)
        with torch.no_grad():
            dX = path.derivative(t[0].detach())
            out = func.prod(t[0].detach(), z0, dX) if is_prod else func(t[0].detach(), z0)
        _check_shapes(dX, out, z0, is_prod)
        field = term.ode
        grad_tensors = list(path.grad_tensors()) if adjoint else []  # (the adjoint's: a direct solve needs none)
        del land  # landing is asked through options (translated by odeint), as in torchcde
    if t.shape[0] == 1:
        ys = torch.stack([z0]) if isinstance(z0, Tensor) else tuple(torch.stack([z]) for z in z0)
        return _time_second_last(ys)
    if backend == "torchsde":
        ys = _sde_backend(field, z0, t, adjoint, adjoint_params, func, grad_tensors, kwargs)
        return _time_second_last(ys)
    if adjoint:
        kwargs.setdefault("adjoint_atol", kwargs["atol"])
        kwargs.setdefault("adjoint_rtol", kwargs["rtol"])
        params = _adjoint_params(adjoint_params, func, grad_tensors, X)
        ys = odeint_adjoint(field, z0, t, adjoint_params=params, **kwargs)
    else:
        ys = odeint(field, z0, t, **kwargs)
    return _time_second_last(ys)


def _adjoint_params(adjoint_params: Any, func: Any, grad_tensors: list[Tensor], X: Any) -> list[Tensor]:
    """The user's adjoint parameters (default: ``func``'s) joined by the path's gradient tensors, without the
    path's own coefficient and time buffers (the path's gradient tensors stand for them: counting both would give
    them their gradient twice)."""
    params = list(adjoint_params) if adjoint_params is not None else field_params(func)
    controls = X.controls if isinstance(X, TupleControl) else [X]
    covered = {id(b) for c in controls if isinstance(c, _Interpolation) for b in (c._t, c._coeffs)}
    params = [p for p in params if id(p) not in covered]
    seen = {id(p) for p in params}
    return params + [x for x in grad_tensors if id(x) not in seen]


def _tuple_field(func: Any, paths: list, is_prod: bool) -> Callable:
    def field(t: Tensor, z: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        dXs = [p.derivative(t) for p in paths]
        if is_prod:
            return tuple(func.prod(t, z, dXs))
        return tuple(torch.matmul(v, d.unsqueeze(-1)).squeeze(-1) for v, d in zip(func(t, z), dXs))
    return field


def _time_second_last(ys: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    if isinstance(ys, Tensor):
        return ys.movedim(0, -2)
    return tuple(y.movedim(0, -2) for y in ys)


def _sde_backend(field: Callable, z0: Any, t: Tensor, adjoint: bool, adjoint_params: Any, func: Any,
                 grad_tensors: list[Tensor], kwargs: dict) -> Any:
    if isinstance(z0, tuple):
        raise InputError("cdeint: backend='torchsde' takes a tensor z0 (as torchsde).")
    method = kwargs.pop("method", "midpoint")
    if method not in _SDE_METHODS:
        raise InputError(f"cdeint: backend='torchsde' supports the methods {', '.join(sorted(_SDE_METHODS))} here "
                         f"(the CDE has no noise), got {method!r}.")
    if kwargs.pop("adaptive", False):
        raise InputError("cdeint: backend='torchsde' with adaptive=True is not supported; use "
                         "backend='torchdiffeq' for adaptive steps.")
    dt = float(kwargs.pop("dt", 1e-3))
    rtol, atol = kwargs.pop("rtol"), kwargs.pop("atol")
    for k in ("adjoint_method", "adjoint_adaptive", "adjoint_rtol", "adjoint_atol", "dt_min", "names", "options",
              "adjoint_options", "bm", "logqp"):
        kwargs.pop(k, None)
    if kwargs:
        raise InputError(f"cdeint: unknown argument(s) {sorted(kwargs)} for backend='torchsde'.")
    params = None
    if adjoint:
        params = _adjoint_params(adjoint_params, func, grad_tensors, None)
    sol = solve(field, z0, t, method=_SDE_METHODS[method], step_size=dt, rtol=rtol, atol=atol,
                gradient="adjoint" if adjoint else "direct", params=params)
    return sol.ys
