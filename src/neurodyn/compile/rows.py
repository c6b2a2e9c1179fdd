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
the eager per-sample solve to rounding. Used for explicit Runge--Kutta methods without extra dense-output stages,
real floating-point states, where no autograd graph is recorded, with no hooks, replay log or events, and every
row integrating in the same direction; everything else runs the eager row loop. Compiled steps are cached per
vector field, method, shape, dtype, device, controller, direction and tolerance shapes; a failed compilation warns
once and the loop continues eagerly.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from ..core import interpolation
from ..core.control import LANDING_SLACK, PIDController, rms_ratio, step_underflow_tensor
from ..solvers.explicit_rk import ExplicitRungeKutta
from .loop import combo_cols
from .step import compiled_context, nonzero, own_code, stage_sum

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FALLBACK = object()


def supports(solver: ExplicitRungeKutta, dtype: torch.dtype) -> bool:
    """Whether the row step of ``solver`` on a state of ``dtype`` can be compiled (see the module docstring)."""
    return (isinstance(solver, ExplicitRungeKutta) and solver.adaptive and not solver.tableau.extra_a
            and dtype in (torch.float32, torch.float64))


def _build(solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], controller: PIDController,
           d: float, m: int, device: torch.device) -> Callable:
    tb = solver.tableau
    s = solver.stages
    c = [float(x) for x in tb.c]
    a_rows = [nonzero(row) for row in tb.a]
    b_row = nonzero(tb.b)
    e_rows = [nonzero(r) for r in [tb.b_err] + ([tb.b_err_low] if tb.b_err_low is not None else [])]
    last_is_y1 = solver.last_stage_is_y1
    fsal = solver.fsal
    dense_p = [[float(v) for v in row] for row in tb.dense] if tb.dense is not None else None
    pid = PIDController.start(controller, solver.controller_order)  # the PID formula, as the eager rows
    user_shape = tuple(shape)
    b = shape[0]
    n = max(1, math.prod(shape[1:]))

    def passed(next_out: Tensor, t: Tensor) -> Tensor:
        return next_out <= t if d > 0 else next_out >= t

    def row_step(sv: Tensor, yv: Tensor, iv: Tensor, times_flat: Tensor, rtol: Tensor, atol: Tensor, lim: Tensor):
        # Packed (each tensor passed to or returned from the compiled graph costs its call a handle): sv (7, B)
        # float64 [t, |h|, t_stop, prev, prev2, ratio, h]; yv (3, B, n) [y, k1, outputs]; iv (6, B) int64
        # [out_slot, steps, attempts, write_at, stuck, need_more] (see RowPack).
        rdt = yv.dtype
        eps = torch.finfo(rdt).eps
        min_step, max_step = lim[0], lim[1]
        t, h_abs, t_stop, prev, prev2 = sv[0], sv[1], sv[2], sv[3].to(rdt), sv[4].to(rdt)
        y, k1 = yv[0], yv[1]
        out_slot, steps, attempts = iv[0], iv[1], iv[2]

        def f(tt: Tensor, yy: Tensor) -> Tensor:
            return func(tt.to(rdt), yy.view(user_shape)).reshape(b, n)

        # Landing on each row's end time (control.LANDING_SLACK), as the eager loop.
        rem = (t_stop - t).abs()
        land = rem <= h_abs * LANDING_SLACK
        hp = torch.where(land, rem, h_abs)
        h = hp if d > 0 else -hp
        t1 = torch.where(land, t_stop, t + h)
        act = rem > 0
        hy = h.to(rdt).view(b, 1)
        ks = [k1]
        yi = y
        for i in range(1, s):
            yi = y + hy * stage_sum(ks, a_rows[i]) if a_rows[i] else y
            ks.append(f(t + c[i] * h, yi))
        y1 = yi if last_is_y1 else y + hy * stage_sum(ks, b_row)
        err = torch.stack([stage_sum(ks, r) for r in e_rows]) * hy
        if m < n:
            ratio = rms_ratio(err[..., :m], y[:, :m], y1[:, :m], rtol, atol)
        else:
            ratio = rms_ratio(err, y, y1, rtol, atol)
        accept = (ratio <= 1.0) & act
        f_last = ks[-1] if fsal else f(t1, y1)
        acc_col = accept.view(b, 1)
        y_new = torch.where(acc_col, y1, y)
        k_new = torch.where(acc_col, f_last, k1)
        t_new = torch.where(accept, t1, t)
        steps = steps + accept
        attempts = attempts + act
        still = t_new != t_stop
        # The controller, per row (control.ControllerState.propose_tensor), with the min/max step rules.
        h_new, prev, prev2 = pid.propose_tensor(hp, ratio, accept, prev, prev2)
        h_new = torch.minimum(h_new, max_step)
        bump = (h_new < min_step) & ~accept & (hp > min_step)
        h_new = torch.where(bump, min_step, h_new)
        h_abs = torch.where(still, h_new, h_abs)
        stuck = (step_underflow_tensor(t_new, h_abs, eps) | (h_abs < min_step)) & still
        # The first output inside each row's step (the method's dense output; cubic Hermite without one).
        next_out = times_flat[out_slot]
        need = passed(next_out, t_new)
        theta = ((next_out - t) / h).view(b, 1)
        if dense_p is not None:
            powers = [theta]
            for _ in range(len(dense_p[0]) - 1):
                powers.append(powers[-1] * theta)
            w = [sum(p[j] * powers[j] for j in range(len(p)) if p[j] != 0.0) for p in dense_p]
            vals = y + hy * combo_cols(w, ks, rdt)
        else:
            vals = interpolation.hermite(theta.to(rdt), y, y1, k1, f_last, hy)
        trash = times_flat.shape[0] + torch.arange(b, device=t.device)  # the output buffer's last block
        write_at = torch.where(need, out_slot, trash)
        out_slot = out_slot + need * b
        need_more = passed(times_flat[out_slot], t_new)
        flags = torch.stack([still.any(), stuck.any(), need.any(), need_more.any()])
        sv = torch.stack([t_new, h_abs, t_stop, prev.to(torch.float64), prev2.to(torch.float64),
                          ratio.to(torch.float64), h])
        yv = torch.stack([y_new, k_new, vals])
        iv = torch.stack([out_slot, steps, attempts, write_at, stuck.long(), need_more.long()])
        return sv, yv, iv, torch.stack([y1, *ks, f_last]), flags

    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(own_code(row_step), options=options, fullgraph=True)


class CompiledRows:
    """The plug-in :func:`neurodyn.core.rows.integrate_rows` receives as ``LoopConfig.row_step``.

    ``bind(solver, controller, dtype, device, d, m, rtol, atol)`` returns a :class:`RowPack` (one compiled attempt
    on the packed loop state) or None where the row step is not compiled for that solve."""

    def __init__(self, func: Callable, shape: tuple[int, ...]):
        self.func, self.shape = func, shape
        try:
            self.per_func = _CACHE.setdefault(func, {})
        except TypeError:  # not weak-referenceable: cache on nothing (compiles per solve)
            self.per_func = {}

    context = compiled_context

    def bind(self, solver: ExplicitRungeKutta, controller: PIDController, dtype: torch.dtype, device: torch.device,
             d: float, m: int, rtol: Tensor, atol: Tensor) -> Callable | None:
        if not supports(solver, dtype) or self.per_func.get(_FALLBACK):
            return None
        key = (solver.name, self.shape, dtype, device, d, m, tuple(rtol.shape), tuple(atol.shape),
               (controller.pcoeff, controller.icoeff, controller.dcoeff, controller.safety, controller.ifactor,
                controller.dfactor, controller.accept_dfactor))
        fn = self.per_func.get(key)
        if fn is None:
            fn = self.per_func[key] = _build(solver, self.func, self.shape, controller, d, m, device)
        return RowPack(fn, self.per_func, solver.stages)


class RowPack:
    """One solve's compiled attempt on the packed loop state ``(sv, yv, iv)`` (see :func:`_build`), with the
    accessors :func:`neurodyn.core.rows.integrate_rows` reads; ``aux`` (``[y1, stages..., f_last]``, ``(s + 2, B, n)``)
    is what the eager dense output needs for the rare second output inside a step."""

    def __init__(self, fn: Callable, per_func: dict, stages: int):
        self.fn, self.per_func, self.s = fn, per_func, stages

    @staticmethod
    def pack(t: Tensor, y: Tensor, k1: Tensor, h_abs: Tensor, t_stop: Tensor, prev: Tensor, prev2: Tensor,
             out_slot: Tensor, steps: Tensor, attempts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loop state as ``(sv, yv, iv)``."""
        z = torch.zeros_like(t)
        zi = torch.zeros_like(out_slot)
        return (torch.stack([t, h_abs, t_stop, prev.to(torch.float64), prev2.to(torch.float64), z, z]),
                torch.stack([y, k1, torch.zeros_like(y)]), torch.stack([out_slot, steps, attempts, zi, zi, zi]))

    def __call__(self, sv: Tensor, yv: Tensor, iv: Tensor, times_flat: Tensor, rtol: Tensor, atol: Tensor,
                 lim: Tensor):
        """One attempt: ``(sv, yv, iv, aux, flags)`` (flags: any row continues, any stuck, any output written, any
        second output pending), or None where the compilation failed (warned once; eager attempts from then on)."""
        try:
            with compiled_context():
                return self.fn(sv, yv, iv, times_flat, rtol, atol, lim)
        except Exception as exc:  # compilation failed: eager row steps from now on, for this field
            self.per_func[_FALLBACK] = True
            warnings.warn(f"compile=True: the per-sample row step could not be compiled ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running eager row steps.",
                          RuntimeWarning, stacklevel=4)
            return None
