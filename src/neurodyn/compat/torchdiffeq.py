"""The torchdiffeq drop-in: ``odeint`` and ``odeint_event`` with torchdiffeq's signatures and options.

``import neurodyn as torchdiffeq`` runs existing torchdiffeq code: the names and options are translated
here and everything runs through :func:`neurodyn.solve`. Tuple states are flattened into one vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.control import PIDController
from ..errors import InputError
from ..solve import real_dtype, solve
from ..solvers import available_methods

ADAPTIVE_OPTIONS = ("first_step", "min_step", "max_step", "max_num_steps", "step_t", "grid_points", "jump_t",
                    "norm", "dtype", "safety", "ifactor", "dfactor", "perturb", "step_size")
FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "norm", "dtype", "step_t", "jump_t",
                 "max_num_steps")

_FIXED_INTERP = {"linear": "linear", "cubic": "hermite"}
# Options of particular methods (torchdiffeq's names), passed to a configured stepper.
METHOD_OPTIONS = {"explicit_adams": ("max_order",), "implicit_adams": ("max_order", "max_iters"),
                  "adams": ("max_order",)}


class _TupleState:
    """Flattens a tuple of tensors into one vector and back."""

    def __init__(self, ys: tuple[Tensor, ...]):
        self.shapes = [y.shape for y in ys]
        self.sizes = [y.numel() for y in ys]
        dtypes = {y.dtype for y in ys}
        if len(dtypes) != 1:
            raise InputError(f"tuple state: every tensor must have one dtype, got {sorted(map(str, dtypes))}.")
        devices = {y.device for y in ys}
        if len(devices) != 1:
            raise InputError("tuple state: every tensor must be on one device.")

    def flat(self, ys: tuple[Tensor, ...]) -> Tensor:
        return torch.cat([y.reshape(-1) for y in ys])

    def split(self, y: Tensor, lead: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
        parts = torch.split(y, self.sizes, dim=-1)
        return tuple(p.reshape((*lead, *s)) for p, s in zip(parts, self.shapes))


def _check_tuple_tol(tol: Any, ts: _TupleState, like: Tensor) -> Any:
    if isinstance(tol, (tuple, list)):
        if len(tol) != len(ts.sizes):
            raise InputError(f"a tolerance tuple has {len(tol)} entries but the state has {len(ts.sizes)}.")
        return torch.cat([torch.as_tensor(x, dtype=real_dtype(like.dtype), device=like.device).expand(s).reshape(-1)
                          for x, s in zip(tol, ts.shapes)])
    return tol


def _mixed_norm(parts: tuple[Tensor, ...]) -> Tensor:
    """torchdiffeq's default norm for tuple states: the largest RMS over the tensors."""
    return torch.stack([p.abs().pow(2).mean().sqrt() for p in parts]).max()


def _translate(method: str | None, options: dict | None, func, y0: Tensor, t: Tensor, rtol: Any = 1e-7,
               atol: Any = 1e-9) -> tuple[Any, dict]:
    if options is None:
        options = {}
    if method is None:
        method = "dopri5"
    if method == "scipy_solver":
        return method, dict(options)
    if method not in available_methods():
        raise InputError(f"unknown method {method!r}; valid methods: {', '.join(available_methods())}.")
    from ..solvers import get_solver

    adaptive = get_solver(method).adaptive
    valid = (ADAPTIVE_OPTIONS if adaptive else FIXED_OPTIONS) + METHOD_OPTIONS.get(method, ())
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for method {method!r}; valid options: {', '.join(valid)}.")
    kw: dict[str, Any] = {}
    o = dict(options)
    stepper_opts = {k: o.pop(k) for k in METHOD_OPTIONS.get(method, ()) if k in o}
    if "dtype" in o:
        if not isinstance(o.pop("dtype"), torch.dtype):
            raise InputError("option dtype must be a torch.dtype.")
    for src, dst in (("first_step", "first_step"), ("min_step", "min_step"), ("max_step", "max_step"),
                     ("jump_t", "jump_t"), ("step_size", "step_size"), ("perturb", "perturb"), ("norm", "norm")):
        if src in o and o[src] is not None:
            v = o.pop(src)
            kw[dst] = float(v) if dst in ("first_step", "min_step", "max_step", "step_size") else v
        else:
            o.pop(src, None)
    step_t = o.pop("step_t", None)
    grid_points = o.pop("grid_points", None)
    if step_t is not None or grid_points is not None:
        kw["step_t"] = torch.cat([torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()
                                  for x in (step_t, grid_points) if x is not None])
    if "max_num_steps" in o:
        v = o.pop("max_num_steps")
        kw["max_steps"] = int(min(int(v), 2**62))
    else:
        kw["max_steps"] = 2**31 - 1
    if any(k in o for k in ("safety", "ifactor", "dfactor")):
        kw["controller"] = PIDController(safety=float(o.pop("safety", 0.9)), ifactor=float(o.pop("ifactor", 10.0)),
                                         dfactor=float(o.pop("dfactor", 0.2)))
    if not adaptive:
        interp = o.pop("interp", "linear")
        if interp not in _FIXED_INTERP:
            raise InputError(f"option interp must be 'linear' or 'cubic', got {interp!r}.")
        kw["interp"] = _FIXED_INTERP[interp]
        gc = o.pop("grid_constructor", None)
        if gc is not None:
            if "step_size" in kw:
                raise InputError("options step_size and grid_constructor are mutually exclusive.")
            grid = gc(func, y0, t)
            kw["step_t"] = torch.cat([kw.get("step_t", torch.zeros(0, dtype=torch.float64)),
                                      torch.as_tensor(grid).detach().reshape(-1).cpu().double()])
    assert not o, o
    if method == "implicit_adams" or stepper_opts:
        from ..solvers.adams import FixedAdams, VariableAdams

        if method == "adams":
            method = VariableAdams(**stepper_opts)
        else:  # torchdiffeq's corrector iteration converges to odeint's rtol/atol
            method = FixedAdams(implicit=method == "implicit_adams", rtol=rtol, atol=atol, **stepper_opts)
    return method, kw


def _prepare(func, y0, t, rtol, atol, method, options, event_fn):
    """Common translation for odeint: tuple flattening, dtype of t, options."""
    tuple_state = None
    if isinstance(y0, (tuple, list)):
        if len(y0) == 0 or not all(isinstance(y, Tensor) for y in y0):
            raise InputError("y0 must be a tensor or a non-empty tuple of tensors.")
        tuple_state = _TupleState(tuple(y0))
        base_func, base_event = func, event_fn

        def func(t_, y_, _f=base_func, _ts=tuple_state):  # noqa: F811
            out = _f(t_, _ts.split(y_))
            return _ts.flat(out)

        if base_event is not None:
            def event_fn(t_, y_, _e=base_event, _ts=tuple_state):  # noqa: F811
                return _e(t_, _ts.split(y_))
        flat0 = tuple_state.flat(tuple(y0))
        rtol = _check_tuple_tol(rtol, tuple_state, flat0)
        atol = _check_tuple_tol(atol, tuple_state, flat0)
        y0 = flat0
    if not isinstance(t, Tensor):
        raise InputError(f"t must be a 1-d tensor of times, got {type(t).__name__}.")
    if not isinstance(y0, Tensor):
        raise InputError(f"y0 must be a tensor or a tuple of tensors, got {type(y0).__name__}.")
    if t.is_floating_point() and (y0.is_floating_point() or y0.is_complex()):
        t = t.to(real_dtype(y0.dtype))  # torchdiffeq computes times in its own dtype
    method, kw = _translate(method, options, func, y0, t, rtol, atol)
    if tuple_state is not None:
        user_norm = kw.pop("norm", None)
        ts = tuple_state

        def norm(x, _u=user_norm, _ts=ts):
            parts = _ts.split(x.reshape(-1))
            return _u(parts) if _u is not None else _mixed_norm(parts)

        kw["norm"] = norm
    return func, y0, t, rtol, atol, method, kw, tuple_state, event_fn


def odeint(func: Callable, y0: Tensor | tuple[Tensor, ...], t: Tensor, *, rtol: float | Tensor = 1e-7,
           atol: float | Tensor = 1e-9, method: str | None = None, options: dict | None = None,
           event_fn: Callable | None = None):
    """Integrate ``dy/dt = func(t, y)`` exactly as ``torchdiffeq.odeint`` does.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``y`` is a tensor or a tuple of tensors (then ``func`` returns a tuple).
    y0 : Tensor or tuple of Tensors
        Initial state at ``t[0]``.
    t : Tensor, shape ``(T,)``
        Output times, increasing or decreasing; ``t[0]`` is the initial time.
    rtol, atol : float or Tensor
        Tolerances (tuples of them for tuple states).
    method : str, optional
        torchdiffeq's method names (``dopri5`` by default; ``explicit_adams``/``implicit_adams`` with the
        options ``max_order``, ``max_iters``; ``scipy_solver``) plus ``tsit5``, ``ralston``, ``adams``,
        ``leapfrog``, ``yoshida4`` and ``semi_implicit_euler``.
    options : dict, optional
        torchdiffeq's options: ``step_size``, ``first_step``, ``max_num_steps``, ``min_step``,
        ``max_step``, ``step_t``/``grid_points``, ``jump_t``, ``perturb``, ``norm``, ``dtype``,
        ``safety``, ``ifactor``, ``dfactor`` (adaptive); ``step_size``, ``grid_constructor``,
        ``interp`` (``"linear"``/``"cubic"``), ``perturb`` (fixed grid). ``method="scipy_solver"`` (forward
        only: raises if ``y0`` or ``t`` requires grad) takes ``solver`` (any ``solve_ivp`` method, ``"LSODA"`` by
        default) and further ``solve_ivp`` keywords.
    event_fn : callable ``(t, y) -> Tensor``, optional
        Integrate from ``t[0]`` until ``event_fn`` crosses zero; returns ``(event_t, solution)`` with
        ``solution`` holding ``[y0, y(event_t)]``.

    Returns
    -------
    Tensor of shape ``(T, *y0.shape)`` (a tuple for tuple states), or ``(event_t, solution)``.

    Examples
    --------
    >>> import torch, neurodyn as torchdiffeq
    >>> ys = torchdiffeq.odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
    >>> ys.shape
    torch.Size([5, 3])
    """
    func, y0, t, rtol, atol, method, kw, ts, event_fn = _prepare(func, y0, t, rtol, atol, method, options,
                                                                 event_fn)
    if method == "scipy_solver":
        if event_fn is not None:
            raise InputError("event_fn is not supported with method='scipy_solver'; use a torch method.")
        from .scipy_solver import scipy_odeint

        ys = scipy_odeint(func, y0, t, rtol=rtol, atol=atol, options=kw)
        return ts.split(ys, (ys.shape[0],)) if ts is not None else ys
    if event_fn is None:
        sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, **kw)
        return ts.split(sol.ys, (sol.ys.shape[0],)) if ts is not None else sol.ys
    if t.dim() != 1 or t.numel() < 1:
        raise InputError("t must be a 1-d tensor; with event_fn only t[0] is used.")
    direction = -1.0 if (t.numel() >= 2 and float(t[1]) < float(t[0])) else 1.0
    t_span = torch.stack([t[0], t[0].detach() + direction * _FAR]).to(t.dtype)
    sol = solve(func, y0, t_span, method=method, rtol=rtol, atol=atol, event_fn=event_fn, **kw)
    if sol.event_t is None:
        raise InputError("event_fn never crossed zero before the solve stopped "
                         f"(status {sol.status}, t={sol.t_final:.6g}).")
    solution = torch.stack([y0, sol.y_final.reshape(y0.shape)])
    event_t = sol.event_t.to(t.dtype)
    if ts is not None:
        solution = ts.split(solution, (2,))
    return event_t, solution


_FAR = 1e30  # "until the event": a final time no step reaches


def odeint_adjoint(func: Callable, y0: Tensor | tuple[Tensor, ...], t: Tensor, *, rtol: float | Tensor = 1e-7,
                   atol: float | Tensor = 1e-9, method: str | None = None, options: dict | None = None,
                   event_fn: Callable | None = None, adjoint_rtol: float | None = None,
                   adjoint_atol: float | None = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None, adjoint_params=None):
    """torchdiffeq's ``odeint_adjoint``: gradients by the continuous adjoint (``gradient="adjoint"``).

    As in torchdiffeq, ``func`` must be an ``nn.Module`` unless ``adjoint_params`` lists the tensors
    to differentiate. ``adjoint_options`` accepts ``norm="seminorm"`` (neurodyn's default; pass
    ``norm="default"`` for the full norm over the parameter channels too).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = torch.nn.Linear(2, 2).double()
    >>> ys = neurodyn.odeint_adjoint(lambda t, y: f(y), torch.ones(2, dtype=torch.float64),
    ...                              torch.linspace(0, 1, 3, dtype=torch.float64), adjoint_params=f.parameters())
    >>> ys[-1].sum().backward()
    """
    if event_fn is not None:
        raise InputError("odeint_adjoint with event_fn is not supported; use odeint (direct gradients) for events.")
    if method == "scipy_solver":
        raise InputError("method='scipy_solver' is forward only (no gradients through scipy); use odeint, or a "
                         "torch method with odeint_adjoint.")
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise InputError("func must be an nn.Module to find the adjoint parameters; alternatively pass them "
                             "with adjoint_params=...")
        adjoint_params = tuple(func.parameters())
    params = [p for p in adjoint_params]
    seminorm = True
    a_opts = dict(adjoint_options or {})
    if "norm" in a_opts:
        nv = a_opts.pop("norm")
        if nv == "seminorm":
            seminorm = True
        elif nv in (None, "default"):
            seminorm = False
        else:
            raise InputError(f"adjoint_options norm must be 'seminorm' or 'default', got {nv!r}.")
    if a_opts:
        raise InputError(f"unknown adjoint_options {sorted(a_opts)}; valid: norm.")
    func, y0, t, rtol, atol, method, kw, ts, _ = _prepare(func, y0, t, rtol, atol, method, options, None)
    sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, gradient="adjoint", params=params,
                adjoint_method=adjoint_method, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                seminorm=seminorm, **kw)
    return ts.split(sol.ys, (sol.ys.shape[0],)) if ts is not None else sol.ys


def odeint_event(func: Callable, y0: Tensor | tuple[Tensor, ...], t0: Tensor, *, event_fn: Callable,
                 reverse_time: bool = False, odeint_interface: Callable = odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero (torchdiffeq's ``odeint_event``).

    Returns ``(event_t, solution)``; ``solution`` has shape ``(2, *y0.shape)``: ``[y0, y(event_t)]``.
    The event time and state carry gradients (implicit function theorem).

    Examples
    --------
    >>> import torch, neurodyn
    >>> h0 = torch.tensor([1.0, 0.0], dtype=torch.float64)  # height, velocity; gravity 9.81
    >>> f = lambda t, y: torch.stack([y[1], torch.tensor(-9.81, dtype=y.dtype)])
    >>> t_hit, sol = neurodyn.odeint_event(f, h0, torch.tensor(0.0, dtype=torch.float64),
    ...                                    event_fn=lambda t, y: y[0])
    >>> round(float(t_hit), 6)
    0.451524
    """
    t0 = torch.as_tensor(t0)
    if reverse_time:
        t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() - 1.0])
    else:
        t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + 1.0])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)


__all__ = ["odeint", "odeint_adjoint", "odeint_event"]
