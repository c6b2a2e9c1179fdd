"""The torchdiffeq drop-in: ``odeint`` and ``odeint_event`` with torchdiffeq's signatures and options.

``import neurodyn as torchdiffeq`` runs existing torchdiffeq code: the names and options are translated
here and everything runs through :func:`neurodyn.solve`. Tuple states are flattened into one vector.
``dopri5``, ``bosh3``, ``fehlberg2`` and ``adaptive_heun`` take torchdiffeq's steps (:data:`TD_STEP_RULE`): its
error estimates and dense outputs (the tableaus ``dopri5_shampine`` and ``*_torchdiffeq``), I control that never
shrinks the step after an accepted one, its starting step, and a last step run past the final time with the outputs
read off the dense output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import solution as _sol
from ..core.control import PIDController
from ..core.events import event_values, implicit_event
from ..core.tensors import real_dtype
from ..errors import InputError, NoEventError
from ..fields import check_derivative
from ..solve import solve
from ..solvers import available_methods

ADAPTIVE_OPTIONS = ("first_step", "min_step", "max_step", "max_num_steps", "step_t", "grid_points", "eps", "jump_t",
                    "norm", "dtype", "safety", "ifactor", "dfactor", "perturb", "step_size")
FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb", "norm", "dtype", "step_t", "jump_t",
                 "max_num_steps")

_FIXED_INTERP = {"linear": "linear", "cubic": "hermite"}
# torchdiffeq's solver classes, named in its warnings.
_TD_SOLVER_NAMES = {"dopri5": "Dopri5Solver", "dopri8": "Dopri8Solver", "bosh3": "Bosh3Solver",
                    "adaptive_heun": "AdaptiveHeunSolver", "fehlberg2": "Fehlberg2"}
# torchdiffeq's adaptive Runge--Kutta methods -> the neurodyn tableaus with its error estimates and dense outputs; the
# step rule around them (odeint's controller) in _translate. (torchdiffeq's dopri8 is another 8(7) pair than neurodyn's
# DOP853 and keeps neurodyn's step rule.)
TD_STEP_RULE = {"dopri5": "dopri5_shampine", "bosh3": "bosh3_torchdiffeq", "fehlberg2": "fehlberg2_torchdiffeq",
                "adaptive_heun": "adaptive_heun_torchdiffeq"}
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT_CALLBACK_NAMES = tuple(name + "_adjoint" for name in CALLBACK_NAMES)
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
    if adaptive and "step_size" in o:
        # torchdiffeq's adaptive solvers take no step_size: they warn about the unexpected argument and stay adaptive.
        warnings.warn(f"{_TD_SOLVER_NAMES.get(method, method)}: Unexpected arguments "
                      f"{ {'step_size': o.pop('step_size')} }", UserWarning, stacklevel=4)
    if adaptive and o.get("min_step") is not None:
        kw["accept_min_step"] = True  # torchdiffeq takes steps of min_step whatever their error
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
    # torchdiffeq 0.1's ``eps`` beside ``grid_points``: the field may jump at the grid points, evaluate it eps inside
    # each interval. That is torchdiffeq 0.2's jump_t (land on them, evaluate each side's own value), so with eps > 0
    # the grid points are jump times; without eps, step times.
    eps = o.pop("eps", 0.0)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise InputError(f"option eps must be a number >= 0 (torchdiffeq 0.1's offset from grid_points), got {eps!r}.")
    if grid_points is not None and eps > 0:
        grid = torch.as_tensor(grid_points, dtype=torch.float64).reshape(-1).cpu()
        jumps = kw.get("jump_t")
        kw["jump_t"] = grid if jumps is None else torch.cat(
            [torch.as_tensor(jumps, dtype=torch.float64).reshape(-1).cpu(), grid])
        grid_points = None
    if step_t is not None or grid_points is not None:
        kw["step_t"] = torch.cat([torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()
                                  for x in (step_t, grid_points) if x is not None])
    if "max_num_steps" in o:  # default: solve's max_steps (torchdiffeq's 2**31 - 1 never ends a stalled solve)
        v = o.pop("max_num_steps")
        kw["max_steps"] = int(min(int(v), 2**62))
    if method in TD_STEP_RULE:
        # torchdiffeq's step rule: its error estimate and dense output, I control that never shrinks after an
        # accepted step, the starting step with the error order's exponent, and no last step cut to the final time.
        method = TD_STEP_RULE[method]
        kw["controller"] = PIDController(pcoeff=0.0, icoeff=1.0, accept_dfactor=1.0, first_step_rule="torchdiffeq",
                                         land_on_end=False, safety=float(o.pop("safety", 0.9)),
                                         ifactor=float(o.pop("ifactor", 10.0)), dfactor=float(o.pop("dfactor", 0.2)))
    elif any(k in o for k in ("safety", "ifactor", "dfactor")):
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


def _callback_hooks(owner: Any, method: Any, tuple_state: _TupleState | None, shape: torch.Size,
                    t_dtype: torch.dtype, device: torch.device) -> dict | None:
    """``solve``'s step_callbacks calling torchdiffeq's ``callback_step``/``_accept_step``/``_reject_step`` on
    ``owner`` (the vector field) as ``cb(t0, y0, dt)``: tensors, ``y0`` in the user's shape (a tuple for tuple
    states), ``dt > 0``. As torchdiffeq: adaptive methods call all three, fixed-grid methods only ``callback_step``,
    ``scipy_solver`` none, and a callback a method does not call is warned about."""
    found = {name: getattr(owner, name) for name in CALLBACK_NAMES if callable(getattr(owner, name, None))}
    if not found:
        return None
    from ..solvers import get_solver

    if method == "scipy_solver":
        valid: set[str] = set()
    elif get_solver(method or "dopri5").adaptive:
        valid = set(CALLBACK_NAMES)
    else:
        valid = {"callback_step"}
    invalid = set(found) - valid
    if invalid:
        warnings.warn(f"Solver '{method or 'dopri5'}' does not support callbacks {invalid}", stacklevel=4)

    def wrap(cb):
        def hook(t: float, y: Tensor, h: float) -> None:
            tt = torch.scalar_tensor(t, dtype=t_dtype, device=device)
            dt = torch.scalar_tensor(h, dtype=t_dtype, device=device)
            cb(tt, tuple_state.split(y.reshape(-1)) if tuple_state is not None else y.view(shape), dt)
        return hook

    keys = {"callback_step": "step", "callback_accept_step": "accept", "callback_reject_step": "reject"}
    return {keys[name]: wrap(cb) for name, cb in found.items() if name in valid} or None


def _prepare(func, y0, t, rtol, atol, method, options, event_fn):
    """Common translation for odeint: tuple flattening, dtype of t, options."""
    owner = func
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
    hooks = _callback_hooks(owner, method, tuple_state, y0.shape, real_dtype(y0.dtype), y0.device)
    method, kw = _translate(method, options, func, y0, t, rtol, atol)
    if hooks is not None and method != "scipy_solver":
        kw["step_callbacks"] = hooks
    if tuple_state is not None and method != "scipy_solver":
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
        ``leapfrog``, ``yoshida4`` and ``semi_implicit_euler``. ``dopri5``, ``bosh3``, ``fehlberg2`` and
        ``adaptive_heun`` take torchdiffeq's steps (the same evaluations and outputs as torchdiffeq to rounding);
        ``dopri8`` is DOP853 (torchdiffeq's dopri8 is another 8(7) pair) with neurodyn's step rule.
    options : dict, optional
        torchdiffeq's options: ``step_size``, ``first_step``, ``max_num_steps`` (default 100000 attempted steps,
        where torchdiffeq's is unbounded: a solve that needs more raises ``MaxStepsReached``), ``min_step``,
        ``max_step``, ``step_t``/``grid_points`` (with torchdiffeq 0.1's ``eps > 0`` beside
        them, the grid points are taken as ``jump_t``), ``jump_t``, ``perturb``, ``norm``, ``dtype``,
        ``safety``, ``ifactor``, ``dfactor`` (adaptive); ``step_size``, ``grid_constructor``,
        ``interp`` (``"linear"``/``"cubic"``), ``perturb`` (fixed grid). ``method="scipy_solver"`` (as torchdiffeq:
        ``y0`` and ``t`` go to scipy detached and the result carries no gradient; ``odeint_adjoint`` gives one)
        takes ``solver`` (any ``solve_ivp`` method, ``"LSODA"`` by
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
    if event_fn is None and _single_time(t):
        # torchdiffeq: one time is the initial time, the solution is y0 (a copy; scipy_solver's carries no gradient)
        ys = torch.stack([y0.detach() if method == "scipy_solver" else y0])
        return ts.split(ys, (1,)) if ts is not None else ys
    if method == "scipy_solver":
        if event_fn is not None:
            raise InputError("event_fn is not supported with method='scipy_solver'; use a torch method.")
        from .scipy_solver import scipy_odeint

        # As torchdiffeq's wrapper: the values go to scipy detached, and the result carries no gradient.
        ys = scipy_odeint(func, y0.detach(), t.detach(), rtol=rtol, atol=atol, options=kw)
        return ts.split(ys, (ys.shape[0],)) if ts is not None else ys
    if event_fn is None:
        sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, **kw)
        return ts.split(sol.ys, (sol.ys.shape[0],)) if ts is not None else sol.ys
    return _until_event(func, y0, t, event_fn, method, rtol, atol, kw, ts, options, None)


_FAR = 1e30  # "until the event" without t_max: a final time no step reaches (the step budget bounds the search)
# The step budget of an event search when options give no max_num_steps (torchdiffeq searches without a bound).
EVENT_MAX_STEPS = 100_000


def _until_event(func: Callable, y0: Tensor, t: Tensor, event_fn: Callable, method: Any, rtol: Any, atol: Any,
                 kw: dict, ts: _TupleState | None, options: dict | None, t_max: Any) -> tuple[Tensor, Any]:
    """Integrate from ``t[0]`` to the first root of ``event_fn`` (``func``, ``y0``, ``event_fn`` as ``_prepare``
    returns them), at most to ``t_max`` and within the step budget; ``(event_t, [y0, y(event_t)])``."""
    if t.dim() != 1 or t.numel() < 1:
        raise InputError("t must be a 1-d tensor; with event_fn only t[0] is used.")
    if not t.is_floating_point():
        raise InputError(f"t must be a floating-point tensor, got dtype {t.dtype}.")
    direction = -1.0 if (t.numel() >= 2 and float(t[1].detach()) < float(t[0].detach())) else 1.0
    t0 = t[0]
    # event_fn(t0, y0) checked before any work; a component exactly zero there is the event (as torchdiffeq).
    with torch.no_grad():
        g0 = event_values(event_fn, t0.detach(), y0.detach())
        zeros = (g0 == 0).nonzero().view(-1).tolist()
    if zeros:
        f0 = check_derivative(func(t0.detach(), y0.detach()), y0)
        event_t, y_e = implicit_event(event_fn, t0, y0, f0, zeros[0])
        solution = torch.stack([y0, y_e])
        return event_t.to(t.dtype), (ts.split(solution, (2,)) if ts is not None else solution)
    if t_max is None:
        t_end = t0.detach() + direction * _FAR
    else:
        t_end = torch.as_tensor(t_max, dtype=t.dtype, device=t.device).detach()
        if t_end.numel() != 1 or not bool(torch.isfinite(t_end)) or float(t_end - t0) * direction <= 0:
            side = "before" if direction < 0 else "after"
            raise InputError(f"t_max must be one finite time {side} t0={float(t0.detach()):.6g} (the search runs "
                             f"{'backward' if direction < 0 else 'forward'}), got {t_max!r}.")
        t_end = t_end.reshape(())
    budget = "max_num_steps" in (options or {})
    if not budget:
        kw = dict(kw, max_steps=EVENT_MAX_STEPS)
    t_span = torch.stack([t0, t_end]).to(t.dtype)
    sol = solve(func, y0, t_span, method=method, rtol=rtol, atol=atol, event_fn=event_fn, on_failure="return", **kw)
    if sol.status == _sol.EVENT:
        solution = torch.stack([y0, sol.y_final.reshape(y0.shape)])
        event_t = sol.event_t.to(t.dtype)
        return event_t, (ts.split(solution, (2,)) if ts is not None else solution)
    span = f"[{float(t0.detach()):.6g}, {sol.t_final:.6g}]"
    if sol.status == _sol.SUCCESS:
        raise NoEventError(f"no event before t_max={float(t_end):.6g}: event_fn did not change sign on {span} "
                           f"({sol.stats['steps']} steps). Pass a later t_max, or check that event_fn crosses zero "
                           f"along the solution.", status=sol.status, t=sol.t_final, solution=sol)
    if sol.status == _sol.MAX_STEPS_REACHED:
        limit = kw["max_steps"]
        given = "max_num_steps" if budget else "the default step budget"
        raise NoEventError(f"no event within {given} ({limit} steps): event_fn did not change sign on {span}. The "
                           f"event may never happen (e.g. the solution settles where event_fn != 0). Pass t_max=... "
                           f"to odeint_event to search a bounded time span, or options={{'max_num_steps': N}} with a "
                           f"larger N to search longer.", status=sol.status, t=sol.t_final, solution=sol)
    raise _sol.failure(sol.status, sol.message, sol.t_final, sol)


def _single_time(t: Tensor) -> bool:
    """``t`` holds only the initial time (legal in torchdiffeq: the output is ``y0[None]``)."""
    if t.dim() == 1 and t.numel() == 1:
        if not t.is_floating_point():
            raise InputError(f"t must be a floating-point tensor, got dtype {t.dtype}.")
        return True
    return False


def odeint_adjoint(func: Callable, y0: Tensor | tuple[Tensor, ...], t: Tensor, *, rtol: float | Tensor = 1e-7,
                   atol: float | Tensor = 1e-9, method: str | None = None, options: dict | None = None,
                   event_fn: Callable | None = None, adjoint_rtol: float | None = None,
                   adjoint_atol: float | None = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None, adjoint_params=None):
    """torchdiffeq's ``odeint_adjoint``: gradients by the continuous adjoint.

    As in torchdiffeq, ``func`` must be an ``nn.Module`` unless ``adjoint_params`` lists the tensors
    to differentiate (parameters not requiring grad are left out). The backward solve uses ``adjoint_rtol``,
    ``adjoint_atol``, ``adjoint_method`` (default: the forward ones) and ``adjoint_options`` (default: ``options``
    without ``norm``). Its error norm, as torchdiffeq's: by default the full norm
    ``max(|a_t|, norm(y), norm(a_y), max_p rms(a_p))`` over every channel; ``adjoint_options=dict(norm="seminorm")``
    leaves the parameter channels out (fewer backward steps); a callable ``norm`` receives the backward state as
    the tuple ``(a_t, y, a_y, *a_params)`` (``(a_t, *y, *a_y, *a_params)`` for tuple states).

    The default and ``"seminorm"`` norms run :func:`neurodyn.solve`'s ``gradient="adjoint"`` (``seminorm=False`` /
    ``True``). A callable norm, other ``adjoint_options``, ``method``/``adjoint_method="scipy_solver"`` (the
    forward and backward solves run in scipy; nothing is differentiated through it) and the vector field's
    ``callback_step_adjoint``/``callback_accept_step_adjoint``/``callback_reject_step_adjoint`` run torchdiffeq's
    algorithm here instead: the augmented state ``(a_t, y, a_y, *a_params)`` is integrated backward between output
    times with :func:`odeint` itself, so every option and callback applies to it as to any solve.

    Parameters
    ----------
    func, y0, t, rtol, atol, method, options :
        As :func:`odeint` (``t`` may require grad).
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options :
        The backward solve's settings (see above).
    adjoint_params : iterable of Tensor, optional
        The tensors to differentiate (default: ``func.parameters()``).

    Returns
    -------
    Tensor of shape ``(T, *y0.shape)`` (a tuple for tuple states).

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
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise InputError("func must be an nn.Module to find the adjoint parameters; alternatively pass them "
                             "with adjoint_params=... (adjoint_params=() if there are none).")
        adjoint_params = tuple(func.parameters())
    params = [p for p in adjoint_params if p.requires_grad]
    a_opts = dict(adjoint_options or {})
    a_norm = a_opts.get("norm", "default")
    if isinstance(a_norm, str) and a_norm not in ("seminorm", "default"):
        raise InputError(f"adjoint_options norm must be 'seminorm', 'default' or a callable, got {a_norm!r}.")
    in_layer = ("scipy_solver" in (method, adjoint_method) or callable(a_norm) or bool(set(a_opts) - {"norm"})
                or any(callable(getattr(func, name, None)) for name in ADJOINT_CALLBACK_NAMES))
    if in_layer:
        return _adjoint_in_layer(func, y0, t, rtol, atol, method, options, adjoint_rtol, adjoint_atol,
                                 adjoint_method, adjoint_options, params)
    func, y0, t, rtol, atol, method, kw, ts, _ = _prepare(func, y0, t, rtol, atol, method, options, None)
    if _single_time(t):
        ys = torch.stack([y0])
        return ts.split(ys, (1,)) if ts is not None else ys
    sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, gradient="adjoint", params=params,
                adjoint_method=adjoint_method, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                seminorm=a_norm == "seminorm", **kw)
    return ts.split(sol.ys, (sol.ys.shape[0],)) if ts is not None else sol.ys


class _Augmented:
    """The backward vector field of :func:`_adjoint_in_layer` on the tuple ``(a_t, *y, *a_y, *a_params)``.

    Carries the user's ``*_adjoint`` callbacks under the plain names, so :func:`odeint` calls them for the
    backward solve (torchdiffeq's convention)."""

    def __init__(self, func: Callable, k: int, tuple_state: bool, params: list[Tensor], t_grad: bool):
        self.func, self.k, self.tuple_state, self.params, self.t_grad = func, k, tuple_state, params, t_grad
        for name, adj_name in zip(CALLBACK_NAMES, ADJOINT_CALLBACK_NAMES):
            cb = getattr(func, adj_name, None)
            if callable(cb):
                setattr(self, name, cb)

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        k = self.k
        ys, adj = state[1:1 + k], state[1 + k:1 + 2 * k]
        with torch.enable_grad():
            tt = t.detach().requires_grad_(self.t_grad)
            yv = tuple(y.detach().requires_grad_(True) for y in ys)
            out = self.func(tt, yv if self.tuple_state else yv[0])
            fs = tuple(out) if self.tuple_state else (out,)
            inputs = ((tt,) if self.t_grad else ()) + yv + tuple(self.params)
            live = [(f, -a) for f, a in zip(fs, adj) if f.requires_grad]
            if live:
                grads = torch.autograd.grad([f for f, _ in live], inputs, [a for _, a in live], allow_unused=True)
            else:  # a field of t alone
                grads = (None,) * len(inputs)
        if self.t_grad:
            vjp_t, grads = grads[0], grads[1:]
        else:
            vjp_t = None
        vjp_t = torch.zeros_like(state[0]) if vjp_t is None else vjp_t.to(state[0].dtype).reshape(())
        vjps = tuple(torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, (*ys, *self.params)))
        return (vjp_t, *(f.detach() for f in fs), *vjps)


class _InLayerAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: dict, t: Tensor, *tensors: Tensor):
        k = spec["k"]
        y0 = tensors[:k] if spec["tuple"] else tensors[0]
        with torch.no_grad():
            ys = odeint(spec["func"], y0, t, rtol=spec["rtol"], atol=spec["atol"], method=spec["method"],
                        options=spec["options"])
        ys = tuple(ys) if spec["tuple"] else (ys,)
        ctx.spec = spec
        ctx.save_for_backward(t, *ys, *tensors[k:])
        return ys

    @staticmethod
    def backward(ctx, *grad_ys: Tensor):
        spec = ctx.spec
        k = spec["k"]
        t, *saved = ctx.saved_tensors
        ys, params = saved[:k], saved[k:]
        t_grad = ctx.needs_input_grad[1]
        aug = _Augmented(spec["func"], k, spec["tuple"], list(params), t_grad)
        with torch.no_grad():
            grad_ys = [torch.zeros_like(y) if g is None else g for g, y in zip(grad_ys, ys)]
            state = [ys[0].new_zeros(()), *(y[-1] for y in ys), *(g[-1] for g in grad_ys),
                     *(torch.zeros_like(p) for p in params)]
            time_vjps = torch.zeros_like(t) if t_grad else None
            for i in range(t.shape[0] - 1, 0, -1):
                if t_grad:  # moving the output time t_i moves y_i along f
                    f_i = spec["func"](t[i], tuple(y[i] for y in ys) if spec["tuple"] else ys[0][i])
                    f_i = tuple(f_i) if spec["tuple"] else (f_i,)
                    d = sum((f.reshape(-1) * g[i].reshape(-1)).sum() for f, g in zip(f_i, grad_ys))
                    state[0] = state[0] - d
                    time_vjps[i] = d
                out = odeint(aug, tuple(state), t[i - 1:i + 1].flip(0), rtol=spec["adjoint_rtol"],
                             atol=spec["adjoint_atol"], method=spec["adjoint_method"],
                             options=spec["adjoint_options"])
                state = [o[1] for o in out]
                for j in range(k):
                    state[1 + j] = ys[j][i - 1]
                    state[1 + k + j] = state[1 + k + j] + grad_ys[j][i - 1]
            if t_grad:
                time_vjps[0] = state[0]
        return (None, time_vjps, *state[1 + k:1 + 2 * k], *state[1 + 2 * k:])


def _adjoint_in_layer(func, y0, t, rtol, atol, method, options, adjoint_rtol, adjoint_atol, adjoint_method,
                      adjoint_options, params):
    """torchdiffeq's adjoint algorithm, with :func:`odeint` for the forward and every backward interval."""
    is_tuple = isinstance(y0, (tuple, list))
    parts = tuple(y0) if is_tuple else (y0,)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise InputError("y0 must be a tensor or a non-empty tuple of tensors.")
    if not isinstance(t, Tensor):
        raise InputError(f"t must be a 1-d tensor of times, got {type(t).__name__}.")
    if method is None:
        method = "dopri5"
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise InputError("adjoint_method differs from method, so the backward solve cannot reuse options: pass "
                         "adjoint_options too (as torchdiffeq requires).")
    if adjoint_options is None:
        adjoint_options = {key: v for key, v in (options or {}).items() if key != "norm"}
    else:
        adjoint_options = dict(adjoint_options)
    k = len(parts)
    state_norm = (options or {}).get("norm")

    def y_norm(ys: tuple[Tensor, ...]) -> Tensor:
        if state_norm is not None:
            return torch.as_tensor(state_norm(ys if is_tuple else ys[0]))
        return _mixed_norm(ys)

    user = adjoint_options.get("norm", "default")
    if callable(user):
        def adjoint_norm(s, _u=user):
            return _u(s)
    else:
        def adjoint_norm(s, _semi=user == "seminorm"):
            vals = [s[0].abs().reshape(()), y_norm(s[1:1 + k]), y_norm(s[1 + k:1 + 2 * k])]
            if not _semi and len(s) > 1 + 2 * k:
                vals.append(_mixed_norm(s[1 + 2 * k:]))
            return torch.stack([torch.as_tensor(v, dtype=s[0].dtype) for v in vals]).max()
    adjoint_options["norm"] = adjoint_norm
    spec = dict(func=func, k=k, tuple=is_tuple, rtol=rtol, atol=atol, method=method, options=options,
                adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
                adjoint_atol=atol if adjoint_atol is None else adjoint_atol,
                adjoint_method=adjoint_method, adjoint_options=adjoint_options)
    ys = _InLayerAdjoint.apply(spec, t, *parts, *params)
    return tuple(ys) if is_tuple else ys[0]


def odeint_dense(func: Callable, y0: Tensor, t0: Tensor, t1: Tensor, *, rtol: float | Tensor = 1e-7,
                 atol: float | Tensor = 1e-9, method: str | None = None,
                 options: dict | None = None) -> Callable[[Tensor], Tensor]:
    """torchdiffeq's ``odeint_dense``: solve from ``t0`` to ``t1`` and return the dense solution as a function.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
    y0 : Tensor
        Initial state at ``t0`` (a tensor: tuple states are not supported, as in torchdiffeq).
    t0, t1 : Tensor (0-dim)
        Initial and final time (``t1 > t0``).
    rtol, atol, options :
        As :func:`odeint`.
    method : str, optional
        ``"dopri5"`` (the default; torchdiffeq accepts only it) or any adaptive method of :func:`odeint`.

    Returns
    -------
    callable ``dense(t_eval) -> Tensor``
        ``t_eval`` a tensor of times in ``[t0, t1]`` of any shape (``t1`` included); the result has shape
        ``(*t_eval.shape, *y0.shape)``: each method's continuous extension (dopri5's 4th-order one, as
        torchdiffeq's). Differentiable with respect to ``y0`` and ``func``'s parameters.

    Examples
    --------
    >>> import torch, neurodyn
    >>> dense = neurodyn.odeint_dense(lambda t, y: -y, torch.ones(2, dtype=torch.float64),
    ...                               torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    >>> bool(torch.allclose(dense(torch.tensor(0.5, dtype=torch.float64)), torch.exp(torch.tensor(-0.5)).double()))
    True
    """
    if not isinstance(y0, Tensor):
        raise InputError("odeint_dense: y0 must be a tensor (tuple states are not supported, as in torchdiffeq).")
    if not isinstance(t0, Tensor) or not isinstance(t1, Tensor):
        raise InputError("odeint_dense: t0 and t1 must be tensors (e.g. torch.tensor(0.0)).")
    t = torch.stack([t0.reshape(()), t1.reshape(()).to(t0)])
    if not float(t[1]) > float(t[0]):
        raise InputError(f"odeint_dense integrates forward: t1 must be > t0, got t0={float(t0)}, t1={float(t1)}.")
    func, y0, t, rtol, atol, method, kw, _, _ = _prepare(func, y0, t, rtol, atol, method, options, None)
    if method == "scipy_solver" or (isinstance(method, str) and not _adaptive(method)):
        raise InputError(f"odeint_dense needs an adaptive torch method (dopri5 as torchdiffeq), got {method!r}.")
    sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, dense=True, **kw)

    def dense_output_fn(t_eval: Tensor) -> Tensor:
        return sol.evaluate(torch.as_tensor(t_eval).to(t.dtype))

    return dense_output_fn


def _adaptive(method: str) -> bool:
    from ..solvers import get_solver

    return get_solver(method).adaptive


def odeint_event(func: Callable, y0: Tensor | tuple[Tensor, ...], t0: Tensor, *, event_fn: Callable,
                 reverse_time: bool = False, odeint_interface: Callable = odeint, t_max: float | Tensor | None = None,
                 **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` crosses zero (torchdiffeq's ``odeint_event``).

    As torchdiffeq: ``event_fn`` returns a tensor (several components: the first root of any); a component
    exactly zero at ``t0`` is an event at ``t0``; ``reverse_time`` searches backward; ``kwargs`` go to
    ``odeint_interface`` (``rtol``, ``atol``, ``method``, ``options``). Unlike torchdiffeq the search is bounded:
    by ``t_max`` when given, and by ``options["max_num_steps"]`` (default :data:`EVENT_MAX_STEPS`); a search that
    ends without a root raises :class:`~neurodyn.NoEventError` saying which bound stopped it.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
    y0 : Tensor or tuple of Tensors
        Initial state.
    t0 : Tensor, 0-dim or shape ``(1,)``
        Initial time (may require grad).
    event_fn : callable ``(t, y) -> Tensor``
        The event function; the solve stops where a component changes sign.
    reverse_time : bool
        Search toward earlier times.
    odeint_interface : callable
        :func:`odeint` (default); ``t_max`` needs it.
    t_max : float or Tensor, optional
        The latest (earliest with ``reverse_time``) time to search to (neurodyn's addition).

    Returns
    -------
    (Tensor, Tensor)
        ``event_t`` (0-dim) and ``solution`` of shape ``(2, *y0.shape)``: ``[y0, y(event_t)]`` (tuples for tuple
        states). The event time and state carry gradients (implicit function theorem).

    Raises
    ------
    NoEventError
        No sign change before ``t_max`` or within the step budget.
    InputError
        ``event_fn(t0, y0)`` is not a real tensor (a Python number, None, ...) or is NaN; a bad ``t_max``.

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
    if odeint_interface is not odeint:
        if t_max is not None:
            raise InputError("t_max needs odeint_interface=neurodyn.odeint (the default).")
        return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    unknown = sorted(set(kwargs) - {"rtol", "atol", "method", "options"})
    if unknown:
        raise InputError(f"odeint_event got unexpected keyword argument(s) {unknown}; it takes rtol, atol, method, "
                         f"options (passed to odeint), reverse_time and t_max.")
    rtol, atol = kwargs.get("rtol", 1e-7), kwargs.get("atol", 1e-9)
    method, options = kwargs.get("method"), kwargs.get("options")
    func, y0, t, rtol, atol, method, kw, ts, event_fn = _prepare(func, y0, t, rtol, atol, method, options, event_fn)
    if method == "scipy_solver":
        raise InputError("event_fn is not supported with method='scipy_solver'; use a torch method.")
    return _until_event(func, y0, t, event_fn, method, rtol, atol, kw, ts, options, t_max)


__all__ = ["odeint", "odeint_adjoint", "odeint_dense", "odeint_event"]
