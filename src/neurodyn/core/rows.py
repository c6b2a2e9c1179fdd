"""Per-sample stepping (``solve(..., per_sample_steps=True)``).

The leading dimension of the state holds independent problems. Each row has its own time, step size,
accept/reject decision, output times, status and statistics, so an easy sample takes large steps while
a hard one takes small ones, instead of the whole batch sharing the step size of the hardest. Every
step still evaluates the vector field once per stage on the whole batch (``func`` sees the batch it was
given; rows that have finished are frozen with a zero step), so it pays off when the rows' difficulties
differ.

This is the vectorised form of the loop in ``core/loop.py``, over the same stepper and tableau data
(``Stepper.step_rows`` / ``interpolate_rows``); the controller and the error norm are the same
formulas, evaluated per row. The loop is written for few tensor operations per step: the stages are kept
multiplied by each row's step so every stage combination is one ``addmm``; decisions are masks
(``torch.where``), never index gathers of the active rows; the only host synchronisation per step is one
small read that decides whether to continue, whether any row needs an output and whether any row failed.

:func:`integrate_rows` is the loop itself, shared by the gradient methods (``gradients/per_sample.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import solution as _sol
from ..errors import InputError
from ..solution import Events, Solution
from .config import LoopConfig
from .control import (
    PIDController,
    initial_step_tensor,
    landing_reach,
    rms_ratio,
    step_underflow_tensor,
)
from .events import RowEventWatch
from .stepper import Stepper
from .tensors import real_dtype
from .term import check_output

RowTerm = Callable[[Tensor, Tensor], Tensor]  # (t of shape (B,), y of shape (B, n)) -> dy/dt of shape (B, n)
RowState = tuple[Tensor, Tensor, Tensor, Tensor]  # the loop's (y, t, out_slot, k1) at the start of a step

# Per-row status codes: indices into solution.STATUSES.
_MAX_STEPS, _UNDERFLOW, _NON_FINITE, _EVENT, _ZENO = (_sol.CODE[s] for s in (
    _sol.MAX_STEPS_REACHED, _sol.STEP_SIZE_UNDERFLOW, _sol.NON_FINITE, _sol.EVENT, _sol.ZENO))


class StepHooks:
    """Callbacks of :func:`integrate_rows` around every attempted step (default: nothing).

    ``start_step()`` runs before the stages are evaluated; ``end_step`` after the error control decided,
    with the rows' start times ``t`` (``(B,)``), start states ``y`` (``(B, n)``), signed steps ``h`` (``(B,)``,
    float64; 0 for rows that have finished), the accepted rows ``accept``, the step's end states ``y1``,
    its ``h``-scaled stages ``kh`` (``(s, B, n)``; a reused buffer: copy what must outlive the call) and
    the unscaled derivative ``f_last`` of its last stage.
    """

    def start_step(self) -> None:
        """Called before every attempted step."""

    def end_step(self, t: Tensor, y: Tensor, h: Tensor, accept: Tensor, y1: Tensor, kh: Tensor,
                 f_last: Tensor) -> None:
        """Called after every attempted step."""


@dataclass
class RowLog:
    """What a replay of the loop needs (``gradient="checkpoint"``): each step's ``h``, end time and accepted
    rows, and the loop state ``(y, t, out_slot, k1)`` at the start of every ``stride``-th step, the stride doubling
    whenever more than ``limit`` states would be kept. ``rng`` (an object with ``on_attempt()``, ``on_accept()``,
    ``restore(state)`` and ``attempt``, e.g. :class:`neurodyn.gradients.checkpoint.RngTape`) keeps the random
    generators' state at the start of every step, so a replay draws what the forward drew."""

    limit: int
    rng: Any = None
    h: list[Tensor] = field(default_factory=list)
    t1: list[Tensor] = field(default_factory=list)
    accept: list[Tensor] = field(default_factory=list)
    states: dict[int, RowState] = field(default_factory=dict)
    stride: int = 1

    def begin(self) -> None:
        """Called before every step (its stages draw from the generators from here)."""
        if self.rng is not None:
            self.rng.on_attempt()

    def record(self, h: Tensor, t1: Tensor, accept: Tensor, y: Tensor, t: Tensor, out_slot: Tensor,
               k1: Tensor) -> None:
        j = len(self.h)
        self.h.append(h)
        self.t1.append(t1)
        self.accept.append(accept)
        if self.rng is not None:
            self.rng.on_accept()
        if j % self.stride == 0:
            self.states[j] = (y.detach(), t, out_slot, k1.detach())
            if len(self.states) > max(2, self.limit):
                self.stride *= 2
                self.states = {i: v for i, v in self.states.items() if i % self.stride == 0}


@dataclass
class RowsResult:
    """What :func:`integrate_rows` returns."""

    ys: Tensor  # (T, B, n); NaN where a row failed before the output time
    y: Tensor  # (B, n): each row's state at its time reached
    t: Tensor  # (B,) float64: time reached
    status: Tensor  # (B,) long: index into solution.STATUSES
    steps: Tensor  # (B,) accepted steps
    attempts: Tensor  # (B,) attempted steps
    n_valid: Tensor  # (B,) outputs filled
    nfe: int  # vector-field calls (each on the whole batch)
    first_step: Tensor  # (B,) float64
    next_step: Tensor  # (B,) float64: the controller's proposal after the last step (to continue from)
    compiled: str | None = None  # "row-step" / "row-loop": the attempts ran compiled (LoopConfig.row_step)


class _Frame:
    """The constant data of one per-sample integration and its output buffer (flat ``((T + 1) B, n)``: one
    block per output time, and a last block that takes the writes of rows with nothing to write)."""

    def __init__(self, term: RowTerm, solver: Stepper, y0: Tensor, times: Tensor, d: float):
        self.term, self.solver, self.d = term, solver, d
        self.b, self.n = y0.shape
        self.n_out = times.shape[1]
        self.co = solver.coefficients(y0.dtype, y0.device)
        self.rdt = real_dtype(y0.dtype)
        self.rows = torch.arange(self.b, device=y0.device)
        # Next-output times; the last output is the end state itself, never interpolated: a sentinel beyond it.
        # Output slots are flat positions ``index * B + row`` in the output buffer and in ``times_flat``.
        pad = times.clone()
        pad[:, -1] = d * math.inf
        self.times_flat = pad.t().contiguous().view(-1)
        self.trash = self.rows + self.n_out * self.b
        self.t_end = times[:, -1].contiguous()

    def new_outputs(self, y0: Tensor | None, like: Tensor) -> Tensor:
        buf = like.new_full(((self.n_out + 1) * self.b, self.n), math.nan if y0 is not None else 0.0)
        if y0 is not None:
            buf[: self.b] = y0
        return buf

    def passed(self, next_out: Tensor, t: Tensor) -> Tensor:
        """Rows whose next output time lies at or behind ``t``."""
        return next_out <= t if self.d > 0 else next_out >= t

    def write_outputs(self, buf: Tensor, need: Tensor, out_slot: Tensor, next_out: Tensor, t_prev: Tensor,
                      t_cur: Tensor, h: Tensor, hc: Tensor, y_prev: Tensor, y1: Tensor, kh: Tensor,
                      f_last: Tensor) -> tuple[Tensor, Tensor, int]:
        """Write every output time inside the step ``(t_prev, t_cur]`` of the rows in ``need`` (the method's dense
        output, vectorised over rows; one pass per output a step contains). Returns the new ``out_slot``,
        ``next_out`` and the number of extra vector-field calls (dense-output stages)."""
        solver, co, b = self.solver, self.co, self.b
        kf = solver.dense_stages_rows(self.term, t_prev, h, hc, y_prev, kh, co)
        fh1 = f_last * hc if co.dense_t is None else None
        masked = kf.requires_grad  # under autograd the unused rows' values must be finite (0 * NaN = NaN)
        while True:
            theta = (next_out - t_prev) / h
            if masked:
                theta = torch.where(need, theta, 0.0)
            vals = solver.interpolate_rows(y_prev, y1, kf, fh1, theta, co)
            buf.index_copy_(0, torch.where(need, out_slot, self.trash), vals)
            out_slot = torch.add(out_slot, need, alpha=b)
            next_out = self.times_flat.take(out_slot)
            need = self.passed(next_out, t_cur)
            if not bool(need.any()):
                return out_slot, next_out, len(co.extra_a)

    def finish_outputs(self, buf: Tensor, y: Tensor, success: Tensor) -> Tensor:
        """The outputs ``(T, B, n)``: the written ones and, for the rows that reached the end, the end state."""
        b = self.b
        last = torch.where(success.view(b, 1), y, buf.new_full((), math.nan))
        return torch.cat([buf[: (self.n_out - 1) * b], last], 0).view(self.n_out, b, self.n)


def _error_ratio(err: Tensor, y0: Tensor, y1: Tensor, rtol: Tensor, atol: Tensor, m: int) -> Tensor:
    """Per-row error ratio (:func:`~neurodyn.core.control.rms_ratio`) over the first ``m`` components; ``(B,)``."""
    if m < y0.shape[1]:
        err, y0, y1 = err[..., :m], y0[:, :m], y1[:, :m]
    return rms_ratio(err, y0, y1, rtol, atol)


def _scaled_tol(tol: float | Tensor, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tolerance over the first ``m`` components times ``sqrt(m)`` (so a plain norm gives the RMS)."""
    t = tol[:, :m] if isinstance(tol, Tensor) else torch.tensor(tol, dtype=torch.float64, device=device)
    return t.to(dtype) * math.sqrt(m)


def _oriented(term: RowTerm, times: Tensor) -> tuple[RowTerm, Tensor, float, Tensor | None]:
    """One direction of integration for all rows: ``(term, times, d, sign)``. Rows integrating backward
    while others go forward are integrated in ``s = -t`` (``sign`` is then the per-row ``(B,)`` sign)."""
    sign = torch.sign(times[:, -1] - times[:, 0])
    lo, hi = torch.aminmax(sign)
    lo, hi = float(lo), float(hi)
    if lo == hi:
        return term, times, hi, None
    col = sign.view(-1, 1)

    def flipped(s: Tensor, y: Tensor) -> Tensor:
        return term(s * sign, y) * col.to(y.dtype)

    return flipped, times * col, 1.0, sign


def integrate_rows(term: RowTerm, y0: Tensor, f0: Tensor, times: Tensor, solver: Stepper,
                   cfg: LoopConfig, rtol: float | Tensor, atol: float | Tensor, *,
                   first_step: Tensor | None = None, error_dims: int | None = None,
                   hooks: StepHooks | None = None, log: RowLog | None = None,
                   events: RowEventWatch | None = None) -> RowsResult:
    """Integrate every row of ``y0`` (``(B, n)``) through its own output times ``times`` (``(B, T)``, float64).

    ``term(t, y)`` evaluates the vector field on all rows (``t`` of shape ``(B,)``, float64); ``f0`` is its value
    at the start. ``rtol``/``atol`` are floats or ``(B, n)`` tensors; ``error_dims`` restricts the error
    control to the first components (a seminorm). ``first_step`` (``(B,)``) replaces the initial step
    selection. ``hooks`` sees every attempted step; ``log`` records what :func:`replay_rows` needs; ``events``
    (a :class:`~neurodyn.core.events.RowEventWatch`, rows integrating in one direction) locates and acts on each row's
    events, a row's step ending at its occurrence. Never raises for a failed row: ``status`` says what happened to
    each.
    """
    term, times, d, sign = _oriented(term, times)
    if sign is not None:
        f0 = f0 * sign.view(-1, 1).to(f0.dtype)
    fr = _Frame(term, solver, y0, times, d)
    b, n, co, rdt = fr.b, fr.n, fr.co, fr.rdt
    dev = y0.device
    m = error_dims or n
    eps = torch.finfo(rdt).eps  # the state's precision: the underflow rule's unit
    rtol_t, atol_t = _scaled_tol(rtol, m, rdt, dev), _scaled_tol(atol, m, rdt, dev)
    grad = torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad)
    fsal = solver.fsal
    s_new = solver.stages - 1
    t_cur = times[:, 0].contiguous()
    t_stop = fr.t_end.clone()
    nfe = 0
    min_step, max_step = cfg.min_step, cfg.max_step
    # torchdiffeq's min_step (as core/loop.py): steps never below min_step, one at min_step accepted whatever its error
    accept_min = cfg.accept_min_step and min_step > 0
    # Compiled attempts (compile=True: LoopConfig.row_step) where only the loop's own state is needed: the plug-in
    # keeps the state packed as (sv, yv, iv) (layout: compile.rows.RowPack) while it runs.
    fast = None
    if (cfg.row_step is not None and not grad and hooks is None and log is None and events is None and sign is None
            and not accept_min):
        fast = cfg.row_step.bind(solver, cfg.controller, y0.dtype, dev, d, m, rtol_t, atol_t, fr.n_out)
    # Where the whole loop runs compiled, it chooses the first steps itself (same formula, no eager work per solve).
    first_in_loop = (fast is not None and fast.whole and first_step is None and cfg.first_step is None and m == n)

    def eager_first_step() -> Tensor:
        rt, at = (rtol_t, atol_t) if m == n else (_scaled_tol(rtol, n, rdt, dev), _scaled_tol(atol, n, rdt, dev))
        return initial_step_tensor(term, t_cur, y0.detach(), f0.detach(), d, solver.order, rt, at, cfg.max_step)

    with torch.no_grad():
        if first_step is not None:
            h_abs = first_step.to(torch.float64).clamp(max=cfg.max_step)
        elif cfg.first_step is not None:
            h_abs = torch.full((b,), min(cfg.first_step, cfg.max_step), dtype=torch.float64, device=dev)
        elif first_in_loop:
            h_abs = torch.zeros(b, dtype=torch.float64, device=dev)  # chosen in the compiled loop
            nfe += 1
        else:
            h_abs = eager_first_step()
            nfe += 1
        # A non-finite derivative at the start stops the row there (as core/loop.py).
        bad0 = ~torch.isfinite(f0.detach()).all(1)
        any_bad0 = bool(bad0.any())
    first = h_abs.clone()

    ctrl = PIDController.start(cfg.controller, solver.controller_order)  # the PID formula, not a stepper's own
    prev = torch.ones(b, dtype=rdt, device=dev)
    prev2 = prev
    if accept_min:
        h_abs = h_abs.clamp(min=min_step)

    y, k1 = y0, f0
    ys_buf = fr.new_outputs(y0, y0)
    out_slot = fr.rows + b  # output 1 of every row
    next_out = fr.times_flat.take(out_slot)
    steps = torch.zeros(b, dtype=torch.long, device=dev)
    attempts = torch.zeros_like(steps)
    status = torch.zeros_like(steps)
    if any_bad0:
        status = torch.where(bad0, _NON_FINITE, status)
        t_stop = torch.where(bad0, t_cur, t_stop)
    # (The eager attempts' stage buffers: not where the whole loop runs compiled.)
    buf = None if grad or (fast is not None and fast.whole) else solver.make_row_buffers(y0)
    packed = None
    if fast is not None:
        lim = torch.tensor([min_step, max_step], dtype=torch.float64, device=dev)
        packed = fast.pack(t_cur, y, k1, h_abs, t_stop, prev, prev2, out_slot, steps, attempts)
    compiled = None
    it = 0
    act = None  # the rows still integrating: the previous attempt's `still` (None: computed from the times)
    if packed is not None:  # the whole loop compiled, where the plug-in runs it
        whole = fast.loop(packed, status, ys_buf, fr.times_flat, rtol_t, atol_t, lim, cfg.max_steps, first_in_loop)
        if whole is not None:
            sv, yv, iv, ys_buf, cv, h_first = whole
            if h_first is not None:
                first = h_first
            status = iv[3]
            packed = (sv, yv, iv)
            nfe += int(cv[0]) * (s_new if fsal else s_new + 1)
            compiled = "row-loop"
        elif first_in_loop:  # the whole loop did not run: the first steps, eagerly
            with torch.no_grad():
                h_abs = eager_first_step()
            first = h_abs.clone()
            packed = fast.pack(t_cur, y, k1, h_abs, t_stop, prev, prev2, out_slot, steps, attempts)
        if whole is None and not grad:
            buf = solver.make_row_buffers(y0)
    while compiled != "row-loop":
        out = None
        if packed is not None:
            out = fast(*packed, fr.times_flat, rtol_t, atol_t, lim)
            if out is None:  # the compilation failed (warned): eager attempts from here, from the packed state
                sv, yv, iv = packed
                t_cur, h_abs, t_stop, prev, prev2 = sv[0], sv[1], sv[2], sv[3].to(rdt), sv[4].to(rdt)
                y, k1 = yv[0], yv[1]
                out_slot, steps, attempts = iv[0], iv[1].clone(), iv[2].clone()
                next_out = fr.times_flat.take(out_slot)
                packed = None
        if out is not None:
            compiled = "row-step"
            sv, yv, iv, aux, flags = out
            nfe += s_new if fsal else s_new + 1
            cont, any_stuck, any_need, any_more = flags.tolist()
            if any_need:
                ys_buf.index_copy_(0, iv[3], yv[2])
            if any_more:  # a second output inside a row's step: the eager dense output writes the rest
                h = sv[6]
                hc = h.to(rdt).view(b, 1)
                slot, _, extra = fr.write_outputs(ys_buf, iv[5].bool(), iv[0], fr.times_flat.take(iv[0]),
                                                  packed[0][0], sv[0], h, hc, packed[1][0], aux[0],
                                                  aux[1:-1] * hc.view(1, b, 1), aux[-1])
                iv[0] = slot
                nfe += extra
            packed = (sv, yv, iv)
            it += 1
            if any_stuck:  # step size underflow (or every attempt non-finite): the row stops where it is
                stuck = iv[4].bool()
                code = torch.where(torch.isfinite(sv[5]), _UNDERFLOW, _NON_FINITE)
                status = torch.where(stuck, code, status)
                sv[2] = torch.where(stuck, sv[0], sv[2])
                cont = bool((sv[0] != sv[2]).any())
            if not cont:
                break
            if it >= cfg.max_steps:
                status = torch.where(sv[0] != sv[2], _MAX_STEPS, status)
                break
            continue
        if hooks is not None:
            hooks.start_step()
        if log is not None:
            log.begin()
        rem = (t_stop - t_cur).abs()
        land = rem <= landing_reach(h_abs, t_cur.abs() + t_stop.abs(), eps)
        hp = torch.where(land, rem, h_abs)
        h = hp if d > 0 else -hp
        t1 = torch.where(land, t_stop, t_cur + h)
        if act is None:
            act = rem > 0
        hc = (h if h.dtype == rdt else h.to(rdt)).view(b, 1)
        y1, kh, err, f_last = solver.step_rows(term, t_cur, y, h, hc, k1, co, buf)
        nfe += s_new
        if grad:
            ratio = _error_ratio(err, y.detach(), y1.detach(), rtol_t, atol_t, m)
        else:
            ratio = _error_ratio(err, y, y1, rtol_t, atol_t, m)
        accept = (ratio <= 1.0) & act
        if accept_min:  # (hp: a landing step may exceed its proposal by a rounding sliver)
            accept = accept | (act & torch.isfinite(ratio) & (torch.minimum(hp, h_abs) <= min_step))
        if not fsal:
            f_last = term(t1, y1)
            nfe += 1
        if hooks is not None:
            if sign is None:
                hooks.end_step(t_cur, y, h, accept, y1, kh, f_last)
            else:  # real times and steps (the stages are the same in both orientations)
                hooks.end_step(t_cur * sign, y, h * sign, accept, y1, kh, f_last * sign.view(b, 1).to(y.dtype))
        if log is not None:
            log.record(h, t1, accept, y, t_cur, out_slot, k1)
        acc_col = accept.view(b, 1)
        y_prev, t_prev = y, t_cur
        y = torch.where(acc_col, y1, y)
        k1 = torch.where(acc_col, f_last, k1)
        t_cur = torch.where(accept, t1, t_cur)
        if events is not None:
            t_cur, y, k1, t_stop, status = events.after_step(t_prev, y_prev, h, hc, y1, kh, f_last, accept, t_cur, y,
                                                             k1, t_stop, status, (_EVENT, _ZENO))
        steps += accept
        attempts += act
        still = t_cur != t_stop
        # Controller, per row (the formulas of control.PIDController); NaN/inf ratios shrink by dfactor.
        h_new, prev, prev2 = ctrl.propose_tensor(hp, ratio, accept, prev, prev2)
        if max_step < math.inf:
            h_new = h_new.clamp(max=max_step)
        if accept_min:  # non-finite values at min_step cannot be stepped past: the stuck test below stops the row
            at_min = ~torch.isfinite(ratio) & (torch.minimum(hp, h_abs) <= min_step)
            h_new = torch.where(at_min, torch.zeros_like(h_new), h_new.clamp(min=min_step))
        elif min_step > 0:
            bump = (h_new < min_step) & ~accept & (hp > min_step)
            h_new = torch.where(bump, torch.full_like(h_new, min_step), h_new)
        # Rows that finished keep the proposal from before their last (landing) step, to continue from.
        h_abs = torch.where(still, h_new, h_abs)
        # The underflow rule (control.step_underflow_tensor): the step below the time resolution of the state's
        # dtype. (Its third part, a rejected attempt too small to change the state, needs a tolerance below the
        # state's precision -- clamped away by options.clamp_rtol -- or a custom norm, which rows do not take.)
        stuck = step_underflow_tensor(t_cur, h_abs, eps)
        if min_step > 0:
            stuck = stuck | (h_abs < min_step)
        stuck = stuck & still
        need = fr.passed(next_out, t_cur)
        cont, any_stuck, any_need = torch.stack((still, stuck, need)).any(1).tolist()
        if any_need:
            out_slot, next_out, extra = fr.write_outputs(ys_buf, need, out_slot, next_out, t_prev, t_cur, h, hc,
                                                        y_prev, y1, kh, f_last)
            nfe += extra
        it += 1
        if any_stuck:  # step size underflow (or every attempt non-finite): the row stops where it is
            code = torch.where(torch.isfinite(ratio), _UNDERFLOW, _NON_FINITE)
            status = torch.where(stuck, code, status)
            t_stop = torch.where(stuck, t_cur, t_stop)
            still = still & ~stuck
            cont = bool(still.any())
        if not cont:
            break
        if it >= cfg.max_steps:
            status = torch.where(still, _MAX_STEPS, status)
            break
        act = still

    if packed is not None:
        sv, yv, iv = packed
        t_cur, h_abs, y, out_slot, steps, attempts = sv[0], sv[1], yv[0], iv[0], iv[1], iv[2]
    success = status == 0
    ys = fr.finish_outputs(ys_buf, y, success)
    if events is not None:
        nfe += events.nfe
    if sign is not None:
        t_cur = t_cur * sign
    return RowsResult(ys=ys, y=y, t=t_cur, status=status, steps=steps, attempts=attempts,
                      n_valid=out_slot // b + success, nfe=nfe, first_step=first, next_step=h_abs,
                      compiled=compiled)


def replay_rows(term: RowTerm, solver: Stepper, times: Tensor, log: RowLog, j0: int, j1: int,
                y: Tensor, t_cur: Tensor, out_slot: Tensor, k1: Tensor, outs: Tensor | None = None,
                marks: Collection[int] = ()) -> tuple[Tensor, Tensor, dict[int, RowState], int]:
    """Steps ``j0 .. j1 - 1`` of a logged :func:`integrate_rows` again from ``(y, t_cur, out_slot, k1)`` (the loop
    state at step ``j0``), with the logged step sizes and decisions, and the logged random-generator states: the
    same computation, so under autograd its graph is ``gradient="direct"``'s. Outputs falling in those steps are
    written into ``outs`` (a :meth:`_Frame.new_outputs` buffer) unless it is None. Returns the state ``y`` and
    ``k1`` after step ``j1 - 1``, the loop states at the start of the steps in ``marks``, and the number of
    vector-field calls."""
    term, times, d, _ = _oriented(term, times)
    fr = _Frame(term, solver, y, times, d)
    b, co, rdt = fr.b, fr.co, fr.rdt
    nfe = 0
    next_out = fr.times_flat.take(out_slot)
    states = {}
    rng = log.rng
    for j in range(j0, j1):
        h, t1, accept = log.h[j], log.t1[j], log.accept[j]
        if rng is not None:
            rng.restore(rng.attempt[j])
        hc = (h if h.dtype == rdt else h.to(rdt)).view(b, 1)
        y1, kh, _, f_last = solver.step_rows(term, t_cur, y, h, hc, k1, co)
        nfe += solver.stages - 1
        if not solver.fsal:
            f_last = term(t1, y1)
            nfe += 1
        acc_col = accept.view(b, 1)
        y_prev, t_prev = y, t_cur
        y = torch.where(acc_col, y1, y)
        k1 = torch.where(acc_col, f_last, k1)
        t_cur = torch.where(accept, t1, t_cur)
        need = fr.passed(next_out, t_cur)
        while bool(need.any()):
            if outs is None:  # bookkeeping only
                out_slot = torch.add(out_slot, need, alpha=b)
                next_out = fr.times_flat.take(out_slot)
                need = fr.passed(next_out, t_cur)
                continue
            out_slot, next_out, extra = fr.write_outputs(outs, need, out_slot, next_out, t_prev, t_cur, h, hc,
                                                         y_prev, y1, kh, f_last)
            nfe += extra
            break
        if j + 1 in marks:
            states[j + 1] = (y, t_cur, out_slot, k1)
    return y, k1, states, nfe


# ----------------------------------------------------------------------------------------------
# The pieces every per-sample entry point shares
# ----------------------------------------------------------------------------------------------
def check_supported(y0: Tensor, solver: Stepper, cfg: LoopConfig) -> None:
    """Raise InputError for what per-sample stepping does not support."""
    if y0.dim() < 1 or y0.shape[0] < 1:
        raise InputError("per_sample_steps needs a leading batch dimension in y0.")
    if not solver.adaptive or cfg.step_size is not None:
        raise InputError("per_sample_steps needs an adaptive method without step_size (a fixed step is shared).")
    if cfg.step_t or cfg.jump_t or cfg.norm is not None or cfg.perturb:
        raise InputError("per_sample_steps does not support step_t, jump_t, norm or perturb yet.")


def row_times(t: Tensor, b_rows: int) -> Tensor:
    """The output times as a detached float64 ``(B, T)`` tensor (one row per sample)."""
    times = t.detach().to(torch.float64)
    return times.unsqueeze(0).expand(b_rows, -1).contiguous() if times.dim() == 1 else times.contiguous()


def row_term(func: Callable, shape: torch.Size) -> RowTerm:
    """``func`` as a :data:`RowTerm` on flat ``(B, n)`` rows (``t`` cast to the state's real dtype); every result
    is checked to be a tensor of the state's shape (:func:`~neurodyn.core.term.check_output`)."""
    b_rows = shape[0]
    n = max(1, math.prod(shape[1:]))
    shape = tuple(shape)
    flat = shape == (b_rows, n)

    def term(t: Tensor, y: Tensor) -> Tensor:
        out = func(t, y) if flat else func(t, y.view(shape))
        if not (isinstance(out, Tensor) and out.shape == shape):
            check_output(out, shape, float(t.reshape(-1)[0]))
        return out if flat else out.reshape(b_rows, n)

    return term


def time_cast(term: RowTerm, dtype: torch.dtype) -> RowTerm:
    """``term`` receiving its times in ``dtype`` (the loop keeps them in float64)."""
    if dtype == torch.float64:
        return term
    return lambda t, y: term(t.to(dtype), y)


def first_derivative(func: Callable, y0: Tensor, times: Tensor) -> Tensor:
    """``func`` at the start of every row, with the checks of its shape and dtype; ``(B, n)``."""
    f0 = func(times[:, 0].to(real_dtype(y0.dtype)), y0)
    if not isinstance(f0, Tensor) or f0.shape != y0.shape or f0.dtype != y0.dtype:
        got = f"{tuple(f0.shape)} {f0.dtype}" if isinstance(f0, Tensor) else type(f0).__name__
        raise InputError(f"func(t, y) must return the state's shape {tuple(y0.shape)} and dtype {y0.dtype}, "
                         f"got {got}.")
    return f0.reshape(y0.shape[0], -1)


def start_derivative(term: RowTerm, times: Tensor, y0: Tensor) -> Tensor:
    """``term`` at the rows' start ``(times[:, 0], y0)`` as :func:`integrate_rows` holds it (its ``k1``: times each
    row's direction where rows integrate in both directions); ``(B, n)``."""
    oterm, otimes, _, _ = _oriented(term, times)
    return oterm(otimes[:, 0].contiguous(), y0)


def row_tolerance(tol: float | Tensor, b_rows: int, n: int) -> float | Tensor:
    """A tolerance as validated by ``solve`` (float, or a tensor of ``B * n`` elements) for rows: ``(B, n)``."""
    return tol.reshape(b_rows, n) if isinstance(tol, Tensor) else tol


def make_solution(res: RowsResult, t: Tensor, shape: torch.Size, method: str, on_failure: str,
                  gradient: str, ys: Tensor | None = None, events: RowEventWatch | None = None) -> Solution:
    """The :class:`Solution` of a per-sample solve (raising for a failed sample if asked); with ``events``, its
    occurrences in ``sol.events`` (``.sample``: the row of each)."""
    b_rows = shape[0]
    codes = [_sol.STATUSES[i] for i in res.status.tolist()]
    failed = [i for i, s_ in enumerate(codes) if s_ in _sol.FAILURE_STATUSES]
    overall = codes[failed[0]] if failed else (_sol.EVENT if _sol.EVENT in codes else _sol.SUCCESS)
    stats = {
        "nfe": res.nfe,
        "steps": int(res.steps.max()),
        "rejected": int((res.attempts - res.steps).sum()),
        "steps_per_sample": res.steps,
        "rejected_per_sample": res.attempts - res.steps,
        "initial_step": res.first_step,
        "method": method,
        "per_sample": True,
        "gradient": gradient,
    }
    if res.compiled:
        stats["compiled"] = res.compiled
    message = overall if not failed else (
        f"{len(failed)} of {b_rows} samples failed (first: sample {failed[0]}, {codes[failed[0]]} at "
        f"t={float(res.t[failed[0]]):.6g}); see sol.sample_status and sol.t_final_per_sample. Loosen rtol/atol, "
        f"raise max_steps, or check the vector field for those samples.")
    forward = float(t.detach().reshape(-1, t.shape[-1])[0, -1] - t.detach().reshape(-1, t.shape[-1])[0, 0]) > 0
    out = res.ys if ys is None else ys
    sol = Solution(ts=t, ys=out.view(out.shape[0], *shape), stats=stats, status=overall, message=message,
                   t_final=float(res.t.max() if forward else res.t.min()), y_final=res.y.view(shape),
                   n_valid=int(res.n_valid.min()), sample_status=codes, t_final_per_sample=res.t)
    if events is not None:
        rec = events.records
        row_shape = tuple(shape[1:])
        if rec:
            sol.events = Events(t=torch.stack([r[1] for r in rec]).to(t.dtype),
                                y=torch.stack([r[2].reshape(row_shape) for r in rec]),
                                index=torch.tensor([r[3] for r in rec], dtype=torch.long, device=res.y.device),
                                sample=torch.tensor([r[0] for r in rec], dtype=torch.long, device=res.y.device))
        else:
            sol.events = Events(t=t.new_zeros(0), y=res.y.new_zeros((0, *row_shape)),
                                index=torch.zeros(0, dtype=torch.long, device=res.y.device),
                                sample=torch.zeros(0, dtype=torch.long, device=res.y.device))
    if failed and on_failure == "raise":
        raise _sol.failure(overall, message, float(res.t[failed[0]]), sol)
    return sol


def solve_per_sample(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                     on_failure: str) -> Solution:
    """Integrate each row of ``y0`` (shape ``(B, ...)``) independently; ``t`` is ``(T,)`` or ``(B, T)``.

    ``gradient="direct"``: autograd differentiates through the loop (see ``gradients/per_sample.py`` for the
    other gradient methods).
    """
    check_supported(y0, solver, cfg)
    b_rows = y0.shape[0]
    n = max(1, math.prod(y0.shape[1:]))
    times = row_times(t, b_rows)
    f0 = first_derivative(func, y0, times)
    term = time_cast(row_term(func, y0.shape), real_dtype(y0.dtype))
    watch = None
    if cfg.events:
        d = torch.sign(times[:, -1] - times[:, 0])
        if not bool((d == d[0]).all()):
            raise InputError("per_sample_steps with events needs every sample to integrate in the same direction of "
                             "time (some t rows increase, others decrease).")
        watch = RowEventWatch(cfg.events, term, solver, y0.shape, times[:, 0], y0.reshape(b_rows, n), cfg)
    res = integrate_rows(term, y0.reshape(b_rows, n), f0, times, solver, cfg, row_tolerance(cfg.rtol, b_rows, n),
                         row_tolerance(cfg.atol, b_rows, n), events=watch)
    res.nfe += 1
    return make_solution(res, t, y0.shape, solver.name, on_failure, "direct", events=watch)
