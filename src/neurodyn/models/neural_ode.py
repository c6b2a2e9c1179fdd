"""``NeuralODE``: a thin ``nn.Module`` over :func:`neurodyn.solve`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..fields import takes_time
from ..solution import Solution
from ..solve import solve

OUTPUTS = ("final", "trajectory", "solution")


class _Field(nn.Module):
    """The vector field as the solver sees it: ``(t, z) -> dz/dt``, counting calls."""

    def __init__(self, func: Callable, takes_time: bool):
        super().__init__()
        self.func = func  # registered as a submodule when it is one: its parameters are the model's
        self.takes_time = takes_time
        self.calls = 0

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        self.calls += 1
        return self.func(t, z) if self.takes_time else self.func(z)


class NeuralODE(nn.Module):
    """A Neural ODE layer: ``z(t1) = z(t0) + integral of f(t, z) dt``, solved by :func:`neurodyn.solve`.

    Parameters
    ----------
    func : nn.Module or callable
        The vector field, ``f(t, z)`` or ``f(z)`` (autonomous; detected from the signature, or set
        ``autonomous``). Its parameters are this module's.
    t : sequence of floats or Tensor, shape ``(T,)``, ``T >= 2``
        Integration times; default ``(0, 1)``. ``forward(z0, t=...)`` may override them per call.
    output : ``"final"``, ``"trajectory"`` or ``"solution"``
        What ``forward`` returns: ``z(t[-1])`` (shape of ``z0``), the states at all ``t`` (shape
        ``(T, *z0.shape)``), or the :class:`Solution` (dense: ``sol.evaluate(t)`` anywhere in the span,
        continuous depth).
    method, rtol, atol, gradient :
        As in :func:`neurodyn.solve` (``gradient``: ``"direct"``, ``"adjoint"``, ``"checkpoint"``,
        ``"interpolated"``).
    autonomous : bool, optional
        Force ``f(z)`` (True) or ``f(t, z)`` (False) instead of detecting it.
    **solve_options :
        Any other keyword of :func:`neurodyn.solve` (``step_size``, ``max_steps``, ``compile``, ...).

    Attributes
    ----------
    nfe_forward : int
        Vector-field evaluations of the last forward solve.
    nfe_backward : int
        Vector-field evaluations of the last backward pass (0 for ``gradient="direct"``: autograd
        replays the recorded graph without calling ``f``); read it after ``backward()``.
    last_solution : Solution
        The last forward solve (stats, status).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> model = neurodyn.NeuralODE(f, t=(0.0, 1.0), method="tsit5", rtol=1e-5, atol=1e-7)
    >>> z1 = model(torch.randn(8, 2))          # (8, 2): z(1) for a batch of 8
    >>> z1.pow(2).mean().backward()
    >>> model.nfe_forward > 0
    True
    """

    def __init__(self, func: Callable, t: Sequence[float] | Tensor = (0.0, 1.0), *, output: str = "final",
                 method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8, gradient: str = "direct",
                 autonomous: bool | None = None, **solve_options: Any):
        super().__init__()
        if not callable(func):
            raise InputError(f"NeuralODE: func must be callable, got {type(func).__name__}.")
        if output not in OUTPUTS:
            raise InputError(f"NeuralODE: output must be one of {OUTPUTS}, got {output!r}.")
        with_time = (not autonomous) if autonomous is not None else takes_time(func)
        self.field = _Field(func, with_time)
        t_tensor = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t
        if t_tensor.dim() != 1 or t_tensor.numel() < 2:
            raise InputError(f"NeuralODE: t must hold at least 2 times, got {t_tensor.tolist()}.")
        self.register_buffer("t", t_tensor.detach().clone(), persistent=False)
        self.output = output
        self.method, self.rtol, self.atol, self.gradient = method, rtol, atol, gradient
        self.solve_options = dict(solve_options)
        self.nfe_forward = 0
        self.last_solution: Solution | None = None

    @property
    def func(self) -> Callable:
        """The user's vector field."""
        return self.field.func

    @property
    def nfe_backward(self) -> int:
        sol = self.last_solution
        return int(sol.stats.get("nfe_backward", 0)) if sol is not None else 0

    def forward(self, z0: Tensor, t: Tensor | None = None) -> Tensor | Solution:
        """Solve from ``z0`` at ``t[0]``; returns what ``output`` says (see the class docstring).

        ``z0``: any shape (a batch is just leading dimensions); ``t`` overrides the module's times.
        """
        tt = self.t if t is None else torch.as_tensor(t)
        real = z0.real.dtype if z0.is_complex() else z0.dtype
        if tt.dtype != real or tt.device != z0.device:
            tt = tt.to(device=z0.device, dtype=real)
        dense = self.output == "solution"
        calls0 = self.field.calls
        sol = solve(self.field, z0, tt, method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient,
                    dense=dense or self.solve_options.get("dense", False),
                    **{k: v for k, v in self.solve_options.items() if k != "dense"})
        # The solver's own count: excludes one-off probes (e.g. the adjoint's hidden-tensor check).
        self.nfe_forward = int(sol.stats.get("nfe", self.field.calls - calls0))
        self.last_solution = sol
        if self.output == "final":
            return sol.ys[-1]
        if self.output == "trajectory":
            return sol.ys
        return sol

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, rtol={self.rtol}, atol={self.atol}, gradient={self.gradient!r}, "
                f"output={self.output!r}, t=[{float(self.t[0])}, {float(self.t[-1])}]")
