"""The integrate loop: every method and gradient method steps through it."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Generator

import torch
from torch import Tensor

from .. import solution as _sol
from ..errors import InputError
from .config import LoopConfig
from .control import (
    even_step,
    fixed_even_step,
    frozen_attempt,
    initial_step,
    landing_reach,
    make_error_ratio,
    not_frozen,
    step_grid,
    step_underflow,
    time_eps,
)
from .events import EventWatch
from .output import LoopResult, step_outputs
from .stepper import Step, Stepper, nextafter
from .tensors import VMAP_ADAPTIVE, fixed_bad, no_transform, real_bad, real_dtype, vmapped
from .term import ODETerm


def integrate(term: ODETerm, solver: Stepper, y0: Tensor, k0: Tensor | Callable[[], Tensor], times: list[float],
              cfg: LoopConfig) -> LoopResult | None:
    """Integrate from ``times[0]`` through ``times[-1]``, returning the state at every time (None with
    ``cfg.loop_only`` where the whole compiled loop does not run).

    ``y0`` has shape ``(1, n)``; ``k0`` (the user's shape) is dy/dt at ``(times[0], y0)`` (already computed by the
    caller's shape check), or a function computing and checking it where the caller left it to the compiled whole
    loop (:func:`defers_start`): called only if that loop does not run. Never raises for a failed solve: the status
    says what happened. ``cfg.on_attempt``, when set, is called after every attempted step as
    ``on_attempt(t, y, h, accepted, nfe)`` (see :func:`iterate`).
    """
    if not isinstance(k0, Tensor):  # the compiled whole loop first, without the generator (as iterate starts)
        jumps, stops = landing_times(times, cfg)
        res = None if jumps else _run_deferred(term, solver, y0, times, stops, cfg)
        if res is not None:
            return res
        k0 = k0()  # the loop does not run here: evaluated (and checked) now
    run = iterate(term, solver, y0, k0, times, cfg)
    hook = cfg.on_attempt if not cfg.pause else None
    try:
        while True:
            attempt = next(run)  # only with cfg.on_attempt / cfg.pause: the loop yields nothing otherwise
            if hook is not None:
                hook(*attempt, term.nfe)
    except StopIteration as done:
        return done.value


def iterate(term: ODETerm, solver: Stepper, y0: Tensor, k0: Tensor | Callable[[], Tensor], times: list[float],
            cfg: LoopConfig) -> Generator[tuple, None, LoopResult]:
    """The loop of :func:`integrate` as a generator returning the :class:`LoopResult`.

    With ``cfg.on_attempt`` or ``cfg.pause`` set it yields ``(t, y, h, accepted)`` once each attempted step is
    accepted or rejected (``t, y``: the step's end ``t + h`` and its result when accepted, the unchanged start when
    rejected; ``h`` signed). With ``cfg.pause`` it also yields ``(t, y, step, h_abs)`` after the step's outputs, events
    and step-size control (``t, y``: where the loop stands; ``step``: the accepted :class:`Step` for dense output,
    else None; ``h_abs``: the next step's size); a step that ends the solve returns instead of this second yield.
    Without either it never yields. (:func:`integrate` calls no hook with ``cfg.pause``.)
    """
    t0, t_end = times[0], times[-1]
    direction = 1.0 if t_end > t0 else -1.0
    jumps, stops = landing_times(times, cfg)
    if not isinstance(k0, Tensor):  # dy/dt at t0 left to the compiled whole loop (defers_start)
        res = None if jumps else _run_deferred(term, solver, y0, times, stops, cfg)
        if res is not None:
            return res
        k0 = k0()  # the loop does not run here: evaluated (and checked) now
    if vmapped(k0):
        if cfg.adaptive:  # vmapped over the field's parameters only (a batched state is refused by solve())
            raise InputError(VMAP_ADAPTIVE)
    elif fixed_bad(k0):  # screened by the sum (tensors.fixed_bad)
        return _bad_start(y0, t0)
    # The event functions evaluated and checked at (t0, y0) before any work.
    watch = EventWatch(term, cfg, t0, y0) if cfg.events else None
    records: list = []  # event occurrences (t_e, y_e, event index)
    co = solver.coefficients(y0.dtype, y0.device)
    n = y0.shape[1]
    fixed = not cfg.adaptive
    fsal = solver.fsal

    stop_i = 0
    next_stop = stops[0]
    # compile=True: the compiled plug-in says whether the whole loop, compiled steps or eager steps run here.
    path, why = None, None
    if cfg.advance is not None:
        loop_ok = cfg.loop is not None and not jumps and _whole_loop_applies(cfg, y0, k0)
        path, why = cfg.advance.choose(term, solver, y0, k0, times, stops, cfg, loop_ok)
    if path == "loop":
        res = _run_compiled_loop(term, solver, y0, k0, times, stops, cfg)
        if res is not None:
            res.compile_reason = why
            return res
        path, why = "step", f"{why}; it could not be compiled: compiled steps"
    if cfg.loop_only:
        return None

    ratio_fn = None
    ctrl = None
    m = n
    # The fixed-step finiteness check of every step: the lean form where no torch.func transform is active (none
    # can start inside the loop) and the state is real.
    bad = real_bad if no_transform() and not y0.is_complex() else fixed_bad
    eps = torch.finfo(real_dtype(y0.dtype)).eps  # the state's precision: the underflow rule's unit
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

            order, first_norm, first_cap = solver.order, plain_norm, cfg.max_step
            if cfg.controller.first_step_rule == "torchdiffeq":  # (max_step caps the step below, not h0)
                order, first_cap = solver.controller_order, math.inf
                if cfg.norm is not None:
                    def first_norm(x: Tensor, _n=cfg.norm, _u=cfg.unflatten) -> float:  # noqa: E306
                        return float(_n(_u(x) if _u is not None else x))
            h_abs = initial_step(term, t0, y0.detach(), k0.detach().reshape(1, -1), direction, order,
                                 cfg.rtol, cfg.atol, first_norm, first_cap)
        first_h = h_abs
    h_abs = min(h_abs, cfg.max_step)
    accept_min = cfg.accept_min_step and not fixed
    if accept_min:
        h_abs = max(h_abs, cfg.min_step)
    cbs = cfg.step_callbacks or {}
    cb_step, cb_accept, cb_reject = cbs.get("step"), cbs.get("accept"), cbs.get("reject")

    outs: list[Tensor] = [y0]
    out_i = 1
    n_out = len(times)
    steps_kept: list[Step] = []
    t, y, k1 = t0, y0, k0
    steps = rejected = 0
    status = _sol.SUCCESS
    message = ""
    last_h = 0.0
    nonfinite_streak = False
    event = None
    perturb = cfg.perturb
    max_steps = cfg.max_steps
    attempts = 0

    on_accept = cfg.on_accept
    pause = cfg.pause
    observe = cfg.on_attempt is not None or pause
    fast = cfg.advance if path != "eager" else None
    # Without an autograd graph or recorded steps, stages go to two alternating preallocated buffers
    # (alternating: a rejected attempt must not overwrite the FSAL stage the retry starts from).
    buffers = pool_key = None
    if not torch.is_grad_enabled() and not cfg.record and fast is None:
        pooled = on_accept is None and not pause and k0.numel() <= POOL_MAX_NUMEL
        buffers, pool_key = take_buffers(solver, y0, k0) if pooled else (None, None)
        if buffers is None:
            buffers = (solver.make_buffers(y0, k0), solver.make_buffers(y0, k0))
    which = 0
    buf = None
    new_stages = solver.stages - 1
    record = cfg.record
    min_step, max_step_size = cfg.min_step, cfg.max_step
    propose = ctrl.propose if ctrl is not None else None
    land_end = fixed or cfg.controller.land_on_end
    # perturb / jump_t nudges: one ulp of the time tensor the field receives (a float64 ulp vanishes in float32).
    t_dtype = getattr(term, "t_dtype", None) or torch.get_default_dtype()
    t_eps, t_scale = time_eps(t_dtype), abs(t0) + abs(t_end)
    k1_time = nextafter(t0, direction, t_dtype) if perturb else t0
    # Compiled steps: their compiler settings held once for the whole loop (not entered per step). Eager fixed steps:
    # the term's part that depends on t alone evaluated at every evaluation time at once (evaluation_grid).
    with fast.context() if fast is not None else \
            evaluation_grid(term, solver, times, stops, h_abs if fixed and not perturb else math.inf, k0, jumps):
        while True:
            if k1 is None:
                k1_time = nextafter(t, direction, t_dtype) if perturb else t
                k1 = term(k1_time, y)
            remaining = (next_stop - t) * direction
            # Land on the stop when within a hair of it (no sliver steps from accumulated rounding); the final time
            # not with land_on_end=False: the step passing it ends the solve (its outputs from the dense output).
            reach = landing_reach(h_abs, t_scale, t_eps)
            landing = remaining <= reach and (land_end or next_stop != t_end)
            if landing:
                h = next_stop - t
            elif next_stop in jumps:
                # Toward a jump (never the final time): equal steps no larger than the proposal or the fixed step
                # (within the landing rule's reach), no sliver step before it (h_abs stays as it is; an adaptive
                # solve's next proposal comes from the step taken).
                h = direction * (fixed_even_step(remaining, h_abs, reach) if fixed else even_step(remaining, h_abs))
            else:
                h = direction * h_abs
            t1 = next_stop if landing else t + h
            nudge = nextafter(t1, -direction, t_dtype) if (perturb or (landing and next_stop in jumps)) else None
            if cb_step is not None:
                cb_step(t, y, abs(h))
            ratio = None
            if fast is not None and nudge is None:
                out = fast(t, y, h, k1)
                if out is None:  # compilation failed (the plug-in warned): the stepper from now on
                    fast = None
                else:
                    y1, k, ratio = out
                    term.nfe += new_stages
            if ratio is None:
                buf = buffers[which] if buffers else None
                y1, k, err = solver.step(term, t, y, h, k1, co, nudge, buf)
            attempts += 1

            if fixed:
                ratio = 0.0
                if bad(y1):
                    status = _sol.NON_FINITE
                    message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected)
                    break
                accept = True
            else:
                if ratio is None:
                    ratio = ratio_fn(err, y, y1, h)
                accept = ratio <= 1.0  # False for NaN
                nonfinite_streak = not math.isfinite(ratio)
                # (h_abs: a step landing on a stop may exceed its proposal by a rounding sliver)
                if accept_min and not accept and not nonfinite_streak and min(abs(h), h_abs) <= min_step:
                    accept = True  # torchdiffeq: a step at min_step is taken whatever its error
            if observe:
                yield (t1, y1, h, True) if accept else (t, y, h, False)

            if accept:
                if cb_accept is not None:
                    cb_accept(t, y, abs(h))
                steps += 1
                which ^= 1
                last_h = h
                st = Step(t, h, y, y1, k)
                if record:
                    steps_kept.append(st)
                if on_accept is not None:
                    on_accept(t, h, t1, nudge, k1_time, y, k1)
                # Outputs inside (t, t1]: the method's own dense output, never forced steps.
                if out_i < n_out and (times[out_i] - t1) * direction <= 0:
                    out_i = step_outputs(solver, term, st, co, cfg.interp, times, out_i, t1, direction, outs)
                hit = watch.check(solver, st, co, t1, steps - 1) if watch is not None else None
                jumped = False
                if hit is not None:
                    # Occurrences recorded (their differentiable times and states); the last one may stop the
                    # solve, refuse (Zeno) or jump.
                    n_rec = len(hit.occ) - (1 if hit.stop == "zeno" else 0)
                    for th, c in hit.occ[:n_rec]:
                        records.append((*watch.occurrence(solver, st, co, th, c), watch.owner[c]))
                    if hit.stop is not None:
                        # Outputs already written past the event time are invalid: drop them.
                        t_ev = st.t0 + hit.theta * st.h
                        while len(outs) > 1 and (times[len(outs) - 1] - t_ev) * direction > 0:
                            outs.pop()
                        out_i = len(outs)
                        if hit.stop != "jump":
                            event = records[-1][:2] if hit.stop == "terminal" else \
                                watch.occurrence(solver, st, co, *hit.occ[-1])
                            status = _sol.EVENT if hit.stop == "terminal" else _sol.ZENO
                            if status == _sol.ZENO:
                                message = zeno_message(t_ev, cfg, watch.total)
                            t, y = t_ev, None
                            break
                        # The jump: the solve continues from the new state with the derivative evaluated afresh
                        # (a multistep stepper sees a state that is not its last step's end, and restarts).
                        t_e, y_e, _ = records[-1]
                        y, k1, zeno = watch.restart(t_e, y_e, hit.occ[-1][1], h)
                        t = t_ev
                        k1_time = t
                        jumped = True
                        if zeno:
                            status, message = _sol.ZENO, zeno_message(t_ev, cfg, watch.total, h)
                            event = (t_e, y.view(term.shape))
                            break
                if not jumped:
                    t, y = t1, y1
                    k1_time = t
                    if landing and next_stop in jumps:
                        k1_time = nextafter(t, direction, t_dtype)
                        k1 = None if perturb else term(k1_time, y)
                    elif perturb:
                        k1 = None
                    elif fsal:
                        # The last stage in the state's shape (a cached view when it sits in a stage buffer).
                        k1 = buf.rows[-1] if buf is not None and k is buf.flat else k[-1].view(term.shape)
                    else:
                        # dy/dt at the step end if Hermite output computed it; else evaluated at the loop top.
                        k1 = st.f1.view(term.shape) if st.f1 is not None else None
                    if not land_end and next_stop == t_end and (t - t_end) * direction >= 0:
                        t, y = t_end, outs[-1]  # passed the final time: the solve ends at its output
                        break
                    if landing:
                        if next_stop == t_end:
                            break
                        stop_i += 1
                        next_stop = stops[stop_i]
            else:
                if cb_reject is not None:
                    cb_reject(t, y, abs(h))
                rejected += 1

            if not fixed:
                new_h = propose(abs(h), ratio, accept)
                if accept_min:
                    # Clamped to min_step; non-finite values at min_step cannot be stepped past.
                    new_h = -1.0 if (nonfinite_streak and min(abs(h), h_abs) <= min_step) else max(new_h, min_step)
                elif new_h < min_step:
                    if abs(h) > min_step and accept is False:
                        new_h = min_step
                    else:
                        new_h = -1.0
                h_abs = min(new_h, max_step_size)
                # The underflow rule (control.step_underflow): below the time resolution of the state's dtype, or
                # a rejected attempt whose changes a smaller step could not resolve (a host read per rejection).
                frozen = False
                if not accept and not nonfinite_streak and h_abs > 0:
                    ym, y1m, shrink = (y, y1, h_abs / abs(h)) if m == n else (y[:, :m], y1[:, :m], h_abs / abs(h))
                    frozen = not not_frozen(ym, y1m, shrink, eps) and bool(frozen_attempt(ym, y1m, shrink, eps)[0])
                if step_underflow(t, h_abs, eps, frozen):
                    status = _sol.NON_FINITE if nonfinite_streak else _sol.STEP_SIZE_UNDERFLOW
                    message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected, y0.dtype)
                    break
            if attempts >= max_steps and status == _sol.SUCCESS:
                status = _sol.MAX_STEPS_REACHED
                message = failure_message(status, t, abs(h), cfg, solver, t0, t_end, steps, rejected)
                break
            if pause:
                yield (t, y, st if accept else None, h_abs)

    if watch is not None:  # occurrences whose location the event watch deferred (they change nothing in the loop)
        records = watch.finish(solver, co, records)
    if pool_key is not None:
        give_back_buffers(solver, pool_key, buffers)
    return LoopResult(outs=outs, status=status, t_final=t, y_final=y, steps=steps, rejected=rejected,
                      initial_step=first_h, last_step=abs(last_h), records=steps_kept, message=message,
                      next_step=h_abs if math.isfinite(h_abs) and h_abs > 0 else None,
                      event=event, events=records if watch is not None else None,
                      hits=watch.hits if watch is not None else None,
                      compiled="step" if fast is not None else ("eager" if path == "eager" else None),
                      compile_reason=why)


# The most elements (evaluation times x the state's elements) an evaluation grid of a fixed-step solve may hold.
GRID_MAX_ELEMENTS = 2 ** 24


@contextlib.contextmanager
def evaluation_grid(term: ODETerm, solver: Stepper, times: list[float], stops: list[float], step_size: float,
                    k0: Tensor, jumps: set[float]) -> Generator[None, None, None]:
    """A fixed-step solve (a finite ``step_size``) with a stepper whose evaluation times are known before the step
    (:meth:`~neurodyn.core.stepper.StepperBase.stage_times`) knows every evaluation time before its first step (the
    step grid of :func:`~neurodyn.core.control.step_grid`): inside this context the bound ``term`` reads the part
    of its ODE form that depends on ``t`` alone (a control path's ``dX/dt``, :meth:`~neurodyn.core.term.Term.on_grid`)
    from one evaluation at all of them, made on entry. Evaluations elsewhere (a nudged time, dense output, after an
    event's jump) evaluate the term as before. Nothing happens for other solves, or where the grid would hold more
    than ``GRID_MAX_ELEMENTS`` elements (counted with the state's size) or the state is under ``torch.func.vmap``."""
    on = False
    owner = getattr(term, "grid_owner", None)
    if owner is not None and math.isfinite(step_size) and owner() is not None and not vmapped(k0):
        starts, hs = step_grid(times, stops, step_size, time_eps(term.t_dtype), jumps)
        grid: list[float] | None = []
        for t, h in zip(starts, hs):
            stage = solver.stage_times(t, h)
            if stage is None:
                grid = None
                break
            grid.append(t)
            grid.extend(stage)
        if grid and len(grid) * k0.numel() <= GRID_MAX_ELEMENTS:
            on = term.use_grid(grid)
    try:
        yield
    finally:
        if on:
            term.grid = None


# Stage buffers kept between solves: a pair of them with their cached views costs ~30 us to build, a measurable share
# of a small solve. A loop takes a pair out of the pool and puts it back only when it returns, so nested solves (a
# field that solves) and threads never share a pair, and a loop abandoned half-way (an exception, manual stepping
# given up) just drops its pair. Only loops whose results cannot alias a buffer take part: no on_accept hook or
# pausing (what these keep may hold a buffer's stages past the loop; the outputs, the final state, the stage
# derivative and the event records a loop returns are fresh tensors, and the event watch copies the stages it keeps,
# core/events.py). Small states only (the pool holds their memory), at most
# POOL_MAX_KEYS layouts per stepper; the pool is keyed weakly by the stepper, so a per-solve bound stepper's
# entries go with it.
POOL_MAX_NUMEL = 4096
POOL_MAX_KEYS = 16
_BUFFER_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def take_buffers(solver: Stepper, y0: Tensor, k0: Tensor) -> tuple[tuple | None, tuple | None]:
    """``(buffers, key)``: a pair of stage buffers for ``y0``/``k0``'s layout from the pool, or ``(None, key)`` where
    the pool has none (the caller makes them and hands them back with :func:`give_back_buffers`), or ``(None, None)``
    where the stepper cannot be pooled."""
    key = (y0.dtype, y0.device, tuple(y0.shape), tuple(k0.shape), torch.is_inference_mode_enabled())
    try:
        per = _BUFFER_POOL.get(solver)
    except TypeError:  # a stepper that cannot be weakly referenced: not pooled
        return None, None
    if per is None:
        return None, key
    free = per.get(key)
    return (free.pop() if free else None), key


def give_back_buffers(solver: Stepper, key: tuple, buffers: tuple) -> None:
    """Return a pair taken with :func:`take_buffers` (or made for its key) to the pool (one spare pair kept per
    layout)."""
    if buffers[0] is None:  # the stepper has no buffers (or refused them under vmap)
        return
    try:
        per = _BUFFER_POOL.get(solver)
        if per is None:
            per = _BUFFER_POOL[solver] = {}
    except TypeError:
        return
    free = per.get(key)
    if free is None:
        if len(per) >= POOL_MAX_KEYS:
            per.clear()
        free = per[key] = []
    if not free:
        free.append(buffers)


def zeno_message(t: float, cfg: LoopConfig, total: int, h: float | None = None) -> str:
    """What stopped a solve whose events accumulated at ``t`` (``h``: the step, when an event would fire again
    right after its jump)."""
    if h is not None:
        why = f"an event would occur again within {math.sqrt(2.2e-16) * abs(h):.2g} of its jump"
    elif total >= cfg.max_events:
        why = f"more than max_events={cfg.max_events} events"
    else:
        why = f"two events closer than min_event_gap={cfg.min_event_gap:g}"
    return (f"Zeno behaviour at t={t:.6g}: {why} (the events accumulate, e.g. a bouncing ball coming to rest). The "
            f"solution up to t={t:.6g} is kept (pass on_failure='return'). Stop the solve there with a terminal event "
            f"or a final time before it, change the jump so events stop accumulating, or raise max_events / lower "
            f"min_event_gap.")


def failure_message(status: str, t: float, h_abs: float, cfg: LoopConfig, solver: Stepper, t0: float,
                    t_end: float, steps: int, rejected: int, dtype: torch.dtype | None = None) -> str:
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
        dt = str(real_dtype(dtype)).replace("torch.", "") if dtype is not None else "the state's dtype"
        floor = f"min_step={cfg.min_step:g}" if cfg.min_step else \
            f"what {dt} resolves (the resolution of t, or a step too small to change y)"
        wider = ", or use float64" if dtype is not None and real_dtype(dtype) != torch.float64 else ""
        return (f"step size underflow at t={t:.6g}: the step fell below {floor} (last {h_abs:.3g}). The solution "
                f"may blow up near t={t:.6g}, the tolerances (or a custom norm) may ask for more than {dt} resolves "
                f"(loosen rtol/atol{wider}), or the problem is stiff: check the vector field for a singularity, or "
                f"{stiff_hint}.")
    return (f"max_steps={cfg.max_steps} reached at t={t:.6g} of [{t0:.6g}, {t_end:.6g}] ({steps} accepted, "
            f"{rejected} rejected). Raise max_steps (odeint: options={{'max_num_steps': ...}}), loosen rtol/atol, or, "
            f"if the steps are tiny because the problem is stiff, {stiff_hint}.")


def landing_times(times: list[float], cfg: LoopConfig) -> tuple[set[float], list[float]]:
    """``(jumps, stops)``: the jump times strictly inside the span of ``times``, and the times the solver must land
    on (``step_t``, ``jump_t`` and the final time) in the direction of travel."""
    t0, t_end = times[0], times[-1]
    direction = 1.0 if t_end > t0 else -1.0
    jumps = {x for x in cfg.jump_t if (x - t0) * direction > 0 and (t_end - x) * direction > 0}
    stops = sorted({x for x in cfg.step_t if (x - t0) * direction > 0 and (t_end - x) * direction > 0}
                   | jumps, key=lambda x: x * direction) + [t_end]
    return jumps, stops


def _bad_start(y0: Tensor, t0: float) -> LoopResult:
    """The result of a solve whose dy/dt at the initial time holds NaN/inf (no step attempted)."""
    return LoopResult(outs=[y0], status=_sol.NON_FINITE, t_final=t0, y_final=y0, steps=0, rejected=0,
                      initial_step=0.0, last_step=0.0, records=[],
                      message=(f"NaN/inf in the derivative func(t0, y0) at the initial time t={t0:.6g}: "
                               f"check the vector field and y0."))


def defers_start(cfg: LoopConfig, y0: Tensor) -> bool:
    """Whether a solve may pass :func:`integrate` dy/dt at the initial time unevaluated (a function computing it):
    where the compiled whole loop, which evaluates it itself, may run -- its plug-in allows it for ``y0``
    (``cfg.loop.defers_start``, :func:`neurodyn.compile.train.trainable`) and the solve's settings are the loop's.
    Whether it runs is settled in :func:`iterate` (the compile policy's cached choice; the plug-in's own checks);
    where it does not, the function is called and the solve goes on as with an evaluated ``k0``."""
    allows = getattr(cfg.loop, "defers_start", None)
    return allows is not None and cfg.advance is not None \
        and _whole_loop_applies(cfg, y0, None) and allows(y0)


def _run_deferred(term: ODETerm, solver: Stepper, y0: Tensor, times: list[float], stops: list[float],
                  cfg: LoopConfig) -> LoopResult | None:
    """The compiled whole loop with dy/dt at the initial time evaluated inside it, where the compile policy's choice
    for this solve is cached and is the loop; None where it did not run (the caller evaluates dy/dt and goes on)."""
    cached = getattr(cfg.advance, "cached_choice", None)
    path, why = cached(term, solver, y0, times, stops, cfg, True) if cached is not None else (None, None)
    if path != "loop":
        return None
    res = _run_compiled_loop(term, solver, y0, None, times, stops, cfg)
    if res is not None and res.compiled == "loop":
        res.compile_reason = why
    return res


def _whole_loop_applies(cfg: LoopConfig, y0: Tensor, k0: Tensor | None) -> bool:
    """The compiled whole loop covers solves that record no steps, events or per-step hooks, and no autograd graph
    unless the plug-in is marked ``differentiable`` (``k0`` None: not evaluated yet, see :func:`defers_start`)."""
    if cfg.record or cfg.perturb or cfg.events or cfg.on_accept is not None or cfg.norm is not None:
        return False
    if cfg.accept_min_step or cfg.step_callbacks or cfg.on_attempt is not None or cfg.pause:
        return False
    if cfg.error_dims is not None or vmapped(y0):  # torch.func.vmap cannot enter a compiled while_loop
        return False
    # A recorded graph: a loop plug-in marked `differentiable` joins its outputs to the graph itself.
    return getattr(cfg.loop, "differentiable", False) or not (
        torch.is_grad_enabled() and (y0.requires_grad or k0 is None or k0.requires_grad))


def _run_compiled_loop(term: ODETerm, solver: Stepper, y0: Tensor, k0: Tensor | None, times: list[float],
                       stops: list[float], cfg: LoopConfig) -> LoopResult | None:
    """Run the compiled whole loop and report it as the eager loop would (None: it could not run)."""
    first = cfg.first_step if cfg.adaptive else cfg.step_size
    o = cfg.loop(times, stops, y0, k0, first, cfg.rtol, cfg.atol, cfg.min_step, cfg.max_step, cfg.max_steps)
    if o is None:
        return None
    if o.status == _sol.NON_FINITE and o.attempts == 0:  # dy/dt at t0 not finite (evaluated in the loop)
        return _bad_start(y0, times[0])
    if getattr(o, "nfe", None) is not None:  # the plug-in counted the evaluations itself
        term.nfe += o.nfe
    else:
        per_attempt = solver.stages - (1 if solver.fsal else 0)
        term.nfe += o.attempts * per_attempt + (1 if cfg.adaptive and cfg.first_step is None else 0)
    message = "" if o.status == _sol.SUCCESS else failure_message(
        o.status, o.t_final, o.last_try, cfg, solver, times[0], times[-1], o.steps, o.rejected, y0.dtype)
    ys = o.ys if o.n_valid == o.ys.shape[0] else o.ys[: o.n_valid]
    return LoopResult(outs=[], status=o.status, t_final=o.t_final, y_final=o.y_final,
                      steps=o.steps, rejected=o.rejected, initial_step=o.initial_step, last_step=o.last_step,
                      records=[], message=message, next_step=o.next_step, ys=ys, compiled="loop")
