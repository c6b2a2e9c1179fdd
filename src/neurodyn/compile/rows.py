"""The compiled per-sample row step (``solve(..., per_sample_steps=True, compile=True)``).

The eager per-sample loop (:func:`neurodyn.core.rows.integrate_rows`) runs some fifty small tensor operations per
attempted step besides the vector field: landing, the stage combinations, the per-row error ratio, the masked
accept/reject updates, the per-row PI controller, the underflow rule and the first output write. On a small
state each costs about as much as its arithmetic. Here that whole attempt -- with the vector field's stages --
is one ``torch.compile`` graph of fixed shapes; the loop calls it once per attempt, writes the outputs it
computed with one ``index_copy_`` and reads four flags (continue, any row stuck, any output written, a second
output inside the same step) in the one host read per attempt it already had. The rare cases (a row that needs
two outputs in one step, a row that underflows, the last attempts before ``max_steps``) are finished by the eager
code of the loop, from the tensors the graph returns.

Same algorithm and formulas as the eager loop (the controller's :meth:`~neurodyn.core.control.ControllerState.
propose_tensor`, :func:`~neurodyn.core.control.rms_ratio`, :func:`~neurodyn.core.control.step_underflow_tensor`,
the landing rule, the method's dense output); the stage sums are fused in another order, so results agree with
the eager per-sample solve to rounding. The whole loop on the CPU also stores a state of a few components per row
column by column (:data:`LOOP_COLUMNS`; same values) and computes the controller's factor as one ``exp`` of a sum of
logarithms (:data:`LOOP_LOG_CONTROL`; the factor to rounding); the whole loop carries its integer rows as int32
(:data:`LOOP_INT32`) and tests NaN by comparisons (:data:`LOOP_BLEND_NAN`), same values, and its repeat calls run the
compiled program with its guards checked but without Dynamo's frame machinery (:mod:`neurodyn.compile.entries`). The
whole loop writes at most one output per row and attempt, into an output buffer updated in place
(:data:`LOOP_ONE_OUTPUT`, :data:`LOOP_YS_IN_PLACE`); where some row's next step could pass two output times it hands
over to a program with a nested output loop, with the same results. Used
for explicit Runge--Kutta methods without extra dense-output stages, real floating-point states, where no autograd
graph is recorded, with no hooks, replay log or events, and every row integrating in the same direction; everything
else runs the eager row loop. Compiled steps
are cached per vector field, method, shape, dtype, device, controller, direction and tolerance shapes; a failed
compilation warns once and the loop continues eagerly.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .. import solution as _sol
from ..core import interpolation
from ..core.control import PIDController, initial_step_tensor, landing_reach, rms_ratio, step_underflow_tensor
from ..solvers.explicit_rk import ExplicitRungeKutta
from .entries import Entries, constant_guard_filter
from .loop import CPU_MAX_OUTPUT_ELEMENTS, CPU_OPTIONS, combo_cols, module_state
from .patches import pooled_loop_buffers, small_cats
from .step import compiled_context, nonzero, own_code, stage_sum

try:  # Inductor's layout request (private, so optional): without it the whole loop keeps its states (B, n)
    from torch._inductor.inductor_prims import force_stride_order
except ImportError:
    force_stride_order = None
try:  # Dynamo's compiled entries of a code object (to notice recompilations); private, so optional
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as _entries
except ImportError:  # another torch: recompilations go unnoticed (each solve still correct)
    def _entries(code) -> list:
        return []

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FALLBACK, _LOOP_FALLBACK, _ONE_FALLBACK = object(), object(), object()
# Which compiled form runs: None (the whole loop where worthwhile_rows says so, else compiled attempts), "loop" or
# "step" (tests and benchmarks).
FORM: str | None = None
# The whole row loop on the CPU: stacks of at most this many parts of size 1 are one fused loop each (small_cats;
# 0: Inductor's own lowering). Each stage's `torch.stack` of a field's components and the packed loop state otherwise
# create ~40 tensor views per attempt (glibc malloc/free of their objects: ~27% of the Van der Pol row loop).
# Measured there (B = 256, dopri5): 0.93x the time per attempt, same outputs bit for bit. Read when a loop is compiled.
LOOP_CAT_PARTS = 8
# The whole row loop on the CPU: a state of 2 to this many components per row, with at least LOOP_COLUMNS_ROWS rows, is
# stored component by component, (n, B), inside the loop (the field still receives a (B, ...) view and its result is
# written into that layout: inductor_prims.force_stride_order). Inductor's CPU code vectorizes the innermost dimension:
# on (B, n) rows of n = 2 each stage, error and dense-output loop ran one masked 8-lane vector per row (2 lanes used);
# on (n, B) it runs full vectors along the rows. Measured (Van der Pol, B = 256, n = 2, dopri5, AMD EPYC AVX2): 0.91x
# the row loop's time, outputs bit for bit. 0: never. Read when a loop is compiled.
LOOP_COLUMNS = 4
LOOP_COLUMNS_ROWS = 16
# The whole row loop: the PI controller's powers as one exp of a sum of logarithms, the previous ratios' logarithms
# carried (control.ControllerState.propose_tensor_log): one Sleef log and exp per row and attempt instead of two pow
# (~13 % of the Van der Pol row loop). Factors equal to propose_tensor's to rounding. Read when a loop is compiled.
LOOP_LOG_CONTROL = True
# The whole row loop: the controller's and the underflow rule's NaN/inf replacements as a comparison and a select
# (control.step_underflow_tensor's and ControllerState._bounded's `blend`; the same values) rather than nan_to_num,
# whose NaN test Inductor's CPU code runs one element at a time through a bounce buffer. Read when a loop is compiled.
LOOP_BLEND_NAN = True
# The whole row loop: its integer rows (iv: output slots, counters, statuses) carried as int32 inside the loop (int64
# outside; slots, counts and codes all below 2^31): Inductor's CPU code reads int64 vectors through an out-of-line
# helper. Read when a loop is compiled.
LOOP_INT32 = True
# The whole row loop: the program that runs writes at most one output per row and attempt, without the nested output
# loop (a `while_loop` inside the loop's body: its condition, inputs and carried output buffer cost every attempt,
# ~10 % of the Van der Pol row loop). An attempt in which some row's step passes a second output time is not committed:
# the program stops there and the one with the nested loop goes on from that state (and runs from the start for later
# solves of the same key). Same arithmetic, same results. Read when a solve starts.
LOOP_ONE_OUTPUT = True
# The whole row loop's one-output program: its output buffer written in place by the loop's body (a tensor the body
# captures, not carried: torch's while_loop allows that where no autograd graph is recorded) instead of a new
# ((T + 1) B, n) buffer made and copied at every attempt. Same values. Read when a loop is compiled.
LOOP_YS_IN_PLACE = True
# Status codes inside the graph.
_NON_FINITE, _UNDERFLOW, _MAX_STEPS = (_sol.CODE[s] for s in (_sol.NON_FINITE, _sol.STEP_SIZE_UNDERFLOW,
                                                               _sol.MAX_STEPS_REACHED))


def supports(solver: ExplicitRungeKutta, dtype: torch.dtype) -> bool:
    """Whether the row step of ``solver`` on a state of ``dtype`` can be compiled (see the module docstring)."""
    return (isinstance(solver, ExplicitRungeKutta) and solver.adaptive and not solver.tableau.extra_a
            and dtype in (torch.float32, torch.float64))


class _Attempt:
    """One attempted step of every row, traced into a compiled graph (the body of both compiled forms)."""

    def __init__(self, solver: ExplicitRungeKutta, controller: PIDController, shape: tuple[int, ...], d: float,
                 m: int):
        tb = solver.tableau
        self.s = solver.stages
        self.c = [float(x) for x in tb.c]
        self.a_rows = [nonzero(row) for row in tb.a]
        self.b_row = nonzero(tb.b)
        self.e_rows = [nonzero(r) for r in [tb.b_err] + ([tb.b_err_low] if tb.b_err_low is not None else [])]
        self.last_is_y1 = solver.last_stage_is_y1
        self.fsal = solver.fsal
        self.dense_p = [[float(v) for v in row] for row in tb.dense] if tb.dense is not None else None
        self.pid = PIDController.start(controller, solver.controller_order)  # the PID formula, as the eager rows
        self.order = solver.order
        self.b = shape[0]
        self.n = max(1, math.prod(shape[1:]))
        self.d, self.m = d, m

    def passed(self, t_out: Tensor, t: Tensor) -> Tensor:
        """Output times at or behind ``t`` (in the direction of integration)."""
        return t_out <= t if self.d > 0 else t_out >= t

    def __call__(self, f: Callable, t: Tensor, h_abs: Tensor, t_stop: Tensor, prev: Tensor, prev2: Tensor, y: Tensor,
                 k1: Tensor, rtol: Tensor, atol: Tensor, lim: Tensor, logs: tuple[Tensor, Tensor] | None = None,
                 blend: bool = False) -> dict[str, Tensor]:
        b, s = self.b, self.s
        rdt = y.dtype
        eps = torch.finfo(rdt).eps
        min_step, max_step = lim[0], lim[1]
        # Landing on each row's end time (control.landing_reach), as the eager loop.
        rem = (t_stop - t).abs()
        land = rem <= landing_reach(h_abs, t.abs() + t_stop.abs(), eps)
        hp = torch.where(land, rem, h_abs)
        h = hp if self.d > 0 else -hp
        t1 = torch.where(land, t_stop, t + h)
        act = rem > 0
        hy = h.to(rdt).view(b, 1)
        ks = [k1]
        yi = y
        for i in range(1, s):
            yi = y + hy * stage_sum(ks, self.a_rows[i]) if self.a_rows[i] else y
            ks.append(f(t + self.c[i] * h, yi))
        y1 = yi if self.last_is_y1 else y + hy * stage_sum(ks, self.b_row)
        err = torch.stack([stage_sum(ks, r) for r in self.e_rows]) * hy
        m = self.m
        if m < self.n:
            ratio = rms_ratio(err[..., :m], y[:, :m], y1[:, :m], rtol, atol)
        else:
            ratio = rms_ratio(err, y, y1, rtol, atol)
        accept = (ratio <= 1.0) & act
        f_last = ks[-1] if self.fsal else f(t1, y1)
        acc_col = accept.view(b, 1)
        t_new = torch.where(accept, t1, t)
        still = t_new != t_stop
        # The controller, per row (control.ControllerState.propose_tensor), with the min/max step rules.
        if logs is None:
            h_new, prev, prev2 = self.pid.propose_tensor(hp, ratio, accept, prev, prev2)
        else:  # (the whole loop: the previous ratios' logarithms carried, one exp per row)
            h_new, prev, prev2, *logs = self.pid.propose_tensor_log(hp, ratio, accept, prev, prev2, *logs, blend)
        h_new = torch.minimum(h_new, max_step)
        bump = (h_new < min_step) & ~accept & (hp > min_step)
        h_new = torch.where(bump, min_step, h_new)
        h_abs = torch.where(still, h_new, h_abs)
        stuck = (step_underflow_tensor(t_new, h_abs, eps, blend=blend) | (h_abs < min_step)) & still
        return dict(t=t_new, h_abs=h_abs, prev=prev, prev2=prev2, y=torch.where(acc_col, y1, y),
                    k1=torch.where(acc_col, f_last, k1), accept=accept, act=act, still=still, stuck=stuck,
                    ratio=ratio, h=h, hy=hy, y1=y1, ks=ks, f_last=f_last, logs=logs)

    def dense(self, theta: Tensor, y: Tensor, y1: Tensor, k1: Tensor, f_last: Tensor, hy: Tensor,
              ks: list[Tensor]) -> Tensor:
        """The method's dense output (cubic Hermite without one) at fractions ``theta`` (``(..., B, 1)``, float64) of
        each row's step."""
        if self.dense_p is None:
            return interpolation.hermite(theta.to(y.dtype), y, y1, k1, f_last, hy)
        powers = [theta]
        for _ in range(len(self.dense_p[0]) - 1):
            powers.append(powers[-1] * theta)
        w = [sum(p[j] * powers[j] for j in range(len(p)) if p[j] != 0.0) for p in self.dense_p]
        return y + hy * combo_cols(w, ks, y.dtype)


def _field(func: Callable, shape: tuple[int, ...], state: dict | None, cols: bool = False
           ) -> Callable[[Tensor, Tensor], Tensor]:
    """``func`` on flat rows (times cast to the state's dtype), through ``functional_call`` where ``state`` holds
    a module's tensors passed as inputs of the compiled loop. With ``cols`` (the whole loop's column layout, see
    :data:`LOOP_COLUMNS`) the rows may be a strided view and the result is stored component by component."""
    b = shape[0]

    def f(tt: Tensor, yy: Tensor) -> Tensor:
        args = (tt.to(yy.dtype), yy.reshape(shape) if cols else yy.view(shape))
        out = func(*args) if state is None else torch.func.functional_call(func, state, args)
        if cols:  # (B, n) values stored (n, B)
            return force_stride_order(out.reshape(b, -1), [1, b])
        return out.reshape(b, -1)

    return f


def _build_step(att: _Attempt, func: Callable, shape: tuple[int, ...], device: torch.device) -> Callable:
    b = att.b

    def row_step(sv: Tensor, yv: Tensor, iv: Tensor, times_flat: Tensor, rtol: Tensor, atol: Tensor, lim: Tensor):
        # Packed (each tensor passed to or returned from the compiled graph costs its call a handle): sv (7, B)
        # float64 [t, |h|, t_stop, prev, prev2, ratio, h]; yv (3, B, n) [y, k1, outputs]; iv (6, B) int64
        # [out_slot, steps, attempts, write_at, stuck, need_more] (see RowPack).
        rdt = yv.dtype
        t, y, k1, out_slot = sv[0], yv[0], yv[1], iv[0]
        r = att(_field(func, shape, None), t, sv[1], sv[2], sv[3].to(rdt), sv[4].to(rdt), y, k1, rtol, atol, lim)
        # The first output inside each row's step.
        next_out = times_flat[out_slot]
        need = att.passed(next_out, r["t"])
        theta = ((next_out - t) / r["h"]).view(b, 1)
        vals = att.dense(theta, y, r["y1"], k1, r["f_last"], r["hy"], r["ks"])
        trash = times_flat.shape[0] + torch.arange(b, device=t.device)  # the output buffer's last block
        write_at = torch.where(need, out_slot, trash)
        out_slot = out_slot + need * b
        need_more = att.passed(times_flat[out_slot], r["t"])
        flags = torch.stack([r["still"].any(), r["stuck"].any(), need.any(), need_more.any()])
        sv = torch.stack([r["t"], r["h_abs"], sv[2], r["prev"].to(torch.float64), r["prev2"].to(torch.float64),
                          r["ratio"].to(torch.float64), r["h"]])
        yv = torch.stack([r["y"], r["k1"], vals])
        iv = torch.stack([out_slot, iv[1] + r["accept"], iv[2] + r["act"], write_at, r["stuck"].long(),
                          need_more.long()])
        return sv, yv, iv, torch.stack([r["y1"], *r["ks"], r["f_last"]]), flags

    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    own = own_code(row_step)
    compiled = torch.compile(own, options=options, fullgraph=True, dynamic=False)
    compiled.code = own.__code__  # to count Dynamo's compiled entries (recompilations)
    return compiled


def _build_loop(att: _Attempt, func: Callable, shape: tuple[int, ...], device: torch.device,
                choose_first: bool = False, n_slots: int = 0, max_steps: int = 0, one_output: bool = False,
                resume: bool = False) -> Callable:
    state_names = list(module_state(func)) if isinstance(func, torch.nn.Module) else None
    cols = (device.type == "cpu" and force_stride_order is not None and 1 < att.n <= LOOP_COLUMNS
            and att.b >= LOOP_COLUMNS_ROWS)
    log_control = LOOP_LOG_CONTROL
    blend = LOOP_BLEND_NAN
    in_place = one_output and LOOP_YS_IN_PLACE
    int32 = LOOP_INT32 and n_slots + att.b < 2**31 and max_steps < 2**31  # (slots and counts fit)

    def run(sv: Tensor, yv: Tensor, iv: Tensor, ys: Tensor, cv: Tensor, times_flat: Tensor, rtol: Tensor,
            atol: Tensor, lim: Tensor, *tensors: Tensor):
        # Carried: sv (7, B) float64 as RowPack's; yv (3, B, n) [y, k1, -]; iv (6, B) int64 [output slot, steps,
        # attempts, status, -, -]; ys ((T + 1) B, n) the output buffer (core.rows._Frame's layout: its last block
        # takes the writes of rows with nothing to write); cv int64 [iterations, done, max_steps]. times_flat (T B,):
        # the output times by slot (the last: the end time's sentinel, never interpolated). With choose_first, each
        # row's first step (sv[1] on entry: unused) is chosen here (core.control.initial_step_tensor, as the eager
        # rows: one evaluation of the field) and returned last.
        state = dict(zip(state_names, tensors)) if state_names is not None else None
        f = _field(func, shape, state)
        b = att.b
        h_first = None
        if choose_first:
            h_first = initial_step_tensor(f, sv[0], yv[0], yv[1], att.d, att.order, rtol, atol, lim[1])
            sv = torch.cat([sv[0:1], h_first.view(1, b), sv[2:]])
        if cols:  # y and k1 stored (n, B) inside the loop (LOOP_COLUMNS)
            f = _field(func, shape, state, True)
            yv = yv.transpose(1, 2).contiguous()
        if log_control and not resume:  # sv gains rows 7, 8: log(prev), log(prev2) (LOOP_LOG_CONTROL)
            sv = torch.cat([sv, sv[3:5].log()])
        if int32:  # iv as int32 inside the loop (LOOP_INT32)
            iv = iv.to(torch.int32)
        rows = torch.arange(b, device=ys.device)
        trash = times_flat.shape[0] + rows

        def two_outputs(t, h_abs, t_stop, slot):
            # Whether some row's next attempt, if accepted, would pass two output times (its end: the landing rule of
            # _Attempt; a rejected attempt passes none).
            rem = (t_stop - t).abs()
            land = rem <= landing_reach(h_abs, t.abs() + t_stop.abs(), torch.finfo(yv.dtype).eps)
            t1 = torch.where(land, t_stop, t + h_abs if att.d > 0 else t - h_abs)
            first = att.passed(times_flat[slot], t1)
            return att.passed(times_flat[slot + first.to(slot.dtype) * b], t1).any()

        if one_output:  # (before the first attempt as well)
            cv = torch.stack([cv[0], torch.where(two_outputs(sv[0], sv[1], sv[2], iv[0]), 2, cv[1]), cv[2]])

        def cond(sv, yv, iv, ys, cv):
            return cv[1] == 0

        def body(sv, yv, iv, ys, cv):
            rdt = yv.dtype
            # (Copies: views of one carried tensor would alias as inputs of the inner loop below.)
            if cols:
                t, y, k1, status = sv[0].clone(), yv[0].clone().t(), yv[1].clone().t(), iv[3]
            else:
                t, y, k1, status = sv[0].clone(), yv[0].clone(), yv[1].clone(), iv[3]
            logs = (sv[7].to(rdt), sv[8].to(rdt)) if log_control else None
            r = att(f, t, sv[1], sv[2], sv[3].to(rdt), sv[4].to(rdt), y, k1, rtol, atol, lim, logs, blend)
            t_new = r["t"]

            def write_next(ys, slot, mutate=False):
                # The next output of every row whose step passed it (the method's dense output). (The step's tensors
                # enter the inner loop as inputs, which must not alias: hy is made here from h.)
                next_out = times_flat[slot]
                need = att.passed(next_out, t_new)
                h = r["h"]
                theta = ((next_out - t) / h).view(b, 1)
                vals = att.dense(theta, y, r["y1"], k1, r["f_last"], h.to(rdt).view(b, 1), r["ks"])
                if mutate:
                    ys.index_copy_(0, torch.where(need, slot, trash), vals)
                    return slot + need.to(slot.dtype) * b
                return ys.index_copy(0, torch.where(need, slot, trash), vals), slot + need.to(slot.dtype) * b

            def more(ys, slot):
                return att.passed(times_flat[slot], t_new).any()

            if in_place:  # (ys: None; no step passes two output times: see two_outputs)
                slot = write_next(ys_out, iv[0], True)
            elif one_output:  # (no step passes two output times: see two_outputs)
                ys, slot = write_next(ys, iv[0])
            else:
                # One output per row and attempt in the graph; a loop for the rare rows with several in one step.
                ys, slot = torch._higher_order_ops.while_loop(more, write_next, write_next(ys, iv[0]))
            stuck = r["stuck"]
            code = torch.where(torch.isfinite(r["ratio"]), _UNDERFLOW, _NON_FINITE).to(status.dtype)
            status = torch.where(stuck, code, status)
            t_stop = torch.where(stuck, t_new, sv[2])
            still = r["still"] & ~stuck
            it = cv[0] + 1
            out_of_budget = (it >= cv[2]) & still.any()
            status = torch.where(still & out_of_budget, _MAX_STEPS, status)
            done = (~still.any()) | out_of_budget
            if one_output:  # cv[1] = 2: the next attempt may pass two outputs (RowPack.loop: the nested program)
                done = torch.where(done, 1, torch.where(two_outputs(t_new, r["h_abs"], t_stop, slot), 2, 0))
            sv = torch.stack([t_new, r["h_abs"], t_stop, r["prev"].to(torch.float64), r["prev2"].to(torch.float64),
                              r["ratio"].to(torch.float64), r["h"]]
                             + ([x.to(torch.float64) for x in r["logs"]] if log_control else []))
            if cols:
                yv = torch.stack([r["y"].t(), r["k1"].t(), yv[2]])
            else:
                yv = torch.stack([r["y"], r["k1"], yv[2]])
            iv = torch.stack([slot, iv[1] + r["accept"], iv[2] + r["act"], status, iv[4], iv[5]])
            cv = torch.stack([it, done.long(), cv[2]])
            return sv, yv, iv, ys, cv

        if in_place:  # the output buffer written in place by the loop's body, not carried (LOOP_YS_IN_PLACE)
            ys_out = ys.clone()

            def body_in_place(sv, yv, iv, cv):
                sv, yv, iv, _, cv = body(sv, yv, iv, None, cv)
                return sv, yv, iv, cv

            sv, yv, iv, cv = torch._higher_order_ops.while_loop(lambda sv, yv, iv, cv: cv[1] == 0, body_in_place,
                                                                (sv, yv, iv, cv))
            out = (sv, yv, iv, ys_out, cv)
        else:
            out = torch._higher_order_ops.while_loop(cond, body, (sv, yv, iv, ys, cv))
        out = (out[0],  # (with LOOP_LOG_CONTROL its rows 7, 8 too: the logarithms, for a resume)
               out[1].transpose(1, 2).contiguous() if cols else out[1],
               out[2].to(torch.int64) if int32 else out[2], *out[3:])
        return (*out, h_first) if choose_first else out

    # Inductor's default vector width (the widest the CPU has; loop.CPU_OPTIONS sets 256 bits on Intel CPUs): the row
    # loop's per-row control is elementwise work across the batch's rows, where 512-bit vectors are the faster ones
    # (Intel Xeon with AVX-512, bench_suite's Van der Pol batch of 256 rows: 6.91 -> 5.65 ms; its batched MLP case
    # with per_sample_steps: 29.8 -> 30.4 ms, within the noise).
    options = {k: v for k, v in CPU_OPTIONS.items() if k != "cpp.simdlen"} if device.type == "cpu" else None
    if options is not None and LOOP_CAT_PARTS:  # (named in the options: Inductor's cache tells the programs apart)
        options = {**options, "post_grad_fusion_options": {"decompose_mm_pass": {
            **options["post_grad_fusion_options"]["decompose_mm_pass"], "neurodyn_small_cats": LOOP_CAT_PARTS}}}
    own = own_code(run)
    # Repeat calls run the compiled entries with their guards checked, without Dynamo's frame machinery (Entries);
    # the lowering patches are entered only where Dynamo compiles (_loop_backend).
    entries = Entries(own, n_outputs=6 if choose_first else 5)
    compiled = torch.compile(own, backend=entries.backend(_loop_backend(options)), fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": _own_constant_guards})
    compiled.entries = entries
    return compiled


# The row loop's closure variables that are its build's own constants: made by _build_loop from the solver, the
# controller, the shape and the module's settings (all part of the per-field cache key, with the program) and never
# changed after: their guards are left out.
_own_constant_guards = constant_guard_filter(("att", "state_names", "cols", "log_control", "blend", "int32",
                                              "choose_first", "shape", "one_output", "resume", "in_place"))


def _loop_backend(options: dict | None) -> Callable:
    """A ``torch.compile`` backend: Inductor with ``options`` (as ``backend="inductor"``), run inside the row loop's
    lowering patches (:class:`~neurodyn.compile.patches.small_cats` with :data:`LOOP_CAT_PARTS` on the CPU,
    :class:`~neurodyn.compile.patches.pooled_loop_buffers`). Dynamo calls it only when it compiles a program, so a
    call that runs a compiled program enters neither."""
    patches = dict(options or {})
    parts = LOOP_CAT_PARTS if options is not None else 0

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        with small_cats(parts), pooled_loop_buffers():
            return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


class CompiledRows:
    """The plug-in :func:`neurodyn.core.rows.integrate_rows` receives as ``LoopConfig.row_step``.

    ``bind(solver, controller, dtype, device, d, m, rtol, atol, n_times)`` returns a :class:`RowPack` (the compiled
    forms for that solve) or None where the row step is not compiled for it."""

    def __init__(self, func: Callable, shape: tuple[int, ...]):
        self.func, self.shape = func, shape
        try:
            self.per_func = _CACHE.setdefault(func, {})
        except TypeError:  # not weak-referenceable: cache on nothing (compiles per solve)
            self.per_func = {}

    def bind(self, solver: ExplicitRungeKutta, controller: PIDController, dtype: torch.dtype, device: torch.device,
             d: float, m: int, rtol: Tensor, atol: Tensor, n_times: int) -> RowPack | None:
        if not supports(solver, dtype) or self.per_func.get(_FALLBACK):
            return None
        key = (solver.name, self.shape, dtype, device, d, m, tuple(rtol.shape), tuple(atol.shape),
               (controller.pcoeff, controller.icoeff, controller.dcoeff, controller.safety, controller.ifactor,
                controller.dfactor, controller.accept_dfactor))
        att = self.per_func.get(("attempt", key))
        if att is None:  # (the tableau's coefficients as floats: built once per key)
            att = self.per_func[("attempt", key)] = _Attempt(solver, controller, self.shape, d, m)
        per_func, func, shape = self.per_func, self.func, self.shape
        whole = worthwhile_rows(self.shape, n_times, device) and not per_func.get(_LOOP_FALLBACK)

        def build(kind: str, choose_first: bool = False, wide: bool = False, one_output: bool = False,
                  resume: bool = False) -> Callable:
            # (wide: max_steps at least 2^31, so that the loop's counters stay int64; one_output, resume: see
            # _build_loop)
            k = (kind, key, n_times if kind == "loop" else None, choose_first, wide, one_output, resume)
            fn = per_func.get(k)
            if fn is None:
                fn = (_build_loop(att, func, shape, device, choose_first, n_times * att.b, 2**31 if wide else 0,
                                  one_output, resume)
                      if kind == "loop" else _build_step(att, func, shape, device))
                per_func[k] = fn
            return fn

        return RowPack(build, per_func, whole, module_state(func), ("several outputs", key, n_times))


def worthwhile_rows(shape: tuple[int, ...], n_times: int, device: torch.device) -> bool:
    """Whether the whole per-sample loop is compiled (else one compiled attempt per step; :data:`FORM` overrides):
    its output buffer ``((T + 1) B, n)`` is carried through the loop (copied each attempt), so on the CPU only where
    ``B n T`` is at most :data:`neurodyn.compile.loop.CPU_MAX_OUTPUT_ELEMENTS` (as the compiled whole loop).

    Examples
    --------
    >>> import torch
    >>> worthwhile_rows((256, 2), 11, torch.device("cpu"))   # the Van der Pol batch: 5632 output elements
    True
    >>> worthwhile_rows((512, 64), 11, torch.device("cpu"))
    False
    """
    if FORM is not None:
        return FORM == "loop"
    return device.type != "cpu" or math.prod(shape) * n_times <= CPU_MAX_OUTPUT_ELEMENTS


class RowPack:
    """One solve's compiled forms: :meth:`loop` (the whole loop, where it pays) and ``__call__`` (one attempt) on the
    packed loop state ``(sv, yv, iv)`` (layouts: :func:`_build_step`, :func:`_build_loop`)."""

    def __init__(self, build: Callable[..., Callable], per_func: dict, whole: bool, state: dict[str, Tensor],
                 several_key: tuple = ()):
        self.build, self.per_func, self.whole, self.state = build, per_func, whole, state
        self.several_key = several_key  # per_func's mark: a solve of this key had a step passing two outputs
        self.fn = None
        self.calls = 0
        self.entries = 0

    @staticmethod
    def pack(t: Tensor, y: Tensor, k1: Tensor, h_abs: Tensor, t_stop: Tensor, prev: Tensor, prev2: Tensor,
             out_slot: Tensor, steps: Tensor, attempts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loop state as ``(sv, yv, iv)``."""
        z = torch.zeros_like(t)
        zi = torch.zeros_like(out_slot)
        return (torch.stack([t, h_abs, t_stop, prev.to(torch.float64), prev2.to(torch.float64), z, z]),
                torch.stack([y, k1, torch.zeros_like(y)]), torch.stack([out_slot, steps, attempts, zi, zi, zi]))

    def loop(self, packed: tuple[Tensor, Tensor, Tensor], status: Tensor, ys: Tensor, times_flat: Tensor,
             rtol: Tensor, atol: Tensor, lim: Tensor, max_steps: int, choose_first: bool = False):
        """The whole loop from the packed state and the rows' ``status``; ``ys``: the output buffer (written in place
        of the returned one); ``times_flat``: the output times by slot. Returns ``(sv, yv, iv, ys, cv, h_first)``
        (``iv[0]`` each row's next output slot, ``iv[3]`` the statuses, ``cv[0]`` the attempts made; with
        ``choose_first`` each row's first step is chosen in the compiled program from ``(t, y, k1)`` (the packed
        step size is ignored) and returned as ``h_first``, ``(B,)`` float64, else ``h_first`` is None), or None
        where it is not used (``B n T`` too large) or could not be compiled (warned once; compiled attempts
        then)."""
        if not self.whole:
            return None
        sv, yv, iv = packed
        iv = iv.clone()
        iv[3] = status
        cv = torch.tensor([0, 0, max_steps], dtype=torch.long, device=ys.device)
        wide = max_steps >= 2**31
        try:
            # The program that writes at most one output per row and attempt (LOOP_ONE_OUTPUT), unless a solve of
            # this key had a step passing two; where it stops at such a step (cv[1] = 2), the one with the nested
            # output loop goes on from its state.
            one = LOOP_ONE_OUTPUT and not self.per_func.get(self.several_key) and not self.per_func.get(_ONE_FALLBACK)
            try:
                out = self._call(self.build("loop", choose_first, wide, one), (sv, yv, iv, ys, cv), times_flat,
                                 rtol, atol, lim)
            except Exception:  # (the one-output program could not be compiled: the nested one, for this field)
                if not one:
                    raise
                self.per_func[_ONE_FALLBACK], one = True, False
                out = self._call(self.build("loop", choose_first, wide), (sv, yv, iv, ys, cv), times_flat, rtol,
                                 atol, lim)
            h_first = out[5] if choose_first else None
            if one and int(out[4][1]) == 2:
                self.per_func[self.several_key] = True
                cv = out[4].clone()
                cv[1] = 0
                out = self._call(self.build("loop", False, wide, False, True), (*out[:4], cv), times_flat, rtol,
                                 atol, lim)
            return (out[0][:7], *out[1:5], h_first)
        except Exception as exc:  # compilation failed: compiled attempts from now on, for this field
            self.per_func[_LOOP_FALLBACK] = True
            warnings.warn(f"compile=True: the per-sample loop could not be compiled as a whole ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running compiled row steps.",
                          RuntimeWarning, stacklevel=4)
            return None

    def _call(self, fn: Callable, carried: tuple[Tensor, ...], times_flat: Tensor, rtol: Tensor, atol: Tensor,
              lim: Tensor) -> tuple[Tensor, ...]:
        args = (*carried, times_flat, rtol, atol, lim, *self.state.values())
        out = fn.entries(args)  # a compiled entry whose guards pass, or None: Dynamo's call (compiles if needed)
        if out is None:
            with compiled_context():
                out = fn(*args)
        return tuple(out)

    def __call__(self, sv: Tensor, yv: Tensor, iv: Tensor, times_flat: Tensor, rtol: Tensor, atol: Tensor,
                 lim: Tensor):
        """One attempt: ``(sv, yv, iv, aux, flags)`` (flags: any row continues, any stuck, any output written, any
        second output pending), or None where the compilation failed (warned once; eager attempts from then on)."""
        try:
            if self.fn is None:
                self.fn = self.build("step")
            with compiled_context():
                out = self.fn(sv, yv, iv, times_flat, rtol, atol, lim)
        except Exception as exc:  # compilation failed: eager row steps from now on, for this field
            return self._give_up(f"could not be compiled ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
        # A field whose Python state changes at every call (a counter it increments, say) compiles the step again at
        # every attempt: noticed on the second attempt of a solve.
        self.calls += 1
        if self.calls <= 2:
            entries = len(_entries(self.fn.code))
            if self.calls == 2 and entries > self.entries:
                return self._give_up("was compiled again at every attempt because Python state of the vector field "
                                     "changes (a counter or list it updates: sol.stats['nfe'] counts evaluations)")
            self.entries = entries
        return out

    def _give_up(self, why: str) -> None:
        self.per_func[_FALLBACK] = True
        warnings.warn(f"compile=True: the per-sample row step {why}; running eager row steps (for this vector field).",
                      RuntimeWarning, stacklevel=5)
        return None
