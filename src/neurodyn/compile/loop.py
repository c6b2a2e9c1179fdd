"""The whole integrate loop compiled into one graph (``solve(..., compile=True)`` where torch can).

The per-step compiled path (:mod:`neurodyn.compile.step`) still returns to Python once per step: the loop
reads the error ratio, chooses the next step, writes outputs. For a small problem that Python round trip
costs as much as the step itself. Here the loop itself -- step, error norm, accept/reject, PI control,
landing on the stops, dense output at the output times, the failure statuses -- runs inside
``torch._higher_order_ops.while_loop``, compiled once by ``torch.compile`` into one kernel program; the
host reads the counters and the status once, after the solve.

It is the same algorithm as :func:`neurodyn.core.loop.integrate` (same step-size sequence, same
outputs, to rounding: stage sums are fused in another order) for the cases it covers:

* explicit Runge--Kutta methods that are FSAL or fixed-step, with no extra dense-output stages
  (``dopri5``, ``tsit5``, ``bosh3``, and every fixed-step method);
* no autograd graph to record (under ``torch.no_grad()``, or nothing requires grad: inference, the
  adjoint's forward pass), no ``dense=True``, events, ``jump_t``, ``perturb``, custom ``norm`` or
  error seminorm, no ``torch.func.vmap``; real floating-point states;
* on the CPU, ``y0.numel() * len(t) <= CPU_MAX_OUTPUT_ELEMENTS`` (``CPU_MAX_INFERENCE_OUTPUT_ELEMENTS`` under
  ``torch.no_grad()``; see there).

Everything else uses the per-step compiled path. Compilation failures fall back with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import solution as _sol
from ..core import interpolation
from ..core.control import (
    PIDController,
    frozen_attempt,
    initial_step_tensor,
    landing_reach,
    rms_ratio,
    step_underflow_tensor,
)
from ..core.tensors import ordinary_tensors
from ..solvers.explicit_rk import ExplicitRungeKutta
from .entries import Entries, constant_guard_filter
from .patches import (
    LOWERING_MARKS,
    MKL_ON_INTEL,
    ONEDNN_FLOAT32,
    ONEDNN_MIN_INNER,
    ONEDNN_MIN_MACS,
    SIMD_BITS,
    library_tanh,
    pooled_loop_buffers,
    register_onednn_lowering,
    thin_products,
    vectorize_strided_loads,
)
from .pool import LOOP_POOL_BYTES
from .step import nonzero, own_code, stage_sum

try:  # Inductor's layout request (private, so optional): without it the field's matrices enter the loop as they are
    from torch._inductor.inductor_prims import force_stride_order
except ImportError:
    force_stride_order = None
try:  # Inductor's base class of custom graph passes (part of its cache key); private, so optional
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # another torch: the pass is a plain callable (Inductor then does not cache the loop's graph)
    CustomGraphPass = object

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Inductor on the CPU: the graph's wrapper in C++ (no Python between kernels); products with a single row (a
# batch-1 state through a Linear layer) as fused loops rather than library GEMV calls; the vector width of
# patches.SIMD_BITS (256 bits on Intel CPUs). The "neurodyn_*" entries are no Inductor settings: they name the
# lowering changes made while compiling (LOWERING_MARKS, and the buffer pool's), so that Inductor's cache of compiled
# graphs tells programs apart.
CPU_OPTIONS = {"cpp_wrapper": True, **({"cpp.simdlen": SIMD_BITS} if SIMD_BITS else {}),
               "post_grad_fusion_options": {"decompose_mm_pass": {
                   **LOWERING_MARKS, "neurodyn_loop_pool": LOOP_POOL_BYTES}}}
# Matrix products with at most this inner dimension are written as fused loops in the compiled whole loop
# (thin_products): a field's first layer on a state of a few components, (B, n) @ (n, hidden), whose library GEMM call
# (plus ATen's copy of the bias into its output) costs more than the arithmetic; measured on the batched protocol case
# (n = 2, B = 256): ~3% of the solve.
LOOP_THIN_INNER = 8
# Matrix products with at most this many output columns and more rows than that (a field's last layer back to a state
# of a few components, (B, hidden) @ (hidden, n)) are computed transposed in the compiled whole loop (LoopProducts):
# MKL's product for a (B, 64) x (64, 2) layer takes ~7.5 us with its bias, ~3 us transposed (float64, one core).
LOOP_THIN_OUTPUTS = 8
_FALLBACK = object()
# Compiled variants of one loop (train()/eval(), say) before a field counts as changing its Python state every solve.
_MAX_VARIANTS = 3
# Status codes inside the graph.
_RUNNING, _NON_FINITE, _UNDERFLOW, _MAX_STEPS = (_sol.CODE[s] for s in (_sol.SUCCESS, _sol.NON_FINITE,
                                                                         _sol.STEP_SIZE_UNDERFLOW,
                                                                         _sol.MAX_STEPS_REACHED))


# On the CPU the whole loop rewrites every output row each attempt (static shapes): ~7 n T multiply-adds for n state
# elements and T output times, against ~100 us of Python per step saved. Up to this n T (the batched protocol case:
# 5.6e3) it is built for every solve, training steps included.
CPU_MAX_OUTPUT_ELEMENTS = 32768
# Up to this n T it is also built for solves that record no autograd graph (under torch.no_grad()), and the compile
# policy measures it against eager steps: with the field's large tanh in ATen's kernel (patches.library_tanh), one core,
# float64, the medium protocol case (n T = 1.8e5) ran at 0.73x the eager solve's time, the large one (3.6e5) at 0.95x.
CPU_MAX_INFERENCE_OUTPUT_ELEMENTS = 1 << 19
# Attempted steps per iteration of the compiled loop. Torch's compiled while_loop reads its condition on the host
# every iteration: free on the CPU, a device synchronisation on a GPU. There, 8 attempts run between reads (after
# the end of the solve, at most 7 do nothing); on the CPU one (no attempt is wasted). Not yet measured on a GPU.
UNROLL = 1
UNROLL_ACCELERATOR = 8


def worthwhile(y0: Tensor, n_times: int) -> bool:
    """Whether the whole loop may pay off for this state and number of output times, in the current grad mode (else
    compiled steps): on the CPU up to :data:`CPU_MAX_OUTPUT_ELEMENTS` output elements, or
    :data:`CPU_MAX_INFERENCE_OUTPUT_ELEMENTS` under ``torch.no_grad()``.

    >>> worthwhile(torch.zeros(1024, 16), 11)
    False
    >>> with torch.no_grad():
    ...     worthwhile(torch.zeros(1024, 16), 11)
    True
    """
    if y0.device.type != "cpu":
        return True
    size = y0.numel() * n_times
    limit = CPU_MAX_OUTPUT_ELEMENTS if torch.is_grad_enabled() else CPU_MAX_INFERENCE_OUTPUT_ELEMENTS
    return size <= limit


def supports(solver: ExplicitRungeKutta, adaptive: bool, controller: PIDController) -> bool:
    """Whether the whole loop of ``solver`` can be compiled (see the module docstring)."""
    tb = solver.tableau
    return (isinstance(solver, ExplicitRungeKutta) and not tb.extra_a and (solver.fsal or not adaptive)
            and type(controller) is PIDController)


class StepPlan:
    """An explicit Runge--Kutta step and its dense output as the compiled code writes them (internal): the tableau's
    nonzero coefficients, which dense output (the method's own, Hermite or linear), and the method's flags."""

    def __init__(self, solver: ExplicitRungeKutta, interp: str, adaptive: bool):
        tb = solver.tableau
        self.s = solver.stages
        self.c = [float(x) for x in tb.c]
        self.a_rows = [nonzero(row) for row in tb.a]
        self.b_row = nonzero(tb.b)
        self.e_row = nonzero(tb.b_err) if adaptive else []
        self.last_is_y1 = solver.last_stage_is_y1
        self.fsal = solver.fsal
        self.own_dense = interp == "auto" and tb.dense is not None
        self.hermite = interp == "hermite" or (interp == "auto" and tb.dense is None)
        self.dense_p = [[float(v) for v in row] for row in tb.dense] if self.own_dense else None


def rk_stages(f: Callable[[Tensor, Tensor], Tensor], t: Tensor, h: Tensor, y: Tensor, k1: Tensor,
              plan: StepPlan) -> tuple[Tensor, list[Tensor], Tensor]:
    """One step from ``(t, y)`` (rows ``(1, n)``) with ``k1 = f(t, y)``: ``(y1, stages, h in y's dtype)``."""
    hy = h.to(y.dtype)
    ks = [k1]
    yi = y
    for i in range(1, plan.s):
        yi = y + hy * stage_sum(ks, plan.a_rows[i]) if plan.a_rows[i] else y
        ks.append(f(t + plan.c[i] * h, yi))
    y1 = yi if plan.last_is_y1 else y + hy * stage_sum(ks, plan.b_row)
    return y1, ks, hy


def dense_rows(plan: StepPlan, tz: Tensor, t: Tensor, t1: Tensor, h: Tensor, hy: Tensor, y: Tensor, y1: Tensor,
               k1: Tensor, f_end: Tensor, ks: list[Tensor]) -> Tensor:
    """The step's dense output at the times ``tz`` (``(m,)``, float64) as rows ``(m, n)``; a time equal to ``t1``
    is ``y1``."""
    theta = ((tz - t) / h).view(-1, 1)
    if plan.own_dense:
        dense_p = plan.dense_p
        powers = [theta]
        for _ in range(len(dense_p[0]) - 1):
            powers.append(powers[-1] * theta)
        w = [sum(p[m] * powers[m] for m in range(len(p)) if p[m] != 0.0) for p in dense_p]
        val = y + hy * combo_cols(w, ks, y.dtype)
    elif plan.hermite:
        val = interpolation.hermite(theta.to(y.dtype), y, y1, k1, f_end, hy)
    else:
        val = interpolation.linear(theta.to(y.dtype), y, y1)
    return torch.where((tz == t1).view(-1, 1), y1, val)


def field_rows(func: Callable, shape: tuple[int, ...]) -> Callable:
    """``f(t64, y, t_dtype, state)``: ``func`` at a float64 time (cast to ``t_dtype``) and a row ``(1, n)``, as a row;
    with ``state`` (a module's tensors by name) called through ``torch.func.functional_call``."""
    user_shape = tuple(shape)

    def f(t64: Tensor, y: Tensor, t_dtype: torch.dtype, state: dict | None) -> Tensor:
        tt, yy = t64.to(t_dtype), y.view(user_shape)
        out = func(tt, yy) if state is None else torch.func.functional_call(func, state, (tt, yy))
        return out.reshape(1, -1)

    return f


def _build(solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], adaptive: bool, interp: str,
           controller: PIDController, choose_first: bool, device: torch.device, n_times: int,
           n_stop_times: int, record: int = 0) -> Callable:
    plan = StepPlan(solver, interp, adaptive)
    e_row = plan.e_row
    fsal = plan.fsal
    order = solver.order
    # The controller's exponents and limits, as the eager loop's controller state computes them.
    pid = controller.start(solver.controller_order if adaptive else 0)
    f = field_rows(func, shape)
    n_out, n_stops = n_times, n_stop_times
    unroll = UNROLL if device.type == "cpu" else UNROLL_ACCELERATOR
    state_names = list(module_state(func)) if isinstance(func, torch.nn.Module) else None
    layout = matrix_layout(shape, device)

    def run(cv: Tensor, y0: Tensor, tol: Tensor, iv: Tensor, *tensors: Tensor):
        # cv (float64): the output times, the stops, the first step (inf: choose), min_step, max_step. tol: rtol and
        # atol as rows, (2, n), the state's real dtype. iv (int64): the integer state, max_steps last. Few inputs:
        # the compiled loop passes every input to every iteration (a tensor handle each).
        t_dtype = tol.dtype
        eps = torch.finfo(t_dtype).eps  # the state's precision: the underflow rule's unit
        n = y0.shape[1]
        # A module's parameters and buffers arrive as inputs (module_state): read from the module inside the loop,
        # each evaluation would add an input of its own, and the compiled loop rejects inputs that alias. Their
        # copies in the layout the loop reads them in are made here, once per call, before the loop.
        if layout is not None:
            tensors = [layout(x) for x in tensors]
        state = dict(zip(state_names, tensors)) if state_names is not None else None
        times = cv[:n_out]
        h_init, max_step = cv[-3], cv[-1]
        rtol, atol = tol[0:1], tol[1:2]
        t0 = times[0]
        direction = torch.where(times[-1] > t0, 1.0, -1.0).to(torch.float64)
        # dy/dt at (t0, y0), evaluated here (no eager call of the field before the loop). Where it holds NaN/inf the
        # loop runs no attempt: status non-finite, no attempt counted (the host reports the eager loop's message).
        k0 = f(t0, y0, t_dtype, state)
        bad_start = ~torch.isfinite(k0).all()
        slot = torch.arange(iv.shape[0], device=iv.device)
        iv = iv + bad_start.long() * torch.where(slot == 5, _NON_FINITE, (slot == 6).long())
        if adaptive and choose_first:  # Hairer's initial step (core.control.initial_step_tensor), in the graph
            root = math.sqrt(max(n, 1))
            h_first = initial_step_tensor(lambda tt, yy: f(tt.reshape(()), yy, t_dtype, state), t0, y0, k0,
                                          direction, order, rtol * root, atol * root, max_step).reshape(())
        else:
            h_first = h_init
        h_abs = torch.minimum(h_first, max_step)
        # The carried state, packed into three tensors (each carried tensor costs the compiled loop buffers and
        # handles per iteration): Z = [y; k1; outputs] in the state's dtype, (2 + n_out, n); S = [t, |h|, the
        # controller's last two ratios, last accepted h, last attempted |h|] (float64); I = [next output, next
        # stop, accepted, rejected, attempts, status, done, max_steps] (int64).
        z = torch.cat([y0, k0, y0.expand(n_out, n)])
        one = torch.ones((), dtype=torch.float64, device=y0.device)
        sv = torch.stack([t0, h_abs, one, one, one * 0, one * 0])

        # With `record` > 0 (a recorded solve, compile.train): two more carried tensors, the accepted steps
        # R = [t, h, t1, first output, end of outputs] (record, 5) (float64) and RY = [y, k1] (record, 2n), row j
        # written when step j is accepted (steps past `record` are not kept: the caller checks the count).
        carry = (z, sv, iv)
        if record:
            carry += (torch.zeros(record, 5, dtype=torch.float64, device=y0.device), y0.new_zeros(record, 2 * n))

        def cond(*carry):
            return carry[2][6] == 0

        def attempts_body(*carry):
            # `unroll` attempts per loop iteration: the loop's condition (read on the host: a device sync on a GPU)
            # is checked once per `unroll` attempts; attempts after the solve ended leave the state as it was.
            for _ in range(unroll - 1):
                new = attempt(*carry)
                ended = carry[2][6] != 0
                carry = tuple(torch.where(ended, old, nw) for old, nw in zip(carry, new))
            new = attempt(*carry)
            if unroll == 1:
                return new
            ended = carry[2][6] != 0
            return tuple(torch.where(ended, old, nw) for old, nw in zip(carry, new))

        def attempt(z, sv, iv, *rec):
            times, stops = cv[:n_out], cv[n_out:n_out + n_stops]
            min_step, max_step = cv[-2], cv[-1]
            rtol_s, atol_s = tol[0:1] * math.sqrt(n), tol[1:2] * math.sqrt(n)
            direction = torch.where(times[-1] > times[0], 1.0, -1.0).to(torch.float64)
            one = torch.ones((), dtype=torch.float64, device=z.device)
            rows = torch.arange(2 + n_out, device=z.device).view(-1, 1)
            y, k1 = z[0:1], z[1:2]
            t, h_abs, prev, prev2, last_h = sv[0], sv[1], sv[2], sv[3], sv[4]
            out_i, stop_i, steps, rejected, attempts, status = iv[0], iv[1], iv[2], iv[3], iv[4], iv[5]
            next_stop = stops.index_select(0, stop_i.view(1)).view(())
            landing = (next_stop - t) * direction <= landing_reach(h_abs, times[0].abs() + times[-1].abs(), eps)
            h = torch.where(landing, next_stop - t, direction * h_abs)
            t1 = torch.where(landing, next_stop, t + h)
            y1, ks, hy = rk_stages(lambda tt, yy: f(tt, yy, t_dtype, state), t, h, y, k1, plan)
            habs_now = h.abs()
            if adaptive:
                err = stage_sum(ks, e_row)
                ratio = rms_ratio(err.unsqueeze(0), y, y1, rtol_s, atol_s).reshape(()).to(torch.float64) * habs_now
                finite = torch.isfinite(ratio)
                accept = ratio <= 1.0
            else:
                finite = torch.isfinite(y1).all()
                accept = finite
            # Next k1: the last stage for FSAL methods; dy/dt at the step end otherwise (fixed-step methods).
            f_end = ks[-1] if fsal else f(t1, y1, t_dtype, state)
            # Outputs inside (t, t1]: the method's dense output; a time equal to t1 is y1. Computed on the rows of
            # z (rows 0 and 1, y and k1, are masked out), so that the new z is one elementwise expression.
            tz = times.index_select(0, (rows.view(-1) - 2).clamp_min(0))
            mask = (rows.view(-1) - 2 >= out_i) & ((tz - t1) * direction <= 0) & accept
            val = dense_rows(plan, tz, t, t1, h, hy, y, y1, k1, f_end, ks)
            finished = accept & landing & (stop_i == n_stops - 1)
            if adaptive:
                new_h, prev, prev2 = pid.propose_tensor(habs_now, ratio, accept, prev, prev2)
                new_h = torch.where(new_h < min_step,
                                    torch.where((habs_now > min_step) & ~accept, min_step, -one), new_h)
                h_new = torch.minimum(new_h, max_step)
                t_new = torch.where(accept, t1, t)
                # The underflow rule (control.step_underflow_tensor), as the eager loop's.
                frozen = frozen_attempt(y, y1, h_new / habs_now, eps).view(()) & ~accept & finite
                under = step_underflow_tensor(t_new, h_new, eps, frozen)
                failed = under & ~finished
                status = torch.where(failed, torch.where(finite, _UNDERFLOW, _NON_FINITE), status)
                h_abs = torch.where(finished, h_abs, h_new)
            else:
                failed = ~finite
                status = torch.where(failed, _NON_FINITE, status)
            attempts = attempts + 1
            out_of_budget = (attempts >= iv[7]) & ~finished & ~failed
            status = torch.where(out_of_budget, _MAX_STEPS, status)
            done = finished | failed | out_of_budget
            z = torch.where(rows == 0, torch.where(accept, y1, y),
                            torch.where(rows == 1, torch.where(accept, f_end, k1),
                                        torch.where(mask.view(-1, 1), val, z)))
            sv = _pack([torch.where(accept, t1, t), h_abs, prev, prev2, torch.where(accept, h, last_h), habs_now])
            out_end = out_i + mask.sum()
            if rec:
                r, ry = rec
                at = (torch.arange(record, device=z.device).view(-1, 1) == steps) & accept
                row = _pack([t, h, t1, out_i.to(torch.float64), out_end.to(torch.float64)])
                rec = (torch.where(at, row.view(1, -1), r), torch.where(at, torch.cat([y, k1], 1), ry))
            iv = _pack([out_end, torch.where(accept & landing & ~finished, stop_i + 1, stop_i),
                        steps + accept.long(), rejected + (~accept).long(), attempts, status, done.long(), iv[7]])
            return (z, sv, iv, *rec)

        z, sv, iv, *rec = torch._higher_order_ops.while_loop(cond, attempts_body, carry)
        counters = torch.cat([sv[[0, 1, 4, 5]], h_first.view(1), iv[[2, 3, 4, 0, 5]].double()])
        return (z[2:], z[0:1], counters, *rec)

    options = LOOP_OPTIONS if device.type == "cpu" else None
    own = own_code(run)
    # Repeat calls run the compiled entries with their guards checked, without Dynamo's frame machinery (Entries).
    entries = Entries(own, n_outputs=3 + (2 if record else 0))
    compiled = torch.compile(own, backend=entries.backend(patched_inductor(options)), fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": _own_constant_guards})
    compiled.code = own.__code__  # to count Dynamo's compiled entries (recompilations)
    compiled.entries = entries
    return compiled


# The whole loop's closure variables that are the build's own constants: made by _build from the solver, the
# controller and the solve's static options (all part of the program's cache key) and never changed after: their
# guards (~200 of the whole loop's ~590 guard entries) are left out.
_own_constant_guards = constant_guard_filter(("plan", "e_row", "pid", "state_names", "unroll", "record", "order",
                                              "n_stops", "n_out", "fsal", "choose_first", "adaptive"))


def patched_inductor(options: dict | None) -> Callable:
    """A ``torch.compile`` backend: Inductor (``compile_fx`` with ``options``, as ``backend="inductor"`` with these
    options calls it) run inside the whole loop's lowering patches (:func:`vectorize_strided_loads`,
    :func:`library_tanh`, :func:`thin_products` with :data:`LOOP_THIN_INNER`, :func:`pooled_loop_buffers`). Dynamo
    calls it only when it compiles a program (a first call, a recompilation), so a call that runs a compiled program
    enters none of them (their entering and leaving cost ~20-80 us a call, a share of a small compiled solve)."""
    patches = dict(options or {})

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        with vectorize_strided_loads(), library_tanh(), thin_products(LOOP_THIN_INNER), pooled_loop_buffers():
            return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


def _pack(vals: list[Tensor]) -> Tensor:
    """``torch.stack(vals)`` of 0-dim tensors as one elementwise expression: the compiler writes it as a single
    buffer (a stack would add a view per element, each a tensor handle per loop iteration)."""
    idx = torch.arange(len(vals), device=vals[0].device)
    out = vals[-1].expand(len(vals))
    for i in range(len(vals) - 2, -1, -1):
        out = torch.where(idx == i, vals[i], out)
    return out


def combo_cols(w: list[Tensor], ks: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``sum_j w[j] * ks[j]`` with ``w[j]`` columns ``(m, 1)`` (float64) and ``ks[j]`` rows ``(1, n)``."""
    acc = None
    for wj, kj in zip(w, ks):
        if isinstance(wj, int):  # an all-zero column
            continue
        term = wj.to(dtype) * kj
        acc = term if acc is None else acc + term
    return acc



def _source_hash(obj: Any) -> str:
    """A hash of ``obj``'s source code (empty where the source cannot be read)."""
    try:
        text = inspect.getsource(obj)
    except (OSError, TypeError):
        text = ""
    return hashlib.sha256(text.encode()).hexdigest()


class LoopProducts(CustomGraphPass):
    """An Inductor post-grad pass (the CPU whole loop's ``post_grad_custom_post_pass``) on the matrix products
    ``addmm(bias, a, b)`` and ``mm(a, b)``, ``a`` of shape ``(m, k)`` and ``b`` of shape ``(k, n)``:

    * ``n <= cols`` and ``m > n`` (a batched field's last layer back to a small state): computed as ``(b^T a^T)^T``
      plus the bias, written once into a row-major ``(m, n)`` buffer. MKL's product with the short dimension first
      costs about half as much as ``addmm`` with its bias copy ((256, 64) x (64, 2), float64: ~3 vs ~7.5 us);
    * other ``addmm``: ``mm`` and then the bias added in place by a fused loop, instead of ATen copying the bias into
      the output before the product ((256, 64) x (64, 64): ~4 us of copy).

    Same products; a sum may round differently where the library sums in another order. Only on CPU tensors of a
    real floating dtype, with ``alpha = beta = 1``.

    Examples
    --------
    >>> import torch
    >>> g = torch.fx.symbolic_trace(lambda x: x + 1).graph
    >>> LoopProducts(8)(g)   # no product in this graph: left as it is
    """

    def __init__(self, cols: int):
        self.cols = cols

    def uuid(self) -> tuple:
        # Inductor's cache key: the pass's own source (a changed rule compiles anew) and its setting.
        return ("neurodyn.LoopProducts", _source_hash(type(self)), self.cols, ONEDNN_FLOAT32 and ONEDNN_MIN_MACS)

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._rewrite(graph)
        if ONEDNN_FLOAT32 and register_onednn_lowering():
            self._onednn(graph)

    def _onednn(self, graph: torch.fx.Graph) -> None:
        """Each product ``mm(a, b)`` of float32 CPU matrices of shapes ``(m, k)`` and ``(k, n)``, ``a`` row-major and
        ``b`` row-major or transposed row-major, with at least :data:`~neurodyn.compile.patches.ONEDNN_MIN_MACS`
        multiply-adds and :data:`ONEDNN_MIN_INNER` terms, as :func:`~neurodyn.compile.patches.onednn_mm` of ``a``
        and ``b.T`` (read row-major). ``b.T`` is read as it is where ``b`` is a transposed row-major matrix (``w.T``
        of a layer's weight ``w``, in the forward); otherwise a row-major copy of it is made once, after ``b``, for
        all of ``b``'s products (a weight read by every step's products in the backward). Weight gradients, whose
        left factor is a transposed matrix, stay ATen's: both their factors would need copies (measured slower)."""
        aten = torch.ops.aten
        made: dict = {}
        first = next((n for n in graph.nodes if n.op != "placeholder"), None)

        def transposed(x: torch.fx.Node) -> torch.fx.Node:
            inner = self._transpose_of(x)
            if inner is not None:
                return inner
            with graph.inserting_before(first) if x.op == "placeholder" else graph.inserting_after(x):
                tr = graph.call_function(aten.permute.default, (x, [1, 0]))
            tr.meta["val"] = self._val(x).permute(1, 0)
            return tr

        def row_major(x: torch.fx.Node) -> torch.fx.Node:
            if self._val(x).is_contiguous():
                return x
            if x not in made:
                with graph.inserting_after(x):
                    made[x] = graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
                made[x].meta["val"] = self._val(x).contiguous()
            return made[x]

        for node in list(graph.nodes):
            if not self._onednn_product(node):
                continue
            a, b = node.args
            va = self._val(a)
            with va.fake_mode if hasattr(va, "fake_mode") else contextlib.nullcontext():
                wt = row_major(transposed(b))
            with graph.inserting_before(node):
                prod = graph.call_function(torch.ops.neurodyn.onednn_mm.default, (a, wt))
            prod.meta["val"] = self._val(node)
            node.replace_all_uses_with(prod)
            graph.erase_node(node)

    @classmethod
    def _onednn_product(cls, node: Any) -> bool:
        """Whether ``node`` is a product that :meth:`_onednn` computes by oneDNN (where :data:`ONEDNN_FLOAT32` is
        set)."""
        if not (ONEDNN_FLOAT32 and node.op == "call_function" and node.target is torch.ops.aten.mm.default):
            return False
        va, vb = (cls._val(x) for x in node.args)
        if not (cls._plain(va, torch.float32) and cls._plain(vb, torch.float32) and va.is_contiguous()
                and (vb.is_contiguous() or vb.t().is_contiguous())):
            return False
        (m, k), n = va.shape, vb.shape[1]
        return k >= ONEDNN_MIN_INNER and m * k * n >= ONEDNN_MIN_MACS

    @staticmethod
    def _val(node: Any) -> Tensor | None:
        v = getattr(node, "meta", {}).get("val") if isinstance(node, torch.fx.Node) else None
        return v if isinstance(v, Tensor) else None

    @classmethod
    def _plain(cls, v: Tensor | None, dtype: torch.dtype | None = None) -> bool:
        return (v is not None and v.dim() == 2 and v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64)
                and (dtype is None or v.dtype == dtype) and all(isinstance(d, int) for d in v.shape))

    @staticmethod
    def _transpose_of(node: Any) -> Any:
        """The node ``x`` where ``node`` is ``permute(x, [1, 0])``, else None."""
        if (isinstance(node, torch.fx.Node) and node.op == "call_function"
                and node.target is torch.ops.aten.permute.default and list(node.args[1]) == [1, 0]):
            return node.args[0]
        return None

    def _rewrite(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        try:  # Inductor's layout request (private, so optional): without it the transposed product stays a view
            from torch._inductor.inductor_prims import force_stride_order
        except ImportError:
            force_stride_order = None
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
                continue
            if node.target is aten.addmm.default:
                if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
                    continue
                bias, a, b = node.args
            else:
                bias, (a, b) = None, node.args
            vals = [getattr(x, "meta", {}).get("val") for x in (a, b, node)]
            if not all(isinstance(v, Tensor) for v in vals):
                continue
            va, vb, vout = vals
            vbias = getattr(bias, "meta", {}).get("val") if bias is not None else None
            if not (va.dim() == 2 and vb.dim() == 2 and va.device.type == "cpu" and vb.device.type == "cpu"
                    and va.dtype in (torch.float32, torch.float64) and vb.dtype == va.dtype
                    and all(isinstance(d, int) for d in (*va.shape, *vb.shape))
                    and (bias is None or (isinstance(vbias, Tensor) and vbias.dtype == va.dtype))):
                continue
            if not (vb.shape[1] <= self.cols and va.shape[0] > vb.shape[1]):
                if bias is not None:  # a wider product: the bias added in place after it (no bias copy before)
                    with graph.inserting_before(node):
                        prod = graph.call_function(aten.mm.default, (a, b))
                        out = graph.call_function(aten.add.Tensor, (prod, bias))
                        prod.meta["val"] = out.meta["val"] = vout
                    node.replace_all_uses_with(out)
                    graph.erase_node(node)
                continue
            fake = va.fake_mode if hasattr(va, "fake_mode") else None
            with graph.inserting_before(node):
                bt = graph.call_function(aten.permute.default, (b, [1, 0]))
                at = graph.call_function(aten.permute.default, (a, [1, 0]))
                prod = graph.call_function(aten.mm.default, (bt, at))
                out = graph.call_function(aten.permute.default, (prod, [1, 0]))
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
                if fake is not None:
                    with fake:
                        bt.meta["val"] = vb.permute(1, 0)
                        at.meta["val"] = va.permute(1, 0)
                        prod.meta["val"] = torch.mm(bt.meta["val"], at.meta["val"])
                        tr = prod.meta["val"].permute(1, 0)
                        if bias is not None:
                            out.args[0].meta["val"] = tr
                            out.meta["val"] = tr + vbias
                        else:
                            out.meta["val"] = tr
            if force_stride_order is not None:
                # Written once into a row-major buffer: left as a transposed view, each consumer's fused loop (the
                # stage sums, the error estimate, the dense output) gathers the product's elements across its rows.
                with graph.inserting_after(out):
                    forced = graph.call_function(force_stride_order, (out, [vout.shape[1], 1]))
                if fake is not None:
                    with fake:
                        forced.meta["val"] = torch.empty_like(vout)
                out = forced
            node.replace_all_uses_with(out)
            graph.erase_node(node)


class ColumnSums(LoopProducts):
    """:class:`LoopProducts`, and column sums ``sum(x, [0])`` of a matrix ``x`` of shape ``(m, n)`` with
    ``m >= min_rows`` written as the product ``ones(1, m) @ x`` (the post-grad pass of the compiled blocks of steps
    under autograd, :mod:`neurodyn.compile.driven`). Their backward sums each layer's output gradient over the batch
    for the bias gradient; Inductor's CPU reduction over the leading dimension walks the matrix column strip by column
    strip (a strided pass per 8 columns), while the library product reads it row by row: (512, 128) float32, one core,
    ~13-18 us against ~26-33 us. Same sums in another order (rounding may differ). Only on 2-d CPU tensors of a real
    floating dtype without ``dtype=``.
    """

    def __init__(self, cols: int, min_rows: int):
        super().__init__(cols)
        self.min_rows = min_rows

    def uuid(self) -> tuple:
        return ("neurodyn.ColumnSums", _source_hash(LoopProducts), _source_hash(type(self)), self.cols,
                self.min_rows)

    def _rewrite(self, graph: torch.fx.Graph) -> None:
        super()._rewrite(graph)
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.sum.dim_IntList:
                continue
            x, dims = node.args[0], node.args[1]
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            vx, vout = getattr(x, "meta", {}).get("val"), node.meta.get("val")
            if not (isinstance(vx, Tensor) and isinstance(vout, Tensor) and "dtype" not in node.kwargs
                    and list(dims) in ([0], [-2]) and vx.dim() == 2 and vx.device.type == "cpu"
                    and vx.dtype in (torch.float32, torch.float64) and vx.is_contiguous()
                    and all(isinstance(d, int) for d in vx.shape) and vx.shape[0] >= self.min_rows):
                continue
            m, n = vx.shape
            fake = vx.fake_mode if hasattr(vx, "fake_mode") else None
            with graph.inserting_before(node):
                ones = graph.call_function(aten.full.default, ([1, m], 1.0),
                                           {"dtype": vx.dtype, "device": vx.device, "pin_memory": False})
                prod = graph.call_function(aten.mm.default, (ones, x))
                out = prod if keep else graph.call_function(aten.view.default, (prod, [n]))
                if fake is not None:
                    with fake:
                        ones.meta["val"] = torch.ones(1, m, dtype=vx.dtype, device=vx.device)
                        prod.meta["val"] = torch.mm(ones.meta["val"], vx)
                        if not keep:
                            out.meta["val"] = prod.meta["val"].view(n)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

class BlockProducts(ColumnSums):
    """:class:`ColumnSums` (and :class:`LoopProducts`' rules), and three rules for the matrix products of the compiled
    blocks of steps under autograd (their post-grad pass, forward and backward graphs; :mod:`neurodyn.compile.driven`),
    on 2-d CPU tensors of a real floating dtype:

    * ``weights``: products ``x @ w.T`` with ``w`` a graph input read by several products (a layer's weight,
      constant over the block's steps) read ``w.T`` from a row-major copy made once per block (MKL's
      plain-times-plain product is ~3% faster than with a transposed right operand); two such products of the same
      ``x`` (the drift's and the diffusion's first layers at one state) are one product with the two transposed
      weights side by side, ``x @ [w1.T, w2.T]``, sliced into the two results: ``x`` is read and packed once (the
      benchmark's (512, 64) x (64, 128) pair, float32, one core: ~196 us against ~205 us).
    * ``orient``: a weight gradient ``a^T b`` (``a`` of shape ``(k, m)`` and ``b`` of shape ``(k, n)`` row-major,
      ``k`` the batch, ``k > m > n``) is computed as ``(b^T a)^T``: MKL's transposed-times-plain product runs faster
      with the shorter output dimension first (``(512, 128)^T (512, 64)``, float32, one core of the AMD EPYC: ~112 us
      against ~102 us). The result is a transposed view; its consumers (the sums over the steps) read it so.
    * ``accumulate``: a sum ``p + a @ b`` (the product used by that sum only, same shape and dtype, no broadcasting,
      through reshapes of the product) is one ``addmm(p, a, b)``: the library product adds onto a copy of ``p``
      (``beta = 1``) instead of zeroing its output first, and no separate pass adds the two. A chain of such sums
      -- a weight's gradient summed over the steps of a block -- becomes a chain of products each adding onto the
      last, in the orientation of the ``orient`` rule where its terms are transposed views.

    Same products and sums in another order (rounding may differ).
    """

    def __init__(self, cols: int, min_rows: int, orient: bool = True, accumulate: bool = True,
                 accumulate_views: bool = True, weights: bool = True):
        super().__init__(cols, min_rows)
        self.orient, self.accumulate, self.accumulate_views = orient, accumulate, accumulate_views
        self.weights = weights

    def uuid(self) -> tuple:
        return ("neurodyn.BlockProducts", _source_hash(LoopProducts), _source_hash(ColumnSums),
                _source_hash(type(self)), self.cols, self.min_rows, self.orient, self.accumulate,
                self.accumulate_views, self.weights)

    def _rewrite(self, graph: torch.fx.Graph) -> None:
        super()._rewrite(graph)
        if self.weights:
            self._weights(graph)
        if self.orient:
            self._orient(graph)
        if self.accumulate:
            self._accumulate(graph)

    def _weights(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        groups: dict = {}
        uses: dict = {}
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not aten.mm.default:
                continue
            lhs, rhs = node.args
            w = self._transpose_of(rhs)
            vw, vl = self._val(w), self._val(lhs)
            if not (isinstance(w, torch.fx.Node) and w.op == "placeholder" and self._plain(vw) and vw.is_contiguous()
                    and self._plain(vl, vw.dtype)):
                continue
            groups.setdefault(lhs, []).append((node, w))
            uses[w] = uses.get(w, 0) + 1
        # Only weights read by several products (the steps of a block): one copy then serves them all.
        groups = {lhs: kept for lhs, prods in groups.items() if (kept := [p for p in prods if uses[p[1]] > 1])}
        made: dict = {}
        for prods in groups.values():
            while prods:
                pair = prods[:2]
                if len(pair) == 2 and (self._val(pair[0][1]).shape[1] != self._val(pair[1][1]).shape[1]
                                       or pair[0][1] is pair[1][1]):
                    pair = pair[:1]
                prods = prods[len(pair):]
                self._fuse_weights(graph, pair, made)

    def _fuse_weights(self, graph: torch.fx.Graph, pair: list, made: dict) -> None:
        """The products ``lhs @ w.T`` of ``pair`` (one or two, sharing ``lhs``; ``w`` a graph input) as one product
        of ``lhs`` with the transposed weights side by side in a row-major matrix, made once per graph (at its top;
        shared by every step's products), then column slices of the result."""
        aten = torch.ops.aten
        ws = tuple(w for _, w in pair)
        vws = [self._val(w) for w in ws]
        node0 = pair[0][0]
        lhs = node0.args[0]
        fake = vws[0].fake_mode if hasattr(vws[0], "fake_mode") else None
        rhs = made.get(ws)
        if rhs is None:
            # Made from graph inputs only: placed before the graph's first computation, ahead of every product.
            top = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(top):
                ts = [graph.call_function(aten.permute.default, (w, [1, 0])) for w in ws]
                if len(ts) == 2:
                    rhs = graph.call_function(aten.cat.default, (ts, 1))
                else:
                    rhs = graph.call_function(aten.clone.default, (ts[0],), {"memory_format": torch.contiguous_format})
            if fake is not None:
                with fake:
                    for t, vw in zip(ts, vws):
                        t.meta["val"] = vw.permute(1, 0)
                    rhs.meta["val"] = (torch.cat([t.meta["val"] for t in ts], 1) if len(ts) == 2
                                       else ts[0].meta["val"].contiguous())
            made[ws] = rhs
        with graph.inserting_before(node0):
            prod = graph.call_function(aten.mm.default, (lhs, rhs))
            outs, start = [], 0
            for _, w in pair:
                n = self._val(w).shape[0]
                outs.append(graph.call_function(aten.slice.Tensor, (prod, 1, start, start + n))
                            if len(pair) == 2 else prod)
                start += n
        if fake is not None:
            with fake:
                prod.meta["val"] = torch.mm(self._val(lhs), rhs.meta["val"])
                start = 0
                for o, (_, w) in zip(outs, pair):
                    n = self._val(w).shape[0]
                    if o is not prod:
                        o.meta["val"] = prod.meta["val"][:, start:start + n]
                    start += n
        for o, (node, _) in zip(outs, pair):
            node.replace_all_uses_with(o)
            graph.erase_node(node)

    def _orient(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.mm.default:
                continue
            a, b = node.args
            x = self._transpose_of(a)
            vx, vb, vout = self._val(x), self._val(b), self._val(node)
            if not (self._plain(vx) and self._plain(vb, vx.dtype) and self._plain(vout) and vx.is_contiguous()
                    and vb.is_contiguous()):
                continue
            k, m = vx.shape
            n = vb.shape[1]
            if not (k > m > n):
                continue
            fake = vx.fake_mode if hasattr(vx, "fake_mode") else None
            with graph.inserting_before(node):
                bt = graph.call_function(aten.permute.default, (b, [1, 0]))
                prod = graph.call_function(aten.mm.default, (bt, x))
                out = graph.call_function(aten.permute.default, (prod, [1, 0]))
            if fake is not None:
                with fake:
                    bt.meta["val"] = vb.permute(1, 0)
                    prod.meta["val"] = torch.mm(bt.meta["val"], vx)
                    out.meta["val"] = prod.meta["val"].permute(1, 0)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def _accumulate(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        views = (aten.reshape.default, aten.view.default)
        order = {node: i for i, node in enumerate(graph.nodes)}

        def single(node: Any) -> bool:
            return isinstance(node, torch.fx.Node) and len(node.users) == 1

        def product(q: Any) -> tuple | None:
            """``(mm node, transposed, reshaped)`` where ``q`` is a product used once (through one reshape or one
            transpose, themselves used once), else None."""
            reshaped = False
            if self.accumulate_views and isinstance(q, torch.fx.Node) and q.op == "call_function" \
                    and q.target in views and single(q):
                q, reshaped = q.args[0], True
            transposed = False
            x = self._transpose_of(q)
            if not reshaped and x is not None and single(q):
                q, transposed = x, True
            # (Not a product oneDNN computes: its add stays a fused pass, cheaper than MKL's product with it.)
            if (isinstance(q, torch.fx.Node) and q.op == "call_function" and q.target is aten.mm.default
                    and single(q) and not self._onednn_product(q)):
                return q, transposed, reshaped
            return None

        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs or len(node.args) != 2:
                continue
            vout = self._val(node)
            if vout is None or vout.device.type != "cpu" or vout.dtype not in (torch.float32, torch.float64):
                continue
            lhs, rhs = node.args
            vl, vr = self._val(lhs), self._val(rhs)
            if vl is None or vr is None or vl.shape != vout.shape or vr.shape != vout.shape \
                    or vl.dtype != vout.dtype or vr.dtype != vout.dtype:
                continue
            picks = [(q, p, product(q)) for q, p in ((rhs, lhs), (lhs, rhs))]
            picks = [c for c in picks if c[2] is not None]
            if not picks:
                continue
            # The product computed last (the other term then exists before it), in graph order.
            q, p, (mm, transposed, reshaped) = max(picks, key=lambda c: order.get(c[2][0], -1))
            a, b = mm.args
            vmm, vp = self._val(mm), self._val(p)
            if not (self._plain(vmm, vout.dtype) and self._plain(self._val(a), vout.dtype)
                    and self._plain(self._val(b), vout.dtype)):
                continue
            if transposed:
                p0 = self._transpose_of(p)
                vp0 = self._val(p0)
                if not (self._plain(vp0, vout.dtype) and vp0.shape == vmm.shape and vp0.is_contiguous()):
                    continue
            elif reshaped:
                if not vp.is_contiguous():
                    continue
            elif not self._plain(vp):
                continue
            fake = vmm.fake_mode if hasattr(vmm, "fake_mode") else None
            with graph.inserting_before(node):
                if transposed:
                    base = p0
                elif reshaped:
                    base = graph.call_function(aten.reshape.default, (p, list(vmm.shape)))
                else:
                    base = p
                acc = graph.call_function(aten.addmm.default, (base, a, b))
                if transposed:
                    out = graph.call_function(aten.permute.default, (acc, [1, 0]))
                elif reshaped:
                    out = graph.call_function(aten.reshape.default, (acc, list(vout.shape)))
                else:
                    out = acc
            if fake is not None:
                with fake:
                    vbase = self._val(p0) if transposed else (vp.reshape(vmm.shape) if reshaped else vp)
                    if reshaped:
                        base.meta["val"] = vbase
                    acc.meta["val"] = torch.addmm(vbase, self._val(a), self._val(b))
                    if transposed:
                        out.meta["val"] = acc.meta["val"].permute(1, 0)
                    elif reshaped:
                        out.meta["val"] = acc.meta["val"].reshape(vout.shape)
            order[acc] = order[node]
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            if q is not mm:
                graph.erase_node(q)
            graph.erase_node(mm)


class SaveSigmoids(CustomGraphPass):
    """A pass over the joint forward-backward graph of a compiled block under autograd (:mod:`neurodyn.compile.driven`,
    before AOTAutograd splits it): each ``sigmoid`` of the forward (a node no tangent flows into) of a CPU float tensor
    is marked to be kept for the backward. By default the partitioner keeps the sigmoid's input instead (the same
    size) and computes the ``sigmoid`` again in the backward for its derivative ``s (1 - s)``: one more ``exp`` per
    element (the partitioner may then keep ``s (1 - s)``, computed in the forward's fused kernel). Same values."""

    def uuid(self) -> tuple:
        return ("neurodyn.SaveSigmoids", _source_hash(type(self)))

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch.utils.checkpoint import CheckpointPolicy
        backward: set = set()
        for node in graph.nodes:
            if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
                    a in backward for a in node.all_input_nodes):
                backward.add(node)
        for node in graph.nodes:
            v = node.meta.get("val")
            if (node.op == "call_function" and node.target is torch.ops.aten.sigmoid.default
                    and node not in backward and isinstance(v, Tensor) and v.device.type == "cpu"
                    and v.dtype in (torch.float32, torch.float64) and "recompute" not in node.meta):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


# The whole loop's options: CPU_OPTIONS, with the thin-product rule named (as CPU_OPTIONS names its own changes) and the
# library products' pass.
LOOP_OPTIONS = {**CPU_OPTIONS, "post_grad_fusion_options": {"decompose_mm_pass": {
    **CPU_OPTIONS["post_grad_fusion_options"]["decompose_mm_pass"], "neurodyn_loop_thin_inner": LOOP_THIN_INNER}},
    "post_grad_custom_post_pass": LoopProducts(LOOP_THIN_OUTPUTS)}
# Column sums of at least this many rows as library products in the compiled blocks of steps (ColumnSums).
GRAPH_SUM_ROWS = 128
# Inductor's C++ kernels compiled with floating-point contraction (-ffp-contract=fast: a product and a sum one fused
# multiply-add where the CPU has them, rounded once instead of twice). The float32 tanh formula (patches.tanh_formula:
# two Horner polynomials) is compute-bound on an AVX2 CPU: with contraction a (512, 128) bias + tanh kernel took ~42 us
# against ~56 us, its accuracy against float64 tanh max 3.1e-7 relative (5.1 ulp) against 3.4e-7 (5.7 ulp) without.
CONTRACT_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}
# The compiled blocks' options (forward and backward under autograd): LOOP_OPTIONS with BlockProducts (ColumnSums' rules
# and the blocks' product rules), SaveSigmoids on the joint graph, and contraction (CONTRACT_OPTIONS).
GRAPH_OPTIONS = {**LOOP_OPTIONS, "post_grad_custom_post_pass": BlockProducts(LOOP_THIN_OUTPUTS, GRAPH_SUM_ROWS),
                 "joint_custom_post_pass": SaveSigmoids(), **CONTRACT_OPTIONS}
# The compiled driven loop's options (compile.driven: the SDE methods' fixed steps without an autograd graph):
# LOOP_OPTIONS with contraction (CONTRACT_OPTIONS), as its compiled blocks under autograd have it. (The ODE loops keep
# LOOP_OPTIONS: their results are compared with the eager solve's to their own tolerances.)
DRIVEN_OPTIONS = {**LOOP_OPTIONS, **CONTRACT_OPTIONS}



def _give_up(per_func: dict, why: str) -> None:
    per_func[_FALLBACK] = True
    warnings.warn(f"compile=True: the solve loop {why}; stepping from Python with compiled steps instead (for this "
                  f"vector field). Common causes: Python side effects in the vector field (counters, lists, prints: "
                  f"they cannot run inside a compiled loop; sol.stats['nfe'] counts evaluations), or views of its "
                  f"tensors made inside it, such as `y @ self.w.T` (keep the transposed tensor as an attribute "
                  f"instead).", RuntimeWarning, stacklevel=5)


def module_state(func: Callable) -> dict[str, Tensor]:
    """The parameters and buffers of ``func`` (an ``nn.Module``; none otherwise) by name, in a fixed order."""
    if not isinstance(func, torch.nn.Module):
        return {}
    # Detached: no graph is recorded, and requires_grad flags toggled between solves must not recompile the loop.
    return {name: v.detach() for name, v in module_tensors(func)}


_MODULE = torch.nn.Module


def module_tensors(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """``[*module.named_parameters(), *module.named_buffers()]``: the same names, tensors and order, from one walk of
    ``named_modules()`` (the two methods walk it once each), where ``module``'s class keeps ``nn.Module``'s own
    ``named_parameters``, ``named_buffers`` and ``_named_members``; otherwise by calling them."""
    cls = type(module)
    if cls.named_parameters is not _MODULE.named_parameters or cls.named_buffers is not _MODULE.named_buffers \
            or cls._named_members is not _MODULE._named_members:
        return [*module.named_parameters(), *module.named_buffers()]
    modules = list(module.named_modules())
    out = []
    for kind in ("_parameters", "_buffers"):
        memo: set = set()  # as _named_members: a tensor held twice is listed once, under its first name
        for prefix, m in modules:
            for k, v in getattr(m, kind).items():
                if v is None or v in memo:
                    continue
                memo.add(v)
                out.append((prefix + ("." if prefix else "") + k, v))
    return out


def module_values(func: Callable) -> list[Tensor]:
    """The values of :func:`module_state` (the detached parameters and buffers of ``func``, in the same order),
    without their names: the whole loop's inputs. Where every module of the tree keeps ``nn.Module``'s own
    ``named_modules``, ``named_parameters``, ``named_buffers`` and ``_named_members``, from one walk of the tree in
    ``named_modules``' order (depth first, children in order, a module or tensor held twice taken at its first
    place) with no name strings built; otherwise from :func:`module_state`."""
    if not isinstance(func, _MODULE):
        return []
    seen: set = set()
    params: list = []
    buffers: list = []
    stack = [func]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        cls = type(m)
        if cls.named_modules is not _NAMED_MODULES or cls.named_parameters is not _NAMED_PARAMETERS \
                or cls.named_buffers is not _NAMED_BUFFERS or cls._named_members is not _NAMED_MEMBERS:
            return list(module_state(func).values())
        seen.add(m)
        params += m._parameters.values()
        buffers += m._buffers.values()
        children = m._modules
        if children:
            stack += reversed([c for c in children.values() if c is not None])
    out = []
    for group in (params, buffers):
        memo: set = set()
        for v in group:
            if v is not None and v not in memo:
                memo.add(v)
                out.append(v.detach())
    return out


_NAMED_MODULES, _NAMED_PARAMETERS = _MODULE.named_modules, _MODULE.named_parameters
_NAMED_BUFFERS, _NAMED_MEMBERS = _MODULE.named_buffers, _MODULE._named_members


def column_major_copy(x: Tensor) -> Tensor:
    """A matrix ``(r, c)`` as a copy stored column by column (strides ``(1, r)``; same values); other tensors as they
    are. A one-row state times ``W.T`` (``nn.Linear``) then reads ``W`` down its columns: Inductor's CPU code
    accumulates whole vectors of outputs instead of one horizontal sum per output (~17% less per evaluation of the
    small protocol field, float64, one core). Made inside the compiled whole loop's program as a layout request
    (``inductor_prims.force_stride_order``): Inductor writes the copy once, before the loop (written as
    ``x.t().contiguous().t()`` the copy was fused into the loop's kernels and made again at every attempt)."""
    return force_stride_order(x, [1, x.shape[0]]) if x.dim() == 2 else x


def batch_column_major(x: Tensor) -> Tensor:
    """For a batched state: a matrix ``(r, c)`` with ``r > LOOP_THIN_OUTPUTS`` as :func:`column_major_copy` where it
    is a first layer of a few inputs (``c <= LOOP_THIN_INNER``: a fused loop, which then reads ``W.T`` along its rows),
    and, where MKL runs on an Intel CPU (:data:`~neurodyn.compile.patches.MKL_ON_INTEL`), whatever ``c``; other
    tensors as they are. There ``nn.Linear``'s ``h @ W.T`` then reaches MKL as a product of two row-major matrices (its
    ``NN`` kernel: the batched protocol field's (256, 64) x (64, 64) layer 0.79-0.92x the time, bit-equal products;
    ~3.5% of that case's compiled solve). On other CPUs MKL's generic code is the slower one with ``NN`` (AMD EPYC,
    AVX2, float64, one core: 78 against 67 us for that product; the compiled solve ~7% slower), so a wide ``W`` stays
    row-major. A layer back to a small state (``r <= LOOP_THIN_OUTPUTS``) keeps its row-major ``W``, the left operand
    of :class:`LoopProducts`' transposed product."""
    if x.dim() != 2 or x.shape[0] <= LOOP_THIN_OUTPUTS:
        return x
    return column_major_copy(x) if x.shape[1] <= LOOP_THIN_INNER or MKL_ON_INTEL else x


def matrix_layout(shape: tuple[int, ...], device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """How the compiled whole loop lays out the field's tensors for a state of ``shape`` on ``device`` (applied inside
    the compiled program, before its loop): on the CPU :func:`column_major_copy` for a state of one row (every
    matrix), :func:`batch_column_major` for a batch of rows; elsewhere, or where torch lacks the layout request, None
    (as they are)."""
    if device.type != "cpu" or force_stride_order is None:
        return None
    return column_major_copy if math.prod(shape[:-1]) == 1 else batch_column_major


def _tolerances(cache: dict, rtol: float | Tensor, atol: float | Tensor, y0: Tensor) -> Tensor:
    """rtol and atol as the rows of one ``(2, n)`` tensor of the state's dtype (float pairs cached per field)."""
    n = y0.shape[1]
    if isinstance(rtol, Tensor) or isinstance(atol, Tensor):
        return torch.cat([torch.as_tensor(v, dtype=y0.dtype, device=y0.device).expand(1, n) for v in (rtol, atol)])
    key = ("tol", rtol, atol, n, y0.dtype, y0.device)
    tol = cache.get(key)
    if tol is None:
        with ordinary_tensors():  # kept for later calls, with or without autograd
            tol = cache[key] = torch.tensor([[rtol] * n, [atol] * n], dtype=y0.dtype, device=y0.device)
    return tol


def _inputs(per_func: dict, key: tuple, times: list[float], stops: list[float], first: float | None, min_step: float,
            max_step: float, max_steps: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The compiled loop's inputs ``cv`` (float64: the output times, the stops, the first step or inf, ``min_step``,
    ``max_step``) and ``iv`` (int64: the integer state's start, ``max_steps`` last). The last pair made for ``key`` is
    kept in ``per_func`` and reused while the values are the same (zeros with the same sign): the program only reads
    them (no input is written; an outcome's ``times`` is a view of ``cv``, read by the compiled backward)."""
    vals = (*times, *stops, first if first is not None else math.inf, min_step, max_step, max_steps)
    signs = tuple(math.copysign(1.0, v) for v in vals if v == 0)  # -0.0 == 0.0, but not bit for bit
    slot = ("inputs", key)
    kept = per_func.get(slot)
    if kept is not None and kept[0] == vals and kept[1] == signs:
        return kept[2], kept[3]
    with ordinary_tensors():  # kept for later calls, with or without autograd (the compiled backward reads cv)
        cv = torch.tensor(vals[:-1], dtype=torch.float64, device=device)
        iv = torch.tensor([1, 0, 0, 0, 0, 0, 0, max_steps], dtype=torch.int64, device=device)
    per_func[slot] = (vals, signs, cv, iv)
    return cv, iv


class LoopOutcome:
    """What a compiled loop returns to :func:`neurodyn.core.loop.integrate` (internal)."""

    __slots__ = ("ys", "y_final", "t_final", "next_step", "last_step", "last_try", "initial_step", "steps",
                 "rejected", "attempts", "n_valid", "status", "rec", "times", "nfe", "key", "variants")

    def __init__(self):
        self.nfe = None  # evaluations of the field where the loop counted them (else the loop's rule from attempts)


def compiled_loop(solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device, adaptive: bool, interp: str, controller: PIDController,
                  choose_first: bool) -> Callable | None:
    """A function ``run(times, stops, y0, k0, first, rtol, atol, min_step, max_step, max_steps, record=0) ->
    LoopOutcome | None`` running the whole loop compiled (compiled on first use for each number of output times and
    stops), without an autograd graph; it returns None where compilation failed (warned once per vector field; the
    caller then steps in Python). With ``record`` > 0 the outcome's ``rec`` holds the first ``record`` accepted steps
    (see :mod:`neurodyn.compile.train`); ``state``: :func:`module_state` of the field where the caller has it.
    ``compiled_loop`` itself returns None where the whole loop is not supported.

    The loop evaluates ``dy/dt`` at ``(times[0], y0)`` itself. ``k0``: that derivative as the caller evaluated and
    checked it (shape, dtype, device, NaN/inf), or None where the caller left it unevaluated: then the loop runs only
    where every compiled variant of its program (one per Python state of the field, Dynamo's guards) has run before
    with ``k0`` given and been :func:`verified <verify>` (the field's output checked for that state), and returns
    None otherwise (also when this call compiled a new variant: the caller evaluates ``k0`` and calls again). The
    outcome's ``key`` and ``variants`` say which program ran and how many variants it had (for :func:`verify`)."""
    if not supports(solver, adaptive, controller) or dtype not in (torch.float32, torch.float64):
        return None
    try:
        per_func = _CACHE.setdefault(func, {})
    except TypeError:  # not weak-referenceable: cache on nothing (compiles per solve)
        per_func = {}
    if per_func.get(_FALLBACK):
        return None
    base_key = (solver.name, tuple(shape), dtype, device, adaptive, interp, choose_first, UNROLL, UNROLL_ACCELERATOR,
                (controller.pcoeff, controller.icoeff, controller.dcoeff, controller.safety, controller.ifactor,
                 controller.dfactor, controller.accept_dfactor))

    def call(times, stops, y0, k0, first, rtol, atol, min_step, max_step, max_steps,
             record: int = 0, state: dict | None = None) -> LoopOutcome | None:
        if per_func.get(_FALLBACK):
            return None
        key = (base_key, len(times), len(stops), record)
        fn = per_func.get(key)
        if fn is None:
            if k0 is None:
                return None  # nothing compiled yet: the caller evaluates dy/dt at t0 and calls again
            fn = per_func[key] = _build(solver, func, shape, adaptive, interp, controller, choose_first, device,
                                        len(times), len(stops), record)
        cache = fn.entries.cache()  # Dynamo's compiled variants of the program, before this call
        if k0 is None and per_func.get(("verified", key)) != len(cache):
            return None  # not every variant verified: the caller evaluates dy/dt at t0 and calls again
        cv, iv = _inputs(per_func, key, times, stops, first, min_step, max_step, max_steps, device)
        tol = _tolerances(per_func, rtol, atol, y0)
        try:
            # (the lowering patches apply where Dynamo compiles: patched_inductor)
            with torch.no_grad() if torch.is_grad_enabled() else _GRAD_OFF:
                tensors = module_values(func) if state is None else state.values()
                args = (cv, y0.detach(), tol, iv, *tensors)
                out = fn.entries(args, cache)
                ys, y_final, counters, *rec = fn(*args) if out is None else out
        except Exception as exc:  # compilation failed: Python steps from now on, for this field
            # Dynamo's messages: a headline (for higher-order operators a generic one ending in ':'), then the
            # specific reason on the next line.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else ""
            _give_up(per_func, f"could not be compiled as a whole ({type(exc).__name__}: {reason[:200]})")
            return None
        variants = len(cache) if out is not None else len(fn.entries.cache())  # (Dynamo's call may have compiled)
        if k0 is None and variants != per_func[("verified", key)]:
            return None  # compiled a new variant: not verified (the caller evaluates dy/dt at t0 and calls again)
        if variants > _MAX_VARIANTS:
            # Recompiled again and again: Python state the field reads changes between solves (a counter it
            # increments, say). This result is right, but every solve would compile anew: compiled steps from now on
            # (their guards and recompilations are per step, and cheap).
            _give_up(per_func, "was compiled again because Python state of the vector field changed between "
                               "solves")
        vals = counters.tolist()  # the one read back to the host
        o = LoopOutcome()
        o.t_final, h_abs, last_h, o.last_try, o.initial_step = vals[:5]
        o.steps, o.rejected, o.attempts, o.n_valid, code = (int(v) for v in vals[5:])
        o.status = _sol.STATUSES[code]
        o.next_step = h_abs if math.isfinite(h_abs) and h_abs > 0 else None
        o.last_step = abs(last_h)
        o.ys, o.y_final = ys, y_final
        o.rec = tuple(rec)
        o.times = cv[:len(times)] if record else None  # (read by a recorded solve's backward only)
        o.key, o.variants = key, variants
        if k0 is not None and not record:  # the caller checked k0, and nothing else is to be checked here
            verify(per_func, o)
        return o

    call.per_func, call.base_key = per_func, base_key
    return call


_GRAD_OFF = contextlib.nullcontext()  # (grad mode already off: nothing to enter)


def verify(per_func: dict, o: LoopOutcome) -> None:
    """Note that the compiled variant the loop outcome ``o`` came from passed the caller's checks (``dy/dt`` at the
    initial time evaluated eagerly and checked, and for a recorded solve :mod:`neurodyn.compile.train`'s checks): once
    every variant of the program has passed, solves may leave ``k0`` unevaluated (see :func:`compiled_loop`). A
    variant is a program compiled for one Python state of the field (Dynamo's guards: its attributes, ``training``
    flag, the ``requires_grad`` flags of tensors it captures), so a check passed once holds for every call of it.
    Only where at most one variant is new since the last verification (the one this call ran: compiled by it, or by
    an unverified call just before)."""
    slot = ("verified", o.key)
    if per_func.get(slot, 0) >= o.variants - 1:
        per_func[slot] = o.variants
