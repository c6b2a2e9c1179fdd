"""Neural controlled differential equations (Kidger et al. 2020): ``dz = f(z) dX(t)``, ``X`` the data's path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.term import ControlTerm
from ..errors import InputError
from ..paths.cubic import CubicPath
from ..paths.fill import check_data, fill_missing
from ..paths.linear import LinearPath
from ..solve import solve

_PATHS = ("cubic", "hermite", "linear")


_ACTIVATIONS: dict[str, type[nn.Module]] = {"softplus": nn.Softplus, "relu": nn.ReLU, "tanh": nn.Tanh}


class CDEField(nn.Module):
    """The default vector field: an MLP ``(..., hidden) -> (..., hidden, channels)`` with a ``tanh`` output.

    ``depth - 1`` hidden layers of ``width`` units, each followed by ``activation`` (``"softplus"``, ``"relu"`` or
    ``"tanh"``), then a linear layer to ``hidden * channels`` outputs and ``tanh``. Kidger et al. (2020) use
    ``depth=4`` (three hidden layers) with ``"relu"``.

    Examples
    --------
    >>> import torch
    >>> f = CDEField(8, 3, width=16, depth=4, activation="relu")
    >>> f(torch.tensor(0.0), torch.randn(5, 8)).shape
    torch.Size([5, 8, 3])
    """

    def __init__(self, hidden: int, channels: int, width: int = 64, depth: int = 2, activation: str = "softplus"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise InputError(f"CDEField: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}.")
        if not isinstance(depth, int) or depth < 1:
            raise InputError(f"CDEField: depth (the number of linear layers) must be a positive int, got {depth!r}.")
        layers: list[nn.Module] = []
        d = hidden
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), _ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, hidden * channels))
        self.net = nn.Sequential(*layers)
        self.hidden, self.channels = hidden, channels

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(self.net(z)).view(*z.shape[:-1], self.hidden, self.channels)


class NeuralCDE(nn.Module):
    """A neural CDE over irregularly sampled series: ``z(t_0) = W x(t_0) + c``, ``dz = f(z) dX(t)``, ``y = R z``.

    Parameters
    ----------
    input_channels, hidden_channels, output_channels : int
        Channels of the data (the time is *not* added: include it as a channel if wanted), of ``z``, of the
        readout.
    vector_field : nn.Module, optional
        ``f(t, z)``: ``(B, hidden) -> (B, hidden, input_channels)`` (default :class:`CDEField`).
    path : ``"cubic"`` (natural cubic spline), ``"hermite"`` (cubic Hermite with backward differences: causal, for
        online use) or ``"linear"``.
    method, rtol, atol, gradient, step_size :
        Passed to :func:`neurodyn.solve` (``gradient`` ``"adjoint"``, ``"direct"``, ``"checkpoint"``,
        ``"interpolated"``: the path's data receive their gradient through each).
    solve_kwargs : dict, optional
        Other :func:`neurodyn.solve` arguments.

    Notes
    -----
    ``forward(x, t=None, times=None)``: ``x`` ``(B, T, input_channels)`` with NaN for missing values, ``t`` ``(T,)``
    its times (default ``0..T-1``). Returns the readout ``(B, output_channels)`` at the last time, or at ``times``
    ``(K,)`` as ``(B, K, output_channels)``. Online/causal use: with ``path="hermite"`` the output at a time in
    ``[t_k, t_{k+1}]`` uses no observation after ``t_{k+1}``; with ``path="linear"`` and data made rectilinear
    (:func:`neurodyn.paths.rectilinear_data`), none after ``t_k``. The initial state uses
    the first observation, missing values filled as the path fills them.

    Examples
    --------
    >>> import torch
    >>> model = NeuralCDE(3, 8, 2, path="hermite", method="rk4", step_size=0.5)
    >>> x = torch.randn(4, 10, 3)
    >>> model(x).shape, model(x, times=torch.tensor([0.0, 4.5, 9.0])).shape
    (torch.Size([4, 2]), torch.Size([4, 3, 2]))
    """

    def __init__(self, input_channels: int, hidden_channels: int, output_channels: int,
                 vector_field: nn.Module | None = None, path: str = "cubic", method: str = "rk4",
                 rtol: float = 1e-4, atol: float = 1e-6, gradient: str = "adjoint", step_size: float | None = None,
                 solve_kwargs: dict[str, Any] | None = None):
        super().__init__()
        for name, v in (("input_channels", input_channels), ("hidden_channels", hidden_channels),
                        ("output_channels", output_channels)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"NeuralCDE: {name} must be a positive int, got {v!r}.")
        if path not in _PATHS:
            raise InputError(f"NeuralCDE: path must be one of {', '.join(_PATHS)}, got {path!r}.")
        self.input_channels, self.hidden_channels = input_channels, hidden_channels
        self.initial = nn.Linear(input_channels, hidden_channels)
        self.func = vector_field if vector_field is not None else CDEField(hidden_channels, input_channels)
        self.readout = nn.Linear(hidden_channels, output_channels)
        self.path = path
        self.solve_kwargs = dict(method=method, rtol=rtol, atol=atol, gradient=gradient, step_size=step_size)
        self.solve_kwargs.update(solve_kwargs or {})
        self.last_stats: dict[str, Any] = {}

    def make_path(self, x: Tensor, t: Tensor) -> LinearPath | CubicPath:
        """The control path of ``x`` ``(B, T, C)`` on ``t`` ``(T,)``."""
        if self.path == "cubic":
            return CubicPath.natural(t, x)
        if self.path == "hermite":
            return CubicPath.hermite(t, x)
        return LinearPath(t, x)

    def forward(self, x: Tensor, t: Tensor | None = None, times: Tensor | None = None) -> Tensor:
        t = check_data("NeuralCDE", x, t)
        if x.shape[-1] != self.input_channels:
            raise InputError(f"NeuralCDE: x has {x.shape[-1]} channels, the model {self.input_channels}.")
        X = self.make_path(x, t)
        x0 = fill_missing(x, t)[..., 0, :]
        z0 = self.initial(x0)
        out_t = t[[0, -1]] if times is None else torch.cat([t[:1], times.to(t.dtype)])
        if times is not None and (times.dim() != 1 or bool(times[0] < t[0])):
            raise InputError("NeuralCDE: times must be a 1-d tensor of times at or after t[0].")
        keep_first = times is not None and bool(times[0] == t[0])
        if keep_first:
            out_t = times.to(t.dtype)
        sol = solve(ControlTerm(self.func, X), z0, out_t, **self.solve_kwargs)
        self.last_stats = dict(sol.stats)
        zs = sol.ys if keep_first else sol.ys[1:]  # (K, B, hidden)
        y = self.readout(zs)
        return y[-1] if times is None else y.movedim(0, -2)
