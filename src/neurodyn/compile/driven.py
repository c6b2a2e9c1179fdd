"""The compiled driven loop: ``solve(..., compile=True)`` for fixed-step methods whose steps read inputs queried on the
host (``driven`` steppers, :mod:`neurodyn.core.stepper`: the SDE methods, whose steps read the Brownian path's
increments and Levy areas).

A Brownian path is a Python object (a tree of intervals, a cache), which no compiled graph can query. But with fixed
steps the step grid is known before the solve, so the host queries each step's inputs first -- the same intervals the
eager loop queries, in order, so the same sample path to the last bit -- and stacks them; then one compiled
``torch._higher_order_ops.while_loop`` runs the steps between two output times: the stepper's own step formula
(``driven_step``, the eager step's code on tensors), the drift at the step end, the finiteness check. Drift and
diffusion evaluations, the method's stage combinations and the noise products are one graph, compiled by Inductor
with the CPU patches of :mod:`neurodyn.compile.loop` (large ``tanh`` as a library call or a fused formula,
strided-load vectorisation) and floating-point contraction (``loop.DRIVEN_OPTIONS``). The stacked inputs of one call
hold at most :data:`MAX_INPUT_ELEMENTS` elements: a longer solve runs in blocks of steps. Repeat calls of the loop (and
of the blocks below) run its compiled entries with their guards checked, without Dynamo's frame machinery
(:class:`~neurodyn.compile.entries.Entries`).

Where an autograd graph is recorded (``gradient="direct"``: ``y0``, the drift at ``t0`` or a parameter of the
drift's or diffusion's module requires grad, or a function is a closure) the steps run instead as compiled blocks of
:data:`GRAPH_BLOCK` steps (:data:`GRAPH_BLOCK_CHEAP` for a step of one drift and one diffusion evaluation) unrolled in
one graph (the same ``driven_step``, the same host-queried inputs), called with
grad mode on: AOTAutograd splits each block into a compiled forward that keeps what the backward needs (the hidden
activations of the networks, say: no step is recomputed) and one compiled backward, joined to autograd's graph, so
the gradients are the eager solve's (to rounding) with respect to ``y0``, the parameters and any tensor the functions
capture. The blocks of a method that is not FSAL evaluate the drift at each step's start themselves (the solve
evaluates none on the host: :meth:`DrivenPlugIn.defers_start`). Steps short of a whole block before an output time run
as one-step blocks. The compiled backward cannot be differentiated again (``create_graph=True``: use
``compile=False``).

It covers fixed-step solves (``step_size=``) without events, ``dense=True``, ``jump_t``, ``perturb``, step hooks or a
recorded solve (``gradient="checkpoint"``, ``"adjoint"``); elsewhere the solve runs the eager stepper. Outputs are
the stepper's dense output between the step ends (linear for the SDE methods), computed on the host once per output
time. Results agree with the eager solve to rounding; ``stats["nfe"]`` counts the evaluations made (without a graph:
the drift at the end of each step between two outputs, one more per output interval than the eager loop, which
evaluates it at the next step's start; the compiled blocks of a method that is not FSAL evaluate the eager loop's).
Whether compiling pays is measured once per field and problem (:mod:`neurodyn.compile.policy`; under autograd forward
and backward of the first :data:`GRAPH_ATTEMPTS` steps, compiled blocks against eager steps);
``stats["compiled"]`` is ``"loop"`` where this loop or the compiled blocks ran.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import solution as _sol
from ..core.control import step_grid, time_eps
from ..core.output import step_outputs
from ..core.stepper import Step, Stepper
from ..core.tensors import ordinary_tensors
from ..core.term import ODETerm, term_of
from ..solvers.sde import split_sde
from . import policy
from .entries import Entries
from .loop import DRIVEN_OPTIONS, GRAPH_OPTIONS, LoopOutcome, patched_inductor
from .step import own_code

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FALLBACK = object()
# Steps of the loop per timed run when the policy measures it (policy.LOOP_ATTEMPTS is 16): each run also queries and
# stacks its steps' inputs and makes two compiled calls, costs that a solve of many steps spreads over all of them
# (16 steps of the Euler problem of benchmarks/bench_sde.py: 1.00x the eager step; the whole solve: 0.75-0.87x).
DRIVEN_ATTEMPTS = 48
# Elements of stacked step inputs per compiled call (64 MiB of float32): a longer solve runs in chunks of steps.
MAX_INPUT_ELEMENTS = 2 ** 24
# Where an autograd graph is recorded: steps per compiled block (unrolled in one graph, which AOTAutograd splits into a
# forward that keeps what the backward needs and one compiled backward). Compiling takes longer with more steps
# (10 steps of the benchmarks/bench_sde.py Euler problem: ~13 s, 20 steps: ~75 s, 25 steps: ~4 min on this CPU;
# Milstein's 20: ~4 min) while the time per step changes little beyond ~10 (Milstein 10 -> 20: 1.006x); steps left
# over after the blocks run as one-step blocks.
GRAPH_BLOCK = 10
# Steps per block for a method whose step evaluates the drift and the diffusion once each (at most GRAPH_CHEAP_EVALS
# evaluations: Euler, reversible Heun): each block call costs ~0.5 ms of host work forward and ~0.3 ms backward
# (AOTAutograd's wrappers, the guards), a larger share of these cheap steps (Euler's training step of
# benchmarks/bench_sde.py: 0.94-0.95x the time with blocks of 20 instead of 10).
GRAPH_BLOCK_CHEAP = 20
GRAPH_CHEAP_EVALS = 2
# Steps of forward and backward per timed run when the policy measures the graph path against eager steps.
GRAPH_ATTEMPTS = 2 * GRAPH_BLOCK


def _build(holder: list, n_carried: int) -> Callable:
    """The compiled loop over steps ``i0 .. i1 - 1`` of the stepper and bound term in ``holder`` (set before each
    call: the compiled code is shared by the solves of one field)."""

    def run(i0: Tensor, i1: Tensor, y: Tensor, k: Tensor, tg: Tensor, hg: Tensor, *rest: Tensor):
        solver, term = holder
        shape, func, t_dtype = term.shape, term.func, term.t_dtype
        carried, stacks = rest[:n_carried], rest[n_carried:]

        def cond(i, ok, y, k, *c):
            return (i < i1) & ok

        def body(i, ok, y, k, *c):
            at = i.view(1)
            t = tg.index_select(0, at).view(())
            h = hg.index_select(0, at).view(())
            inputs = tuple(s.index_select(0, at).squeeze(0) for s in stacks)
            y1, kn, c1 = solver.driven_step(term, t, y, h, k, c, inputs)
            if kn is None:  # the drift at the step end: the next step's k1
                t1 = tg.index_select(0, at + 1).view(())
                kn = func(t1.to(t_dtype), y1.view(shape)).reshape(1, -1)
            return (i + 1, torch.isfinite(y1).all(), y1, kn, *c1)

        ok = torch.ones((), dtype=torch.bool, device=y.device)
        return torch._higher_order_ops.while_loop(cond, body, (i0, ok, y, k, *carried))

    options = DRIVEN_OPTIONS if holder[1].device is None or torch.device(holder[1].device).type == "cpu" else None
    return compiled_program(own_code(run), options, 4 + n_carried)


def _build_block(holder: list, n_carried: int, n_inputs: int, size: int, start_drift: bool = False) -> Callable:
    """The compiled block of ``size`` steps for a solve that records an autograd graph (the steps unrolled in one
    graph; the stepper and bound term in ``holder``, set before each call): ``run(y, k, tg, hg, *carried, *inputs) ->
    (finite, y, k, *carried)``, ``inputs`` the steps' inputs in step order (``n_inputs`` each), ``finite`` a bool per
    step (the state after it is finite), ``k`` the drift at the state (FSAL methods: the step's own). With
    ``start_drift`` (methods that are not FSAL) the block evaluates the drift at each step's start itself and neither
    takes nor returns it: ``run(y, tg, hg, *carried, *inputs) -> (finite, y, *carried)`` -- no drift is evaluated on
    the host before the first block, nor after the last step. Called with grad mode on, AOTAutograd splits it into a
    compiled forward that keeps the tensors the backward needs (no step is recomputed) and a compiled backward, joined
    to autograd's graph."""

    # One function for both forms (its arguments and closure are what compile.entries reads the graph's inputs from).
    def run(y: Tensor, *rest: Tensor):
        solver, term = holder
        shape, func, t_dtype = term.shape, term.func, term.t_dtype
        if start_drift:
            k, tg, hg, rest = None, rest[0], rest[1], rest[2:]
        else:
            k, tg, hg, rest = rest[0], rest[1], rest[2], rest[3:]
        carried, inputs = tuple(rest[:n_carried]), rest[n_carried:]
        finite = []
        for j in range(size):
            if start_drift:  # the drift at the step's start
                k = func(tg[j].to(t_dtype), y.view(shape)).reshape(1, -1)
            y1, kn, carried = solver.driven_step(term, tg[j], y, hg[j], k, carried,
                                                 tuple(inputs[j * n_inputs:(j + 1) * n_inputs]))
            if kn is None and not start_drift:  # the drift at the step end: the next step's k1
                kn = func(tg[j + 1].to(t_dtype), y1.view(shape)).reshape(1, -1)
            finite.append(torch.isfinite(y1).all())
            y, k = y1, kn
        if start_drift:
            return torch.stack(finite), y, *carried
        return torch.stack(finite), y, k, *carried

    options = GRAPH_OPTIONS if holder[1].device is None or torch.device(holder[1].device).type == "cpu" else None
    return compiled_program(own_code(run), options, (2 if start_drift else 3) + n_carried, dynamic=False)


def compiled_program(fn: Callable, options: dict | None, n_outputs: int,
                     check: Callable[[list], None] | None = None, **kwargs: Any) -> Callable:
    """``torch.compile(fn, fullgraph=True, **kwargs)`` by Inductor with ``options``, the CPU lowering patches entered
    while it compiles (:func:`~neurodyn.compile.loop.patched_inductor`), never around a call; ``fn`` returns a tuple of
    ``n_outputs`` tensors. ``check(example_inputs)`` (optional) runs on the graph's inputs before Inductor compiles
    it (it raises to refuse the graph). Call it with :func:`call_compiled`: repeat calls run its compiled entries with
    their guards checked, without Dynamo's frame machinery (:class:`~neurodyn.compile.entries.Entries`)."""
    entries = Entries(fn, n_outputs=n_outputs)
    inductor = patched_inductor(options)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if check is not None:
            check(example_inputs)
        return inductor(gm, example_inputs)

    compiled = torch.compile(fn, backend=entries.backend(backend), fullgraph=True, **kwargs)
    compiled.entries = entries
    return compiled


def call_compiled(compiled: Callable, *args: Tensor) -> tuple:
    """``compiled(*args)`` for a function made by :func:`compiled_program`: the compiled entry whose guards pass, called
    directly, or Dynamo's call where none does (a first call compiles)."""
    out = compiled.entries(args)
    if out is not None:
        return out
    # A Python float the functions read is a constant of the graph: Dynamo's automatic dynamic float would make it
    # a SymFloat in the while_loop's carry, which the loop's tracing rejects (a changed value compiles anew instead).
    with torch._dynamo.config.patch(specialize_float=True):
        return compiled(*args)


def graph_leaves(term: Any, y0: Tensor, k0: Tensor | None) -> tuple[list[Tensor], bool]:
    """``(leaves, known)``: the tensors requiring grad that a solve of the SDE ``term`` (the user's) from ``y0`` with
    the drift ``k0`` there (None: not evaluated) depends on -- ``y0``, ``k0`` (where they require grad) and the
    parameters requiring grad of the ``nn.Module`` owners of its drift and diffusion functions; ``known`` is False
    where one of those functions is not a module's method or a module (a closure: what it captures is not known)."""
    leaves = [x for x in (y0, k0) if x is not None and x.requires_grad]
    known = True
    seen: set = set()
    drift, diff = split_sde(term)
    fns = (drift.func if isinstance(drift, ODETerm) else drift, diff.vector_field, diff.g_prod,
           getattr(term, "f_and_g", None), getattr(term, "f_and_g_prod", None))
    for fn in fns:
        if fn is None:
            continue
        owner = getattr(fn, "__self__", fn)
        if not isinstance(owner, torch.nn.Module):
            known = False
            continue
        for prm in owner.parameters():
            if prm.requires_grad and id(prm) not in seen:
                seen.add(id(prm))
                leaves.append(prm)
    return leaves, known


def records_graph(term: Any, y0: Tensor, k0: Tensor | None) -> bool:
    """Whether a solve of the SDE ``term`` from ``y0`` (drift ``k0`` there) records an autograd graph: grad mode on
    and a tensor requiring grad behind it (:func:`graph_leaves`; a closure among its functions counts as one)."""
    if not torch.is_grad_enabled():
        return False
    leaves, known = graph_leaves(term, y0, k0)
    return bool(leaves) or not known


class DrivenPlugIn:
    """The ``compile=True`` plug-in of a driven stepper (internal): ``choose`` (for ``LoopConfig.advance``: the whole
    loop where it applies and pays, else eager) and :meth:`loop` (``LoopConfig.loop``)."""

    def __init__(self, solver: Stepper, func: Callable, y0: Tensor):
        self.solver = solver
        user = term_of(func)
        anchor, key = solver.driven_key(user) if user is not None else (func, ())
        try:
            self.per_func = _CACHE.setdefault(anchor, {}).setdefault(key, {})
        except TypeError:  # not weak-referenceable: cache on nothing (compiles per solve)
            self.per_func = {}
        self.user = user
        self.key = (solver.name, tuple(y0.shape), y0.dtype, y0.device)
        self._term = None

    @property
    def usable(self) -> bool:
        return not self.per_func.get(_FALLBACK)

    def context(self):
        return contextlib.nullcontext()

    def __call__(self, t: float, y: Tensor, h: float, k1: Tensor) -> None:
        return None  # no compiled single step: the loop then steps with the stepper

    def choose(self, term, solver: Stepper, y0: Tensor, k0: Tensor, times: list[float], stops: list[float], cfg,
               loop_available: bool) -> tuple[str, str]:
        """``"loop"`` or ``"eager"`` and why: measured once per field and problem (:func:`policy.measure`, the
        loop's first :data:`DRIVEN_ATTEMPTS` steps against eager steps), decided by :func:`policy.decide`."""
        self._term = term  # the bound term of this solve: what loop() steps
        if not loop_available or not self.usable:
            why = "compiling failed for this field" if not self.usable else \
                "the compiled driven loop covers fixed-step solves without events, jump_t, perturb, step hooks, " \
                "a custom norm or a recorded solve"
            return "eager", f"{why}: eager steps"
        if policy.FORCE is not None:
            return policy.decide(None, True, force=policy.FORCE)
        graph = self.user is not None and records_graph(self.user, y0, k0)
        key = ("decision", self.key, len(times), len(stops), torch.is_grad_enabled(), graph)
        decision = self.per_func.get(key)
        if decision is None and graph:
            options = dict(getattr(solver, "options", None) or {})
            stats = dict(solver.stats or {})
            try:
                timing = self._measure_graph(term, solver, y0, times, stops, cfg)
                decision = self.per_func[key] = policy.decide(timing, True)
                if decision[0] == "loop":
                    decision = ("loop", decision[1] + " (compiled blocks of steps, forward and backward)")
            except _Failed:
                decision = ("eager", "compiling failed for this field: eager steps")
            finally:
                _restore(solver, options, stats)
        if decision is None:
            options = dict(getattr(solver, "options", None) or {})
            stats = dict(solver.stats or {})
            first = cfg.step_size

            def loop() -> int:
                o = self.loop(times, stops, y0, k0, first, cfg.rtol, cfg.atol, cfg.min_step, cfg.max_step,
                              min(DRIVEN_ATTEMPTS, cfg.max_steps), term=term)
                if o is None:
                    raise _Failed
                return o.attempts

            variants = {"loop": loop}
            if not getattr(solver, "fsal", False):
                # The eager loop evaluates the drift at each step's start, outside the stepper's step that
                # policy.measure times (the compiled loop evaluates it inside): timed beside it, and added.
                variants["drift"] = lambda: (term(times[0], y0), 1)[1]
            try:
                eager_s, best, rounds = policy.measure(term, solver, y0, k0, times, cfg, variants)
                eager_s += best.get("drift", 0.0)
                timing = policy.Timing(eager_s=eager_s, step_s=None, loop_s=best["loop"], rounds=rounds)
                decision = self.per_func[key] = policy.decide(timing, True)
            except _Failed:
                decision = ("eager", "compiling failed for this field: eager steps")
            finally:  # the measured steps leave the stepper as it was (options such as an initial state, counters)
                _restore(solver, options, stats)
        return decision

    def cached_choice(self, term, solver: Stepper, y0: Tensor, times: list[float], stops: list[float], cfg,
                      loop_available: bool) -> tuple[str, str] | tuple[None, None]:
        """:meth:`choose`'s answer for a solve whose drift at the initial time is not evaluated yet
        (:meth:`defers_start`), where it is cached and is the loop; else ``(None, None)`` (the caller evaluates the
        drift and calls :meth:`choose`)."""
        if not loop_available or not self.usable or self.user is None:
            return None, None
        if policy.FORCE is not None:
            decision = policy.decide(None, True, force=policy.FORCE)
        else:
            graph = records_graph(self.user, y0, None)
            decision = self.per_func.get(("decision", self.key, len(times), len(stops), torch.is_grad_enabled(),
                                          graph))
        if decision is None or decision[0] != "loop":
            return None, None
        self._term = term  # the bound term of this solve: what loop() steps
        return decision

    def defers_start(self, y0: Tensor) -> bool:
        """Whether a solve from ``y0`` may leave the drift at the initial time unevaluated
        (:func:`neurodyn.core.loop.defers_start`): where it records an autograd graph and the method is not FSAL, the
        compiled blocks evaluate it at the first step's start themselves (:func:`_build_block`'s ``start_drift``)."""
        return torch.is_grad_enabled() and self.usable and self.user is not None \
            and not getattr(self.solver, "fsal", False) and records_graph(self.user, y0, None)

    def _measure_graph(self, term, solver: Stepper, y0: Tensor, times: list[float], stops: list[float],
                       cfg) -> policy.Timing:
        """Forward and backward of the first :data:`GRAPH_ATTEMPTS` steps, compiled blocks against eager steps
        (``solver.step``, the drift at each step's end where the method is not FSAL), interleaved, best of
        ``policy.MIN_ROUNDS`` rounds per step, thread CPU time on the CPU. The backward asks for the gradients of
        every tensor the solve depends on (:func:`graph_leaves`) without accumulating them into ``.grad``."""
        # From a copy of y0 and the drift there evaluated anew per run (the caller's graph of k0 stays untouched).
        y0 = y0.detach().requires_grad_(True)
        leaves, _ = graph_leaves(self.user, y0, y0)
        tl, hl = step_grid(times, stops, min(cfg.step_size, cfg.max_step), time_eps(term.t_dtype))
        m = min(GRAPH_ATTEMPTS, len(hl), cfg.max_steps)
        fsal = getattr(solver, "fsal", False)
        nfe = term.nfe

        def pull(out: Tensor) -> None:
            torch.autograd.grad(out.sum(), leaves, allow_unused=True)

        def compiled() -> int:
            o = self.loop(times, stops, y0, term(times[0], y0), cfg.step_size, cfg.rtol, cfg.atol, cfg.min_step,
                          cfg.max_step, m, term=term)
            if o is None:
                raise _Failed
            pull(o.y_final)
            return o.steps

        def eager() -> int:
            reset = getattr(solver, "reset", None)
            if reset is not None:
                reset()
            y, k = y0, term(times[0], y0)
            for j in range(m):
                y, k, _ = solver.step(term, tl[j], y, hl[j], k)
                if not fsal:
                    k = term(tl[j + 1], y)
            pull(y)
            return m

        variants = {"eager": eager, "loop": compiled}
        best = dict.fromkeys(variants, math.inf)
        clock = time.thread_time if y0.device.type == "cpu" else time.perf_counter
        try:
            try:
                for fn in variants.values():
                    fn()  # compiles (the backward at its first call)
            except _Failed:
                raise
            except Exception as exc:  # the compiled backward could not be built: eager steps for this field
                self._failed(exc)
                raise _Failed from exc
            for r in range(policy.MIN_ROUNDS):
                for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                    s = clock()
                    n = variants[name]()
                    best[name] = min(best[name], (clock() - s) / max(n, 1))
        finally:
            term.nfe = nfe
            reset = getattr(solver, "reset", None)
            if reset is not None:
                reset()
        return policy.Timing(eager_s=best["eager"], step_s=None, loop_s=best["loop"], rounds=policy.MIN_ROUNDS)

    def loop(self, times: list[float], stops: list[float], y0: Tensor, k0: Tensor, first: float | None, rtol, atol,
             min_step: float, max_step: float, max_steps: int, term=None) -> LoopOutcome | None:
        """Run the solve compiled (see the module docstring); None where compiling failed (warned once)."""
        if term is None:
            term = self._term
        solver = self.solver
        if self.per_func.get(_FALLBACK) or first is None:
            return None
        if self.user is not None and records_graph(self.user, y0, k0):
            return self._loop_graph(term, times, stops, y0, k0, first, max_step, max_steps)
        if k0 is None:  # the loop below starts from the drift at the initial time
            return None
        tl, hl = step_grid(times, stops, min(first, max_step), time_eps(term.t_dtype))
        n = min(len(hl), max_steps)
        if n == 0:
            return None  # nothing to step (the eager loop handles it)
        status = _sol.MAX_STEPS_REACHED if len(hl) > max_steps else _sol.SUCCESS
        direction = 1.0 if times[-1] > times[0] else -1.0
        holder = None
        try:
            k, carried = solver.driven_start(term, times[0], y0, k0.reshape(1, -1))

            def inputs_for(a: int, b: int, out: list[Tensor] | None = None) -> list[Tensor]:
                # the inputs of steps a .. b - 1, stacked per position (into `out`'s first b - a rows where given)
                cols = zip(*(solver.step_inputs(term, tl[j], tl[j] + hl[j]) for j in range(a, b)))
                if out is None:
                    return [torch.stack(col) for col in cols]
                return [torch.stack(col, out=o[:b - a]) for col, o in zip(cols, out)]

            first_inputs = inputs_for(0, 1)
            # Steps run in blocks of `size` (all of them where their inputs have at most MAX_INPUT_ELEMENTS elements),
            # each block's inputs stacked once; a last shorter block is padded, so every call has the same shapes.
            size = min(n, max(1, MAX_INPUT_ELEMENTS // max(1, sum(x.numel() for x in first_inputs))))
            # The stacked inputs go into buffers kept for the next solve of this field and layout (taken out of the
            # cache while in use): freshly allocated ones, megabytes each, cost their page faults every solve (for
            # the benchmark's 100 steps of (512, 64): the stack took ~5 ms of a ~50 ms solve; into kept ones, ~1 ms).
            bkey = ("inputs", self.key, size, tuple((x.shape, x.dtype) for x in first_inputs))
            bufs = self.per_func.pop(bkey, None) if size > 1 else None
            if bufs is None and size > 1:
                with ordinary_tensors():  # kept for later solves, inside inference mode or not (written in place)
                    bufs = [x.new_empty(size, *x.shape[1:]) for x in first_inputs]
            block: dict = {}

            def load(j: int) -> tuple:  # block j: (stacks, tg, hg), padded to `size` steps
                if block.get("j") != j:
                    a, b = j * size, min(n, (j + 1) * size)
                    pad = size - (b - a)
                    if (a, b) == (0, 1):
                        stacks = first_inputs
                        if pad:
                            stacks = [torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) for x in stacks]
                    else:
                        stacks = inputs_for(a, b, bufs)
                        if pad:
                            for o in bufs:
                                o[b - a:].zero_()
                            stacks = bufs
                    tg = torch.tensor(tl[a:b + 1] + [tl[b]] * pad, dtype=torch.float64, device=y0.device)
                    hg = torch.tensor(hl[a:b] + [0.0] * pad, dtype=torch.float64, device=y0.device)
                    block.update(j=j, data=(stacks, tg, hg))
                return block["data"]

            ckey = (self.key, len(carried), len(first_inputs))
            entry = self.per_func.get(ckey)
            if entry is None:
                # One step on the host counts the step's evaluations (the graph cannot count).
                counts = {"nfe": 0, "nfe_diffusion": 0}
                with torch.no_grad():
                    solver.driven_step(term, torch.tensor(tl[0], dtype=torch.float64, device=y0.device), y0,
                                       torch.tensor(hl[0], dtype=torch.float64, device=y0.device), k, carried,
                                       tuple(x[0] for x in first_inputs), counts)
                holder = [solver, term]
                entry = self.per_func[ckey] = (_build(holder, len(carried)), counts, holder)
            fn, counts, holder = entry
            holder[:] = [solver, term]
            outs = [y0]
            # The loop's carried tensors must not alias one another (y0 and a view of it as z0, say).
            st = _Position(y0, k.clone(), tuple(c.clone() for c in carried))
            with torch.no_grad():

                def advance(stop: int) -> bool:  # steps st.i .. stop - 1; False where one made the state non-finite
                    while st.i < stop:
                        j = st.i // size
                        stacks, tg, hg = load(j)
                        a, b = st.i - j * size, min(stop, (j + 1) * size) - j * size
                        saved = (st.i, st.y, st.k, st.carried)
                        done, ok_t, st.y, st.k, *c = call_compiled(
                            fn, torch.tensor(a, dtype=torch.int64, device=y0.device),
                            torch.tensor(b, dtype=torch.int64, device=y0.device), st.y, st.k, tg, hg, *st.carried,
                            *stacks)
                        st.carried = tuple(c)
                        if not bool(ok_t):
                            # the solve stops before the step that made the state non-finite, as the eager loop
                            # does: run up to it again
                            bad = j * size + int(done) - 1
                            st.i, st.y, st.k, st.carried = saved
                            if bad > st.i:
                                advance(bad)
                            return False
                        st.i = j * size + b
                    return True

                status = _walk_outputs(st, advance, solver, term, times, tl, hl, n, direction, outs, status)
        except Exception as exc:  # compilation failed: eager steps from now on, for this field
            self._failed(exc)
            return None
        finally:
            _release(holder)
        if bufs is not None:
            self.per_func[bkey] = bufs
        return _finish(solver, term, st, outs, tl, hl, status, first, max_step, counts)

    def _failed(self, exc: Exception) -> None:
        """Compiling failed: warn, and step eagerly from now on for this field."""
        self.per_func[_FALLBACK] = True
        # Dynamo's messages: a headline (for higher-order operators a generic one ending in ':'), then the specific
        # reason on the next line.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else ""
        warnings.warn(f"compile=True: the fixed-step {self.solver.name!r} loop could not be compiled "
                      f"({type(exc).__name__}: {reason[:300]}); stepping eagerly instead (for this vector field).",
                      RuntimeWarning, stacklevel=6)

    def _loop_graph(self, term, times: list[float], stops: list[float], y0: Tensor, k0: Tensor | None, first: float,
                    max_step: float, max_steps: int) -> LoopOutcome | None:
        """The solve as compiled blocks of steps under autograd (:func:`_build_block`): outputs and final state joined
        to the graph of ``y0``, ``k0`` and the functions' tensors; None where compiling failed (warned once). A method
        that is not FSAL runs blocks that evaluate the drift at each step's start (``start_drift``): ``k0`` is not read
        (None: not evaluated, :meth:`defers_start`); an FSAL method needs it (None: returns None)."""
        solver = self.solver
        start_drift = not getattr(solver, "fsal", False)
        if k0 is None and not start_drift:
            return None
        tl, hl = step_grid(times, stops, min(first, max_step), time_eps(term.t_dtype))
        n = min(len(hl), max_steps)
        if n == 0:
            return None
        status = _sol.MAX_STEPS_REACHED if len(hl) > max_steps else _sol.SUCCESS
        direction = 1.0 if times[-1] > times[0] else -1.0
        dev = y0.device

        def own(x: Tensor) -> Tensor:
            # Every floating input of a block requires grad (one compiled graph whichever the caller's do; a gradient
            # nobody asked for is a few elementwise operations), and none aliases another (z0 is y0 at the start).
            return x.clone() if x.requires_grad else x.detach().clone().requires_grad_(True)

        holder = None
        try:
            k, carried = solver.driven_start(term, times[0], y0, None if k0 is None else k0.reshape(1, -1))
            k = None if start_drift else own(k)
            carried = tuple(own(c) if c.is_floating_point() else c for c in carried)
            first_inputs = solver.step_inputs(term, tl[0], tl[0] + hl[0])
            n_in = len(first_inputs)
            ckey = ("graph", self.key, len(carried), n_in, start_drift)
            entry = self.per_func.get(ckey)
            if entry is None:
                counts = {"nfe": 0, "nfe_diffusion": 0}
                with torch.no_grad():
                    # (the step's own evaluations; a drift where none was evaluated yet: any values, only counted)
                    solver.driven_step(term, torch.tensor(tl[0], dtype=torch.float64, device=dev), y0.detach(),
                                       torch.tensor(hl[0], dtype=torch.float64, device=dev),
                                       y0.detach().reshape(1, -1) if k is None else k.detach(),
                                       tuple(c.detach() for c in carried), first_inputs, counts)
                holder = [solver, term]
                entry = self.per_func[ckey] = ({}, counts, holder)
            blocks, counts, holder = entry
            holder[:] = [solver, term]
            outs = [y0]
            st = _Position(y0 if y0.requires_grad else own(y0), k, carried)
            # the step's drift and diffusion evaluations (the drift at its start or end included)
            evals = counts["nfe"] + counts["nfe_diffusion"] + (0 if getattr(solver, "fsal", False) else 1)
            long = GRAPH_BLOCK_CHEAP if evals <= GRAPH_CHEAP_EVALS else GRAPH_BLOCK

            def block(size: int) -> Callable:
                fn = blocks.get(size)
                if fn is None:
                    fn = blocks[size] = _build_block(holder, len(carried), n_in, size, start_drift)
                return fn

            def run(size: int) -> tuple:  # steps st.i .. st.i + size - 1 from the current state: (finite, y, k, *c)
                a = st.i
                inputs = [x for j in range(a, a + size) for x in solver.step_inputs(term, tl[j], tl[j] + hl[j])]
                tg = torch.tensor(tl[a:a + size + 1], dtype=torch.float64, device=dev)
                hg = torch.tensor(hl[a:a + size], dtype=torch.float64, device=dev)
                if start_drift:
                    finite, y1, *c1 = call_compiled(block(size), st.y, tg, hg, *st.carried, *inputs)
                    return finite, y1, None, *c1
                return call_compiled(block(size), st.y, st.k, tg, hg, *st.carried, *inputs)

            def advance(stop: int) -> bool:  # steps st.i .. stop - 1; False where one made the state non-finite
                while st.i < stop:
                    size = long if stop - st.i >= long else 1
                    finite, y1, k1, *c1 = run(size)
                    if size > 1 and not bool(finite.all()):
                        # the solve stops before the step that made the state non-finite, as the eager loop does
                        for _ in range(int(finite.to(torch.int8).argmin())):
                            finite, st.y, st.k, *c = run(1)
                            st.carried = tuple(c)
                            st.i += 1
                        return False
                    if not bool(finite.all()):
                        return False
                    st.y, st.k, st.carried = y1, k1, tuple(c1)
                    st.i += size
                return True

            status = _walk_outputs(st, advance, solver, term, times, tl, hl, n, direction, outs, status)
        except Exception as exc:  # compilation failed: eager steps from now on, for this field
            self._failed(exc)
            return None
        finally:
            _release(holder)
        # The drift at each step's start (start_drift) or end: one per step either way; with k0 not evaluated, the
        # one at the initial time is the one the solve already counts (the direct solve's NFE starts at 1).
        return _finish(solver, term, st, outs, tl, hl, status, first, max_step, counts,
                       -1 if k0 is None and st.i else 0)


def _release(holder: list | None) -> None:
    """Empty a compiled program's ``holder`` after a solve: the cache entry holding it lives as long as the user's
    module (its weak key), so a holder keeping the solve's term -- the module's bound methods -- would keep the module
    alive for good. The next solve sets it again before calling the program."""
    if holder is not None:
        holder[:] = [None] * len(holder)


class _Position:
    """Where a compiled driven solve stands: steps taken, state, the solver's ``k`` and carried tensors."""

    __slots__ = ("i", "y", "k", "carried")

    def __init__(self, y: Tensor, k: Tensor, carried: tuple):
        self.i, self.y, self.k, self.carried = 0, y, k, carried


def _walk_outputs(st: _Position, advance: Callable[[int], bool], solver, term, times: list[float], tl: list[float],
                  hl: list[float], n: int, direction: float, outs: list[Tensor], status: str) -> str:
    """Step the grid ``tl``, ``hl`` (its first ``n`` steps) with ``advance`` and append the states at ``times[1:]``
    to ``outs``; the solve's status: ``status``, or NON_FINITE where a step made the state non-finite."""
    out_i = 1
    while out_i < len(times) and st.i < n:
        if (times[out_i] - tl[n]) * direction > 0:  # max_steps ends the solve before the next output
            return status if advance(n) else _sol.NON_FINITE
        # the step holding the next output time: the steps before it, then it (its start state is what the dense
        # output needs)
        b = st.i
        while b < n - 1 and (times[out_i] - tl[b + 1]) * direction > 0:
            b += 1
        # An output time on the step's end is the state there (step_outputs): no start state needed, so the steps
        # up to it run in one call.
        on_end = times[out_i] == tl[b + 1]
        if b > st.i and not on_end and not advance(b):
            return _sol.NON_FINITE
        y_prev = st.y
        if not advance(b + 1):
            return _sol.NON_FINITE
        if (times[out_i] - tl[st.i]) * direction <= 0:
            step = Step(tl[st.i - 1], hl[st.i - 1], y_prev, st.y, st.k)
            out_i = step_outputs(solver, term, step, None, "auto", times, out_i, tl[st.i], direction, outs)
    return status


def _finish(solver: Stepper, term, st: _Position, outs: list[Tensor], tl: list[float], hl: list[float], status: str,
            first: float, max_step: float, counts: dict, nfe_offset: int = 0) -> LoopOutcome:
    """Close a compiled driven solve: the solver's state, its counters and the :class:`LoopOutcome` (its ``nfe``
    shifted by ``nfe_offset``)."""
    solver.driven_finish(term, tl[st.i], st.y, st.k, tuple(st.carried))
    if solver.stats is not None and "nfe_diffusion" in solver.stats:
        solver.stats["nfe_diffusion"] += st.i * counts["nfe_diffusion"]
    # the steps' drift evaluations, and (not FSAL) the drift at each step's end
    return _outcome(outs, st.y, tl, hl, st.i, status, first, max_step, st.i * counts["nfe"] + (
        0 if getattr(solver, "fsal", False) else st.i) + nfe_offset)


def _outcome(outs: list[Tensor], y: Tensor, tl: list[float], hl: list[float], i: int, status: str, first: float,
             max_step: float, nfe: int) -> LoopOutcome:
    """The :class:`LoopOutcome` of a driven solve that took ``i`` steps of the grid ``tl``, ``hl``."""
    o = LoopOutcome()
    o.ys = torch.cat(outs)
    o.n_valid = len(outs)
    o.y_final, o.t_final = y, tl[i]
    o.steps = o.attempts = i
    o.rejected = 0
    o.status = status
    o.initial_step = first
    o.last_step = o.last_try = abs(hl[i - 1]) if i else 0.0
    o.next_step = min(first, max_step) if math.isfinite(first) else None
    o.rec = ()
    o.times = None
    o.nfe = nfe
    return o


class _Failed(Exception):
    """The compiled driven loop could not be built (it warned)."""


def _restore(solver: Stepper, options: dict, stats: dict) -> None:
    """Put back the stepper's options and counters as they were before measured steps."""
    if getattr(solver, "options", None) is not None:
        solver.options.clear()
        solver.options.update(options)
    if solver.stats is not None:
        solver.stats.clear()
        solver.stats.update(stats)


def plug_in(solver: Stepper, func: Callable, y0: Tensor) -> tuple[DrivenPlugIn, Callable]:
    """``(advance, loop)`` for :class:`~neurodyn.core.config.LoopConfig` of a fixed-step ``compile=True`` solve with a
    driven stepper (see the module docstring)."""
    p = DrivenPlugIn(solver, func, y0)

    def loop(*args, **kwargs) -> LoopOutcome | None:
        return p.loop(*args, **kwargs)

    loop.differentiable = True  # it joins its outputs to a recorded graph itself (compiled blocks of steps)
    loop.defers_start = p.defers_start
    return p, loop
