"""Gradient methods with per-sample stepping (``solve(..., per_sample_steps=True, gradient=...)``).

Every method runs the per-sample loop (:func:`neurodyn.core.rows.integrate_rows`); none touches a solver.

``"direct"``
    Autograd through the per-sample loop (:func:`neurodyn.core.rows.solve_per_sample`).
``"adjoint"``
    The forward solve keeps no graph. The backward pass integrates each sample's ``[y, a]`` (``a = dL/dy``)
    from the last output time to the first with per-sample steps of its own: the rows are independent
    problems, so their adjoints are too. The parameter gradient ``g = -int a^T df/dtheta dt`` is shared by
    all samples, so it is not a state channel: after every backward step it is accumulated with the
    method's quadrature weights over the stages of each row's accepted step (``b_i h_b``, zero for rejected
    rows), by one backward pass through the stage evaluations kept from the step (the first stage, which
    FSAL reuses, is evaluated again). The error control therefore always leaves the parameter channels
    out (a seminorm).
``"interpolated"``
    As ``"adjoint"``, with ``y(t)`` read from the forward solve's per-sample dense output (kept for every
    step: memory O(steps)) instead of being integrated backward.
``"checkpoint"``
    The forward loop logs each step's per-row step sizes and decisions (``3 B`` numbers) and the state at a
    doubling stride; the backward pass replays segments between checkpoints with autograd (recursively
    checkpointed, down to 2 steps) and backpropagates them, last first. The replay is the same computation,
    so the gradient is ``gradient="direct"``'s to rounding, with bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.config import LoopConfig
from ..core.rows import (
    RowLog,
    RowsResult,
    RowState,
    StepHooks,
    check_supported,
    first_derivative,
    integrate_rows,
    make_solution,
    replay_rows,
    row_term,
    row_times,
    row_tolerance,
    solve_per_sample,
    start_derivative,
    time_cast,
)
from ..core.stepper import Stepper
from ..core.tensors import real_dtype
from ..errors import InputError, SolveFailure
from ..solution import FAILURE_STATUSES, STATUSES, Solution, check_differentiable
from ..solvers import get_solver
from .checkpoint import RngTape
from .common import GradientOptions, HiddenTensorGuard, first_order_only

_LEAF_STEPS = 2  # longest replayed segment backpropagated as one graph (as gradients/checkpoint.py)


class _DenseRows(StepHooks):
    """Records every step of a forward per-sample solve and evaluates each row's dense solution at a time of
    its own (the interpolated adjoint's source of ``y``)."""

    def __init__(self, term: Callable[[Tensor, Tensor], Tensor], solver: Stepper):
        self.term, self.solver = term, solver
        self.parts: list[tuple[Tensor, ...]] = []
        self.tables: tuple[Tensor, ...] | None = None
        self.nfe = 0

    def end_step(self, t, y, h, accept, y1, kh, f_last) -> None:
        solver = self.solver
        co = solver.coefficients(y.dtype, y.device)
        hc = h.to(real_dtype(y.dtype)).view(-1, 1)
        kf = solver.dense_stages_rows(self.term, t, h, hc, y, kh, co)
        self.nfe += len(co.extra_a)
        kf = kf.clone() if kf is kh else kf  # kh is the loop's reused buffer
        hermite = (y1, f_last * hc) if co.dense_t is None else ()
        self.parts.append((t, h, y, kf.transpose(0, 1), *hermite))

    def build(self) -> None:
        """Stack the records into per-row tables (after the forward solve)."""
        t0, h, *rest = (torch.stack(p) for p in zip(*self.parts))
        self.parts = []
        # Sorted start times per row (rejected attempts start where the row's next accepted step does, and
        # come before it; finished rows' zero steps are pushed to the end), in the direction of travel.
        sign = torch.sign(h.sum(0)).view(1, -1)
        key = torch.where(h == 0, math.inf, t0 * sign)
        self.tables = (key.t().contiguous(), sign.view(-1), t0, h, *rest)

    def __call__(self, t: Tensor) -> Tensor:
        key, sign, t0, h, y, kf, *herm = self.tables
        rows = torch.arange(key.shape[0], device=key.device)
        j = torch.searchsorted(key, (t * sign).view(-1, 1), right=True).view(-1).sub_(1).clamp_(0, key.shape[1] - 1)
        th = (t - t0[j, rows]) / h[j, rows]
        co = self.solver.coefficients(y.dtype, y.device)
        y1, fh1 = (herm[0][j, rows], herm[1][j, rows]) if herm else (None, None)
        return self.solver.interpolate_rows(y[j, rows], y1, kf[j, rows].transpose(0, 1), fh1, th, co)


class _AdjointRows(StepHooks):
    """The per-sample adjoint field on rows ``z = [y, a]`` (``(B, 2n)``), or ``z = a`` with ``y`` from the
    forward dense output, and the quadrature of the parameter gradient over each row's accepted steps."""

    def __init__(self, func: Callable, shape: torch.Size, params: list[Tensor], weights: list[float],
                 y_of_t: _DenseRows | None, guard: HiddenTensorGuard):
        # The stage graphs are kept until the step ends: the guard settles there.
        self.func, self.shape, self.params, self.weights, self.y_of_t = (
            guard.field(func, settle=False), shape, params, weights, y_of_t)
        self.guard = guard
        self.b_rows = shape[0]
        self.n = max(1, math.prod(shape[1:]))
        self.keep = bool(params)
        self.stash: list[tuple[int, Tensor, Tensor]] = []
        self.calls = len(weights)  # the stage the next call evaluates (none: outside a step)
        self.g = [torch.zeros_like(p) for p in params]
        self.nfe = 0

    def _split(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.y_of_t is None:
            return z[:, : self.n], z[:, self.n:]
        return self.y_of_t(t), z

    def _eval(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        yv = y.detach().reshape(self.shape).requires_grad_(True)
        return yv, self.func(t.to(real_dtype(y.dtype)), yv)

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        b, n = self.b_rows, self.n
        y, a = self._split(t, z)
        i = self.calls = self.calls + 1
        keep = self.keep and i < len(self.weights) and self.weights[i] != 0
        with torch.enable_grad():
            yv, fy = self._eval(t, y)
            gy = None
            if fy.requires_grad:
                (gy,) = torch.autograd.grad(fy, yv, -a.reshape(self.shape), retain_graph=keep, allow_unused=True)
        if keep and fy.requires_grad:
            self.stash.append((i, fy, a))
        gy = torch.zeros_like(a) if gy is None else gy.reshape(b, n)
        return gy if self.y_of_t is not None else torch.cat([fy.detach().reshape(b, n), gy], 1)

    def start_step(self) -> None:
        self.stash.clear()
        self.calls = 0

    def end_step(self, t, y, h, accept, y1, kh, f_last) -> None:
        self.calls = len(self.weights)
        if not self.keep:
            self.stash.clear()
            self.guard.settle()
            return
        w = (h * accept).to(real_dtype(y.dtype)).view(-1, 1)
        outs, grads = [], []
        fy = None
        if self.weights[0] != 0:  # the first stage came from the previous step (FSAL): evaluate it again
            y0, a0 = self._split(t, y)
            with torch.enable_grad():
                _, fy = self._eval(t, y0)
            self.nfe += 1
            if fy.requires_grad:
                outs.append(fy)
                grads.append((a0 * w).mul_(-self.weights[0]).view(self.shape))
        for i, fy, a in self.stash:
            outs.append(fy)
            grads.append((a * w).mul_(-self.weights[i]).view(self.shape))
        self.stash.clear()
        if outs:
            with torch.enable_grad():
                gp = torch.autograd.grad(outs, self.params, grads, allow_unused=True)
            for acc, g in zip(self.g, gp):
                if g is not None:
                    acc.add_(g)
        del outs, fy  # the stage graphs: a leaf the field made dies with them
        self.guard.settle()


class _Setup:
    """Everything the autograd Function needs besides tensors."""

    def __init__(self, func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                 on_failure: str, gopts: GradientOptions, mode: str):
        self.func, self.t, self.solver, self.cfg, self.on_failure, self.gopts, self.mode = (
            func, t, solver, cfg, on_failure, gopts, mode)
        self.shape = y0.shape
        self.b_rows = y0.shape[0]
        self.n = max(1, math.prod(y0.shape[1:]))
        self.times = row_times(t, self.b_rows)
        self.term = time_cast(row_term(func, y0.shape), real_dtype(y0.dtype))
        self.rtol = row_tolerance(cfg.rtol, self.b_rows, self.n)
        self.atol = row_tolerance(cfg.atol, self.b_rows, self.n)
        self.result: RowsResult | None = None
        self.solution: Solution | None = None
        self.log: RowLog | None = None
        self.dense: _DenseRows | None = None

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, y0: Tensor) -> Tensor:
        b, n = self.b_rows, self.n
        if self.mode == "checkpoint":
            # (the tape's first state is the generators' before f0: the backward pass evaluates f0 again there)
            self.log = RowLog(self.gopts.checkpoints, rng=RngTape(y0.device))
        elif self.mode == "interpolated":
            self.dense = _DenseRows(self.term, self.solver)
        with torch.no_grad():
            f0 = first_derivative(self.func, y0, self.times)
            res = integrate_rows(self.term, y0.reshape(b, n), f0, self.times, self.solver, self.cfg, self.rtol,
                                 self.atol, hooks=self.dense, log=self.log)
        res.nfe += 1 + (self.dense.nfe if self.dense is not None else 0)
        self.result = res
        self.solution = make_solution(res, self.t, self.shape, self.solver.name, self.on_failure, self.mode)
        if self.dense is not None and not self.failed():
            self.dense.build()
        return res.ys.detach().view(res.ys.shape[0], *self.shape)

    def failed(self) -> bool:
        return self.solution.status in FAILURE_STATUSES

    # -- backward --------------------------------------------------------------------------------
    def backward(self, grad_ys: Tensor) -> tuple[Tensor, list[Tensor]]:
        sol = self.solution
        check_differentiable(sol)
        gy = grad_ys.reshape(grad_ys.shape[0], self.b_rows, self.n)
        if self.mode == "checkpoint":
            # The replay puts the generators where the forward had them: the caller's are restored after.
            self.log.rng.begin_replay()
            with torch.random.fork_rng(devices=[gy.device] if gy.device.type == "cuda" else []):
                return self._checkpoint(gy)
        return self._adjoint(gy)

    def _adjoint(self, gy: Tensor) -> tuple[Tensor, list[Tensor]]:
        gopts, cfg, times = self.gopts, self.cfg, self.times
        b, n = self.b_rows, self.n
        ys = self.result.ys.detach()
        solver = get_solver(gopts.adjoint_method) if gopts.adjoint_method else self.solver
        interpolated = self.mode == "interpolated"
        field = _AdjointRows(self.func, self.shape, gopts.params, [float(x) for x in solver.tableau.b],
                             self.dense if interpolated else None, HiddenTensorGuard(gopts.params, self.mode))
        rtol = gopts.adjoint_rtol if gopts.adjoint_rtol is not None else self.rtol
        atol = gopts.adjoint_atol if gopts.adjoint_atol is not None else self.atol
        if not interpolated:  # per-element tolerances apply to y and a alike
            rtol = torch.cat([rtol, rtol], 1) if isinstance(rtol, Tensor) else rtol
            atol = torch.cat([atol, atol], 1) if isinstance(atol, Tensor) else atol
        bcfg = LoopConfig(rtol=rtol, atol=atol, adaptive=True, min_step=cfg.min_step, max_step=cfg.max_step,
                          max_steps=cfg.max_steps, controller=cfg.controller)
        a = gy[-1].clone()
        h_next = None
        nfe = steps = 0
        row_steps = torch.zeros(b, dtype=torch.long, device=a.device)
        drift = 0.0
        with torch.no_grad():
            for i in range(times.shape[1] - 1, 0, -1):
                z = a if interpolated else torch.cat([ys[i], a], 1)
                seg = torch.stack([times[:, i], times[:, i - 1]], 1)
                k0 = field(seg[:, 0], z)
                res = integrate_rows(field, z, k0, seg, solver, bcfg, rtol, atol, first_step=h_next, hooks=field)
                nfe += res.nfe + 1
                steps += int(res.steps.max())
                row_steps += res.steps
                bad = res.status != 0
                if bool(bad.any()):
                    row = int(torch.nonzero(bad)[0])
                    raise SolveFailure(
                        f"the adjoint (backward) solve of sample {row} failed between t={float(times[row, i]):.6g} "
                        f"and t={float(times[row, i - 1]):.6g} (stopped at t={float(res.t[row]):.6g}). Try "
                        f"gradient='checkpoint' (exact, no backward solve), gradient='interpolated', or other "
                        f"adjoint tolerances.", status=STATUSES[int(res.status[row])], t=float(res.t[row]),
                        solution=self.solution)
                if interpolated:
                    a = res.y + gy[i - 1]
                else:
                    scale = _scale(self.atol, self.rtol, ys[i - 1])
                    drift = max(drift, float(((res.y[:, :n] - ys[i - 1]).abs() / scale).max()))
                    a = res.y[:, n:] + gy[i - 1]
                h_next = res.next_step
        field.guard.settle()
        stats = self.solution.stats
        stats["nfe_backward"] = nfe + field.nfe
        stats["steps_backward"] = steps
        stats["steps_backward_per_sample"] = row_steps
        if not interpolated:
            stats["adjoint_drift"] = drift
            if drift > 1e3:
                import warnings

                warnings.warn(
                    f"gradient='adjoint': the backward reconstruction of y drifted from the forward solution by "
                    f"{drift:.3g} tolerance units (sol.stats['adjoint_drift']); the gradient may be inaccurate. "
                    f"Use gradient='checkpoint' or 'interpolated'.", RuntimeWarning, stacklevel=3)
        return a.view(self.shape), [g.to(p.dtype) for g, p in zip(field.g, gopts.params)]

    def _checkpoint(self, gy: Tensor) -> tuple[Tensor, list[Tensor]]:
        log, params, times, solver, term = self.log, self.gopts.params, self.times, self.solver, self.term
        b, n = self.b_rows, self.n
        n_out = gy.shape[0]
        # The outputs' gradients in the loop's output-buffer layout (slot = index * B + row); the first output
        # is y0 itself and the last the end state (its gradient joins the adjoint of the end state).
        grad_buf = gy.new_zeros(((n_out + 1) * b, n))
        grad_buf[b:(n_out - 1) * b] = gy[1:n_out - 1].reshape(-1, n)
        g_params = [torch.zeros_like(p) for p in params]
        guard = HiddenTensorGuard(params, "checkpoint")
        nfe = 0

        def backprop(j0: int, j1: int, state: RowState, a_end: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            """The adjoints ``(a_y, a_k1)`` of the loop state at step ``j0`` from those at ``j1`` (``k1``, the
            derivative the next step starts from, carries its gradient across segments: it is not evaluated
            again, so a stochastic field's draws stay the forward's)."""
            nonlocal nfe
            if j1 - j0 > _LEAF_STEPS:
                stride = math.ceil((j1 - j0) / log.limit)
                marks = set(range(j0 + stride, j1, max(stride, 1)))
                with torch.no_grad():
                    _, _, subs, k = replay_rows(term, solver, times, log, j0, max(marks), *state, marks=marks)
                nfe += k
                subs[j0] = state
                keys = sorted(subs) + [j1]
                for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
                    a_end = backprop(s0, s1, subs[s0], a_end)
                return a_end
            with torch.enable_grad():
                y_start = state[0].detach().requires_grad_(True)
                k_start = state[3].detach().requires_grad_(True)
                outs = grad_buf.new_zeros(grad_buf.shape)
                y_end, k_end, _, k = replay_rows(term, solver, times, log, j0, j1, y_start, state[1], state[2],
                                                 k_start, outs)
                roots, grads = [y_end, k_end], list(a_end)
                if outs.requires_grad:
                    roots.append(outs)
                    grads.append(grad_buf)
                guard.watch(roots, [y_start, k_start])
                res = torch.autograd.grad(roots, [y_start, k_start, *params], grads, allow_unused=True)
            del roots, outs, y_end, k_end  # the replayed graph: a leaf the field made dies with it
            guard.settle()
            nfe += k
            for acc, r in zip(g_params, res[2:]):
                if r is not None:
                    acc.add_(r)
            return tuple(r if r is not None else torch.zeros_like(x) for r, x in zip(res[:2], (y_start, k_start)))

        keys = sorted(log.states) + [len(log.h)]
        a = (gy[-1].clone(), gy.new_zeros((b, n)))
        for s0, s1 in reversed(list(zip(keys[:-1], keys[1:]))):
            a = backprop(s0, s1, log.states[s0], a)
        # f0 = f(t0, y0), evaluated again where the forward evaluated it (its draws too): its adjoint reaches y0
        # and the parameters.
        a, a_k = a
        if log.states:
            log.rng.restore(log.rng.after[-1])
            with torch.enable_grad():
                y_start = log.states[0][0].detach().requires_grad_(True)
                f0 = start_derivative(term, times, y_start)
                guard.watch([f0], [y_start])
                res = torch.autograd.grad(f0, [y_start, *params], a_k, allow_unused=True)
            del f0
            guard.settle()
            nfe += 1
            if res[0] is not None:
                a = a + res[0]
            for acc, r in zip(g_params, res[1:]):
                if r is not None:
                    acc.add_(r)
        self.solution.stats["nfe_backward"] = nfe
        self.solution.stats["checkpoints"] = len(log.states)
        return (a + gy[0]).view(self.shape), g_params


def _scale(atol: float | Tensor, rtol: float | Tensor, y: Tensor) -> Tensor:
    """The error scale ``atol + rtol |y|`` (the adjoint's drift is reported in these units)."""
    return atol + rtol * y.abs()


class _PerSampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, *params: Tensor) -> Tensor:
        ctx.setup = setup
        ctx.save_for_backward(y0, *params)
        return setup.forward(y0)

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        grad_y0, grad_params = ctx.setup.backward(grad_ys)
        return (None, *first_order_only(ctx.setup.mode, [grad_y0, *grad_params], [grad_ys, *ctx.saved_tensors]))


def solve_per_sample_gradient(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                              on_failure: str, gopts: GradientOptions, gradient: str) -> Solution:
    """A per-sample solve with the gradient method ``gradient`` (see the module docstring)."""
    if gradient == "direct":
        return solve_per_sample(func, y0, t, solver, cfg, on_failure)
    check_supported(y0, solver, cfg)
    if cfg.events:
        raise InputError(f"per_sample_steps with events differentiates with gradient='direct' only, not "
                         f"{gradient!r} (the per-sample replays and backward solves do not repeat the events).")
    if gradient in ("adjoint", "interpolated") and gopts.adjoint_method is not None:
        adj = get_solver(gopts.adjoint_method)
        if not adj.rows or not adj.adaptive:
            raise InputError(f"per_sample_steps: the backward solve needs an adaptive explicit Runge-Kutta "
                             f"adjoint_method, not {gopts.adjoint_method!r}.")
    setup = _Setup(func, y0, t, solver, cfg, on_failure, gopts, gradient)
    ys = _PerSampleFunction.apply(setup, y0, *gopts.params)
    sol = setup.solution
    sol.ys = ys
    return sol
