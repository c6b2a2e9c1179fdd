"""Continuous adjoints: ``gradient="adjoint"`` (backsolve) and ``gradient="interpolated"``.

Forward: the solve runs without autograd. Backward: the adjoint ``a = dL/dy`` and the parameter
gradient ``g`` are integrated from the last output time to the first,

    da/dt = -a^T df/dy,    dg/dt = -a^T df/dtheta,

with ``a`` jumping by ``dL/dy(t_i)`` at every output time. ``"adjoint"`` reconstructs ``y`` by solving
it backward alongside (O(1) memory in the steps; the state is reset to the forward value at each
output time, and the drift of that reconstruction is reported). ``"interpolated"`` reads ``y(t)`` from
the forward dense solution instead (stable where the backward reconstruction diverges; memory
O(accepted steps)). Where ``g``'s channels are not error-controlled (fixed steps, or ``seminorm=True``) and the
backward method's step is a weighted sum of its evaluations (explicit Runge--Kutta: the stepper's
``quadrature_weights()``), ``g`` is integrated outside the backward state with those weights
the same gradient to rounding, each stage combination touching ``[y, a]`` only and each evaluation adding only to the
parameters it depends on. An implicit backward method solves its Newton iterations to the backward solve's
tolerances (``adjoint_rtol``/``adjoint_atol``), not the forward's.

Accuracy
--------
These are gradients of the continuous problem, computed to the accuracy of the backward solve (and, for
``"interpolated"``, of the forward dense output), not the exact gradient of the discrete forward solve
(``"direct"``, ``"checkpoint"``). Two effects matter on stiff problems (measured on ``tests/test_auto.py``'s bump
problem, ``lambda(t)`` down to -1e4, ``kvaerno5`` at ``rtol=1e-7``; see ``tests/test_stiff_gradients.py``):

* A parameter channel integrates ``a^T df/dtheta``, in which a stiff component of ``a`` (of size ~ 1/|lambda|) is
  multiplied by ~|lambda|: its absolute error, set by ``adjoint_atol``, is amplified, and with ``seminorm=True``
  (the default) the parameter channels are not error-controlled at all. Such a gradient converges as the adjoint
  tolerances tighten: 9e-8 relative at the defaults, 6e-9 with ``adjoint_rtol=1e-8, adjoint_atol=1e-11``, 1e-10
  with ``1e-9, 1e-12``.
* ``"interpolated"`` reads ``y(t)`` from the forward dense output. For methods whose dense output is cubic Hermite
  (``kvaerno3/4/5``, ``trbdf2`` and the fixed-step DIRKs; also ``auto`` while it runs ``kvaerno5``) its error is
  ~h^4 on long steps and, in a stiff phase, |lambda| times the state error through the end derivatives -- far
  above ``rtol`` (7e-5 on the bump, against 4e-8 for ``radau``'s collocation polynomial). A gradient that integrates
  ``y`` carries that error whatever the adjoint tolerance (4e-6 to 5e-6 relative at forward ``rtol=1e-7``) and it
  shrinks only with the forward tolerance (6e-7 at 1e-8, 2e-7 to 3e-7 at 1e-9, ~h^4). ``radau``: 1e-9 at the
  defaults. Use ``radau``, or ``"checkpoint"``, where this matters.

Random draws in the field
-------------------------
The backward solve evaluates the field at other times than the forward and in another order, so a field that draws
random numbers in each call (dropout in training mode, noise drawn inside the call) sees different draws backward:
the gradient is not that of the forward that ran (7 % off on a small dropout MLP). Draw the noise once per solve,
outside the field, and let the field read it -- FFJORD's Hutchinson estimator samples ``e`` before ``odeint`` --
and the adjoint is consistent again (``tests/test_gradient_correctness.py``); or use ``"checkpoint"``, which
replays the forward's draws exactly, or ``"direct"``.

Hidden tensors and second derivatives
-------------------------------------
The backward solve differentiates the field with respect to ``y`` and ``params`` only. Every backward evaluation
is checked (:class:`~neurodyn.gradients.common.HiddenTensorGuard`) for other tensors requiring grad that the field
uses -- a field may use one only after some time -- and an :class:`~neurodyn.errors.InputError` names them.
The gradient is computed outside autograd, so it cannot be differentiated again (``create_graph=True``): doing so
raises an :class:`~neurodyn.errors.InputError`; use ``gradient="direct"`` for second derivatives.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ..core.config import LoopConfig
from ..core.control import StepperController, initial_step
from ..core.loop import integrate
from ..core.output import assemble
from ..core.stepper import Step, Stepper, nextafter
from ..core.tensors import flat_cat, real_dtype
from ..core.term import AdjointTerm, ODETerm, SDEAdjointTerm, term_of
from ..errors import InputError, SolveFailure
from ..fields import check_derivative
from ..solution import FAILURE_STATUSES, Solution, check_differentiable
from ..solvers import get_solver
from .common import GradientOptions, HiddenTensorGuard, first_order_only
from .reversible import exact_reversible, solve_reversible


class _Setup:
    """Everything the autograd Function needs besides tensors (kept off the tensor arguments)."""

    def __init__(self, func, solver, cfg, on_failure, gopts, mode, shape):
        self.func = func
        self.solver = solver
        self.cfg = cfg
        self.on_failure = on_failure
        self.gopts = gopts
        self.mode = mode
        self.shape = shape
        self.solution: Solution | None = None
        self.records: list[Step] = []
        self.term: ODETerm | None = None


class _DenseLookup:
    """y(t) from the recorded forward steps (the interpolated adjoint's source of y)."""

    def __init__(self, term: ODETerm, solver: Stepper, records: list[Step], interp: str):
        self.term, self.solver, self.records, self.interp = term, solver, records, interp
        self.co = solver.coefficients(records[0].y0.dtype, records[0].y0.device)
        self.sign = 1.0 if records[0].h > 0 else -1.0
        self.starts = [r.t0 * self.sign for r in records]

    def __call__(self, t: float) -> Tensor:
        j = min(max(0, bisect.bisect_right(self.starts, t * self.sign) - 1), len(self.records) - 1)
        r = self.records[j]
        th = torch.tensor([(t - r.t0) / r.h], dtype=self.term.t_dtype, device=r.y0.device)
        return self.solver.interpolate(self.term, r, th, self.co, self.interp)


class _ParamQuadrature:
    """The parameter gradient ``g`` integrated outside the backward solve's state.

    ``dg/dt = -a^T df/dtheta`` does not depend on ``g``: in a step ``y1 = y + h sum_i b_i k_i`` of the augmented
    state (:meth:`~neurodyn.core.stepper.StepperBase.quadrature_weights`) the ``g`` channels only add
    ``h sum_i b_i`` times their values at the step's evaluations, which is what this class accumulates, per parameter
    and only for the evaluations that depend on it (a path's coefficient row enters the evaluations of its own
    piece). The state is then ``[y, a]`` (or ``[a]``), and every stage combination of the backward solve touches
    only those. The loop's hooks delimit the evaluations: those inside an attempt (between the ``"step"`` hook and
    the acceptance or rejection) are stages ``2..s`` in order; the first stage is the last evaluation made outside an
    attempt at the step's starting state (the caller's initial derivative, the loop's ``k1``), or, for a first-same-
    as-last method that made none, the previous accepted step's last stage.
    """

    def __init__(self, weights: tuple[float, ...], params: list[Tensor], fsal: bool):
        self.weights = weights
        self.fsal = fsal
        self.acc: list[Tensor | None] = [None] * len(params)
        self.inside = False
        self.stages: list[list[tuple[int, Tensor]]] = []
        self.outside: list[tuple[int, list[tuple[int, Tensor]]]] = []  # (state's data_ptr, products)
        self.last: list[tuple[int, Tensor]] | None = None
        self.grads: tuple = ()  # the last evaluation's products, as handed over

    def record(self, z: Tensor, grads) -> None:
        """``AdjointTerm``'s ``on_params``: one evaluation's products (the non-None ones, with their index)."""
        self.grads = grads
        parts = [(j, g) for j, g in enumerate(grads) if g is not None]
        if self.inside:
            self.stages.append(parts)
        else:
            self.outside.append((z.data_ptr(), parts))

    def begin(self, t: float, y: Tensor, h_abs: float) -> None:
        self.inside = True
        self.stages = []

    def reject(self, t: float, y: Tensor, h_abs: float) -> None:
        self.inside = False
        self.stages = []

    def accept(self, t, h, t1, nudge, k1_time, y, k1) -> None:
        self.inside = False
        ptr = y.data_ptr()
        first = next((parts for p, parts in reversed(self.outside) if p == ptr), None)
        if first is None and self.fsal:
            first = self.last
        if first is None or len(self.stages) != len(self.weights) - 1:
            raise RuntimeError(f"gradient='adjoint': the backward step at t={t:.6g} did not evaluate the field as its "
                               f"method's quadrature_weights() declare (first stage found: {first is not None}, "
                               f"{len(self.stages)} evaluations inside the step for {len(self.weights)} weights).")
        inc: dict[int, Tensor] = {}
        for w, parts in zip(self.weights, [first, *self.stages]):
            if w == 0.0:
                continue
            for j, g in parts:
                cur = inc.get(j)
                inc[j] = g * w if cur is None else cur.add_(g, alpha=w)
        for j, v in inc.items():
            cur = self.acc[j]
            self.acc[j] = v.mul_(h) if cur is None else cur.add_(v, alpha=h)
        self.last = self.stages[-1] if self.stages else first
        self.outside = []
        self.stages = []

    def start_interval(self) -> None:
        """A new backward solve (the next output interval): its own initial derivative, no FSAL stage carried."""
        self.outside, self.stages, self.last, self.inside = [], [], None, False


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        func, solver, cfg = setup.func, setup.solver, setup.cfg
        term = ODETerm(func, y0.shape, real_dtype(y0.dtype), y0.device)
        times = t.detach().cpu().tolist()
        with torch.no_grad():
            # perturb: the first derivative just after t0, as the loop's (and gradient="direct"'s)
            t_start = nextafter(times[0], times[-1] - times[0], term.t_dtype) if cfg.perturb else times[0]
            f0 = check_derivative(func(torch.scalar_tensor(t_start, dtype=term.t_dtype, device=term.device), y0), y0)
            term.nfe = 1
            if setup.mode == "interpolated":
                cfg = replace(cfg, record=True)
            res = integrate(term, solver, y0.detach().reshape(1, -1), f0, times, cfg)
            sol = assemble(res, term, solver, cfg, y0.detach(), t.detach(), setup.on_failure)
        setup.solution = sol
        setup.records = res.records
        setup.term = term
        ctx.setup = setup
        ys = sol.ys.detach()
        ctx.save_for_backward(ys, t, y0, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: Tensor):
        setup: _Setup = ctx.setup
        ys, t, *inputs = ctx.saved_tensors
        sol = setup.solution
        check_differentiable(sol)
        func, gopts, shape = setup.func, setup.gopts, setup.shape
        params = gopts.params
        n = ys[0].numel()
        p_total = sum(p.numel() for p in params)
        times = t.detach().cpu().tolist()
        t_dtype, device = real_dtype(ys.dtype), ys.device
        interpolated = setup.mode == "interpolated"
        y_of_t = _DenseLookup(setup.term, setup.solver, setup.records, setup.cfg.interp) if interpolated else None
        guard = HiddenTensorGuard(params, setup.mode)
        user = term_of(func)
        stochastic = user is not None and "sde" in user.kinds
        # compile=True: the backward evaluations as compiled programs where they apply (neurodyn.compile.adjoint)
        fast = gopts.adjoint_fields(func, shape, params, ys) if gopts.adjoint_fields is not None else None
        if stochastic:  # the stochastic adjoint: an augmented Stratonovich SDE on the forward's Brownian path
            aug = SDEAdjointTerm(user, shape, params, drift=guard.field(func), wrap=guard.field, fast=fast)
            adj_solver = get_solver(sde_adjoint_method(setup.solver, gopts.adjoint_method), frozenset({"sde"}))
        else:
            adj_solver = get_solver(gopts.adjoint_method) if gopts.adjoint_method else setup.solver
        rtol = gopts.adjoint_rtol if gopts.adjoint_rtol is not None else setup.cfg.rtol
        atol = gopts.adjoint_atol if gopts.adjoint_atol is not None else setup.cfg.atol
        y_dims = 0 if interpolated else n
        controller = setup.cfg.controller
        if not controller.land_on_end:
            # The backward solves land on the interval ends: the parameter quadrature sums whole steps.
            controller = replace(controller, land_on_end=True)
        if adj_solver.bind_tolerances:
            # Newton's tolerance follows the backward solve's: a stepper bound to the forward tolerances would stop
            # Newton far above a tighter adjoint_rtol, and the error control would then chase Newton's residual.
            own = isinstance(controller, StepperController) and controller.stepper is adj_solver
            # Its outputs are the interval ends only: no error control of values between steps is needed.
            extra = {"dense_error": False} if adj_solver.interior_error else {}
            adj_solver = adj_solver.bind(rtol=rtol, atol=atol, **extra)
            if own:  # bdf sizes its own steps: the new stepper's controller
                controller = adj_solver.default_controller()
        want = setup.cfg.step_size is None if gopts.adjoint_adaptive is None else gopts.adjoint_adaptive
        adaptive = adj_solver.adaptive and want
        if adj_solver.optional_error and not adaptive:
            adj_solver = adj_solver.fixed_step()
        quad = None
        if not stochastic:
            # g out of the state where its channels are not error-controlled (fixed steps, or the seminorm) and the
            # method's step is a weighted sum of its evaluations: the same gradient, the steps touching [y, a] only.
            weights = adj_solver.quadrature_weights() if p_total and (gopts.seminorm or not adaptive) else None
            quad = _ParamQuadrature(weights, params, adj_solver.fsal) if weights is not None else None
            aug = AdjointTerm(guard.field(func), shape, params, y_of_t,
                              on_params=quad.record if quad is not None else None,
                              fast=fast.drift if fast is not None else None)
        g_total = 0 if quad is not None else p_total
        rtol_full, atol_full = rtol, atol
        if not isinstance(rtol, float) or not isinstance(atol, float):
            # Per-element tolerances of the state apply to y and a alike; the g channels use the mean.
            rtol_full, atol_full = _aug_tol(rtol, y_dims, n, p_total), _aug_tol(atol, y_dims, n, p_total)
            rtol, atol = _aug_tol(rtol, y_dims, n, g_total), _aug_tol(atol, y_dims, n, g_total)
        cfg = LoopConfig(rtol=rtol, atol=atol, adaptive=adaptive,
                         step_size=None if adaptive else setup.cfg.step_size,
                         first_step=setup.cfg.step_size if adaptive else None, max_steps=setup.cfg.max_steps,
                         min_step=setup.cfg.min_step,
                         max_step=setup.cfg.max_step, controller=controller, accept_min_step=setup.cfg.accept_min_step,
                         jump_t=setup.cfg.jump_t, step_t=setup.cfg.step_t if not adj_solver.adaptive else [],
                         perturb=setup.cfg.perturb,
                         error_dims=(y_dims + n) if gopts.seminorm and quad is None else None,
                         on_accept=quad.accept if quad is not None else None,
                         step_callbacks={"step": quad.begin, "reject": quad.reject} if quad is not None else None)
        jumps = set(setup.cfg.jump_t)
        # (closing: the compiled evaluations forget this solve's term and modules afterwards)
        with torch.no_grad(), contextlib.closing(fast) if fast is not None else contextlib.nullcontext():
            a = grad_ys[-1].reshape(-1).clone()
            g = a.new_zeros(g_total)
            nfe = steps = 0
            drift = 0.0
            for i in range(len(times) - 1, 0, -1):
                parts = [a, g] if interpolated else [ys[i].reshape(-1), a, g]
                z0 = torch.cat(parts).view(1, -1)
                term = ODETerm(aug.rate, z0.shape, t_dtype, device)
                if quad is not None:
                    quad.start_interval()
                # Starting on a jump (a path knot at an output time) or with perturb: the derivative of the side
                # travelled into, one ulp of the time dtype inside the interval.
                nudged = times[i] in jumps or cfg.perturb
                k0 = term(nextafter(times[i], times[i - 1] - times[i], t_dtype) if nudged else times[i], z0)
                if quad is not None and cfg.adaptive and cfg.first_step is None:
                    # The first step proposed from the whole augmented state [y, a, g], as without the quadrature.
                    full = ODETerm(AdjointTerm(guard.field(func), shape, params, y_of_t).rate,
                                   (1, z0.shape[1] + p_total), t_dtype, device)
                    zf = torch.cat([z0, flat_cat(quad.acc, params).to(z0.dtype).view(1, -1)], 1)
                    kf = torch.cat([k0.reshape(1, -1), flat_cat(quad.grads, params).to(z0.dtype).view(1, -1)], 1)
                    inv = 1.0 / math.sqrt(zf.shape[1])
                    direction = 1.0 if times[i - 1] > times[i] else -1.0
                    h0 = initial_step(full, times[i], zf, kf, direction, adj_solver.order, rtol_full, atol_full,
                                      lambda x, _inv=inv: float(torch.linalg.vector_norm(x)) * _inv, cfg.max_step)
                    cfg = replace(cfg, first_step=h0)
                    nfe += full.nfe
                res = integrate(term, adj_solver, z0, k0, [times[i], times[i - 1]], cfg)
                # The next interval starts from the controller's proposal, not a fresh initial guess.
                cfg = replace(cfg, first_step=res.next_step if cfg.adaptive else None)
                nfe += term.nfe
                steps += res.steps
                if res.status in FAILURE_STATUSES:
                    raise SolveFailure(
                        f"the adjoint (backward) solve failed between t={times[i]:.6g} and t={times[i - 1]:.6g}: "
                        f"{res.message} Try gradient='checkpoint' (exact, no backward solve), gradient="
                        f"'interpolated', or other adjoint tolerances.", status=res.status, t=res.t_final,
                        solution=sol)
                z1 = res.outs[-1].reshape(-1)
                if not interpolated:
                    y_rec = z1[:n]
                    scale = atol_abs(setup.cfg.atol, setup.cfg.rtol, ys[i - 1].reshape(-1))
                    drift = max(drift, float(((y_rec - ys[i - 1].reshape(-1)).abs() / scale).max()))
                    a, g = z1[n:2 * n].clone(), z1[2 * n:]
                else:
                    a, g = z1[:n].clone(), z1[n:]
                a = a + grad_ys[i - 1].reshape(-1)
            guard.settle()
            sol.stats["nfe_backward"] = nfe
            sol.stats["steps_backward"] = steps
            if not interpolated:
                sol.stats["adjoint_drift"] = drift
                if drift > 1e3 and setup.cfg.adaptive:  # tolerance units mean nothing for a fixed step
                    import warnings

                    warnings.warn(
                        f"gradient='adjoint': the backward reconstruction of y drifted from the forward solution by "
                        f"{drift:.3g} tolerance units (sol.stats['adjoint_drift']); the gradient may be inaccurate. "
                        f"Use gradient='checkpoint' or 'interpolated'.", RuntimeWarning, stacklevel=2)
            grad_y0 = a.view(shape)
            # Gradients with respect to t are added outside, the same way for every gradient method.
            grad_t = None
            grad_params = []
            off = 0
            for j, p in enumerate(params):
                if quad is not None:
                    acc = quad.acc[j]
                    grad_params.append(acc.view(p.shape).to(p.dtype) if acc is not None else torch.zeros_like(p))
                    continue
                k = p.numel()
                grad_params.append(g[off:off + k].view(p.shape).to(p.dtype))
                off += k
        return (None, *first_order_only(setup.mode, [grad_y0, grad_t, *grad_params], [grad_ys, *inputs]))


class _NoEventGradient(torch.autograd.Function):
    """Passes event values through; a gradient reaching them raises (the continuous adjoint gives none)."""

    @staticmethod
    def forward(ctx, mode: str, value: Tensor, *links: Tensor) -> Tensor:
        ctx.mode = mode
        return value.clone()

    @staticmethod
    def backward(ctx, *_):
        raise InputError(f"gradient={ctx.mode!r} gives the gradient of sol.ys only, not of the event times and states "
                         f"(sol.events): use gradient='checkpoint' (exact, bounded memory) or 'direct' to "
                         f"differentiate them.")


def atol_abs(atol, rtol, y: Tensor) -> Tensor:
    """The error scale ``atol + rtol |y|`` (drift is reported in these units)."""
    a = atol.reshape(-1) if isinstance(atol, Tensor) else atol
    r = rtol.reshape(-1) if isinstance(rtol, Tensor) else rtol
    return a + r * y.abs()


def _aug_tol(tol, y_dims: int, n: int, p_total: int) -> Tensor:
    if not isinstance(tol, Tensor):
        return tol
    flat = tol.reshape(-1)
    parts = ([flat] if y_dims else []) + [flat, flat.mean().expand(p_total)]
    return torch.cat(parts).view(1, -1)


def solve_adjoint(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                  on_failure: str, gopts: GradientOptions, mode: str = "adjoint") -> Solution:
    """gradient="adjoint" / "interpolated": see the module docstring."""
    if mode == "adjoint" and exact_reversible(solver, gopts.adjoint_method):
        return solve_reversible(func, y0, t, solver, cfg, on_failure, gopts)
    stopping = [i for i, e in enumerate(cfg.events) if e.jump is not None or e.stop_after is not None]
    if stopping:
        raise InputError(f"gradient={mode!r} cannot differentiate through a jump or a terminal event (events "
                         f"{stopping}): its backward solve would need the adjoint's jump at every event. Use "
                         f"gradient='checkpoint' (exact, bounded memory) or 'direct'.")
    setup = _Setup(func, solver, cfg, on_failure, gopts, mode, y0.shape)
    ys = _AdjointFunction.apply(setup, y0, t, *gopts.params)
    sol = setup.solution
    sol.ys = ys
    if sol.events is not None and torch.is_grad_enabled():
        # Events without jumps leave the trajectory alone: the gradient of ys is exact. The event times and states
        # carry none: a backward pass reaching them raises.
        links = [x for x in (y0, *gopts.params) if x.requires_grad]
        if links:
            sol.events.t = _NoEventGradient.apply(mode, sol.events.t, *links)
            sol.events.y = _NoEventGradient.apply(mode, sol.events.y, *links)
    sol.stats["gradient"] = mode
    return sol


#: SDE methods integrating the stochastic adjoint (they use the diffusion only as the product g dW).
SDE_ADJOINT_METHODS = ("midpoint", "heun", "euler_heun")


def sde_adjoint_method(forward: Stepper, adjoint_method: str | None) -> str:
    """The SDE method of the stochastic adjoint's backward solve: ``adjoint_method``, else the forward method when
    it can integrate the adjoint SDE, else ``"midpoint"``. Raises an InputError for a method that cannot."""
    if adjoint_method is None:
        name = getattr(forward, "name", None)
        return name if name in SDE_ADJOINT_METHODS else "midpoint"
    if adjoint_method not in SDE_ADJOINT_METHODS:
        raise InputError(f"adjoint_method={adjoint_method!r}: the stochastic adjoint is a Stratonovich SDE with "
                         f"general noise given as the product g dW; the methods integrating it are "
                         f"{', '.join(SDE_ADJOINT_METHODS)}.")
    return adjoint_method


def solve_interpolated(func, y0, t, solver, cfg, on_failure, gopts) -> Solution:
    return solve_adjoint(func, y0, t, solver, cfg, on_failure, gopts, mode="interpolated")

