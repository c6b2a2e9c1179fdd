"""From the loop's steps to the user's outputs: output times inside a step, the dense solution, the Solution."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import solution as _sol
from ..solution import Events, Solution
from .config import LoopConfig
from .stepper import Step, Stepper
from .term import ODETerm


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
    event: tuple[Tensor, Tensor] | None = None  # (time, state) where a terminal event or Zeno stopped the solve
    events: list[tuple[Tensor, Tensor, int]] | None = None  # occurrences (time, state before a jump, event index)
    hits: list | None = None  # (accepted step index, core.events.Hit) per step with occurrences (for replays)
    next_step: float | None = None  # the controller's proposal after the last step (to continue from)
    ys: Tensor | None = None  # the outputs stacked, (n_valid, n), where the loop wrote them in one tensor (outs empty)
    compiled: str | None = None  # "loop": the whole loop ran compiled; "step": compiled steps; "eager": compile=True
    # chose eager steps (compile.policy); None: eager
    compile_reason: str | None = None  # compile=True: why this path (compile.policy.decide)


def step_outputs(solver: Stepper, term: ODETerm, st: Step, co, interp: str, times: list[float],
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


def assemble(res: LoopResult, term: ODETerm, solver: Stepper, cfg: LoopConfig, y0: Tensor,
             t: Tensor, on_failure: str) -> Solution:
    """Turn the loop's result into a Solution (and raise on failure if asked)."""
    shape = y0.shape
    n_valid = res.ys.shape[0] if res.ys is not None else len(res.outs)
    event_t = None
    y_final = res.y_final
    if res.event is not None:
        t_ev, y_final = res.event
        if res.status == _sol.EVENT:
            event_t = t_ev
    events = stack_events(res.events, shape, y0, t) if res.events is not None else None
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
    if res.compile_reason:
        stats["compile_reason"] = res.compile_reason
    # Implicit methods' Jacobians, factorisations and Newton iterations (copied: a backward solve with the
    # same stepper would reset them).
    if solver.stats:
        stats.update(dict(solver.stats))
    dense_fn, span = None, None
    if cfg.record and res.records:
        dense_fn = _make_dense(term, solver, cfg, res.records, shape)
        span = (res.records[0].t0, res.t_final)
    message = res.message or ("event" if res.status == _sol.EVENT else "success")
    sol = Solution(ts=t, ys=ys, stats=stats, status=res.status, message=message, t_final=res.t_final,
                   y_final=y_final.view(shape) if y_final is not None else None, n_valid=n_valid,
                   event_t=event_t, events=events, _dense=dense_fn, _dense_span=span)
    if res.status in _sol.FAILURE_STATUSES and on_failure == "raise":
        raise _sol.failure(res.status, res.message, res.t_final, sol)
    return sol


def stack_events(records: list[tuple[Tensor, Tensor, int]], shape: torch.Size, y0: Tensor, t: Tensor) -> Events:
    """The occurrences ``(t_e, y_e, index)`` as an :class:`~neurodyn.solution.Events` (``(E,)``, ``(E, *shape)``,
    ``(E,)``)."""
    if not records:
        return Events(t=t.new_zeros(0).detach(), y=y0.new_zeros((0, *shape)).detach(),
                      index=torch.zeros(0, dtype=torch.long, device=y0.device))
    stacked = getattr(records, "stacked", None)  # (core.events.EventRecords: the times and states stacked already)
    if stacked is not None:
        ts, ys, which = stacked[0].to(t.dtype), stacked[1].reshape(len(records), *shape), records.index
    else:
        ts = torch.stack([r[0].to(t.dtype) for r in records])
        ys = torch.stack([r[1].reshape(shape) for r in records])
        which = [r[2] for r in records]
    index = torch.tensor(which, dtype=torch.long, device=y0.device)
    return Events(t=ts, y=ys, index=index)


def _make_dense(term: ODETerm, solver: Stepper, cfg: LoopConfig, records: list[Step],
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
