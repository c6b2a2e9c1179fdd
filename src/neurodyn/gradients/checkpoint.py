"""``gradient="checkpoint"``: the exact gradient of the discrete forward solve with bounded memory.

Forward: the loop runs without autograd and logs each accepted step's ``(t, h)`` (a few floats) and
the state at every ``stride``-th step, doubling the stride whenever more than ``checkpoints`` states
would be kept. Backward: each segment between checkpoints is replayed with the logged steps under
autograd and backpropagated, last segment first; a segment longer than 2 steps is first
replayed without autograd to place up to ``checkpoints`` sub-checkpoints, recursively, down to segments
of 2 steps. The replay runs the same stepper on the same step sizes, so the gradient equals
``gradient="direct"``, with memory O(checkpoints x levels) states plus the graph of at most 2 steps.

What a checkpoint holds
-----------------------
The state a step starts from is more than ``y``:

* ``k1``, dy/dt at the step start, when the loop passed it on from the previous step (FSAL). Its value is
  then the previous step's last stage -- for an implicit method the stage equation's derivative, which differs
  from a fresh ``f(t, y)`` by the Newton residual -- and its gradient flows back into that step, as in the
  direct graph. So it is kept and differentiated as part of the state.
* A stepper that carries state from step to step (the multistep methods' history of past derivatives or
  differences) exposes it through two optional methods, so that a replay from a checkpoint reproduces the forward
  steps without any restart:

  ``replay_record() -> (info, tensors, meta)``
      called after every accepted step: ``info`` the decisions that step took (e.g. its order: a rejected attempt
      may have changed them, and the replay sees accepted steps only), ``tensors`` (differentiable) and ``meta``
      (plain data) the state the next step starts from;
  ``replay_prepare(t, y, info, carry)``
      called before a replayed step from ``(t, y)``: impose ``info``, and, with ``carry = (tensors, meta)``
      (a replay starting at a checkpoint), restore that state first.

  The tensors are part of the checkpointed state: their gradients flow from segment to segment like ``y``'s.

Implicit methods solve their stage equations with Newton's method on a Jacobian they keep across steps; a
replay cannot rebuild that Jacobian's history (it sees accepted steps only, in a different order). The replay
therefore runs on a term marked ``replay = True``, which tells an implicit stepper to solve each replayed step's
equations afresh -- a Jacobian at the step start, Newton iterated past the forward's tolerance, never rejecting
the step (see :class:`~neurodyn.solvers.implicit_rk.ImplicitRungeKutta`). The replayed stages then agree with the
forward ones to the forward's Newton tolerance (a small fraction of ``rtol``), and the gradient (implicit function
theorem at the stages, the same as ``"direct"``) with ``"direct"`` to that order.

Random draws in the field
-------------------------
A field that draws random numbers (dropout in training mode, noise drawn inside the call) would draw new ones on the
replay, and the gradient would be that of another forward pass (7 % off on a small dropout MLP). The forward
therefore keeps the generators' states (torch's CPU generator, and the CUDA one of the state's device) per accepted
step (:class:`RngTape`: when the accepted attempt began, and when it was accepted), and the replay restores them
around the same calls, so the draws are the forward's and the gradient equals ``"direct"``'s exactly (with explicit
methods: an implicit method's replayed Newton iterations call the field a different number of times). A
deterministic field stores one state; a stochastic one ~5 KB per step. The caller's generators are left where the
forward left them, as with ``"direct"``.

Second derivatives
------------------
The backward pass runs outside autograd, so its gradient cannot be differentiated again: under
``create_graph=True``, differentiating it raises an :class:`~neurodyn.errors.InputError` (it is never a silent zero).
Use ``gradient="direct"`` for second derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..core.config import LoopConfig
from ..core.events import Event, Hit, event_values, jump_state, occurrence
from ..core.loop import integrate
from ..core.output import assemble, step_outputs
from ..core.stepper import Step, Stepper, nextafter
from ..core.tensors import real_dtype
from ..core.term import ODETerm
from ..errors import InputError, SolveFailure
from ..fields import check_derivative
from ..solution import EVENT, Solution, check_differentiable
from .common import GradientOptions, HiddenTensorGuard, check_hidden_tensors, first_order_only
from .direct import finish_direct, start_direct

# Longest segment backpropagated as one graph; longer ones are checkpointed again (recursively), so the
# graph held at once stays this short however many steps the solve takes.
_LEAF_STEPS = 2

# The state a step starts from: y (1, n), the carried k1 (or None: evaluated afresh), the stepper's tensors and
# plain data (see the module docstring).
State = tuple[Tensor, Tensor | None, tuple[Tensor, ...], Any]


class ReplayTerm(ODETerm):
    """The term of a replay: tells stateful steppers (Newton's Jacobian reuse) that the steps are replayed."""

    __slots__ = ()
    replay = True


def fsal_continues(steps: list, j: int, fsal: bool) -> bool:
    """True when the loop passed the previous step's last stage on as step ``j``'s ``k1`` (FSAL, no jump or
    perturbation at the step start)."""
    if not fsal or j <= 0 or j >= len(steps):
        return False
    t, _, _, _, k1_time = steps[j]
    return k1_time == t and steps[j - 1][2] == t


class RngTape:
    """The random-number generator states of a forward solve, to replay a stochastic field's draws exactly.

    A field that draws random numbers (dropout, Hutchinson noise drawn in the field) draws new ones when its steps
    are replayed, unless the generators are put back where they were. The forward loop's sequence of field calls is
    not the replay's (rejected attempts, Newton iterations and dense output are not replayed), so the states are
    kept per accepted step: ``attempt[j]``, the state when step ``j``'s accepted attempt began (the stages), and
    ``after[j]``, the state when it was accepted (its dense output and the next step's first ``f(t, y)`` follow from
    there; ``after[-1]`` is the state before the solve's first evaluation). The replay restores them around the
    same calls. A state equal to the previous one is not stored again, so a deterministic field keeps one state;
    a stochastic one ~5 KB per step (the CPU generator; a CUDA generator's state adds 16 bytes).
    """

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.attempt: list[Any] = []
        self.after: dict[int, Any] = {}
        self._last: Any = None
        self._last_bytes: bytes | None = None  # the CPU state of _last, compared as bytes (a memcmp)
        self._pending: Any = None
        self._states = 0  # distinct states taped
        self._restored = False
        self.after[-1] = self.snapshot()

    def snapshot(self) -> Any:
        cpu = torch.get_rng_state()
        cpu_bytes = cpu.numpy().tobytes()
        cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        last = self._last
        if last is not None and cpu_bytes == self._last_bytes and (cuda is None or torch.equal(last[1], cuda)):
            return last
        self._last, self._last_bytes = (cpu, cuda), cpu_bytes
        self._states += 1
        return self._last

    def restore(self, state: Any) -> None:
        """Put the generators in ``state``. A tape of one state (no draws in the forward solve: a deterministic
        field) is restored once; the replay of the same evaluations draws nothing either."""
        if self._states == 1:
            if self._restored:
                return
            self._restored = True
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)

    def begin_replay(self) -> None:
        """A new replay (each backward pass) restores the generators afresh."""
        self._restored = False

    def devices(self) -> list:
        return [self.cuda] if self.cuda is not None else []

    def on_attempt(self) -> None:
        self._pending = self.snapshot()

    def on_accept(self) -> None:
        self.attempt.append(self._pending)
        self.after[len(self.attempt) - 1] = self.snapshot()


class _StepLog:
    """Accepted steps (floats), the stepper's decisions per step, and states at a stride that doubles to keep
    at most ``limit`` of them."""

    def __init__(self, limit: int, solver: Any, rng: RngTape | None = None):
        self.rng = rng
        self.limit = max(2, limit)
        self.steps: list[tuple[float, float, float, float | None, float]] = []
        self.infos: list[Any] = []
        self.states: dict[int, State] = {}
        self.stride = 1
        self.fsal = solver.fsal
        self._record = solver.replay_record if solver.replay else None
        self._carry: tuple[tuple[Tensor, ...], Any] = ((), None)  # what the next step starts from

    def __call__(self, t: float, h: float, t1: float, nudge: float | None, k1_time: float, y: Tensor,
                 k1: Tensor) -> None:
        j = len(self.steps)
        self.steps.append((t, h, t1, nudge, k1_time))
        if self.rng is not None:
            self.rng.on_accept()
        if j % self.stride == 0:
            # (a copy: the loop's k1 may sit in a stage buffer that later steps overwrite)
            k1_kept = k1.detach().reshape(1, -1).clone() if fsal_continues(self.steps, j, self.fsal) else None
            self.states[j] = (y.detach(), k1_kept, *self._carry)
            if len(self.states) > self.limit:
                self.stride *= 2
                self.states = {i: v for i, v in self.states.items() if i % self.stride == 0}
        if self._record is not None:
            info, tensors, meta = self._record()
            self.infos.append(info)
            self._carry = (tuple(x.detach() for x in tensors), meta)
        else:
            self.infos.append(None)


class _Setup:
    def __init__(self, func, solver, cfg, on_failure, gopts, shape):
        self.func, self.solver, self.cfg, self.on_failure, self.gopts, self.shape = (
            func, solver, cfg, on_failure, gopts, shape)
        self.solution: Solution | None = None
        self.log: _StepLog | None = None
        self.term: ODETerm | None = None


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, *params: Tensor) -> Tensor:
        func, solver, cfg = setup.func, setup.solver, setup.cfg
        term = ODETerm(func, y0.shape, real_dtype(y0.dtype), y0.device)
        times = setup.times
        ctx.save_for_backward(y0, *params)
        rng = RngTape(y0.device)
        log = _StepLog(setup.gopts.checkpoints, solver, rng)
        user_cbs = dict(cfg.step_callbacks or {})
        user_step = user_cbs.get("step")

        def on_attempt(t: float, y: Tensor, h: float) -> None:
            if user_step is not None:
                user_step(t, y, h)
            rng.on_attempt()

        cfg = replace(cfg, on_accept=log, step_callbacks={**user_cbs, "step": on_attempt})
        with torch.no_grad():
            # perturb: the first derivative just after t0, where the loop (and its replays) take it
            t_start = nextafter(times[0], times[-1] - times[0], term.t_dtype) if cfg.perturb else times[0]
            f0 = check_derivative(func(torch.scalar_tensor(t_start, dtype=term.t_dtype, device=term.device), y0), y0)
            term.nfe = 1
            res = integrate(term, solver, y0.detach().reshape(1, -1), f0, times, cfg)
            sol = assemble(res, term, solver, cfg, y0.detach(), setup.t.detach(), setup.on_failure)
        setup.solution, setup.log, setup.term = sol, log, term
        setup.hits = res.hits or []
        ctx.setup = setup
        ev = sol.events
        if ev is None:
            return sol.ys.detach(), sol.ys.new_zeros(0), sol.ys.new_zeros(0)
        return sol.ys.detach(), ev.t.detach(), ev.y.detach()

    @staticmethod
    def backward(ctx, grad_ys: Tensor, grad_ev_t: Tensor | None = None, grad_ev_y: Tensor | None = None):
        setup: _Setup = ctx.setup
        sol = setup.solution
        check_differentiable(sol)
        log = setup.log
        replayer = _Replayer(setup, grad_ys, grad_ev_t, grad_ev_y)
        keys = sorted(log.states) + [len(log.steps)]
        cot: tuple = (grad_ys.new_zeros((1, grad_ys[0].numel())), None, ())
        # The replay puts the generators where the forward had them at every step: the caller's are restored after.
        log.rng.begin_replay()
        with torch.random.fork_rng(devices=log.rng.devices()):
            for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
                cot = replayer.backprop(s0, s1, log.states[s0], cot)
        sol.stats["nfe_backward"] = replayer.term.nfe
        sol.stats["checkpoints"] = len(log.states)
        grad_y0 = (cot[0].reshape(-1) + grad_ys[0].reshape(-1)).view(setup.shape)
        return (None, *first_order_only("checkpoint", [grad_y0, *replayer.g_params], [grad_ys, *ctx.saved_tensors]))


class _Replayer:
    """Replays logged steps from checkpointed states and backpropagates segment by segment."""

    def __init__(self, setup: _Setup, grad_ys: Tensor, grad_ev_t: Tensor | None = None,
                 grad_ev_y: Tensor | None = None):
        self.setup, self.grad_ys = setup, grad_ys
        self.grad_ev = (grad_ev_t, grad_ev_y)
        self.log, self.solver, self.cfg = setup.log, setup.solver, setup.cfg
        self.params = setup.gopts.params
        self.times = setup.times
        self.direction = 1.0 if self.times[-1] > self.times[0] else -1.0
        # Every replayed evaluation is checked for captured tensors outside params (a stepper may keep the last
        # step's tensors, so "seen in two evaluations" tells them from the field's own leaves).
        self.guard = HiddenTensorGuard(self.params, "checkpoint", mode="repeat")
        self.term = ReplayTerm(self.guard.field(setup.func, settle=False), setup.shape, setup.term.t_dtype,
                               setup.term.device)
        self.co = self.solver.coefficients(grad_ys.dtype, grad_ys.device)
        self.prepare: Callable | None = self.solver.replay_prepare if self.solver.replay else None
        self.record: Callable | None = self.solver.replay_record if self.solver.replay else None
        self.g_params = [torch.zeros_like(p) for p in self.params]
        # The events, with the field's guard (their tensors must be params too): per step with occurrences, the
        # hit, the number of its first occurrence among all, and where the step was cut (a jump, a stop).
        cfg = self.cfg
        self.events = tuple(Event(self.guard.field(e.fn, settle=False), e.direction, e.terminal,
                                  None if e.jump is None else self.guard.field(e.jump, settle=False))
                            for e in cfg.events)
        self.owner = [i for i, e in enumerate(cfg.events) for _ in range(setup.event_sizes[i])]
        self.offset = [sum(setup.event_sizes[:i]) for i in range(len(cfg.events))]
        self.hits: dict[int, tuple[Hit, int]] = {}
        number = 0
        for j, hit in setup.hits:
            self.hits[j] = (hit, number)
            number += len(hit.occ) - (1 if hit.stop == "zeno" else 0)
        # First output index produced by each step (a cut step produces those up to its cut).
        self.first_out = []
        out_i = 1
        for j, (t, h, t1, _, _) in enumerate(self.log.steps):
            self.first_out.append(out_i)
            hit = self.hits.get(j)
            end = t + hit[0].theta * h if hit is not None and hit[0].stop is not None else t1
            while out_i < len(self.times) and (self.times[out_i] - end) * self.direction <= 0:
                out_i += 1
        self.first_out.append(out_i)

    def run(self, j0: int, j1: int, state: State, outs: list[Tensor] | None = None,
            subs: dict[int, State] | None = None, stride: int = 1,
            ev_outs: list[tuple[int, Tensor, Tensor]] | None = None) -> State:
        """Steps ``j0 .. j1 - 1`` again from ``state`` (the state at ``j0``); returns the state at ``j1``.

        Within the segment the first stage comes from the previous step's last (FSAL), as in the forward loop,
        so the replayed graph is the direct method's. ``outs`` collects the outputs the steps produce; ``subs``
        the state at every ``stride``-th step (sub-checkpoints); ``ev_outs`` the events' ``(number, t_e, y_e)``.
        A step with event occurrences repeats them: the same occurrences (times from the log, gradients from the
        replayed graph), and a jump continues from the jumped state as the forward did."""
        log, solver, term, co = self.log, self.solver, self.term, self.co
        y, k1, tensors, meta = state
        after_jump = (j0 - 1) in self.hits and self.hits[j0 - 1][0].stop == "jump"
        k1 = k1.view(self.setup.shape) if k1 is not None and not after_jump else None
        rng = log.rng
        for j in range(j0, j1):
            t, h, t1, nudge, k1_time = log.steps[j]
            if k1 is None:
                rng.restore(rng.after[j - 1])
                k1 = term(k1_time, y)
            if self.prepare is not None:
                self.prepare(t, y, log.infos[j], (tensors, meta) if j == j0 and meta is not None else None)
            rng.restore(rng.attempt[j])
            y1, k, _ = solver.step(term, t, y, h, k1, co, nudge)
            rng.restore(rng.after[j])
            st = Step(t, h, y, y1, k)
            if outs is not None:
                produced: list[Tensor] = []
                step_outputs(solver, term, st, co, self.cfg.interp, self.times, self.first_out[j], t1,
                             self.direction, produced)
                outs.extend(produced[: self.first_out[j + 1] - self.first_out[j]])
            if self.record is not None:
                _, tensors, meta = self.record()
                tensors = tuple(tensors)
            y = y1
            k1 = k[-1].view(self.setup.shape) if fsal_continues(log.steps, j + 1, log.fsal) else None
            if j in self.hits:
                y, k1 = self._events(j, st, ev_outs, y, k1)
            if subs is not None and (j + 1 - j0) % stride == 0:
                subs[j + 1] = (y, k1.reshape(1, -1) if k1 is not None else None, tensors, meta)
        if j1 > j0 and not bool(torch.isfinite(y.detach()).all()):  # one check per segment (a host sync)
            t_a, t_b = log.steps[j0][0], log.steps[j1 - 1][2]
            raise SolveFailure(
                f"gradient='checkpoint': replaying the steps from t={t_a:.6g} to t={t_b:.6g} with method "
                f"{solver.name!r} gave NaN/inf (an implicit method's Newton iteration did not converge on the "
                f"replay). Use gradient='direct', or other tolerances.", status="non_finite", t=t_a,
                solution=self.setup.solution)
        return y, (k1.reshape(1, -1) if k1 is not None else None), tensors, meta

    def _events(self, j: int, st: Step, ev_outs: list | None, y: Tensor, k1: Tensor | None):
        """The occurrences of step ``j`` again; returns the state and ``k1`` the next step starts from."""
        hit, number = self.hits[j]
        n_rec = len(hit.occ) - (1 if hit.stop == "zeno" else 0)
        last = None
        for m, (th, c) in enumerate(hit.occ[:n_rec]):
            e = self.owner[c]
            t_e, y_e = occurrence(self.term, self.solver, st, self.co, self.cfg.interp, self.events[e],
                                  c - self.offset[e], th)
            if ev_outs is not None:
                ev_outs.append((number + m, t_e, y_e))
            last = (t_e, y_e, self.events[e])
        if hit.stop == "jump":
            t_e, y_e, ev = last
            y_new, _ = jump_state(self.term, ev, t_e, y_e)
            return y_new.reshape(1, -1), None
        return y, k1

    def backprop(self, j0: int, j1: int, state: State, cot: tuple) -> tuple:
        """Backpropagate the cotangent ``cot = (a_y, a_k1, a_tensors)`` of the state at ``j1`` (and the outputs
        of steps ``j0 .. j1 - 1``) to the state at ``j0``."""
        if j1 - j0 > _LEAF_STEPS:
            stride = math.ceil((j1 - j0) / self.log.limit)
            subs = {j0: state}
            with torch.no_grad():
                self.run(j0, j1 - 1, state, subs=subs, stride=stride)
            keys = sorted(subs) + [j1]
            for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
                cot = self.backprop(s0, s1, subs[s0], cot)
            return cot
        y, k1, tensors, meta = state
        with torch.enable_grad():
            leaves = [y.detach().requires_grad_(True), None if k1 is None else k1.detach().requires_grad_(True),
                      *(x.detach().requires_grad_(True) for x in tensors)]
            outs: list[Tensor] = []
            ev_outs: list[tuple[int, Tensor, Tensor]] = []
            y_end, k1_end, tensors_end, _ = self.run(j0, j1, (leaves[0], leaves[1], tuple(leaves[2:]), meta), outs,
                                                     ev_outs=ev_outs)
            idx0 = self.first_out[j0]
            a_y, a_k1, a_tensors = cot
            roots = [y_end, k1_end, *tensors_end] + outs
            grads = [a_y, a_k1, *(a_tensors or (None,) * len(tensors_end))]
            grads += [self.grad_ys[idx0 + m].reshape(1, -1) for m in range(len(outs))]
            g_t, g_y = self.grad_ev
            for number, t_e, y_e in ev_outs:
                if g_t is not None:
                    roots.append(t_e)
                    grads.append(g_t[number])
                if g_y is not None:
                    roots.append(y_e)
                    grads.append(g_y[number])
            pairs = [(r, g.view_as(r)) for r, g in zip(roots, grads)
                     if r is not None and g is not None and r.requires_grad]
            inputs = [x for x in leaves if x is not None]
            res = torch.autograd.grad([r for r, _ in pairs], [*inputs, *self.params], [g for _, g in pairs],
                                      allow_unused=True) if pairs else (None,) * (len(inputs) + len(self.params))
        for gp, r in zip(self.g_params, res[len(inputs):]):
            if r is not None:
                gp.add_(r)
        got = [torch.zeros_like(x) if r is None else r for x, r in zip(inputs, res[:len(inputs)])]
        a_y = got.pop(0)
        a_k1 = got.pop(0) if k1 is not None else None
        return a_y, a_k1, tuple(got)


def _check_event_tensors(cfg: LoopConfig, y0: Tensor, t0: float, params: list[Tensor]) -> list[int]:
    """The events' functions and jumps may use only ``y``, ``t`` and ``params`` among tensors requiring grad (the
    replay differentiates with respect to those); checked at ``(t0, y0)``. Returns each function's component
    count."""
    sizes = []
    tt = torch.scalar_tensor(t0, dtype=real_dtype(y0.dtype), device=y0.device)
    for i, ev in enumerate(cfg.events):
        for name, fn in (("fn", ev.fn), ("jump", ev.jump)):
            if fn is None:
                continue
            guard = HiddenTensorGuard(params, "checkpoint")
            with torch.random.fork_rng(devices=[y0.device] if y0.device.type == "cuda" else []), \
                    torch.enable_grad():
                y = y0.detach().requires_grad_(True)
                out = fn(tt, y)
                if name == "fn":
                    sizes.append(event_values(fn, tt, y.detach()).numel())
                if isinstance(out, Tensor) and out.grad_fn is not None:
                    guard.watch([out], [tt, y])
            del out
            try:
                guard.settle(f"in events[{i}].{name} at t={t0:.6g}")
            except InputError as err:
                raise InputError(f"events[{i}].{name}: {err}") from None
    return sizes


def solve_checkpoint(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                     on_failure: str, gopts: GradientOptions) -> Solution:
    """gradient="checkpoint": see the module docstring."""
    if _compiled_training(func, cfg, gopts):
        # compile=True: the compiled training step (the whole loop compiled, steps kept, a compiled backward; the
        # same discrete gradient) where it runs; its kept steps are a few numbers per step (small states only).
        term, y0_flat, f0, times = start_direct(func, y0, t, cfg)
        res = integrate(term, solver, y0_flat, f0, times, replace(cfg, loop_only=True))
        if res is not None:
            sol = finish_direct(res, term, solver, cfg, y0, t, on_failure)
            sol.stats["gradient"] = "checkpoint"
            return sol
    if gopts.hidden_t0 is not None:  # left here by prepare (see solve._check_left_to_checkpoint)
        check_hidden_tensors(func, gopts.hidden_t0, y0, gopts.params, "checkpoint")
    setup = _Setup(func, solver, cfg, on_failure, gopts, y0.shape)
    setup.t = t
    setup.times = t.detach().cpu().tolist()
    setup.event_sizes = _check_event_tensors(cfg, y0, setup.times[0], gopts.params) if cfg.events else []
    ys, ev_t, ev_y = _CheckpointFunction.apply(setup, y0, *gopts.params)
    sol = setup.solution
    sol.ys = ys
    if sol.events is not None:
        sol.events.t, sol.events.y = ev_t.to(sol.events.t.dtype), ev_y
        if sol.status == EVENT:
            sol.event_t, sol.y_final = sol.events.t[-1], ev_y[-1]
    sol.stats["gradient"] = "checkpoint"
    return sol


def _compiled_training(func: Callable, cfg: LoopConfig, gopts: GradientOptions) -> bool:
    """Whether a compiled whole loop that records a graph (``cfg.loop.differentiable``) may stand in for the
    checkpointed replay: grad mode on, no events or dense output, and the tensors differentiated are the field's
    own parameters (the compiled backward differentiates all of them)."""
    if not (getattr(cfg.loop, "differentiable", False) and torch.is_grad_enabled()) or cfg.events or cfg.record:
        return False
    if not isinstance(func, torch.nn.Module):
        return False
    # (buffers requiring grad too: the compiled backward would differentiate them, the replay refuses them)
    own = {id(p) for p in (*func.parameters(), *func.buffers()) if p.requires_grad}
    return {id(p) for p in gopts.params} == own
