"""The native entry point :func:`solve` and the one integrate loop every method runs through."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import solution as _sol
from .control import PIDController, initial_step, make_error_ratio
from .errors import InputError, MaxStepsReached, NonFiniteError, StepSizeUnderflow
from .solution import Solution
from .solvers import get_solver
from .solvers.explicit_rk import ExplicitRungeKutta, Step, nextafter

INTERPOLATIONS = ("auto", "hermite", "linear")


# ----------------------------------------------------------------------------------------------
# The term: how the loop calls the user's vector field.
# ----------------------------------------------------------------------------------------------
class ODETerm:
    """Wraps ``func(t, y)`` for the engine: flat ``(1, n)`` states in, flat ``(n,)`` derivatives out.

    ``t`` reaches ``func`` as a 0-dim tensor of the state's real dtype on the state's device, ``y`` in
    its own shape. Counts evaluations in ``nfe``.
    """

    __slots__ = ("func", "shape", "t_dtype", "device", "nfe", "flat")

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], shape: torch.Size,
                 t_dtype: torch.dtype, device: torch.device):
        self.func = func
        self.shape = shape
        self.t_dtype = t_dtype
        self.device = device
        self.nfe = 0
        n = shape.numel()
        self.flat = tuple(shape) == (1, n)  # the engine's (1, n) layout is already the user's shape
        self.shape = tuple(shape)

    def __call__(self, t: float, y: Tensor) -> Tensor:
        """dy/dt at ``(t, y)``; ``y`` of shape ``(1, n)``; the result has the user's shape (a view of
        ``(n,)`` elements, so it can be stored straight into a stage buffer row after ``view(-1)``)."""
        self.nfe += 1
        tt = torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)
        if self.flat:
            return self.func(tt, y)
        return self.func(tt, y.view(self.shape))


# ----------------------------------------------------------------------------------------------
# Settings the loop needs (validated).
# ----------------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    """Validated settings of one integration (internal)."""

    rtol: float | Tensor
    atol: float | Tensor
    adaptive: bool
    step_size: float | None = None
    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_steps: int = 100_000
    step_t: list[float] = field(default_factory=list)
    jump_t: list[float] = field(default_factory=list)
    controller: PIDController = field(default_factory=PIDController)
    norm: Callable[[Tensor], Tensor] | None = None
    unflatten: Callable[[Tensor], Any] | None = None
    record: bool = False
    interp: str = "auto"
    perturb: bool = False
    event_fn: Callable[[Tensor, Tensor], Tensor] | None = None


@dataclass
class LoopResult:
    """What the integrate loop returns (internal): outputs as ``(1, n)`` rows, status and steps."""

    outs: list[Tensor]
    status: str
    t_final: float
    y_final: Tensor
    steps: int
    rejected: int
    initial_step: float
    last_step: float
    records: list[Step]
    message: str = ""
    event: tuple[Step, float, int] | None = None  # (step, theta, component)


def integrate(term: ODETerm, solver: ExplicitRungeKutta, y0: Tensor, k0: Tensor, times: list[float],
              cfg: LoopConfig) -> LoopResult:
    """Integrate from ``times[0]`` through ``times[-1]``, returning the state at every time.

    ``y0`` has shape ``(1, n)``; ``k0`` (the user's shape) is dy/dt at ``(times[0], y0)`` (already computed by the
    caller's shape check). Never raises for a failed solve: the status says what happened.
    """
    t0, t_end = times[0], times[-1]
    direction = 1.0 if t_end > t0 else -1.0
    co = solver.coefficients(y0.dtype, y0.device)
    n = y0.shape[1]
    fixed = not cfg.adaptive
    fsal = solver.fsal

    # Times the solver must land on: step_t, jump_t and the final time, in the direction of travel.
    jumps = {x for x in cfg.jump_t if (x - t0) * direction > 0 and (t_end - x) * direction > 0}
    stops = sorted({x for x in cfg.step_t if (x - t0) * direction > 0 and (t_end - x) * direction > 0}
                   | jumps, key=lambda x: x * direction) + [t_end]
    stop_i = 0
    next_stop = stops[0]

    ratio_fn = None
    ctrl = None
    if fixed:
        h_abs = cfg.step_size if cfg.step_size is not None else math.inf
        first_h = h_abs
    else:
        ratio_fn = make_error_ratio(cfg.rtol, cfg.atol, n, cfg.norm, cfg.unflatten)
        ctrl = cfg.controller.start(solver.error_order)
        if cfg.first_step is not None:
            h_abs = cfg.first_step
        else:
            inv = 1.0 / math.sqrt(max(n, 1))

            def plain_norm(x: Tensor) -> float:
                return float(torch.linalg.vector_norm(x)) * inv

            h_abs = initial_step(term, t0, y0.detach(), k0.detach().view(1, -1), direction, solver.order,
                                 cfg.rtol, cfg.atol, plain_norm, cfg.max_step)
        first_h = h_abs
    h_abs = min(h_abs, cfg.max_step)

    outs: list[Tensor] = [y0]
    out_i = 1
    n_out = len(times)
    records: list[Step] = []
    t, y, k1 = t0, y0, k0
    steps = rejected = 0
    status = _sol.SUCCESS
    message = ""
    last_h = 0.0
    nonfinite_streak = False
    event = None
    event_fn = cfg.event_fn
    g_prev = None
    if event_fn is not None:
        with torch.no_grad():
            g_prev = event_fn(torch.scalar_tensor(t0, dtype=term.t_dtype, device=term.device),
                              y0.view(term.shape)).detach().reshape(-1)
    perturb = cfg.perturb
    max_steps = cfg.max_steps
    attempts = 0

    while True:
        if k1 is None:
            k1 = term(nextafter(t, direction) if perturb else t, y)
        remaining = (next_stop - t) * direction
        # Land on the stop when within a hair of it (no sliver steps from accumulated rounding).
        landing = remaining <= h_abs * (1.0 + 1e-7)
        h = (next_stop - t) if landing else direction * h_abs
        t1 = next_stop if landing else t + h
        nudge = nextafter(t1, -direction) if (perturb or (landing and next_stop in jumps)) else None
        y1, k, err = solver.step(term, t, y, h, k1, co, nudge)
        attempts += 1

        if fixed:
            accept = True
            ratio = 0.0
        else:
            ratio = ratio_fn(err, y, y1, h)
            accept = ratio <= 1.0  # False for NaN
            nonfinite_streak = not math.isfinite(ratio)

        if accept:
            steps += 1
            last_h = h
            st = Step(t, h, y, y1, k)
            if cfg.record:
                records.append(st)
            # Outputs inside (t, t1]: the method's own dense output, never forced steps.
            if out_i < n_out and (times[out_i] - t1) * direction <= 0:
                j = out_i
                while j < n_out and (times[j] - t1) * direction <= 0:
                    j += 1
                interior = [times[i] for i in range(out_i, j) if times[i] != t1]
                if interior:
                    th = torch.tensor([(x - t) / h for x in interior], dtype=torch.float64)
                    th = th.to(dtype=term.t_dtype, device=y.device)
                    vals = solver.interpolate(term, st, th, co, cfg.interp)
                    rows = list(vals.split(1, 0))
                    for i in range(out_i, j):
                        outs.append(y1 if times[i] == t1 else rows.pop(0))
                else:
                    outs.extend([y1] * (j - out_i))
                out_i = j
            if event_fn is not None:
                with torch.no_grad():
                    g1 = event_fn(torch.scalar_tensor(t1, dtype=term.t_dtype, device=term.device),
                                  y1.detach().view(term.shape)).detach().reshape(-1)
                changed = (torch.sign(g1) != torch.sign(g_prev)) & (g_prev != 0)
                if bool(changed.any()):
                    event = _locate_event(term, solver, st, co, cfg, g_prev, changed)
                    # Outputs already written past the event time are invalid: drop them.
                    t_ev = st.t0 + event[1] * st.h
                    while len(outs) > 1 and (times[len(outs) - 1] - t_ev) * direction > 0:
                        outs.pop()
                    out_i = len(outs)
                    status = _sol.EVENT
                    t, y = t_ev, None
                    break
                g_prev = g1
            t, y = t1, y1
            if landing and next_stop in jumps:
                k1 = None if perturb else term(nextafter(t, direction), y)
            elif perturb:
                k1 = None
            elif fsal:
                k1 = k[-1].view(term.shape)
            else:
                k1 = st.f1  # computed by Hermite output, if any; else evaluated at the loop top
            if landing:
                if next_stop == t_end:
                    break
                stop_i += 1
                next_stop = stops[stop_i]
            if fixed and fixed_bad(y1):
                status = _sol.NON_FINITE
                message = (f"NaN/inf in the state at t={t:.6g} with the fixed-step method '{solver.name}'"
                           f": use a smaller step_size or an adaptive method, and check the vector field.")
                break
        else:
            rejected += 1

        if not fixed:
            new_h = ctrl.propose(abs(h), ratio, accept)
            if new_h < cfg.min_step:
                if abs(h) > cfg.min_step and accept is False:
                    new_h = cfg.min_step
                else:
                    new_h = -1.0
            h_abs = min(new_h, cfg.max_step)
            if h_abs <= 0 or not math.isfinite(h_abs) or t + direction * h_abs == t:
                if nonfinite_streak:
                    status = _sol.NON_FINITE
                    message = (f"NaN/inf in the state or its derivative at t={t:.6g}: every step from there "
                               f"produced non-finite values. Check the vector field for overflow, division "
                               f"by zero or a log/sqrt of a negative near t={t:.6g}.")
                else:
                    status = _sol.STEP_SIZE_UNDERFLOW
                    floor = f"min_step={cfg.min_step:g}" if cfg.min_step else "the resolution of t"
                    message = (f"step size underflow at t={t:.6g}: the step fell below {floor}"
                               f" (last {abs(h):.3g}). The solution may blow up near t={t:.6g}, or the "
                               f"problem is stiff: loosen rtol/atol, check the vector field for a "
                               f"singularity, or use an implicit method.")
                break
        if attempts >= max_steps and status == _sol.SUCCESS:
            status = _sol.MAX_STEPS_REACHED
            message = (f"max_steps={max_steps} reached at t={t:.6g} of [{t0:.6g}, {t_end:.6g}] "
                       f"({steps} accepted, {rejected} rejected). Raise max_steps, loosen rtol/atol, or, "
                       f"if the steps are tiny because the problem is stiff, use an implicit method.")
            break

    return LoopResult(outs=outs, status=status, t_final=t, y_final=y, steps=steps, rejected=rejected,
                      initial_step=first_h, last_step=abs(last_h), records=records, message=message,
                      event=event)


def fixed_bad(y: Tensor) -> bool:
    return not bool(torch.isfinite(y.detach()).all())


def _locate_event(term: ODETerm, solver: ExplicitRungeKutta, st: Step, co, cfg: LoopConfig,
                  g0: Tensor, changed: Tensor) -> tuple[Step, float, int]:
    """Earliest root in the step of any component of ``event_fn`` that changed sign (Illinois)."""
    best_theta, best_comp = 2.0, -1
    with torch.no_grad():
        def g_at(theta: float, comp: int) -> float:
            th = torch.tensor([theta], dtype=term.t_dtype, device=st.y0.device)
            yv = solver.interpolate(term, st, th, co, cfg.interp)
            tt = torch.scalar_tensor(st.t0 + theta * st.h, dtype=term.t_dtype, device=term.device)
            return float(cfg.event_fn(tt, yv.view(term.shape)).reshape(-1)[comp])

        for comp in torch.nonzero(changed).view(-1).tolist():
            a, b = 0.0, 1.0
            fa, fb = float(g0[comp]), g_at(1.0, comp)
            side = 0
            for _ in range(200):
                if fb == fa:
                    m = 0.5 * (a + b)
                else:
                    m = (a * fb - b * fa) / (fb - fa)
                    if not (a < m < b):
                        m = 0.5 * (a + b)
                fm = g_at(m, comp)
                if fm == 0 or abs(b - a) * abs(st.h) <= 4 * math.ulp(max(abs(st.t0), abs(st.t0 + st.h), 1e-300)):
                    a = b = m
                    break
                if (fm > 0) == (fb > 0):
                    b, fb = m, fm
                    if side == -1:
                        fa *= 0.5
                    side = -1
                else:
                    a, fa = m, fm
                    if side == 1:
                        fb *= 0.5
                    side = 1
            theta = 0.5 * (a + b)
            if theta < best_theta:
                best_theta, best_comp = theta, comp
    return st, best_theta, best_comp


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL.get(dtype, dtype)


def _as_time_list(name: str, values: Any, device: torch.device) -> list[float]:
    if values is None:
        return []
    v = torch.as_tensor(values).detach()
    if v.dim() > 1:
        raise InputError(f"{name} must be a 1-d sequence of times, got shape {tuple(v.shape)}.")
    v = v.reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise InputError(f"{name} contains NaN or inf: {v.tolist()}.")
    return v.tolist()


def _check_tol(name: str, tol: Any, y0: Tensor) -> float | Tensor:
    if isinstance(tol, Tensor):
        if tol.is_complex() or not bool(torch.isfinite(tol).all()) or bool((tol < 0).any()):
            raise InputError(f"{name} must be finite and >= 0, got {tol}.")
        if tol.numel() == 1:
            return float(tol)
        try:
            return torch.broadcast_to(tol.to(y0.device, real_dtype(y0.dtype)), y0.shape).reshape(1, -1)
        except RuntimeError:
            raise InputError(f"{name} of shape {tuple(tol.shape)} does not broadcast to the state shape "
                             f"{tuple(y0.shape)}.") from None
    try:
        v = float(tol)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or a tensor, got {type(tol).__name__}.") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be finite and >= 0, got {v}.")
    return v


def validate_times(t: Any, y0: Tensor) -> Tensor:
    """Check the output times: 1-d, >= 2 entries, real floating of y0's precision, finite, monotonic."""
    if not isinstance(t, Tensor):
        raise InputError(f"t must be a 1-d tensor of times, got {type(t).__name__}: use torch.tensor(t).")
    if t.dim() != 1 or t.numel() < 2:
        raise InputError(f"t must be a 1-d tensor with at least 2 times (t[0] is the initial time), got "
                         f"shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise InputError(f"t must be a floating-point tensor, got dtype {t.dtype}: use t.to({real_dtype(y0.dtype)}).")
    if t.device != y0.device:
        raise InputError(f"t is on {t.device} but y0 is on {y0.device}: move both to one device.")
    if t.dtype != real_dtype(y0.dtype):
        raise InputError(f"t has dtype {t.dtype} but y0 has dtype {y0.dtype}: use t.to({real_dtype(y0.dtype)}) "
                         f"(times must have the state's real precision).")
    td = t.detach()
    if not bool(torch.isfinite(td).all()):
        raise InputError(f"t contains NaN or inf: {td.tolist()}.")
    d = td[1:] - td[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise InputError("t must be strictly increasing or strictly decreasing (no repeats); got "
                         f"{td.tolist() if td.numel() <= 20 else 'a non-monotonic sequence'}.")
    return t


def validate_state(y0: Any) -> Tensor:
    if not isinstance(y0, Tensor):
        raise InputError(f"y0 must be a tensor, got {type(y0).__name__} (tuples of tensors are accepted by "
                         f"neurodyn.odeint).")
    if not (y0.is_floating_point() or y0.is_complex()):
        raise InputError(f"y0 must be floating point or complex, got dtype {y0.dtype}: use y0.to(torch.float64).")
    if y0.numel() == 0:
        raise InputError(f"y0 is empty (shape {tuple(y0.shape)}): there is nothing to integrate.")
    if not bool(torch.isfinite(y0.detach()).all()):
        raise InputError("y0 contains NaN or inf.")
    return y0


def check_derivative(f0: Any, y0: Tensor) -> Tensor:
    if not isinstance(f0, Tensor):
        raise InputError(f"func(t, y) must return a tensor, got {type(f0).__name__}.")
    if f0.shape != y0.shape:
        raise InputError(f"func(t, y) returned shape {tuple(f0.shape)}, but the state has shape "
                         f"{tuple(y0.shape)}: dy/dt must have the state's shape.")
    if f0.dtype != y0.dtype:
        raise InputError(f"func(t, y) returned dtype {f0.dtype}, but the state has dtype {y0.dtype}: "
                         f"make the vector field compute in the state's dtype.")
    if f0.device != y0.device:
        raise InputError(f"func(t, y) returned a tensor on {f0.device}, but the state is on {y0.device}.")
    if not bool(torch.isfinite(f0.detach()).all()):
        raise InputError("func(t0, y0) is NaN or inf at the initial time: check the vector field and y0.")
    return f0


# ----------------------------------------------------------------------------------------------
# solve
# ----------------------------------------------------------------------------------------------
def solve(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Tensor = 1e-7,
    atol: float | Tensor = 1e-9,
    gradient: str = "direct",
    step_size: float | None = None,
    first_step: float | None = None,
    min_step: float = 0.0,
    max_step: float = math.inf,
    max_steps: int = 100_000,
    step_t: Sequence[float] | Tensor | None = None,
    jump_t: Sequence[float] | Tensor | None = None,
    controller: PIDController | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
    dense: bool = False,
    on_failure: str = "raise",
    event_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    interp: str = "auto",
    perturb: bool = False,
) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return the solution at the times ``t``.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``t`` is a 0-dim tensor of ``y``'s real dtype; ``y`` and the result have ``y0``'s shape and dtype.
        An ``nn.Module`` or a plain function.
    y0 : Tensor, any shape
        Initial state; float32, float64 or complex, on any device.
    t : Tensor, shape ``(T,)``, ``T >= 2``
        Output times, strictly increasing or strictly decreasing (integrates backward); ``t[0]`` is the
        initial time. Same device as ``y0`` and ``y0``'s real precision.
    method : str
        ``"dopri5"`` (default), ``"tsit5"``, ``"dopri8"``, ``"bosh3"``, ``"fehlberg2"``,
        ``"adaptive_heun"`` (adaptive), or ``"euler"``, ``"midpoint"``, ``"heun2"``, ``"heun3"``,
        ``"ralston"``, ``"rk4"`` (fixed step).
    rtol, atol : float or Tensor broadcastable to ``y0``
        Relative and absolute tolerances for the error norm
        ``RMS(err / (atol + rtol * max(|y_n|, |y_{n+1}|)))``.
    gradient : str
        How gradients are computed: ``"direct"`` (autograd through the solver).
    step_size : float, optional
        Constant step size: required by... nothing: a fixed-step method without it steps on the grid
        ``t``. Given for an adaptive method, it disables error control (constant steps).
    first_step, min_step, max_step : float
        Initial step (else Hairer's selection), bounds on the step size magnitude.
    max_steps : int
        Budget of attempted steps (accepted + rejected).
    step_t : sequence of times, optional
        Times the solver must step onto exactly.
    jump_t : sequence of times, optional
        Discontinuities of ``func``: stepped onto exactly, and ``func`` is re-evaluated just after.
    controller : PIDController, optional
        Step-size controller (default: PI control).
    norm : callable, optional
        Norm of the scaled error (a tensor of ``y0``'s shape) returning a scalar tensor; default RMS.
    dense : bool
        Keep the dense solution for :meth:`Solution.evaluate` (memory grows with the steps).
    on_failure : ``"raise"`` or ``"return"``
        On a failed solve raise a :class:`SolveFailure` subclass (default) or return the partial
        :class:`Solution` with its status.
    event_fn : callable ``(t, y) -> Tensor``, optional
        Stop at the first root of any component of ``event_fn`` (status ``"event"``, ``sol.event_t``).
        The event time is differentiable (implicit function theorem).
    interp : ``"auto"``, ``"hermite"`` or ``"linear"``
        Output interpolation: the method's own dense output (``"auto"``), cubic Hermite, or linear.
    perturb : bool
        Evaluate ``func`` just after the start and just before the end of every step (one-sided limits
        at grid points, as torchdiffeq's ``perturb``); disables FSAL reuse.

    Returns
    -------
    Solution
        ``sol.ys`` of shape ``(T, *y0.shape)``, ``sol.stats``, ``sol.status``, ``sol.evaluate``.

    Raises
    ------
    InputError
        Bad input, before any work.
    MaxStepsReached, StepSizeUnderflow, NonFiniteError
        A failed solve with ``on_failure="raise"``; ``err.solution`` holds the partial result.

    Examples
    --------
    >>> import torch, neurodyn
    >>> A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    >>> f = lambda t, y: y @ A.T
    >>> t = torch.linspace(0, 10, 11, dtype=torch.float64)
    >>> sol = neurodyn.solve(f, torch.tensor([2.0, 0.0], dtype=torch.float64), t, method="tsit5", rtol=1e-8)
    >>> sol.ys.shape
    torch.Size([11, 2])
    >>> exact = torch.linalg.matrix_exp(A * 10) @ torch.tensor([2.0, 0.0], dtype=torch.float64)
    >>> bool(torch.allclose(sol.ys[-1], exact, atol=1e-6))
    True
    """
    if not callable(func):
        raise InputError(f"func must be callable as func(t, y), got {type(func).__name__}.")
    y0 = validate_state(y0)
    t = validate_times(t, y0)
    solver = get_solver(method)
    if gradient not in GRADIENTS:
        raise InputError(f"unknown gradient method {gradient!r}; valid: {', '.join(sorted(GRADIENTS))}.")
    if on_failure not in ("raise", "return"):
        raise InputError(f"on_failure must be 'raise' or 'return', got {on_failure!r}.")
    if interp not in INTERPOLATIONS:
        raise InputError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}.")
    rtol_v = _check_tol("rtol", rtol, y0)
    atol_v = _check_tol("atol", atol, y0)
    if isinstance(rtol_v, float) and isinstance(atol_v, float) and rtol_v == 0 and atol_v == 0 \
            and solver.adaptive and step_size is None:
        raise InputError("rtol and atol are both 0: an adaptive method needs a positive tolerance.")
    if step_size is not None:
        step_size = float(step_size)
        if not math.isfinite(step_size) or step_size <= 0:
            raise InputError(f"step_size must be a finite number > 0, got {step_size}.")
    if first_step is not None:
        first_step = float(first_step)
        if not math.isfinite(first_step) or first_step <= 0:
            raise InputError(f"first_step must be a finite number > 0, got {first_step}.")
    min_step, max_step = float(min_step), float(max_step)
    if not (min_step >= 0 and math.isfinite(min_step)):
        raise InputError(f"min_step must be a finite number >= 0, got {min_step}.")
    if not max_step > 0:
        raise InputError(f"max_step must be > 0, got {max_step}.")
    if min_step > max_step:
        raise InputError(f"min_step={min_step} is larger than max_step={max_step}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InputError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
    if controller is not None and not isinstance(controller, PIDController):
        raise InputError(f"controller must be a neurodyn.PIDController, got {type(controller).__name__}.")
    if norm is not None and not callable(norm):
        raise InputError("norm must be callable: norm(scaled_error) -> scalar tensor.")
    if event_fn is not None and not callable(event_fn):
        raise InputError("event_fn must be callable as event_fn(t, y).")
    step_list = _as_time_list("step_t", step_t, y0.device)
    jump_list = _as_time_list("jump_t", jump_t, y0.device)

    cfg = LoopConfig(
        rtol=rtol_v, atol=atol_v, adaptive=solver.adaptive and step_size is None, step_size=step_size,
        first_step=first_step, min_step=min_step, max_step=max_step, max_steps=max_steps,
        step_t=step_list, jump_t=jump_list, controller=controller or PIDController(), norm=norm,
        unflatten=(lambda x: x.view(y0.shape)) if norm is not None else None, record=dense,
        interp=interp, perturb=bool(perturb), event_fn=event_fn,
    )
    if not solver.adaptive and step_size is None:
        # Fixed-step method without a step size: step on the output grid (torchdiffeq's behaviour).
        cfg.step_t = cfg.step_t + t.detach().cpu().tolist()
    return GRADIENTS[gradient](func, y0, t, solver, cfg, on_failure)


def _direct(func: Callable, y0: Tensor, t: Tensor, solver: ExplicitRungeKutta, cfg: LoopConfig,
            on_failure: str) -> Solution:
    """gradient="direct": run the loop under autograd."""
    term = ODETerm(func, y0.shape, real_dtype(y0.dtype), y0.device)
    times = t.detach().cpu().tolist()
    t0 = times[0]
    t0_tensor = torch.scalar_tensor(t0 if not cfg.perturb else nextafter(t0, times[-1] - t0),
                                    dtype=term.t_dtype, device=term.device)
    f0 = check_derivative(func(t0_tensor, y0), y0)
    term.nfe = 1
    y0_flat = y0.reshape(1, -1)
    res = integrate(term, solver, y0_flat, f0, times, cfg)
    return assemble(res, term, solver, cfg, y0, t, on_failure)


def assemble(res: LoopResult, term: ODETerm, solver: ExplicitRungeKutta, cfg: LoopConfig, y0: Tensor,
             t: Tensor, on_failure: str) -> Solution:
    """Turn the loop's result into a Solution (and raise on failure if asked)."""
    shape = y0.shape
    n_valid = len(res.outs)
    event_t = None
    y_final = res.y_final
    if res.event is not None:
        event_t, y_ev = _differentiable_event(term, solver, cfg, res.event)
        y_final = y_ev
    ys = torch.cat(res.outs, 0)
    if n_valid < t.shape[0]:
        pad = ys.new_full((t.shape[0] - n_valid, ys.shape[1]), float("nan"))
        ys = torch.cat([ys, pad], 0)
    ys = ys.view(t.shape[0], *shape)
    stats = {
        "nfe": term.nfe,
        "steps": res.steps,
        "rejected": res.rejected,
        "initial_step": res.initial_step,
        "last_step": res.last_step,
        "method": solver.name,
    }
    dense_fn, span = None, None
    if cfg.record and res.records:
        dense_fn = _make_dense(term, solver, cfg, res.records, shape)
        span = (res.records[0].t0, res.t_final)
    message = res.message or ("event" if res.event is not None else "success")
    sol = Solution(ts=t, ys=ys, stats=stats, status=res.status, message=message, t_final=res.t_final,
                   y_final=y_final.view(shape) if y_final is not None else None, n_valid=n_valid,
                   event_t=event_t, _dense=dense_fn, _dense_span=span)
    if res.status in _sol.FAILURE_STATUSES and on_failure == "raise":
        cls = {_sol.MAX_STEPS_REACHED: MaxStepsReached, _sol.STEP_SIZE_UNDERFLOW: StepSizeUnderflow,
               _sol.NON_FINITE: NonFiniteError}[res.status]
        raise cls(res.message + " (pass on_failure='return' to get the partial solution)",
                  status=res.status, t=res.t_final, solution=sol)
    return sol


def _differentiable_event(term: ODETerm, solver: ExplicitRungeKutta, cfg: LoopConfig,
                          event: tuple[Step, float, int]) -> tuple[Tensor, Tensor]:
    """Event time and state, with gradients by the implicit function theorem.

    With the root ``t*`` of ``g(t, y(t))`` found numerically, ``t_e = t* - (g - g.detach()) / (dg/dt)``
    has the value ``t*`` and the gradient ``-dg/dtheta / (dg/dt)``; the state is moved along ``f``.
    """
    st, theta, comp = event
    co = solver.coefficients(st.y0.dtype, st.y0.device)
    t_star = st.t0 + theta * st.h
    th = torch.tensor([theta], dtype=term.t_dtype, device=st.y0.device)
    y_star = solver.interpolate(term, st, th, co, cfg.interp)  # (1, n), in the graph
    tt = torch.scalar_tensor(t_star, dtype=term.t_dtype, device=term.device)
    g = cfg.event_fn(tt, y_star.view(term.shape)).reshape(-1)[comp]
    with torch.enable_grad():
        td = tt.detach().requires_grad_(True)
        yd = y_star.detach().view(term.shape).requires_grad_(True)
        gd = cfg.event_fn(td, yd).reshape(-1)[comp]
        if gd.requires_grad:
            gt, gy = torch.autograd.grad(gd, (td, yd), allow_unused=True)
        else:
            gt, gy = None, None
    f_star = term(t_star, y_star.detach()).view(term.shape)
    dgdt = (gt if gt is not None else 0.0) + ((gy * f_star).sum() if gy is not None else 0.0)
    dgdt = torch.as_tensor(dgdt, dtype=term.t_dtype, device=term.device).detach()
    if float(dgdt.abs()) == 0.0:
        t_e = tt
    else:
        t_e = tt - (g - g.detach()) / dgdt
    y_e = y_star.view(term.shape) + f_star.detach() * (t_e - tt).to(f_star.dtype)
    return t_e, y_e.reshape(1, -1)


def _make_dense(term: ODETerm, solver: ExplicitRungeKutta, cfg: LoopConfig, records: list[Step],
                shape: torch.Size) -> Callable[[Tensor], Tensor]:
    co = solver.coefficients(records[0].y0.dtype, records[0].y0.device)
    direction = 1.0 if records[0].h > 0 else -1.0
    starts = [r.t0 * direction for r in records]

    def dense(tt: Tensor) -> Tensor:
        flat = tt.reshape(-1)
        vals = flat.detach().cpu().tolist()
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(vals):
            j = max(0, bisect.bisect_right(starts, v * direction) - 1)
            groups.setdefault(j, []).append(i)
        n = records[0].y0.shape[1]
        out = records[0].y0.new_empty((len(vals), n)) if not torch.is_grad_enabled() else None
        pieces = []
        for j, idx in groups.items():
            r = records[j]
            th = (flat[idx] - r.t0) / r.h
            vals_j = solver.interpolate(term, r, th.to(term.t_dtype), co, cfg.interp)
            if out is not None:
                out[idx] = vals_j
            else:
                pieces.append((idx, vals_j))
        if out is None:
            order = [i for idx, _ in pieces for i in idx]
            stacked = torch.cat([v for _, v in pieces], 0)
            inv = torch.empty(len(order), dtype=torch.long)
            inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            out = stacked[inv.to(stacked.device)]
        return out.view(*tt.shape, *shape)

    return dense


GRADIENTS: dict[str, Callable[..., Solution]] = {"direct": _direct}
