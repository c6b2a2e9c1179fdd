"""``gradient="checkpoint"``: the exact gradient of the discrete forward solve with bounded memory.

Forward: the loop runs without autograd and logs each accepted step's ``(t, h)`` (a few floats) and
the state at every ``stride``-th step, doubling the stride whenever more than ``checkpoints`` states
would be kept. Backward: each segment between checkpoints is replayed with the logged steps under
autograd and backpropagated, last segment first; a segment longer than 2 steps is first
replayed without autograd to place up to ``checkpoints`` sub-checkpoints, recursively, down to segments
of 2 steps. The replay runs the same stepper on the same step sizes, so the gradient equals
``gradient="direct"`` to rounding, with memory O(checkpoints x levels) states plus the graph of at most
2 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError, SolveFailure
from ..integrate import LoopConfig, ODETerm, assemble, check_derivative, integrate, real_dtype, step_outputs
from ..solution import FAILURE_STATUSES, Solution
from ..solvers.explicit_rk import ExplicitRungeKutta, Step
from .common import GradientOptions

# Longest segment backpropagated as one graph; longer ones are checkpointed again (recursively), so the
# graph held at once stays this short however many steps the solve takes.
_LEAF_STEPS = 2


class _StepLog:
    """Accepted steps (floats) and states at a stride that doubles to keep at most ``limit`` of them."""

    def __init__(self, limit: int):
        self.limit = max(2, limit)
        self.steps: list[tuple[float, float, float, float | None, float]] = []
        self.states: dict[int, Tensor] = {}
        self.stride = 1

    def __call__(self, t: float, h: float, t1: float, nudge: float | None, k1_time: float, y: Tensor) -> None:
        j = len(self.steps)
        self.steps.append((t, h, t1, nudge, k1_time))
        if j % self.stride == 0:
            self.states[j] = y.detach()
            if len(self.states) > self.limit:
                self.stride *= 2
                self.states = {i: v for i, v in self.states.items() if i % self.stride == 0}


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
        log = _StepLog(setup.gopts.checkpoints)
        cfg.on_accept = log
        with torch.no_grad():
            f0 = check_derivative(func(torch.scalar_tensor(times[0], dtype=term.t_dtype, device=term.device), y0), y0)
            term.nfe = 1
            res = integrate(term, solver, y0.detach().reshape(1, -1), f0, times, cfg)
            sol = assemble(res, term, solver, cfg, y0.detach(), setup.t.detach(), setup.on_failure)
        cfg.on_accept = None
        setup.solution, setup.log, setup.term = sol, log, term
        ctx.setup = setup
        return sol.ys.detach()

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        setup: _Setup = ctx.setup
        sol = setup.solution
        if sol.status in FAILURE_STATUSES:
            raise SolveFailure(f"cannot differentiate a failed solve (status {sol.status}, stopped at "
                               f"t={sol.t_final:.6g}): fix the forward solve first.", status=sol.status,
                               t=sol.t_final, solution=sol)
        log, solver, cfg, params = setup.log, setup.solver, setup.cfg, setup.gopts.params
        times = setup.times
        direction = 1.0 if times[-1] > times[0] else -1.0
        term = ODETerm(setup.func, setup.shape, setup.term.t_dtype, setup.term.device)
        co = solver.coefficients(grad_ys.dtype, grad_ys.device)
        n = grad_ys[0].numel()
        # First output index produced by each step.
        first_out = []
        out_i = 1
        for (_, _, t1, _, _) in log.steps:
            first_out.append(out_i)
            while out_i < len(times) and (times[out_i] - t1) * direction <= 0:
                out_i += 1
        g_params = [torch.zeros_like(p) for p in params]
        limit = log.limit
        fsal = solver.fsal

        def replay(j: int, y: Tensor, outs: list[Tensor] | None,
                   k1: Tensor | None) -> tuple[Tensor, Tensor | None]:
            """Step j again from y; returns (y1, the next step's first stage if FSAL gives it, else None).

            Within a segment the first stage comes from the previous step's last (FSAL), as in the forward
            loop, so the replayed graph is the direct method's; a segment start evaluates it afresh."""
            t, h, t1, nudge, k1_time = log.steps[j]
            if k1 is None:
                k1 = term(k1_time, y)
            y1, k, _ = solver.step(term, t, y, h, k1, co, nudge)
            if outs is not None:
                step_outputs(solver, term, Step(t, h, y, y1, k), co, cfg.interp, times, first_out[j], t1,
                             direction, outs)
            nxt = None
            if fsal and j + 1 < len(log.steps) and log.steps[j + 1][4] == t1 and log.steps[j + 1][0] == t1:
                nxt = k[-1].view(setup.shape)
            return y1, nxt

        def backprop(j0: int, j1: int, y_start: Tensor, a_end: Tensor) -> Tensor:
            if j1 - j0 > _LEAF_STEPS:
                stride = math.ceil((j1 - j0) / limit)
                subs = {j0: y_start}
                with torch.no_grad():
                    y, k1 = y_start, None
                    for j in range(j0, j1 - 1):
                        y, k1 = replay(j, y, None, k1)
                        if (j + 1 - j0) % stride == 0:
                            subs[j + 1] = y
                keys = sorted(subs) + [j1]
                for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
                    a_end = backprop(s0, s1, subs[s0], a_end)
                return a_end
            with torch.enable_grad():
                ys0 = y_start.detach().requires_grad_(True)
                y, k1 = ys0, None
                outs: list[Tensor] = []
                idx0 = first_out[j0]
                for j in range(j0, j1):
                    y, k1 = replay(j, y, outs, k1)
                roots = [y] + outs
                grads = [a_end.view(1, -1)] + [grad_ys[idx0 + m].reshape(1, -1) for m in range(len(outs))]
                res = torch.autograd.grad(roots, [ys0, *params], grads, allow_unused=True)
            for gp, r in zip(g_params, res[1:]):
                if r is not None:
                    gp.add_(r)
            return res[0] if res[0] is not None else torch.zeros_like(ys0)

        keys = sorted(log.states) + [len(log.steps)]
        a = grad_ys.new_zeros((1, n))
        for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
            a = backprop(s0, s1, log.states[s0], a)
        sol.stats["nfe_backward"] = term.nfe
        sol.stats["checkpoints"] = len(log.states)
        grad_y0 = (a.reshape(-1) + grad_ys[0].reshape(-1)).view(setup.shape)
        return (None, grad_y0, *g_params)


def solve_checkpoint(func: Callable, y0: Tensor, t: Tensor, solver: ExplicitRungeKutta, cfg: LoopConfig,
                     on_failure: str, gopts: GradientOptions) -> Solution:
    """gradient="checkpoint": see the module docstring."""
    if cfg.event_fn is not None:
        raise InputError("event_fn is supported with gradient='direct' only, not 'checkpoint'.")
    setup = _Setup(func, solver, cfg, on_failure, gopts, y0.shape)
    setup.t = t
    setup.times = t.detach().cpu().tolist()
    ys = _CheckpointFunction.apply(setup, y0, *gopts.params)
    sol = setup.solution
    sol.ys = ys
    sol.stats["gradient"] = "checkpoint"
    return sol
