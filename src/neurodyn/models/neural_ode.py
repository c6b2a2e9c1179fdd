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


def select_output(sol: Solution, output: str) -> Tensor | Solution:
    """What a model's ``forward`` returns for its ``output`` setting: ``"final"`` -> ``sol.ys[-1]`` (the state's
    shape), ``"trajectory"`` -> ``sol.ys`` (``(len(t), *state)``), ``"solution"`` -> the :class:`Solution`."""
    if output == "final":
        return sol.ys[-1]
    if output == "trajectory":
        return sol.ys
    return sol


class _Field(nn.Module):
    """The vector field as the solver sees it: ``(t, z) -> dz/dt``.

    It keeps no call counter: the solve counts its evaluations (``sol.stats["nfe"]``), and a Python integer
    attribute bumped on every call would be guarded by ``torch.compile`` (a recompilation per call).
    """

    def __init__(self, func: Callable, takes_time: bool):
        super().__init__()
        self.func = func  # registered as a submodule when it is one: its parameters are the model's
        self.takes_time = takes_time

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
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

    Notes
    -----
    ``torch.compile(model)`` compiles a bounded set of graphs (with graph breaks at the solver's host-side
    decisions) and reuses them for same-shaped inputs; the NFE counters come from the solve's stats, so they
    stay right under compilation. An ensemble of models runs with PyTorch's recipe
    (``torch.func.stack_module_state`` + ``functional_call`` under ``torch.func.vmap``) for fixed-step methods
    (``method="rk4", step_size=h``, or steps on the grid ``t``); the times ``t`` are not stacked (see :attr:`t`).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> model = neurodyn.NeuralODE(f, t=(0.0, 1.0), method="tsit5", rtol=1e-5, atol=1e-7)
    >>> z1 = model(torch.randn(8, 2))          # (8, 2): z(1) for a batch of 8
    >>> z1.pow(2).mean().backward()
    >>> model.nfe_forward > 0
    True
    >>> import copy
    >>> from torch.func import functional_call, stack_module_state, vmap
    >>> ens = [neurodyn.NeuralODE(torch.nn.Linear(2, 2), method="rk4", step_size=0.1) for _ in range(3)]
    >>> params, buffers = stack_module_state(ens)
    >>> skeleton = copy.deepcopy(ens[0]).to("meta")
    >>> z = torch.randn(8, 2)
    >>> vmap(lambda p, b: functional_call(skeleton, (p, b), (z,)))(params, buffers).shape  # one z(1) per member
    torch.Size([3, 8, 2])
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
        self.t = t.detach() if isinstance(t, Tensor) else t  # a Parameter would be registered, not set
        self.output = output
        self.method, self.rtol, self.atol, self.gradient = method, rtol, atol, gradient
        self.solve_options = dict(solve_options)
        self.nfe_forward = 0
        self.last_solution: Solution | None = None

    @property
    def t(self) -> Tensor:
        """The default integration times, shape ``(T,)``.

        A plain tensor attribute, not a parameter or buffer: it is configuration, not state. So it is not in
        ``state_dict()``, ``torch.func.stack_module_state`` does not stack it (an ensemble shares its times)
        and ``functional_call`` leaves it alone. It follows the module's ``.to(dtype / device)`` moves, but
        not ``.to("meta")`` (the ensembling recipe's skeleton model keeps real times); its values always come
        from the times given, so a round trip through a lower precision or ``to_empty`` loses nothing.
        Assigning ``model.t = (0.0, 2.0)`` sets new times.
        """
        return self._t

    @t.setter
    def t(self, t: Sequence[float] | Tensor) -> None:
        t_tensor = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t
        if t_tensor.dim() != 1 or t_tensor.numel() < 2:
            raise InputError(f"NeuralODE: t must be a 1-D sequence of at least 2 times, got {t_tensor.tolist()}.")
        if not t_tensor.is_floating_point():
            t_tensor = t_tensor.to(torch.get_default_dtype())
        self._t_source = t_tensor.detach().clone()  # the values as given: every move starts from these
        self._t = self._t_source

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NeuralODE:
        super()._apply(fn, recurse)
        probe = fn(self._t)  # where and in which dtype the module's tensors now live
        if not probe.is_meta:
            self._t = self._t_source.to(device=probe.device, dtype=probe.dtype)
        return self

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
        sol = solve(self.field, z0, tt, method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient,
                    dense=dense or self.solve_options.get("dense", False),
                    **{k: v for k, v in self.solve_options.items() if k != "dense"})
        # The solver's own count: excludes one-off probes (e.g. the adjoint's hidden-tensor check).
        self.nfe_forward = int(sol.stats["nfe"])
        self.last_solution = sol
        return select_output(sol, self.output)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, rtol={self.rtol}, atol={self.atol}, gradient={self.gradient!r}, "
                f"output={self.output!r}, t=[{float(self.t[0])}, {float(self.t[-1])}]")
