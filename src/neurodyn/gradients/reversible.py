"""The exact adjoint of reversible Heun (Kidger et al. 2021): ``gradient="adjoint"``, ``method="reversible_heun"``.

Reversible Heun carries ``(y, z)`` and steps (``f0 = f(t, z0)``, ``g0 = g(t, z0)``, ``dW`` the step's increment)

    z1 = 2 y0 - z0 + f0 h + g0 dW,          y1 = y0 + (f0 + f1) h / 2 + (g0 + g1) dW / 2,

with ``f1, g1`` at ``(t + h, z1)``. It is algebraically reversible: from ``(y1, z1)``

    z0 = 2 y1 - z1 - f1 h - g1 dW,           y0 = y1 - (f0 + f1) h / 2 - (g0 + g1) dW / 2.

Forward: the solve runs without autograd and keeps the step times (floats) and the last ``z``. Backward: each
step, last to first, reconstructs ``(y0, z0)`` from ``(y1, z1)`` with the same Brownian increments (the path
returns the same ``dW`` for the same query), re-runs the step under autograd and backpropagates the adjoints of
``(y1, z1)`` through it. The gradients are those of the discrete forward solve (``gradient="direct"``'s) up to
rounding in the reconstruction, with memory independent of the number of steps (two states and the step
times). Output times between step ends are the linear dense output ``(1 - theta) y0 + theta y1``; their
cotangents enter the two ends by those weights. ``sol.stats["reconstruction_error"]``: the largest
``|y_reconstructed - y|`` at the output times.

Cost per step backward: one drift and one diffusion evaluation with their graph (at the reconstructed ``z0``) and
one reverse pass through them, taken once both uses of ``f(z0), g(z0)`` (in this step and the one before) have
their cotangents: the forward step's cost plus a reverse pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ..core.config import LoopConfig
from ..core.control import step_grid, time_eps
from ..core.loop import integrate, landing_times
from ..core.output import assemble
from ..core.stepper import Stepper, nextafter
from ..core.tensors import real_dtype
from ..core.term import ControlTerm, MultiTerm, ODETerm, Term, term_of
from ..errors import InputError
from ..fields import check_derivative
from ..solution import Solution, check_differentiable
from .common import GradientOptions, first_order_only

#: ``adjoint_method`` names selecting the exact algebraic adjoint (torchsde's name included).
REVERSIBLE_ADJOINT_NAMES = (None, "reversible_heun", "adjoint_reversible_heun")


def exact_reversible(solver: Stepper, adjoint_method: str | None) -> bool:
    """Whether ``gradient="adjoint"`` with this forward stepper and ``adjoint_method`` is reversible Heun's exact
    adjoint."""
    return getattr(solver, "name", None) == "reversible_heun" and adjoint_method in REVERSIBLE_ADJOINT_NAMES


def _sde_pieces(term: Term) -> tuple[Callable, ControlTerm]:
    parts = term.terms if isinstance(term, MultiTerm) else (term,)
    diffusion = next(p for p in parts if "sde" in p.kinds)
    rest = [p for p in parts if "sde" not in p.kinds]
    drift = rest[0].rate if rest else (lambda t, y: torch.zeros_like(y))
    return drift, diffusion


class _Setup:
    def __init__(self, func, solver, cfg, on_failure, gopts, shape):
        self.func, self.solver, self.cfg, self.on_failure, self.gopts, self.shape = \
            func, solver, cfg, on_failure, gopts, shape
        self.solution: Solution | None = None
        self.steps: list[tuple[float, float]] = []
        self.z_end: Tensor | None = None
        self.y_end: Tensor | None = None


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        func, solver, cfg = setup.func, setup.solver, setup.cfg
        term = ODETerm(func, y0.shape, real_dtype(y0.dtype), y0.device)
        times = t.detach().cpu().tolist()
        steps: list[tuple[float, float, float]] = []

        def on_accept(t0, h, t1, nudge, k1_time, y_start, k1, _inner=cfg.on_accept):
            steps.append((t0, h, t1))
            if _inner is not None:
                _inner(t0, h, t1, nudge, k1_time, y_start, k1)

        # Fixed steps without a caller's hook: the steps are the grid's (step_grid, as every loop steps), so the solve
        # runs without a per-step hook and compile=True may run it as the compiled driven loop.
        grid = not cfg.adaptive and cfg.on_accept is None and not cfg.perturb
        with torch.no_grad():
            t_start = nextafter(times[0], times[-1] - times[0], term.t_dtype) if cfg.perturb else times[0]
            f0 = check_derivative(func(torch.scalar_tensor(t_start, dtype=term.t_dtype, device=term.device), y0), y0)
            term.nfe = 1
            res = integrate(term, solver, y0.detach().reshape(1, -1), f0, times,
                            cfg if grid else replace(cfg, on_accept=on_accept))
            sol = assemble(res, term, solver, cfg, y0.detach(), t.detach(), setup.on_failure)
        if grid:
            jumps, stops = landing_times(times, cfg)
            starts, hs = step_grid(times, stops, min(cfg.step_size, cfg.max_step), time_eps(term.t_dtype), jumps)
            steps = [(starts[j], hs[j], starts[j + 1]) for j in range(res.steps)]
        setup.solution = sol
        setup.steps = steps
        # The carried z of the last accepted step (replay_record: (info, (z, g(z)), t)).
        setup.z_end = solver.replay_record()[1][0].detach() if steps else y0.detach()
        setup.y_end = res.y_final.detach() if steps else y0.detach()
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
        params = setup.gopts.params
        shape = setup.shape
        user = term_of(setup.func)
        drift, diffusion = _sde_pieces(user)
        bm = diffusion.path
        t_dtype, device = real_dtype(ys.dtype), ys.device
        times = t.detach().cpu().tolist()

        def tt(s: float) -> Tensor:
            return torch.scalar_tensor(s, dtype=t_dtype, device=device)

        def fg(s: float, z: Tensor) -> tuple[Tensor, Tensor]:
            ts_ = tt(s)
            return drift(ts_, z), diffusion.vf(ts_, z)

        def phi(s: float, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """``(z', f(s, z'), g(s, z'))`` with ``z'`` a leaf copy of ``z``, under autograd."""
            with torch.enable_grad():
                zv = z.detach().requires_grad_(True)
                return (zv, *fg(s, zv))

        n_valid = sol.n_valid
        y1 = setup.y_end.view(shape).clone()
        z1 = setup.z_end.view(shape).clone()
        # a_y, a_z: the adjoints of (y1, z1) except, for z1, the part through f(z1), g(z1), whose vector-Jacobian
        # product is taken once, when both of its uses (this step's and the next one's) have their cotangents.
        a_y = torch.zeros_like(y1)
        a_z = torch.zeros_like(a_y)
        a_p = [torch.zeros_like(p) for p in params]
        i = n_valid - 1
        err = 0.0
        nfe = 0
        steps = setup.steps
        pend = None  # the next step's cotangents of f(z1) and of g(z1) dW_next, and dW_next
        if steps:
            zv1, f1, g1 = phi(steps[-1][0] + steps[-1][1], z1)
            nfe += 1

        def finish(zv: Tensor, fz: Tensor, gz: Tensor, uses: list[tuple[Tensor, Tensor, Tensor | None]]) -> Tensor:
            """One reverse pass through ``f(z), g(z)`` for all their uses ``(cot_f, cot_gdw, dW)``; adds the
            parameters' part to ``a_p`` and returns the adjoint through ``z``."""
            with torch.enable_grad():
                outs, cots = [fz], [sum(u[0] for u in uses)]
                for _, c, dw in uses:
                    outs.append(diffusion.prod(gz, dw))
                    cots.append(c)
                grads = torch.autograd.grad(outs, (zv, *params), cots, allow_unused=True)
            for k, gp in enumerate(grads[1:]):
                if gp is not None:
                    a_p[k] = a_p[k] + gp
            return grads[0] if grads[0] is not None else torch.zeros_like(fz)

        for idx in range(len(steps) - 1, -1, -1):
            t0, h, t_end = steps[idx]
            # The outputs this step wrote (times in (t0, t_end]): the step end, or the linear interpolation
            # (1 - theta) y0 + theta y1 of the dense output.
            mine = []
            while i >= 1 and (times[i] - t0) * (1.0 if h > 0 else -1.0) > 0:
                theta = 1.0 if times[i] == t_end else (times[i] - t0) / h
                mine.append((i, theta))
                a_y = a_y + theta * grad_ys[i]
                i -= 1
            dW = bm.increment(t0, t0 + h)
            # f(z1), g(z1) enter y1 = y0 + (f0 + f1) h / 2 + (g0 + g1) dW / 2 here, and the next step (pend).
            uses = [((0.5 * h) * a_y, 0.5 * a_y, dW)] + ([pend] if pend is not None else [])
            a_z = a_z + finish(zv1, f1, g1, uses)
            # z1 = 2 y0 - z0 + f0 h + g0 dW and the y1 above, backward to (y0, z0); f(z0), g(z0)'s cotangents wait.
            pend = (h * a_z + (0.5 * h) * a_y, a_z + 0.5 * a_y, dW)
            a_y, a_z = a_y + 2.0 * a_z, -a_z
            with torch.no_grad():
                z0 = 2.0 * y1 - z1 - f1 * h - diffusion.prod(g1, dW)
            # f, g at z0 at the time the forward evaluated them (the end of the step before; t0 at the start)
            zv0, f0, g0 = phi(steps[idx - 1][0] + steps[idx - 1][1] if idx else t0, z0)
            nfe += 1
            with torch.no_grad():
                y0 = y1 - (f0 + f1) * (0.5 * h) - diffusion.prod(g0 + g1, 0.5 * dW)
            for j, theta in mine:
                a_y = a_y + (1.0 - theta) * grad_ys[j]
                err = max(err, float(((1.0 - theta) * y0 + theta * y1 - ys[j]).abs().max()))
            y1, z1, zv1, f1, g1 = y0, z0, zv0, f0, g0
        if steps:  # f(z0), g(z0) at the start: their uses in the first step
            a_z = a_z + finish(zv1, f1, g1, [pend])
        err = max(err, float((y1 - ys[0]).abs().max()))
        # z0 = y0 at the start; ys[0] is y0.
        grad_y0 = (a_y + a_z + grad_ys[0]).view(shape)
        sol.stats["nfe_backward"] = nfe
        sol.stats["steps_backward"] = len(setup.steps)
        sol.stats["reconstruction_error"] = err
        grad_params = [g.to(p.dtype) for g, p in zip(a_p, params, strict=True)]
        return (None, *first_order_only("adjoint", [grad_y0, None, *grad_params], [grad_ys, *inputs]))


def _same_time(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 4e-15 * max(abs(a), abs(b), 1.0)


def solve_reversible(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig, on_failure: str,
                     gopts: GradientOptions) -> Solution:
    """``gradient="adjoint"`` with ``method="reversible_heun"``: see the module docstring."""
    if cfg.events:
        raise InputError("gradient='adjoint' with method='reversible_heun' takes no events: use gradient='direct' or "
                         "'checkpoint'.")
    user = term_of(func)
    if user is None or "sde" not in user.kinds:
        raise InputError("the exact reversible-Heun adjoint integrates SDE terms (neurodyn.sde_term).")
    if _sde_pieces(user)[1].vector_field is None:
        raise InputError("the exact reversible-Heun adjoint needs the diffusion g(t, y) itself (not only g_prod).")
    if getattr(solver, "options", {}).get("initial_state") is not None:
        raise InputError("the exact reversible-Heun adjoint starts from z0 = y0; a solve continued from a carried "
                         "state (solver_options={'initial_state': ...}) needs gradient='direct' or 'checkpoint'.")
    setup = _Setup(func, solver, cfg, on_failure, gopts, y0.shape)
    ys = _ReversibleFunction.apply(setup, y0, t, *gopts.params)
    sol = setup.solution
    sol.ys = ys
    sol.stats["gradient"] = "adjoint"
    return sol

