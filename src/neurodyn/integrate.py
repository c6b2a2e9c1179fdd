"""The one integrate loop every method and gradient method runs through, and its helpers."""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import solution as _sol
from .compiled import _CompileFailed, compiled_context
from .control import PIDController, initial_step, make_error_ratio
from .errors import InputError, MaxStepsReached, NonFiniteError, StepSizeUnderflow
from .solution import Solution
from .solvers.explicit_rk import ExplicitRungeKutta, Step, nextafter


# ----------------------------------------------------------------------------------------------
# The term: how the loop calls the user's vector field.
# ----------------------------------------------------------------------------------------------
class ODETerm:
    """Wraps ``func(t, y)`` for the engine: flat ``(1, n)`` states in, flat ``(n,)`` derivatives out.

    ``t`` reaches ``func`` as a 0-dim tensor of the state's real dtype on the state's device, ``y`` in
    its own shape. Counts evaluations in ``nfe``. ``inline``: steppers may call ``func`` themselves the way
    :meth:`__call__` does (same time tensor, same state view, ``nfe`` counted), saving a frame per stage.
    """

    __slots__ = ("func", "shape", "t_dtype", "device", "nfe", "flat")
    inline = True

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
    # Error control over the first ``error_dims`` components only (a seminorm, e.g. the adjoint's).
    error_dims: int | None = None
    # Called after every accepted step as on_accept(t, h, t1, nudge, k1_time, y_start, k1) (k1: dy/dt the step used).
    on_accept: Callable[..., None] | None = None
    # A compiled step advance(t, y, h, k1) -> (y1, k, ratio) used where no nudge is needed (compile=True).
    advance: Callable[..., Any] | None = None
    # The whole loop compiled (compile=True; compiled_loop.compiled_loop), used where it applies.
    loop: Callable[..., Any] | None = None


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
    next_step: float | None = None  # the controller's proposal after the last step (to continue from)
    ys: Tensor | None = None  # the outputs stacked, (n_valid, n), where the loop wrote them in one tensor (outs empty)
    compiled: str | None = None  # "loop": the whole loop ran compiled; "step": compiled steps; None: eager


def integrate(term: ODETerm, solver: ExplicitRungeKutta, y0: Tensor, k0: Tensor, times: list[float],
              cfg: LoopConfig) -> LoopResult:
    """Integrate from ``times[0]`` through ``times[-1]``, returning the state at every time.

    ``y0`` has shape ``(1, n)``; ``k0`` (the user's shape) is dy/dt at ``(times[0], y0)`` (already computed by the
    caller's shape check). Never raises for a failed solve: the status says what happened.
    """
    t0, t_end = times[0], times[-1]
    direction = 1.0 if t_end > t0 else -1.0
    if not vmapped(k0) and not bool(torch.isfinite(k0.detach()).all()):
        return LoopResult(outs=[y0], status=_sol.NON_FINITE, t_final=t0, y_final=y0, steps=0, rejected=0,
                          initial_step=0.0, last_step=0.0, records=[],
                          message=(f"NaN/inf in the derivative func(t0, y0) at the initial time t={t0:.6g}: "
                                   f"check the vector field and y0."))
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
    if cfg.loop is not None and not jumps and _whole_loop_applies(cfg, y0, k0):
        res = _run_compiled_loop(term, solver, y0, k0, times, stops, cfg)
        if res is not None:
            return res

    ratio_fn = None
    ctrl = None
    if fixed:
        h_abs = cfg.step_size if cfg.step_size is not None else math.inf
        first_h = h_abs
    else:
        m = cfg.error_dims or n
        rtol_m = cfg.rtol[:, :m] if isinstance(cfg.rtol, Tensor) else cfg.rtol
        atol_m = cfg.atol[:, :m] if isinstance(cfg.atol, Tensor) else cfg.atol
        ratio_fn = make_error_ratio(rtol_m, atol_m, m, cfg.norm, cfg.unflatten)
        if m < n:
            full_ratio = ratio_fn

            def ratio_fn(err, ya, yb, h_, _r=full_ratio, _m=m):  # noqa: E306
                return _r(err[:, :_m], ya[:, :_m], yb[:, :_m], h_)
        ctrl = cfg.controller.start(solver.controller_order)
        if cfg.first_step is not None:
            h_abs = cfg.first_step
        else:
            inv = 1.0 / math.sqrt(max(n, 1))

            def plain_norm(x: Tensor) -> float:
                return float(torch.linalg.vector_norm(x)) * inv

            h_abs = initial_step(term, t0, y0.detach(), k0.detach().reshape(1, -1), direction, solver.order,
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

    on_accept = cfg.on_accept
    fast = cfg.advance
    # Without an autograd graph or recorded steps, stages go to two alternating preallocated buffers
    # (alternating: a rejected attempt must not overwrite the FSAL stage the retry starts from).
    buffers = None
    if not torch.is_grad_enabled() and not cfg.record and fast is None:
        buffers = (solver.make_buffers(y0, k0), solver.make_buffers(y0, k0))
    which = 0
    buf = None
    new_stages = solver.stages - 1
    record = cfg.record
    min_step, max_step_size = cfg.min_step, cfg.max_step
    propose = ctrl.propose if ctrl is not None else None
    k1_time = nextafter(t0, direction) if perturb else t0
    # Compiled steps: their compiler settings held once for the whole loop (not entered per step).
    with compiled_context() if fast is not None else contextlib.nullcontext():
        while True:
            if k1 is None:
                k1_time = nextafter(t, direction) if perturb else t
                k1 = term(k1_time, y)
            remaining = (next_stop - t) * direction
            # Land on the stop when within a hair of it (no sliver steps from accumulated rounding).
            landing = remaining <= h_abs * (1.0 + 1e-7)
            h = (next_stop - t) if landing else direction * h_abs
            t1 = next_stop if landing else t + h
            nudge = nextafter(t1, -direction) if (perturb or (landing and next_stop in jumps)) else None
            ratio = None
            if fast is not None and nudge is None:
                try:
                    y1, k, ratio = fast(t, y, h, k1)
                    term.nfe += new_stages
                except _CompileFailed:
                    fast = None
            if ratio is None:
                buf = buffers[which] if buffers else None
                y1, k, err = solver.step(term, t, y, h, k1, co, nudge, buf)
            attempts += 1

            if fixed:
                ratio = 0.0
                if fixed_bad(y1):
                    status = _sol.NON_FINITE
                    message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected)
                    break
                accept = True
            else:
                if ratio is None:
                    ratio = ratio_fn(err, y, y1, h)
                accept = ratio <= 1.0  # False for NaN
                nonfinite_streak = not math.isfinite(ratio)

            if accept:
                steps += 1
                which ^= 1
                last_h = h
                st = Step(t, h, y, y1, k)
                if record:
                    records.append(st)
                if on_accept is not None:
                    on_accept(t, h, t1, nudge, k1_time, y, k1)
                # Outputs inside (t, t1]: the method's own dense output, never forced steps.
                if out_i < n_out and (times[out_i] - t1) * direction <= 0:
                    out_i = step_outputs(solver, term, st, co, cfg.interp, times, out_i, t1, direction, outs)
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
                k1_time = t
                if landing and next_stop in jumps:
                    k1_time = nextafter(t, direction)
                    k1 = None if perturb else term(k1_time, y)
                elif perturb:
                    k1 = None
                elif fsal:
                    # The last stage in the state's shape (a cached view when it sits in a stage buffer).
                    k1 = buf.rows[-1] if buf is not None and k is buf.flat else k[-1].view(term.shape)
                else:
                    # dy/dt at the step end if Hermite output computed it; else evaluated at the loop top.
                    k1 = st.f1.view(term.shape) if st.f1 is not None else None
                if landing:
                    if next_stop == t_end:
                        break
                    stop_i += 1
                    next_stop = stops[stop_i]
            else:
                rejected += 1

            if not fixed:
                new_h = propose(abs(h), ratio, accept)
                if new_h < min_step:
                    if abs(h) > min_step and accept is False:
                        new_h = min_step
                    else:
                        new_h = -1.0
                h_abs = min(new_h, max_step_size)
                if h_abs <= 0 or not math.isfinite(h_abs) or t + direction * h_abs == t:
                    status = _sol.NON_FINITE if nonfinite_streak else _sol.STEP_SIZE_UNDERFLOW
                    message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected)
                    break
            if attempts >= max_steps and status == _sol.SUCCESS:
                status = _sol.MAX_STEPS_REACHED
                message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected)
                break

    return LoopResult(outs=outs, status=status, t_final=t, y_final=y, steps=steps, rejected=rejected,
                      initial_step=first_h, last_step=abs(last_h), records=records, message=message,
                      next_step=h_abs if math.isfinite(h_abs) and h_abs > 0 else None,
                      event=event, compiled="step" if fast is not None else None)


def failure_message(status: str, t: float, h_abs: float, cfg: LoopConfig, solver: ExplicitRungeKutta, t0: float,
                    t_end: float, steps: int, rejected: int) -> str:
    """What went wrong and what to do, for a failed solve stopped at ``t`` (last attempted step ``h_abs``)."""
    stiff_hint = ("use method='auto' (switches to an implicit method when it detects stiffness) or an implicit "
                  "method ('radau', 'kvaerno5')")
    if status == _sol.NON_FINITE and not cfg.adaptive:
        return (f"NaN/inf in the state after the step from t={t:.6g} to t={t + h_abs * (1 if t_end > t0 else -1):.6g} "
                f"with the fixed-step method '{solver.name}': use a smaller step_size or an adaptive method, and "
                f"check the vector field.")
    if status == _sol.NON_FINITE:
        return (f"NaN/inf in the state or its derivative at t={t:.6g}: every step from there produced non-finite "
                f"values. Check the vector field for overflow, division by zero or a log/sqrt of a negative near "
                f"t={t:.6g}.")
    if status == _sol.STEP_SIZE_UNDERFLOW:
        floor = f"min_step={cfg.min_step:g}" if cfg.min_step else "the resolution of t"
        return (f"step size underflow at t={t:.6g}: the step fell below {floor} (last {h_abs:.3g}). The solution "
                f"may blow up near t={t:.6g}, or the problem is stiff: loosen rtol/atol, check the vector field for "
                f"a singularity, or {stiff_hint}.")
    return (f"max_steps={cfg.max_steps} reached at t={t:.6g} of [{t0:.6g}, {t_end:.6g}] ({steps} accepted, "
            f"{rejected} rejected). Raise max_steps, loosen rtol/atol, or, if the steps are tiny because the problem "
            f"is stiff, {stiff_hint}.")


def _whole_loop_applies(cfg: LoopConfig, y0: Tensor, k0: Tensor) -> bool:
    """The compiled whole loop covers solves that record nothing: no graph, steps, events or per-step hooks."""
    if cfg.record or cfg.perturb or cfg.event_fn is not None or cfg.on_accept is not None or cfg.norm is not None:
        return False
    if cfg.error_dims is not None or vmapped(y0):  # torch.func.vmap cannot enter a compiled while_loop
        return False
    return not (torch.is_grad_enabled() and (y0.requires_grad or k0.requires_grad))


def _run_compiled_loop(term: ODETerm, solver: ExplicitRungeKutta, y0: Tensor, k0: Tensor, times: list[float],
                       stops: list[float], cfg: LoopConfig) -> LoopResult | None:
    """Run the compiled whole loop and report it as the eager loop would (None: it could not run)."""
    first = cfg.first_step if cfg.adaptive else cfg.step_size
    o = cfg.loop(times, stops, y0, k0, first, cfg.rtol, cfg.atol, cfg.min_step, cfg.max_step, cfg.max_steps)
    if o is None:
        return None
    per_attempt = solver.stages - (1 if solver.fsal else 0)
    term.nfe += o.attempts * per_attempt + (1 if cfg.adaptive and cfg.first_step is None else 0)
    message = "" if o.status == _sol.SUCCESS else failure_message(
        o.status, o.t_final, o.last_try, cfg, solver, times[0], times[-1], o.steps, o.rejected)
    ys = o.ys[: o.n_valid]
    return LoopResult(outs=[], status=o.status, t_final=o.t_final, y_final=o.y_final,
                      steps=o.steps, rejected=o.rejected, initial_step=o.initial_step, last_step=o.last_step,
                      records=[], message=message, next_step=o.next_step, ys=ys, compiled="loop")


def step_outputs(solver: ExplicitRungeKutta, term: ODETerm, st: Step, co, interp: str, times: list[float],
                 out_i: int, t1: float, direction: float, outs: list[Tensor]) -> int:
    """Append the outputs at ``times[out_i:]`` that fall in the step ``(st.t0, t1]`` to ``outs``.

    Interior times use the method's dense output; a time equal to the step end is the new state.
    Returns the index of the next output time.
    """
    n_out = len(times)
    j = out_i
    while j < n_out and (times[j] - t1) * direction <= 0:
        j += 1
    interior = [times[i] for i in range(out_i, j) if times[i] != t1]
    if len(interior) == j - out_i == 1:  # the common case: one output inside the step
        outs.append(solver.interpolate_floats(term, st, [(interior[0] - st.t0) / st.h], co, interp))
    elif interior:
        vals = solver.interpolate_floats(term, st, [(x - st.t0) / st.h for x in interior], co, interp)
        rows = list(vals.split(1, 0))
        for i in range(out_i, j):
            outs.append(st.y1 if times[i] == t1 else rows.pop(0))
    else:
        outs.extend([st.y1] * (j - out_i))
    return j


def vmapped(x: Tensor) -> bool:
    """True inside ``torch.func.vmap`` (a batched tensor): no host-side decision may read its values."""
    if torch.compiler.is_compiling():  # dynamo traces fake tensors; nothing is vmapped there
        return False
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):  # e.g. jacrev inside vmap: a grad wrapper around a batched one
        if ft.is_batchedtensor(x):
            return True
        x = ft.get_unwrapped(x)
    return False


def fixed_bad(y: Tensor) -> bool:
    """Non-finite values in a fixed-step state (skipped under vmap, where values cannot reach the host)."""
    return not vmapped(y) and not bool(torch.isfinite(y.detach()).all())


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


def assemble(res: LoopResult, term: ODETerm, solver: ExplicitRungeKutta, cfg: LoopConfig, y0: Tensor,
             t: Tensor, on_failure: str) -> Solution:
    """Turn the loop's result into a Solution (and raise on failure if asked)."""
    shape = y0.shape
    n_valid = res.ys.shape[0] if res.ys is not None else len(res.outs)
    event_t = None
    y_final = res.y_final
    if res.event is not None:
        event_t, y_ev = _differentiable_event(term, solver, cfg, res.event)
        y_final = y_ev
    ys = res.ys if res.ys is not None else torch.cat(res.outs, 0)
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
    if res.compiled:
        stats["compiled"] = res.compiled
    # Implicit methods' Jacobians, factorisations and Newton iterations (copied: a backward solve with the
    # same stepper would reset them).
    if getattr(solver, "implicit", False) and isinstance(getattr(solver, "stats", None), dict):
        stats.update(dict(solver.stats))
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



_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a (possibly complex) dtype."""
    return _REAL.get(dtype, dtype)


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
    return f0
