"""Compiled training steps: the compiled whole loop where an autograd graph is recorded (``compile=True`` with
``gradient="direct"`` or ``"checkpoint"``).

Forward: the whole loop of :mod:`neurodyn.compile.loop`, compiled, without an autograd graph, keeping every accepted
step -- its start ``(t, y)``, size ``h``, end time ``t1``, the ``k1 = dy/dt`` it started from and the output rows it
wrote -- in two preallocated tensors. Backward: one more compiled ``while_loop`` runs over the kept steps, last
first, and pulls the cotangents back through each step with ``torch.func.vjp`` of the same step (stages, FSAL
stage, dense output at the output times): no Python per step or per stage in either direction. The gradient is
the discrete one ``gradient="direct"`` computes (the steps are the same; the rounding of the stage sums differs),
with respect to ``y0`` and the parameters and buffers of the vector field. The first ``dy/dt`` at ``t0`` is evaluated
inside the compiled forward and pulled back inside the compiled backward: once verified, a training step makes no
eager call of the field and no autograd node of its own besides the recorded solve's.

A field that draws random numbers (dropout in training mode, noise) is noticed by the random generator's state
moving during a compiled forward solve; that solve and later ones of the field step in Python instead (a replay
would draw other numbers, and the gradient would be another forward pass's). That check, and the check that the
field's tensors requiring grad are its own, run on the solves that evaluate ``dy/dt`` at ``t0`` eagerly: the first
one of each compiled variant of the program (:func:`neurodyn.compile.loop.verify`).

It applies where the compiled whole loop does (:func:`neurodyn.compile.loop.supports`, the state-size rule of
:func:`neurodyn.compile.loop.worthwhile`), for ``nn.Module`` vector fields whose tensors needing gradients are
their own parameters (or buffers) -- checked on the graph of ``dy/dt`` at ``t0``; elsewhere (a closure, a captured
tensor requiring grad) the solve steps in Python with compiled steps, as before. The backward pass cannot be
differentiated again (``create_graph=True`` raises; use ``compile=False`` for second derivatives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..solvers.explicit_rk import ExplicitRungeKutta
from .loop import (
    CPU_OPTIONS,
    StepPlan,
    dense_rows,
    field_rows,
    module_state,
    pooled_loop_buffers,
    rk_stages,
    thin_products,
    vectorize_strided_loads,
    verify,
)
from .step import own_code

# Accepted steps kept per solve at first; a solve that takes more is run again with compiled steps, and the next
# solve of the field keeps 4x as many (one more compilation).
FIRST_CAPACITY = 256
# At most this many kept elements (capacity x (2n + 5)): the forward rewrites the whole record every attempt (one
# elementwise select, static shapes), which for larger states costs more than the Python per step it saves.
MAX_RECORD_ELEMENTS = 32768


def capacity(per_func: dict, base_key: tuple, func: Callable, y0: Tensor, k0: Tensor,
             named: dict[str, Tensor] | None = None) -> int | None:
    """How many accepted steps a recorded solve of ``func`` from ``y0`` keeps, or None where the compiled training
    step does not apply (not an ``nn.Module``, a tensor requiring grad outside the module, a state too large);
    ``named``: the module's parameters and buffers by name, where the caller has them."""
    if not isinstance(func, torch.nn.Module) or not own_tensors_only(func, y0, k0, named):
        return None
    cap = per_func.get(("record", base_key), FIRST_CAPACITY)
    if cap * (2 * y0.shape[1] + 5) > MAX_RECORD_ELEMENTS:
        return None
    return cap


def grow(per_func: dict, base_key: tuple, steps: int) -> None:
    """A recorded solve took ``steps`` accepted steps, more than it kept: keep more from the next solve on."""
    cap = per_func.get(("record", base_key), FIRST_CAPACITY)
    while cap < steps:
        cap *= 4
    per_func[("record", base_key)] = cap


def own_tensors_only(func: torch.nn.Module, y0: Tensor, k0: Tensor, named: dict[str, Tensor] | None = None) -> bool:
    """Whether every leaf tensor requiring grad behind ``k0 = func(t0, y0)`` is a parameter or buffer of ``func``
    (``named``: those by name, where the caller has them) or lies behind ``y0`` (walks the autograd graph of ``k0``,
    not past ``y0``'s)."""
    if named is None:
        named = dict((*func.named_parameters(), *func.named_buffers()))
    mine = {id(x) for x in named.values()}
    behind_y0: set = set()
    stack = [y0.grad_fn] if y0.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in behind_y0:
            continue
        behind_y0.add(node)
        stack.extend(nf for nf, _ in node.next_functions if nf is not None)
    seen: set = set()
    stack = [k0.grad_fn] if k0.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen or node in behind_y0:
            continue
        seen.add(node)
        nexts = node.next_functions
        if nexts:
            stack.extend(nf for nf, _ in nexts if nf is not None)
        else:
            var = getattr(node, "variable", None)
            if var is not None and id(var) not in mine and var is not y0:
                return False
    return True


def build_backward(solver: ExplicitRungeKutta, func: torch.nn.Module, shape: tuple[int, ...], interp: str,
                   device: torch.device, n_times: int) -> Callable:
    """The compiled backward pass of a recorded solve: ``run(rec, rec_y, last, times, g_ys, g_final, t_like, y0,
    *tensors) -> (g_y0, *g_tensors)`` (``tensors``: the module's floating-point parameters and buffers, in
    :func:`neurodyn.compile.loop.module_state` order; ``last``: index of the last kept step, int64; ``y0``: the
    initial state as a row). The cotangent reaching the first step's ``k1 = dy/dt(t0, y0)`` (evaluated inside the
    compiled forward) is pulled back through that evaluation here too."""
    plan = StepPlan(solver, interp, adaptive=False)
    f = field_rows(func, shape)
    names = list(module_state(func))
    n_out = n_times

    def run(rec: Tensor, rec_y: Tensor, last: Tensor, times: Tensor, g_ys: Tensor, g_final: Tensor, t_like: Tensor,
            y0: Tensor, *tensors: Tensor):
        n = g_ys.shape[1]
        t_dtype = t_like.dtype
        rows = torch.arange(n_out, device=g_ys.device).to(torch.float64)
        floating = [i for i, x in enumerate(tensors) if x.is_floating_point()]

        def cond(i, ay, ak, *g):
            return i >= 0

        def with_state(diff):
            vals = list(tensors)
            for j, x in zip(floating, diff):
                vals[j] = x
            return dict(zip(names, vals))

        def body(i, ay, ak, *g):
            r = rec.index_select(0, i.view(1)).view(5)
            t, h, t1, first, end = r[0], r[1], r[2], r[3], r[4]
            yk = rec_y.index_select(0, i.view(1))
            y, k1 = yk[:, :n], yk[:, n:]
            cot = torch.where(((rows >= first) & (rows < end)).view(-1, 1), g_ys, 0.0)

            def step(y, k1, diff):
                state = with_state(diff)

                def fs(tt, yy):
                    return f(tt, yy, t_dtype, state)

                y1, ks, hy = rk_stages(fs, t, h, y, k1, plan)
                f_end = ks[-1] if plan.fsal else fs(t1, y1)
                return y1, f_end, dense_rows(plan, times, t, t1, h, hy, y, y1, k1, f_end, ks)

            _, pull = torch.func.vjp(step, y, k1, tuple(tensors[j] for j in floating))
            gy, gk, gt = pull((ay, ak, cot))
            return (i - 1, gy, gk, *(a + b for a, b in zip(g, gt)))

        zero = g_final.new_zeros(1, n)
        out = torch._higher_order_ops.while_loop(cond, body, (last, g_final, zero,
                                                              *(torch.zeros_like(tensors[j]) for j in floating)))
        # The first step's k1 = f(t0, y0): its cotangent through that evaluation, to y0 and the tensors.
        _, pull = torch.func.vjp(lambda y, diff: f(times[0], y, t_dtype, with_state(diff)), y0,
                                 tuple(tensors[j] for j in floating))
        gy0, gt0 = pull(out[2])
        grads = [None] * len(tensors)
        for j, gj, g0 in zip(floating, out[3:], gt0):
            grads[j] = gj + g0
        return out[1] + gy0, *grads

    options = None
    if device.type == "cpu":
        # The thin-product rule (decompose_thin_products) is no Inductor setting: named in the options (as
        # loop.CPU_OPTIONS names its own), so that Inductor's cache of compiled graphs tells programs apart.
        marks = {**CPU_OPTIONS["post_grad_fusion_options"]["decompose_mm_pass"], "neurodyn_thin_inner": THIN_INNER}
        options = {**CPU_OPTIONS, "post_grad_fusion_options": {"decompose_mm_pass": marks}}
    return torch.compile(own_code(run), options=options, fullgraph=True)


class Recorded:
    """What the backward pass of one recorded solve needs (internal)."""

    __slots__ = ("backward", "rec", "rec_y", "steps", "times", "ys", "y_final", "n_valid", "tensors")


class _RecordedSolve(torch.autograd.Function):
    """Outputs ``(ys, y_final)`` of a recorded compiled solve, differentiable in ``y0`` and the tensors."""

    @staticmethod
    def forward(ctx, info: Recorded, y0: Tensor, *tensors: Tensor):
        ctx.info = info
        ctx.save_for_backward(y0)  # (an in-place change of y0 before the backward pass raises, as in eager mode)
        return info.ys, info.y_final

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ys: Tensor | None, g_final: Tensor | None):
        info: Recorded = ctx.info
        ys, y_final = info.ys, info.y_final
        g_ys = torch.zeros_like(ys) if g_ys is None else g_ys
        g_final = torch.zeros_like(y_final) if g_final is None else g_final
        last = torch.tensor(info.steps - 1, dtype=torch.int64, device=ys.device)
        with torch.no_grad(), vectorize_strided_loads(), decompose_thin_products(), pooled_loop_buffers():
            out = info.backward(info.rec, info.rec_y, last, info.times, g_ys.contiguous(), g_final.contiguous(),
                                info.times.new_zeros(0, dtype=ys.real.dtype if ys.is_complex() else ys.dtype),
                                ctx.saved_tensors[0].detach(), *info.tensors)
        g_y0 = out[0] + g_ys[0:1]
        return None, g_y0, *out[1:]


class decompose_thin_products(thin_products):
    """While compiling the backward pass on the CPU: :class:`~neurodyn.compile.loop.thin_products` with
    :data:`THIN_INNER` terms (the stages' gradients of one weight, outer products of a layer's cotangent and its input
    for a small state, then sum in one loop, with no call, output handle or copy per stage).

    Examples
    --------
    >>> decompose_thin_products().inner == THIN_INNER
    True
    """

    def __init__(self):
        super().__init__(THIN_INNER)


# Matrix products with at most this inner dimension are written as fused loops in the compiled backward pass
# (decompose_thin_products): the weight gradients of states up to this many rows.
THIN_INNER = 32


def attach(info: Recorded, y0: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(ys, y_final)`` of a recorded solve joined to the autograd graph of ``y0`` and ``params`` (the module's
    parameters and buffers, in ``info.tensors`` order)."""
    return _RecordedSolve.apply(info, y0, *params)



def trainable(loop: Callable, solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], interp: str,
              device: torch.device) -> Callable:
    """The compiled whole loop ``loop`` (:func:`neurodyn.compile.loop.compiled_loop`) made usable where a graph is
    recorded: same call, and where ``y0`` or ``k0`` require grad (with grad mode on) a recorded solve whose outputs
    ``ys`` and ``y_final`` are differentiable; None (the caller then steps in Python) where that does not apply or
    the solve took more steps than it kept.

    ``k0`` None (dy/dt at the initial time left to the compiled loop, see :func:`defers_start`): a recorded solve
    where grad mode is on, a plain one where it is off; None where a compiled variant has not been verified yet (the
    caller then evaluates ``k0`` and calls again). The checks of a recorded solve -- the field's tensors requiring
    grad are its own (on the graph of ``k0``), the field draws no random numbers -- run where ``k0`` is given; a
    variant of the compiled program that passed them is :func:`~neurodyn.compile.loop.verify`-ed and needs them no
    more."""
    per_func, base_key = loop.per_func, loop.base_key

    def run(times, stops, y0, k0, first, rtol, atol, min_step, max_step, max_steps):
        grad = torch.is_grad_enabled()
        if k0 is None:
            if not grad:
                return loop(times, stops, y0, None, first, rtol, atol, min_step, max_step, max_steps)
        elif not (grad and (y0.requires_grad or k0.requires_grad)):
            return loop(times, stops, y0, k0, first, rtol, atol, min_step, max_step, max_steps)
        if per_func.get(("random", base_key)) or not isinstance(func, torch.nn.Module):
            return None
        named = dict((*func.named_parameters(), *func.named_buffers()))  # as module_state orders them
        if k0 is None:
            cap = per_func.get(("record", base_key), FIRST_CAPACITY)
            if not (y0.requires_grad or any(x.requires_grad for x in named.values())) \
                    or cap * (2 * y0.shape[1] + 5) > MAX_RECORD_ELEMENTS:
                return None
        else:
            cap = capacity(per_func, base_key, func, y0, k0, named)
            if cap is None:
                return None
        state = {name: x.detach() for name, x in named.items()}
        before = _rng_state(y0.device) if k0 is not None else None
        o = loop(times, stops, y0, k0, first, rtol, atol, min_step, max_step, max_steps, record=cap, state=state)
        if o is None:
            return None
        if before is not None and not _same_state(before, _rng_state(y0.device)):
            # The field draws random numbers (dropout, noise): a replay in the backward pass would draw others.
            per_func[("random", base_key)] = True
            return None
        if o.steps > cap:
            grow(per_func, base_key, o.steps)
            return None
        if k0 is not None:
            verify(per_func, o)
        key = ("backward", base_key, len(times))
        backward = per_func.get(key)
        if backward is None:
            backward = per_func[key] = build_backward(solver, func, shape, interp, device, len(times))
        info = Recorded()
        info.backward, (info.rec, info.rec_y), info.steps, info.times = backward, o.rec, o.steps, o.times
        info.ys, info.y_final = o.ys, o.y_final
        info.tensors = list(state.values())
        o.ys, o.y_final = attach(info, y0, list(named.values()))
        return o

    def defers_start(y0: Tensor) -> bool:
        """Whether a solve from ``y0`` may leave dy/dt at the initial time to the compiled loop (``k0`` None): under
        ``torch.no_grad()``, or where ``y0`` or the field's parameters require grad (a recorded solve; elsewhere in
        grad mode a tensor the field captures might still need a graph, which only an eager evaluation shows)."""
        if not torch.is_grad_enabled():
            return True
        if per_func.get(("random", base_key)) or not isinstance(func, torch.nn.Module):
            return False
        return y0.requires_grad or any(p.requires_grad for p in func.parameters())

    run.differentiable = True
    run.defers_start = defers_start
    return run


def _rng_state(device: torch.device) -> tuple:
    """The random generators a compiled program draws its seeds from (the CPU one; the device's on a GPU)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _same_state(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))
