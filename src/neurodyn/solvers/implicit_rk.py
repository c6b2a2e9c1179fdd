"""One generic implicit Runge--Kutta stepper for stiff problems (every :class:`ImplicitTableau`).

The integrate loop (``core/loop.py``) drives it exactly like the explicit stepper: ``step`` returns
``(y1, k, err)`` -- ``k`` the stacked stage derivatives, ``err`` the local error estimate divided by ``h``
-- and a step whose Newton iteration fails returns a NaN state with an infinite error, so the loop
rejects it (adaptive) or stops with ``status="non_finite"`` (fixed step); an unconverged step is never
accepted.

Newton
------
Simplified Newton on the stage equations (DIRK methods: stage by stage, each started one Newton step away
from the previous stage; coupled methods: all stages, started from the extrapolated collocation polynomial
of the last accepted step as RADAU5 does), with the Jacobian ``J = df/dy`` from autograd
(``torch.func.jacrev``; plain reverse passes, one per row, when ``torch.func`` cannot transform ``f``),
block-diagonal per sample with ``jac="batched"`` for a ``(B, D)`` state whose rows are independent problems, by
forward differences (``jac="fd"``), or from a user callable
``jac(t, y) -> (n, n) | (B, D, D)``. ``J`` is kept across steps until Newton converges slowly
(contraction rate above ``jac_rate``) or fails; the LU factorisations of the iteration matrices
(``torch.linalg.lu_factor``) are kept across stages and steps until ``J`` changes or ``h`` moves by more
than ``refactor_ratio``. Convergence is tested as in Hairer & Wanner's RADAU5: with the rate
``theta = |dz_k| / |dz_{k-1}|`` and ``eta = theta / (1 - theta)`` (carried over from the previous solve
as ``eta^0.8``, but at least ``ETA_FLOOR`` = 0.01, and at least ``m / (1 - m)`` when the factorisation in use was
made for another step size, ``m = |h / h_factored - 1|``: the iteration then contracts the stiff components only
by about ``m``), stop when
``eta |dz| <= newton_tol`` in the norm of the error control; give up when
``theta >= 1``, when the predicted error after ``max_newton_iter`` iterations exceeds the tolerance, or
after ``max_newton_iter`` iterations. A failure with an old ``J`` recomputes ``J`` and retries the step
once before rejecting it.

Gradients
---------
Newton always runs under ``torch.no_grad()``. When gradients are needed (``gradient="direct"``,
``"checkpoint"``), every converged implicit stage ``z*`` is passed through one differentiable correction

    z = z* - C(G(z*)),

with ``G`` the stage residual evaluated with autograd (so it depends on ``y0``, earlier stages and the
parameters) and ``C`` a linear map whose forward value is 0 (so ``z`` equals ``z*`` exactly, with or without
autograd) and whose backward is the exact transposed solve with ``dG/dz`` at ``z*``: the iteration matrix
(its LU, detached) preconditions an iterative refinement that applies ``(dG/dz)^T`` by vector-Jacobian
products (a dense solve if it stalls). The result is the implicit-function-theorem gradient of the
discrete step, whatever the staleness of the Jacobian that Newton used -- no backpropagation through the
Newton iterations.

Second derivatives (``create_graph=True``: Hessian-vector products, gradient penalties): one correction is exact at
first order only -- ``G`` is evaluated at ``z*``, a constant, so the derivative of ``dG/dtheta`` along ``dz/dtheta``
is missing (radau gave +0.066 for a second derivative of -0.114). So each stage passes through the correction twice,
``z1 = z* - C(G(z*))`` and ``z = z1 - C(G(z1))`` (:func:`correct_stage`): ``z1`` is exact to first order, and a
Newton step with the exact Jacobian from it leaves an error of third order, so ``z`` is exact to second order; and
``C``'s backward is itself differentiable (linear in the cotangent, the Jacobian at ``z*`` held fixed, which is
exact here because ``G(z1)``'s first-order error vanishes). The price for first-order gradients is one more
evaluation of ``G`` with autograd per stage and its vector-Jacobian product (the first correction's cotangent is the
second's residual, zero to the solve's tolerance, and is dropped; the first-order gradient is bitwise the single
correction's): measured +10 to +20 % on ``direct`` forward and backward through ``radau``/``kvaerno5``/``bdf``/``gl4``
on a 4-dimensional stiff problem with a small MLP (one thread; ``benchmarks/bench_gradient_overheads.py``).

A ``gradient="checkpoint"`` replay (its term has ``replay = True``) cannot rebuild the forward's Jacobian history
and cannot reject or shrink a step: each replayed step gets a Jacobian at its start, Newton is iterated to
``newton_tol * REPLAY_TIGHTER`` (an iteration that stalls within ``newton_tol`` is accepted) with up to
``REPLAY_ITERS`` iterations and no early give-up (after a failure: again with ``J`` where Newton got stuck,
as for fixed steps). Its stages then match the forward's to the forward's Newton tolerance, and so does the
gradient (see ``gradients/checkpoint.py``).

Tolerances
----------
Newton's norm is the error control's, ``RMS(dz / (atol + rtol |y|))``, with
``newton_tol = max(10 eps / rtol, min(0.03, sqrt(rtol)))`` for the coupled systems (scipy's Radau) and
``max(10 eps / rtol, 0.03)`` stage by stage. The stepper is not told the solve's ``rtol``/``atol`` by the
loop, so they are options of the stepper (:meth:`ImplicitRungeKutta.bind`), defaulting to ``solve``'s
defaults (``1e-7``/``1e-9``).

State
-----
The Jacobian, factorisations, Newton rate and counters (``stats``) belong to the solve in progress: they
are reset when ``step`` sees a new term (a new solve); ``get_solver`` builds a fresh stepper per call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.control import rtol_floor
from ..core.interpolation import hermite, linear
from ..core.stepper import Step, StepperBase
from ..core.tensors import ordinary_tensors
from ..errors import InputError
from .explicit_rk import ExplicitRungeKutta
from .implicit_tableaus import IMPLICIT_TABLEAUS, ImplicitTableau

Term = Callable[[float, Tensor], Tensor]

JAC_MODES = ("full", "batched", "fd")
# The smallest convergence rate Newton's first test assumes (see ImplicitRungeKutta._start_rate): a first increment
# passes only within newton_tol / ETA_FLOOR.
ETA_FLOOR = 1e-2
# Checkpoint replays: Newton's tolerance is the forward's times REPLAY_TIGHTER, with up to REPLAY_ITERS iterations.
REPLAY_TIGHTER = 1e-3
REPLAY_ITERS = 40
# Where a stage-value continuous extension is checked against a second one (ImplicitTableau.stage_dense_check).
DENSE_CHECK_AT = (1.0 / 3.0, 2.0 / 3.0)
DENSE_FILTER_POWER = 2
STAT_KEYS = ("jacobian_evals", "factorizations", "linear_solves", "newton_iters", "newton_failures",
             "adjoint_solves", "adjoint_refinements")


def replay_newton(tol: float, rtol: float | Tensor, dtype: torch.dtype, max_iter: int) -> tuple[float, float, int]:
    """Newton's settings on a checkpoint replay: ``(target, floor, iterations)``. A replay cannot shrink its step
    or reject it, so Newton goes past the forward's tolerance ``tol`` (to ``tol * REPLAY_TIGHTER``, not below the
    rounding level ``10 eps / rtol``), an iteration that stalls within ``tol`` counts as converged (``floor``), and
    it may take ``REPLAY_ITERS`` iterations."""
    rmin = float(rtol.min()) if isinstance(rtol, Tensor) else float(rtol)
    target = max(10 * torch.finfo(dtype).eps / max(rmin, 1e-300), tol * REPLAY_TIGHTER)
    return target, tol, max(REPLAY_ITERS, 4 * max_iter)


# ------------------------------------------------------------------------------------------------
# Coefficients
# ------------------------------------------------------------------------------------------------
def _f64(rows) -> np.ndarray:
    return np.array([[float(x) for x in row] for row in rows], dtype=np.float64)


def _radau5_constants(a: np.ndarray, c: np.ndarray) -> dict[str, Any]:
    """RADAU5's transformation ``TI A^{-1} T = [[mu, 0, 0], [0, alpha, beta], [0, -beta, alpha]]`` and its
    embedded error weights ``E`` (error = ``(mu/h I - J)^{-1} (f0 + sum_i E_i Z_i / h)``)."""
    a_inv = np.linalg.inv(a)
    vals, vecs = np.linalg.eig(a_inv)
    i_real = int(np.argmin(np.abs(vals.imag)))
    i_cplx = [i for i in range(3) if i != i_real and vals[i].imag > 0][0]
    mu = float(vals[i_real].real)
    lam = vals[i_cplx]
    v_real = vecs[:, i_real].real
    v_c = vecs[:, i_cplx]
    t = np.stack([v_real / v_real[-1], v_c.real, v_c.imag], axis=1)
    ti = np.linalg.inv(t)
    lam_blk = np.array([[mu, 0, 0], [0, lam.real, lam.imag], [0, -lam.imag, lam.real]])
    assert np.allclose(ti @ a_inv @ t, lam_blk, atol=1e-12), "RADAU5 transformation"
    # Embedded 3rd-order method with b_hat_0 = 1/mu on f(t0, y0): b_hat from the order conditions.
    g0 = 1.0 / mu
    vand = np.stack([np.ones(3), c, c**2])
    b_hat = np.linalg.solve(vand, np.array([1.0 - g0, 0.5, 1.0 / 3.0]))
    b = a[-1]
    e = mu * ((b_hat - b) @ a_inv)
    return {"T": t, "TI": ti, "mu_real": mu, "mu_complex": complex(lam.real, -lam.imag), "E": e}


def _collocation_dense(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``P`` (s x s) with the collocation polynomial ``u(t0 + theta h) = y0 + h sum_j w_j(theta) K_j``,
    ``w_j(theta) = sum_m P[j, m] theta^(m+1)`` (``K_j`` the stage derivatives)."""
    s = len(c)
    vand = np.stack([c ** (m + 1) for m in range(s)], axis=1)  # vand[l, m] = c_l^(m+1)
    q = np.linalg.inv(vand.T)  # Lagrange basis over (0, c_1..c_s), vanishing at 0: L_i = sum_m q[i, m] theta^(m+1)
    return a.T @ q


def _stage_dense(a: np.ndarray, c: np.ndarray, spec: tuple) -> np.ndarray:
    """``P`` (s x d) of a stage-value continuous extension of a stiffly accurate ESDIRK with stage order 2:
    ``u(t0 + theta h) = y0 + sum_i l_i(theta) (Y_i - y0) = y0 + h sum_j w_j(theta) K_j`` with
    ``w_j(theta) = sum_m P[j, m] theta^(m+1)`` (``w = A^T l``; ``K_j`` the stage derivatives).

    ``spec = (stiff_degree, trees, skip)``: the weights ``l_i`` of the stage values (stages not in ``skip``, the
    first excluded: its value is ``y0``) solve the square system

    * ``sum_i l_i c_i^q = theta^q`` for ``q = 1 .. stiff_degree``: the stage values, combined, reproduce polynomials
      of that degree in their abscissae. On a very stiff component ``y' = lambda (y - g(t))`` every stage value is
      ``g(t0 + c_i h) + O(1 / (h lambda))``, so the extension interpolates ``g`` to that degree instead of
      amplifying ``lambda``-sized derivatives (what cubic Hermite on ``f(y0), f(y1)`` does);
    * the order conditions of the trees in ``trees`` (``"Ac2"``: ``l^T A c^2 = theta^3 / 3``; ``"Ac3"``:
      ``theta^4 / 4``; ``"AAc2"``: ``l^T A A c^2 = theta^4 / 12``): with stage order 2 (``A c = c^2 / 2``) those and
      the degree-1 and -2 conditions above are all the conditions of the corresponding non-stiff order.

    ``u(t0) = y0``, and ``u(t0 + h) = y1`` (the last stage) because ``l = e_s`` solves the system at ``theta = 1``
    (the method's own order conditions)."""
    s = len(c)
    skip = set(spec[2])
    unknowns = [i for i in range(1, s) if i not in skip]
    rows, powers, scale = [], [], []
    for q in range(1, spec[0] + 1):
        rows.append(c ** q)
        powers.append(q)
        scale.append(1.0)
    trees = {"Ac2": (a @ c ** 2, 3, 1.0 / 3.0), "Ac3": (a @ c ** 3, 4, 0.25), "AAc2": (a @ a @ c ** 2, 4, 1.0 / 12.0)}
    for name in spec[1]:
        row, q, w = trees[name]
        rows.append(row)
        powers.append(q)
        scale.append(w)
    m = np.stack(rows)[:, unknowns]
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"stage dense output: {m.shape[0]} conditions for {m.shape[1]} stage weights")
    m_inv = np.linalg.inv(m)
    p = np.zeros((s, max(powers)))
    for k, (q, w) in enumerate(zip(powers, scale)):
        # l_u(theta) += m_inv[u, k] w theta^q; w_j = sum_u a[u, j] l_u
        p[:, q - 1] += a[unknowns].T @ (m_inv[:, k] * w)
    return p


def _stage_hermite(b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Weights ``w`` (``(m, s)``) of cubic Hermite on the stage derivatives of an ESDIRK (explicit first stage,
    stiffly accurate: the slopes at the step's ends are ``K_0`` and ``K_{s-1}``, ``y1 - y0 = h b.K``):
    ``u(t0 + theta h) = y0 + h sum_j w_j(theta) K_j``."""
    th = theta[:, None]
    w = (-2 * th**3 + 3 * th**2) * b[None, :]
    w[:, 0] += (th**3 - 2 * th**2 + th)[:, 0]
    w[:, -1] += (th**3 - th**2)[:, 0]
    return w


@dataclass
class _ImplicitCoefficients:
    """A tableau's coefficients as tensors of one dtype on one device (internal)."""

    A: Tensor  # (s, s)
    A_inv: Tensor | None  # (s, s), fully implicit methods
    b: Tensor  # (1, s)
    b_err: Tensor | None  # (1, s)
    c: list[float]
    a_rows: list[list[float]]
    diag: list[float]
    dense_t: Tensor | None  # (d, s), float64: collocation (or stage-value) weights of the stage derivatives
    radau: dict[str, Any] | None = None
    dense_first: int = 1  # the rows of a step's k the dense weights apply to start here (1: after f(t0, y0))
    dense_check: Tensor | None = None  # (2, s): weights of (other - own) stage-value extension at DENSE_CHECK_AT


# ------------------------------------------------------------------------------------------------
# Linear algebra on flat rows: a full (n, n) Jacobian or a block-diagonal (B, D, D) one.
# ------------------------------------------------------------------------------------------------
class _Layout:
    """Solves with iteration matrices built from ``J``: full ``(n, n)`` or per-sample ``(B, D, D)``."""

    def __init__(self, n: int, batch: int | None):
        self.n = n
        self.B = batch
        self.D = n // batch if batch else n

    def eye(self, J: Tensor) -> Tensor:
        e = torch.eye(self.D, dtype=J.dtype, device=J.device)
        return e if self.B is None else e.expand(self.B, self.D, self.D)

    def solve(self, lu: tuple[Tensor, Tensor], r: Tensor, adjoint: bool = False) -> Tensor:
        """``M^{-1} r`` (or ``M^{-T} r``; conjugate transpose for complex ``M``) for rows ``r`` of shape ``(m, n)``."""
        m = r.shape[0]
        if self.B is None:
            return torch.linalg.lu_solve(lu[0], lu[1], r.transpose(0, 1), adjoint=adjoint).transpose(0, 1)
        rb = r.reshape(m, self.B, self.D).permute(1, 2, 0)
        return torch.linalg.lu_solve(lu[0], lu[1], rb, adjoint=adjoint).permute(2, 0, 1).reshape(m, self.n)

    def firk_matrix(self, A: Tensor, J: Tensor, h: float) -> Tensor:
        """``I - h A (x) J`` over the stacked stages: ``(s n, s n)`` or ``(B, s D, s D)``."""
        s = A.shape[0]
        if self.B is None:
            return torch.eye(s * self.n, dtype=J.dtype, device=J.device) - h * torch.kron(A, J)
        blk = torch.einsum("ij,bpq->bipjq", A, J).reshape(self.B, s * self.D, s * self.D)
        return torch.eye(s * self.D, dtype=J.dtype, device=J.device) - h * blk

    def firk_solve(self, lu: tuple[Tensor, Tensor], r: Tensor, adjoint: bool = False) -> Tensor:
        """Solve with ``I - h A (x) J`` for stacked stages ``r`` of shape ``(s, n)``."""
        s = r.shape[0]
        if self.B is None:
            return torch.linalg.lu_solve(lu[0], lu[1], r.reshape(s * self.n, 1), adjoint=adjoint).view(s, self.n)
        rb = r.reshape(s, self.B, self.D).permute(1, 0, 2).reshape(self.B, s * self.D, 1)
        x = torch.linalg.lu_solve(lu[0], lu[1], rb, adjoint=adjoint)
        return x.view(self.B, s, self.D).permute(1, 0, 2).reshape(s, self.n)


# ------------------------------------------------------------------------------------------------
# The differentiable correction z = z* - C(G(z*)): forward 0, backward the exact transposed solve.
# ------------------------------------------------------------------------------------------------
class _AdjointSolve:
    """Applies ``(dG/dz)^{-T}`` at a converged stage ``z*`` (backward of :class:`StageCorrection`), and ``(dG/dz)^{-1}``
    (the backward of that backward, for second-order gradients)."""

    __slots__ = ("g_of", "zstar", "precond_t", "precond", "stats", "last_norm")

    def __init__(self, g_of: Callable[[Tensor], Tensor], zstar: Tensor, precond_t: Callable[[Tensor], Tensor],
                 stats: dict, precond: Callable[[Tensor], Tensor] | None = None):
        self.g_of, self.zstar, self.precond_t, self.precond, self.stats = g_of, zstar, precond_t, precond, stats
        self.last_norm = 0.0  # |v| of the last transposed solve (see StageCorrection)

    def __call__(self, v: Tensor) -> Tensor:
        return self._solve(v, transpose=True)

    def forward_solve(self, u: Tensor) -> Tensor:
        """``(dG/dz)^{-1} u``."""
        return self._solve(u, transpose=False)

    def _solve(self, v: Tensor, transpose: bool) -> Tensor:
        self.stats["adjoint_solves"] += 1
        vn = float(torch.linalg.vector_norm(v))
        if transpose:
            self.last_norm = vn
        if vn == 0.0 or not math.isfinite(vn):
            return torch.zeros_like(v) if vn == 0.0 else v * math.nan
        with torch.enable_grad():
            zd = self.zstar.detach().requires_grad_(True)
            gd = self.g_of(zd)
            w = torch.zeros_like(gd, requires_grad=True) if not transpose else None

        def gzt(u: Tensor) -> Tensor:  # (dG/dz)^T u
            (out,) = torch.autograd.grad(gd, zd, u, retain_graph=True, allow_unused=True)
            return out if out is not None else torch.zeros_like(u)

        jvp_graph: list[Tensor] = []

        def gz(u: Tensor) -> Tensor:  # (dG/dz) u, by differentiating u -> (dG/dz)^T w with respect to w
            with torch.enable_grad():
                if not jvp_graph:
                    (vjp,) = torch.autograd.grad(gd, zd, w, retain_graph=True, create_graph=True, allow_unused=True)
                    jvp_graph.append(vjp if vjp is not None else torch.zeros_like(zd))
                if not jvp_graph[0].requires_grad:
                    return torch.zeros_like(u)
                (out,) = torch.autograd.grad(jvp_graph[0], w, u, retain_graph=True, allow_unused=True)
            return out if out is not None else torch.zeros_like(u)

        apply, precond = (gzt, self.precond_t) if transpose else (gz, self.precond)
        tol = 1e3 * torch.finfo(v.dtype).eps * vn
        if precond is not None:
            lam = precond(v)
            prev = math.inf
            for _ in range(40):
                res = v - apply(lam)
                rn = float(torch.linalg.vector_norm(res))
                if rn <= tol:
                    return lam
                if not rn < 0.7 * prev:  # stalled or diverging: dense solve
                    break
                prev = rn
                self.stats["adjoint_refinements"] += 1
                lam = lam + precond(res)
        # Dense fallback: dG/dz built row by row from vector-Jacobian products.
        n = v.numel()
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        rows = torch.stack([gzt(eye[i].view_as(v)).reshape(-1) for i in range(n)])  # row i = e_i^T dG/dz
        return torch.linalg.solve(rows.transpose(0, 1) if transpose else rows, v.reshape(-1)).view_as(v)


class StageCorrection(torch.autograd.Function):
    """``C(g)``: value 0; backward ``(dG/dz)^{-T} v`` (see :class:`_AdjointSolve`).

    A stage passes through two corrections, ``z1 = z* - C(G(z*))`` and ``z = z1 - C(G(z1))`` (:func:`correct_stage`):
    the first makes ``z1`` first-order exact, and the second, evaluating ``G`` at that first-order exact point,
    makes ``z`` second-order exact (a Newton step with the exact Jacobian from a point with an ``O(d^2)`` error
    leaves an ``O(d^3)`` one). Under ``create_graph=True`` the backward is itself differentiable
    (:class:`_TransposedSolve`, linear in ``v`` with the Jacobian at ``z*`` held fixed), so Hessian-vector products
    through implicit steps are exact. ``inner`` marks the first correction: without ``create_graph`` its cotangent
    is the second's residual (zero to the solve's tolerance) and is dropped, so a first-order gradient costs one
    more evaluation of ``G`` (and its vector-Jacobian product) per stage than a single correction.
    """

    @staticmethod
    def forward(ctx, g: Tensor, solver: _AdjointSolve, inner: bool = False) -> Tensor:
        ctx.solver, ctx.inner = solver, inner
        return torch.zeros_like(g)

    @staticmethod
    def backward(ctx, v: Tensor):
        solver: _AdjointSolve = ctx.solver
        if torch.is_grad_enabled():
            return _TransposedSolve.apply(v, solver), None, None
        if ctx.inner:
            # The second correction's residual (zero to its solve's tolerance): nothing to pass on.
            if float(torch.linalg.vector_norm(v)) <= 1e4 * torch.finfo(v.dtype).eps * solver.last_norm:
                return None, None, None
        return solver(v), None, None


class _TransposedSolve(torch.autograd.Function):
    """``(dG/dz)^{-T} v`` with ``dG/dz`` fixed at ``z*``; differentiable in ``v`` (backward ``(dG/dz)^{-1} u``)."""

    @staticmethod
    def forward(ctx, v: Tensor, solver: _AdjointSolve) -> Tensor:
        ctx.solver = solver
        return solver(v)

    @staticmethod
    def backward(ctx, u: Tensor):
        if torch.is_grad_enabled():
            return _ForwardSolve.apply(u, ctx.solver), None
        return ctx.solver.forward_solve(u), None


class _ForwardSolve(torch.autograd.Function):
    """``(dG/dz)^{-1} u`` with ``dG/dz`` fixed at ``z*``; differentiable in ``u`` (backward ``(dG/dz)^{-T} v``)."""

    @staticmethod
    def forward(ctx, u: Tensor, solver: _AdjointSolve) -> Tensor:
        ctx.solver = solver
        return solver.forward_solve(u)

    @staticmethod
    def backward(ctx, v: Tensor):
        if torch.is_grad_enabled():
            return _TransposedSolve.apply(v, ctx.solver), None
        return ctx.solver(v), None


def dirk_residual(term: Callable, t: float, psi: Tensor, hg: float) -> Callable[[Tensor], Tensor]:
    """The residual ``G(Y) = Y - psi - hg f(t, Y)`` of one diagonally implicit stage (rows ``(1, n)``)."""
    return lambda Y: Y - psi - hg * term(t, Y).reshape(Y.shape)


def correct_stage(zstar: Tensor, g_of: Callable[[Tensor], Tensor], solver: _AdjointSolve) -> Tensor:
    """``z*`` made differentiable: ``z1 = z* - C(G(z*))``, ``z = z1 - C(G(z1))`` (value ``z*`` exactly; first and
    second derivatives those of the implicit function ``G(z) = 0``). ``g_of(z)`` evaluates the stage residual with
    autograd (depending on the step's inputs and the parameters)."""
    z1 = zstar - StageCorrection.apply(g_of(zstar), solver, True)
    return z1 - StageCorrection.apply(g_of(z1), solver)


# ------------------------------------------------------------------------------------------------
# Per-solve state (the stepper is shared: the state follows the term of the current solve).
# ------------------------------------------------------------------------------------------------
@dataclass
class SolveState:
    term: Any
    dtype: torch.dtype
    device: torch.device
    stats: dict
    layout: _Layout | None = None
    J: Tensor | None = None
    J_at: tuple[float, Tensor] | None = None
    need_jac: bool = True
    lus: dict = field(default_factory=dict)
    eta: float = 1.0
    last: tuple | None = None  # (t0, h, y_in, y1_out, K) of the last successful step() call
    accepted: tuple | None = None  # the last step known to be accepted
    last_call: tuple | None = None  # (t, y) of the last step() call
    fd_warned: bool = False
    patient: bool = False  # no early give-up on a predicted slow convergence (last-chance attempts)
    # A checkpoint replay (the term says so): a Jacobian at every step start, Newton to ``newton_tol * REPLAY_TIGHTER``
    # with up to REPLAY_ITERS iterations, accepted where it stalls within the forward's ``newton_tol`` (``floor``).
    replay: bool = False
    floor: float | None = None
    max_iter: int = 7
    lu_mismatch: float = 0.0  # |h / h_factored - 1| of the factorisation in use (see _start_rate)


def new_stats() -> dict:
    return dict.fromkeys(STAT_KEYS, 0)


# ------------------------------------------------------------------------------------------------
# The stepper
# ------------------------------------------------------------------------------------------------
class ImplicitRungeKutta(StepperBase):
    """A generic implicit Runge--Kutta method driven by an :class:`ImplicitTableau` (stiff problems).

    Plugs into the one integrate loop like the explicit stepper. States are flat ``(1, n)`` rows; the
    Jacobian is ``(n, n)`` (``jac="full"``) or ``(B, D, D)`` (``jac="batched"``, ``B = y0.shape[0]``,
    ``D = n / B``: rows of the state are independent problems).

    Parameters
    ----------
    tableau : ImplicitTableau or str
        The method (``"kvaerno5"``, ``"radau"``, ...; see ``implicit_tableaus.py``).
    jac : ``"full"``, ``"batched"``, ``"fd"`` or callable
        How ``J = df/dy`` is computed: autograd (``torch.func.jacrev``) of the whole state, autograd of a
        block-diagonal per-sample Jacobian (one reverse pass per state dimension ``D``, whatever ``B``),
        forward differences (``n`` or ``D`` extra evaluations of ``f``, counted in ``nfe``), or
        ``jac(t, y) -> Tensor`` with ``t`` 0-dim and ``y`` in the state's shape, returning ``(n, n)`` or
        ``(B, D, D)``. If ``torch.func`` cannot transform ``f`` (e.g. a vector field that calls
        ``torch.autograd.grad``, as the adjoint's augmented field does), plain autograd takes one reverse pass per
        row (still exact, no warning); only an ``f`` not differentiable at all falls back to forward
        differences, with a warning.
    rtol, atol : float or Tensor, optional
        The tolerances of Newton's norm; pass the solve's (default ``1e-7``/``1e-9``, ``solve``'s defaults).
    newton_tol : float, optional
        Newton's stopping tolerance in that norm; default ``max(10 eps / rtol, min(0.03, sqrt(rtol)))``.
    max_newton_iter : int
        Newton iterations per stage (or stage system) before the step is rejected (default 7).
    jac_rate : float
        Recompute ``J`` at the next step when Newton's contraction rate exceeded this (default 0.1).
    refactor_ratio : float
        Refactor the iteration matrix when ``h`` (times the diagonal) changed by more than this
        fraction since the last factorisation (default 0.2).
    dense_error : bool
        ``kvaerno4``/``kvaerno5``: add the continuous extension's error on stiff components to the step's error
        estimate (default True), so that outputs between steps meet the tolerance on stiff problems (at 1.3-2.3x the
        steps there). False: only the step ends are error-controlled, as for a solve whose outputs all fall on step
        ends (the adjoint's backward solves use False).

    Attributes
    ----------
    stats : dict
        Counters of the current (last) solve: ``jacobian_evals``, ``factorizations`` (RADAU5's real and
        complex pair count once, as scipy's ``nlu``), ``linear_solves``, ``newton_iters``,
        ``newton_failures``, ``adjoint_solves``/``adjoint_refinements`` (backward passes).

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.solvers import get_solver
    >>> k = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)
    >>> def rober(t, y):
    ...     r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
    ...     return torch.stack([-r1 + r3, r1 - r2 - r3, r2])
    >>> solver = get_solver("radau").bind(rtol=1e-6, atol=1e-10)
    >>> y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    >>> sol = neurodyn.solve(rober, y0, torch.tensor([0.0, 40.0], dtype=torch.float64), method=solver,
    ...                      rtol=1e-6, atol=1e-10)
    >>> round(float(sol.ys[-1, 0]), 4)
    0.7158
    >>> solver.stats["jacobian_evals"] > 0
    True
    """

    implicit = True
    bind_tolerances = True
    interior_error = True

    def __init__(self, tableau: ImplicitTableau | str, *, jac: str | Callable = "full",
                 rtol: float | Tensor | None = None, atol: float | Tensor | None = None,
                 newton_tol: float | None = None, max_newton_iter: int | None = None, jac_rate: float = 0.1,
                 refactor_ratio: float = 0.2, dense_error: bool = True):
        if isinstance(tableau, str):
            if tableau not in IMPLICIT_TABLEAUS:
                raise InputError(f"unknown implicit method {tableau!r}; valid: {', '.join(sorted(IMPLICIT_TABLEAUS))}.")
            tableau = IMPLICIT_TABLEAUS[tableau]
        if not (callable(jac) or jac in JAC_MODES):
            raise InputError(f"jac must be one of {JAC_MODES} or a callable jac(t, y), got {jac!r}.")
        if max_newton_iter is None:
            max_newton_iter = 10 if tableau.kind == "dirk" else 7
        if isinstance(max_newton_iter, bool) or not isinstance(max_newton_iter, int) or max_newton_iter < 1:
            raise InputError(f"max_newton_iter must be an integer >= 1, got {max_newton_iter!r}.")
        for nm, v in (("jac_rate", jac_rate), ("refactor_ratio", refactor_ratio)):
            if not (isinstance(v, (int, float)) and 0 <= v):
                raise InputError(f"{nm} must be a number >= 0, got {v!r}.")
        if newton_tol is not None and not (newton_tol > 0 and math.isfinite(newton_tol)):
            raise InputError(f"newton_tol must be a finite number > 0, got {newton_tol!r}.")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.controller_order = tableau.controller_order
        self.adaptive = tableau.adaptive
        self.kind = tableau.kind
        # Stiffly accurate DIRKs: the last stage derivative (from the stage equation) is f(t1, y1).
        self.fsal = tableau.kind == "dirk" and tableau.stiffly_accurate
        self.stages = tableau.stages
        self.dense_order = tableau.dense_order
        self.has_own_dense = tableau.dense in ("collocation", "stages")
        self._extra_f0 = not tableau.explicit_first  # k's row 0 is f(t0, y0), then the stage derivatives
        self.jac = jac
        self.rtol = 1e-7 if rtol is None else rtol
        self.atol = 1e-9 if atol is None else atol
        self.newton_tol = newton_tol
        self.max_newton_iter = max_newton_iter
        self.jac_rate = float(jac_rate)
        self.refactor_ratio = float(refactor_ratio)
        self.dense_error = bool(dense_error)
        self._cache: dict[tuple[torch.dtype, torch.device], _ImplicitCoefficients] = {}
        self._state: SolveState | None = None
        self._idle_stats = new_stats()

    # -- options -----------------------------------------------------------------------------------
    def bind(self, **options: Any) -> ImplicitRungeKutta:
        """A new stepper for the same method with some options replaced (``jac``, ``rtol``, ``atol``,
        ``newton_tol``, ``max_newton_iter``, ``jac_rate``, ``refactor_ratio``, ``dense_error``)."""
        kw = {"jac": self.jac, "rtol": self.rtol, "atol": self.atol, "newton_tol": self.newton_tol,
              "max_newton_iter": self.max_newton_iter, "jac_rate": self.jac_rate,
              "refactor_ratio": self.refactor_ratio, "dense_error": self.dense_error}
        unknown = sorted(set(options) - set(kw))
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for an implicit method; valid: {', '.join(kw)}.")
        kw.update(options)
        return ImplicitRungeKutta(self.tableau, **kw)

    @property
    def stats(self) -> dict:
        """Counters of the current (last) solve."""
        return self._state.stats if self._state is not None else self._idle_stats

    @property
    def solve_state(self) -> SolveState | None:
        """The Jacobian, factorisations and counters of the solve in progress (None between solves)."""
        return self._state

    def reset(self) -> None:
        """Forget the Jacobian, factorisations and counters of the last solve."""
        self._state = None

    def invalidate_jacobian(self) -> None:
        """Recompute ``J`` at the next step (e.g. when another method advanced the solve since it was computed)."""
        if self._state is not None:
            self._state.need_jac = True

    def __repr__(self) -> str:
        jac = self.jac if isinstance(self.jac, str) else "callable"
        return f"ImplicitRungeKutta({self.name!r}, jac={jac!r}, rtol={self.rtol}, atol={self.atol})"

    # -- coefficients ------------------------------------------------------------------------------
    def coefficients(self, dtype: torch.dtype, device: torch.device) -> _ImplicitCoefficients:
        key = (dtype, device)
        co = self._cache.get(key)
        if co is None:
            with ordinary_tensors():  # cached for later solves, with or without autograd
                tb = self.tableau
                a = _f64(tb.a)
                c = np.array([float(x) for x in tb.c])

                def t_(x) -> Tensor:
                    return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=dtype, device=device)

                a_inv = None if tb.kind == "dirk" else t_(np.linalg.inv(a))
                dense_t = None
                if tb.dense == "collocation":
                    dense_t = torch.as_tensor(_collocation_dense(a, c).T.copy()).to(device=device)
                dense_check = None
                if tb.dense == "stages":
                    own = _stage_dense(a, c, tb.stage_dense)
                    dense_t = torch.as_tensor(own.T.copy()).to(device=device)
                    if tb.stage_dense_check is not None:
                        th = np.array(DENSE_CHECK_AT)[:, None]
                        if tb.stage_dense_check == "hermite":
                            w_other = _stage_hermite(np.array([float(x) for x in tb.b]), th[:, 0])
                        else:
                            other = _stage_dense(a, c, tb.stage_dense_check)
                            w_other = (th ** np.arange(1, other.shape[1] + 1)) @ other.T
                        w_own = (th ** np.arange(1, own.shape[1] + 1)) @ own.T
                        dense_check = t_(w_other - w_own)
                radau = None
                if tb.kind == "radau5":
                    k = _radau5_constants(a, c)
                    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
                    ti = k["TI"]
                    radau = {"T": t_(k["T"]), "TI": t_(ti), "TI_real": t_(ti[:1]),
                             "TI_complex": torch.as_tensor(ti[1:2] + 1j * ti[2:3]).to(dtype=cdt, device=device),
                             "mu_real": k["mu_real"], "mu_complex": k["mu_complex"], "E": t_(k["E"][None, :]),
                             "cdtype": cdt}
                co = _ImplicitCoefficients(
                    A=t_(a), A_inv=a_inv, b=t_([[float(x) for x in tb.b]]),
                    b_err=None if tb.b_err is None else t_([[float(x) for x in tb.b_err]]),
                    c=[float(x) for x in c], a_rows=[[float(x) for x in row] for row in tb.a],
                    diag=[float(tb.a[i][i]) for i in range(tb.stages)], dense_t=dense_t, radau=radau,
                    dense_first=0 if tb.dense == "stages" else 1, dense_check=dense_check)
            self._cache[key] = co
        return co

    # -- per-solve state ---------------------------------------------------------------------------
    def begin_solve(self, term: Any, y: Tensor) -> SolveState:
        st = self._state
        if st is None or st.term is not term or st.dtype != y.dtype or st.device != y.device:
            if y.is_complex():
                raise InputError("implicit methods support real states only (float32/float64).")
            st = self._state = SolveState(term=term, dtype=y.dtype, device=y.device, stats=new_stats(),
                                           replay=bool(getattr(term, "replay", False)))
        return st

    def _user_tolerances(self, y: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """The stepper's ``(rtol, atol)`` as floats or ``(1, n)`` rows for a state ``y`` of shape ``(1, n)``."""
        n = y.shape[1]

        def as_row(v):
            if isinstance(v, Tensor):
                if v.numel() == n:
                    return v.reshape(1, n).to(dtype=y.dtype, device=y.device)
                return float(v.min())  # e.g. the augmented state of an adjoint solve
            return float(v)

        return as_row(self.rtol), as_row(self.atol)

    def _error_factor(self, rtol: Tensor | float, dtype: torch.dtype = torch.float64) -> Tensor | float:
        """``rtol / rtol'``: how much tighter than the user's the method's internal tolerances are (1 for most).

        A method that advances its lower-order solution (``trbdf2``) has a global error that grows like
        ``rtol^(p/(p+1))`` under error-per-step control; below ``tableau.proportional_below = r0`` it runs at
        ``rtol' = r0 (rtol / r0)^((p+1)/p)``, ``atol' = atol rtol' / rtol`` so that the global error follows
        ``rtol`` (RADAU5 transforms its tolerances the same way, in the other direction). Multiplying the error
        estimate by this factor is exactly that transformation in the loop's norm. ``rtol'`` stops at
        ``control.rtol_floor(dtype)`` (the state's precision: below it the estimate is rounding noise).
        """
        r0 = self.tableau.proportional_below
        if r0 is None:
            return 1.0
        q = 1.0 / self.order
        floor = rtol_floor(dtype)
        if isinstance(rtol, Tensor):
            f = (r0 / rtol.clamp(min=1e-300)).pow(q).clamp(min=1.0)
            return torch.minimum(f, (rtol / floor).clamp(min=1.0)).masked_fill(rtol <= 0, 1.0)
        return max(1.0, min((r0 / rtol) ** q, rtol / floor)) if rtol > 0 else 1.0

    def _tolerances(self, y: Tensor) -> tuple[Tensor | float, float]:
        """(scale for Newton's norm (without |y|), newton_tol), in the method's internal tolerances."""
        rtol, atol = self._user_tolerances(y)
        if self.tableau.proportional_below is not None:
            f = self._error_factor(rtol, y.dtype)
            rtol, atol = rtol / f, atol / f
        rmin = float(rtol.min()) if isinstance(rtol, Tensor) else rtol
        eps = torch.finfo(y.dtype).eps
        tol = self.newton_tol
        if tol is None:
            # scipy's Radau for the coupled stage systems; 0.03 (Hairer's upper value) stage by stage
            kappa = 0.03 if self.kind == "dirk" else min(0.03, math.sqrt(max(rmin, 0.0)))
            tol = max(10 * eps / max(rmin, 1e-300), kappa)
        return (rtol, atol), tol

    @staticmethod
    def _scale(tols, y: Tensor) -> Tensor:
        rtol, atol = tols
        return y.abs() * rtol + atol

    # -- Jacobian ----------------------------------------------------------------------------------
    def _jacobian(self, term: Any, t: float, y: Tensor, st: SolveState) -> Tensor:
        """``df/dy`` at ``(t, y)`` (``y`` of shape ``(1, n)``, detached): ``(n, n)`` or ``(B, D, D)``."""
        n = y.shape[1]
        shape = tuple(term.shape)
        tt = torch.scalar_tensor(t, dtype=term.t_dtype, device=term.device)
        mode = self.jac
        st.stats["jacobian_evals"] += 1
        if callable(mode):
            with torch.no_grad():
                J = torch.as_tensor(mode(tt, y.view(shape))).detach().to(dtype=y.dtype, device=y.device).contiguous()
            if tuple(J.shape) == (n, n):
                st.layout = _Layout(n, None)
            elif J.dim() == 3 and J.shape[1] == J.shape[2] and J.shape[0] * J.shape[1] == n:
                st.layout = _Layout(n, J.shape[0])
            else:
                raise InputError(f"jac(t, y) returned shape {tuple(J.shape)}; expected ({n}, {n}) or (B, D, D) "
                                 f"with B * D = {n}.")
            return J
        batch = shape[0] if (mode == "batched" and len(shape) >= 2 and shape[0] > 1) else None
        st.layout = _Layout(n, batch)
        if mode != "fd":
            try:
                return self._jac_autograd(term.func, tt, y, shape, batch)
            except Exception:  # not transformable by torch.func (e.g. f calls torch.autograd itself)
                pass
            try:  # plain autograd, one reverse pass per row: exact, no functorch
                return self._jac_reverse(term.func, tt, y, shape, batch)
            except Exception as exc:  # not differentiable at all: forward differences
                if not st.fd_warned:
                    st.fd_warned = True
                    warnings.warn(f"implicit method {self.name!r}: autograd Jacobian failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); using forward differences "
                                  f"(pass jac='fd' or a jac callable to silence this).", RuntimeWarning,
                                  stacklevel=4)
        return self._jac_fd(term, t, y, st.layout)

    @staticmethod
    def _jac_autograd(func: Callable, tt: Tensor, y: Tensor, shape: tuple, batch: int | None) -> Tensor:
        n = y.shape[1]
        if batch is None:
            def g(v: Tensor) -> Tensor:
                return func(tt, v.view(shape)).reshape(-1)
            with torch.no_grad():
                return torch.func.jacrev(g)(y.reshape(-1)).detach().contiguous()
        d = n // batch

        def gs(v: Tensor) -> Tensor:  # rows independent: d(sum over samples of f_b)/dy_b = J_b
            return func(tt, v.view(shape)).reshape(batch, d).sum(0)
        with torch.no_grad():
            jt = torch.func.jacrev(gs)(y.reshape(-1)).detach()  # (D, n): [i, b*D + j]
        return jt.view(d, batch, d).permute(1, 0, 2).contiguous()

    @staticmethod
    def _jac_reverse(func: Callable, tt: Tensor, y: Tensor, shape: tuple, batch: int | None) -> Tensor:
        """:meth:`_jac_autograd` without ``torch.func``: one ``torch.autograd.grad`` reverse pass per row of
        ``J`` (``n`` rows, or ``D`` for the per-sample ``(B, D, D)`` layout), for vector fields that call
        ``torch.autograd`` themselves (the adjoint's augmented field). Raises ``RuntimeError`` when ``f`` is not
        connected to ``y`` in the autograd graph (e.g. it detaches ``y``): its Jacobian is not available."""
        n = y.shape[1]
        d = n if batch is None else n // batch
        with torch.enable_grad():
            v = y.detach().reshape(-1).requires_grad_(True)
            out = func(tt, v.view(shape)).reshape(-1)
            if batch is not None:  # rows independent: d(sum over samples of f_b)/dy_b = J_b
                out = out.view(batch, d).sum(0)
            if not out.requires_grad:
                raise RuntimeError("f(t, y) is not connected to y in the autograd graph")
            rows = []
            for i in range(d):
                (g,) = torch.autograd.grad(out[i], v, retain_graph=i + 1 < d, allow_unused=True)
                rows.append(torch.zeros_like(v) if g is None else g)
        jt = torch.stack(rows).detach()  # (d, n)
        if batch is None:
            return jt.contiguous()
        return jt.view(d, batch, d).permute(1, 0, 2).contiguous()

    def _jac_fd(self, term: Any, t: float, y: Tensor, layout: _Layout) -> Tensor:
        with torch.no_grad():
            f0 = term(t, y).reshape(1, -1)
            eps = math.sqrt(torch.finfo(y.dtype).eps)
            n = y.shape[1]
            if layout.B is None:
                cols = []
                for j in range(n):
                    dj = eps * max(abs(float(y[0, j])), 1e-5)
                    yp = y.clone()
                    yp[0, j] += dj
                    cols.append((term(t, yp).reshape(-1) - f0.reshape(-1)) / dj)
                return torch.stack(cols, 1)
            B, D = layout.B, layout.D
            yb = y.view(B, D)
            J = y.new_empty((B, D, D))
            for j in range(D):
                dj = eps * torch.clamp(yb[:, j].abs(), min=1e-5)
                yp = yb.clone()
                yp[:, j] += dj
                J[:, :, j] = (term(t, yp.reshape(1, n)).reshape(B, D) - f0.view(B, D)) / dj.view(B, 1)
            return J

    def _ensure_jacobian(self, term: Any, t: float, y: Tensor, y_key: Tensor, st: SolveState) -> bool:
        """Compute ``J`` at ``(t, y)`` if needed; True when ``J`` belongs to this step's start (``y_key`` is the
        loop's state object, the same for a retry after a rejection)."""
        if st.J is None or st.need_jac:
            st.J = self._jacobian(term, t, y, st)
            st.J_at = (t, y_key)
            st.need_jac = False
            st.lus.clear()
            return True
        return st.J_at is not None and st.J_at[0] == t and st.J_at[1] is y_key

    def _rescue_jacobian(self, term: Any, t_point: float, y_point: Tensor, t: float, y_key: Tensor,
                         st: SolveState) -> None:
        """Last chance before rejecting (a fixed step cannot shrink): ``J`` where Newton got stuck."""
        if bool(torch.isfinite(y_point).all()):
            st.J = self._jacobian(term, t_point, y_point, st)
            st.J_at = (t, y_key)
            st.need_jac = False
            st.lus.clear()

    def _stale(self, key: Any, value: float, st: SolveState):
        """The kept factorisation for ``key`` if it was made for a ``value`` (``h`` or ``h gamma``) close enough, else
        None (refactor). Records the mismatch ``|value / value_factored - 1|`` in ``st.lu_mismatch``."""
        entry = st.lus.get(key)
        mismatch = math.inf if entry is None else abs(value / entry[1] - 1.0)
        if mismatch > self.refactor_ratio:
            st.lu_mismatch = 0.0  # refactored for this value
            return None
        st.lu_mismatch = mismatch
        return entry[0]

    def _lu_dirk(self, st: SolveState, h: float, gamma: float) -> tuple[Tensor, Tensor]:
        hg = h * gamma
        key = ("d", gamma, h > 0)
        lu = self._stale(key, hg, st)
        if lu is None:
            J = st.J
            lu = torch.linalg.lu_factor(st.layout.eye(J) - hg * J)
            st.lus[key] = (lu, hg)
            st.stats["factorizations"] += 1
        return lu

    def _lu_firk(self, st: SolveState, co: _ImplicitCoefficients, h: float) -> tuple[Tensor, Tensor]:
        lu = self._stale(("f", h > 0), h, st)
        if lu is None:
            lu = torch.linalg.lu_factor(st.layout.firk_matrix(co.A, st.J, h))
            st.lus[("f", h > 0)] = (lu, h)
            st.stats["factorizations"] += 1
        return lu

    def _lu_radau(self, st: SolveState, co: _ImplicitCoefficients, h: float):
        lus = self._stale(("r", h > 0), h, st)
        if lus is None:
            J = st.J
            eye = st.layout.eye(J)
            rd = co.radau
            lur = torch.linalg.lu_factor(rd["mu_real"] / h * eye - J)
            luc = torch.linalg.lu_factor((rd["mu_complex"] / h) * eye.to(rd["cdtype"]) - J.to(rd["cdtype"]))
            lus = (lur, luc, h)
            st.lus[("r", h > 0)] = (lus, h)
            st.stats["factorizations"] += 1
        return lus

    # -- Newton ------------------------------------------------------------------------------------
    @staticmethod
    def rms(x: Tensor, scale: Tensor) -> float:
        return float(torch.linalg.vector_norm(x / scale)) / math.sqrt(x.numel())

    def _converge(self, it: int, dn: float, dn_old: float | None, eta: float, tol: float, patient: bool = False,
                  floor: float | None = None):
        """One Newton convergence test: returns (status, eta, theta); status 1 converged, -1 failed, 0 go on.
        ``floor`` (replays): an iteration that stops contracting is converged when its increment is below it."""
        if not math.isfinite(dn):
            return -1, eta, math.inf
        theta = 0.0
        if dn_old is not None:
            theta = dn / dn_old if dn_old > 0 else 0.0
            if theta >= 1.0:
                return (1 if floor is not None and dn <= floor else -1), eta, theta
            eta = theta / (1.0 - theta)
            if not patient and theta ** (self.max_newton_iter - 1 - it) / (1.0 - theta) * dn > tol:
                return -1, eta, theta
        if eta * dn <= tol or dn == 0.0:
            return 1, eta, theta
        return 0, eta, theta

    @staticmethod
    def _start_rate(st: SolveState) -> float:
        """The rate ``eta`` Newton's first convergence test assumes: the last solve's, carried over as ``eta^0.8``
        (RADAU5), but no smaller than what a factorisation kept from another step size implies, nor than
        ``ETA_FLOOR``. On the stiff components the iteration matrix made for ``h'`` contracts the error only by about
        ``|h / h' - 1|`` per iteration; and a rate carried from a solve that converged at once (a linear problem) can
        be ~1e-13 while ``J`` has gone stale (a time-dependent Jacobian). Without these bounds a first increment
        of any size passed the test: accepted stages were several tolerance units (linear problem, reused LU) to
        1e5 units (``kvaerno5``, time-dependent ``J``) off the stage solution."""
        m = min(st.lu_mismatch, 0.9)
        return max(max(st.eta, 1e-16) ** 0.8, m / (1.0 - m), ETA_FLOOR)

    @staticmethod
    def _within_floor(st: SolveState, dn: float) -> bool:
        """Out of iterations: converged all the same in a replay when the last increment met the forward's test."""
        return st.floor is not None and dn <= st.floor

    def _step_tolerances(self, y: Tensor, st: SolveState) -> tuple[tuple, float]:
        """:meth:`_tolerances` for one step; in a replay also a fresh Jacobian and the replay's Newton settings."""
        tols, tol = self._tolerances(y)
        st.max_iter = self.max_newton_iter
        st.floor = None
        if st.replay:
            st.need_jac = True
            tol, st.floor, st.max_iter = replay_newton(tol, tols[0], y.dtype, self.max_newton_iter)
        return tols, tol

    def _newton(self, increment: Callable[[Tensor], Tensor], X: Tensor, scale: Tensor, tol: float,
                st: SolveState) -> tuple[Tensor, bool, float]:
        """Simplified Newton from the guess ``X``: ``X += increment(X)`` until the convergence test of
        :meth:`_converge` passes (True) or fails (False). Returns ``(X, converged, contraction rate)``."""
        eta = self._start_rate(st)
        dn_old = None
        stats = st.stats
        theta = 0.0
        for it in range(st.max_iter):
            dX = increment(X)
            stats["newton_iters"] += 1
            stats["linear_solves"] += 1
            dn = self.rms(dX, scale)
            status, eta, theta = self._converge(it, dn, dn_old, eta, tol, st.patient, st.floor)
            if status < 0:
                return X, False, theta
            X = X + dX
            if status > 0:
                st.eta = eta
                return X, True, theta
            dn_old = dn
        return X, self._within_floor(st, dn), theta

    def _newton_stage(self, term: Any, ti: float, psi: Tensor, hg: float, Y: Tensor, lu, scale: Tensor,
                      tol: float, st: SolveState) -> tuple[Tensor, bool, float]:
        """Solve ``Y = psi + hg f(ti, Y)`` (one DIRK stage) from the guess ``Y``."""
        layout = st.layout
        return self._newton(lambda Y_: layout.solve(lu, psi + hg * term(ti, Y_).reshape(1, -1) - Y_), Y, scale, tol,
                            st)

    def _newton_firk(self, term: Any, t: float, y: Tensor, h: float, Z: Tensor, lu, scale: Tensor, tol: float,
                     co: _ImplicitCoefficients, times: list[float], st: SolveState) -> tuple[Tensor, bool, float]:
        """Solve ``Z = h (A (x) I) F(y + Z)`` for the stacked stages ``Z`` (``(s, n)``)."""
        s = Z.shape[0]

        def increment(Z_: Tensor) -> Tensor:
            F = torch.cat([term(times[i], y + Z_[i:i + 1]).reshape(1, -1) for i in range(s)])
            return st.layout.firk_solve(lu, h * (co.A @ F) - Z_)

        return self._newton(increment, Z, scale, tol, st)

    def _newton_radau(self, term: Any, y: Tensor, h: float, Z: Tensor, lus, scale: Tensor, tol: float,
                      co: _ImplicitCoefficients, times: list[float], st: SolveState) -> tuple[Tensor, bool, float]:
        """RADAU5's Newton on the transformed stages ``W = TI Z`` (one real, one complex solve)."""
        rd = co.radau
        lur, luc, _ = lus
        mr = rd["mu_real"] / h
        mc = rd["mu_complex"] / h
        T, TI = rd["T"], rd["TI"]
        W = TI @ Z
        eta = self._start_rate(st)
        dn_old = None
        theta = 0.0
        layout = st.layout
        for it in range(st.max_iter):
            F = torch.cat([term(times[i], y + Z[i:i + 1]).reshape(1, -1) for i in range(3)])
            f_real = rd["TI_real"] @ F - mr * W[0:1]
            f_cplx = rd["TI_complex"] @ F.to(rd["cdtype"]) - mc * torch.complex(W[1:2], W[2:3])
            d_real = layout.solve(lur, f_real)
            d_cplx = layout.solve(luc, f_cplx)
            dW = torch.cat([d_real, d_cplx.real, d_cplx.imag])
            st.stats["newton_iters"] += 1
            st.stats["linear_solves"] += 2
            dn = self.rms(dW, scale)
            status, eta, theta = self._converge(it, dn, dn_old, eta, tol, st.patient, st.floor)
            if status < 0:
                return Z, False, theta
            W = W + dW
            Z = T @ W
            if status > 0:
                st.eta = eta
                return Z, True, theta
            dn_old = dn
        return Z, self._within_floor(st, dn), theta

    # -- one step ----------------------------------------------------------------------------------
    def make_buffers(self, y: Tensor, k1: Tensor) -> None:
        """No preallocated stage buffers: stages are few and Newton allocates anyway (the loop passes None)."""
        return None

    def step(self, term: Term, t: float, y: Tensor, h: float, k1: Tensor, co: _ImplicitCoefficients,
             t_end_nudge: float | None = None, buf: Any = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Advance ``y`` (shape ``(1, n)``) from ``t`` by ``h``.

        ``k1`` (the user's state shape) is dy/dt at ``(t, y)``; ``buf`` (stage buffers) is ignored. Returns
        ``(y1, k, err)``: ``k`` the stacked
        stage derivatives (``(s, n)`` for methods with an explicit first stage, else ``(s + 1, n)`` with
        ``f(t, y)`` first), ``err`` the error estimate divided by ``h`` (``(1, n)``; ``None`` for fixed-step
        methods). A failed Newton iteration gives a NaN ``y1`` and an infinite ``err``.
        """
        st = self.begin_solve(term, y)
        if st.last is not None and st.last[3] is y:
            st.accepted = st.last  # the previous step ended where this one starts: it was accepted
        retry = st.last_call is not None and st.last_call[0] == t and st.last_call[1] is y
        st.last_call = (t, y)
        times = [t_end_nudge if (t_end_nudge is not None and ci == 1.0) else t + ci * h for ci in co.c]
        if self.kind == "dirk":
            out = self._step_dirk(term, t, y, h, k1, co, times, st)
        else:
            out = self._step_coupled(term, t, y, h, k1, co, times, st, retry)
        return out

    def _failed(self, y: Tensor, rows: int, st: SolveState):
        st.stats["newton_failures"] += 1
        n = y.shape[1]
        nan = y.detach().new_full((1, n), math.nan)
        return nan, y.detach().new_zeros((rows, n)), y.detach().new_full((1, n), math.inf)

    @staticmethod
    def _needs_grad(y: Tensor, k1: Tensor) -> bool:
        return torch.is_grad_enabled() and (y.requires_grad or k1.requires_grad)

    def _step_dirk(self, term, t, y, h, k1, co, times, st):
        s = self.stages
        n = y.shape[1]
        first = 0 if self._extra_f0 else 1
        rows = s + (1 if self._extra_f0 else 0)
        tols, tol = self._step_tolerances(y, st)
        a = co.a_rows
        with torch.no_grad():
            yd = y.detach()
            k1d = k1.detach().reshape(1, n)
            scale = self._scale(tols, yd)
            rescued = False
            for attempt in range(4):
                fresh = self._ensure_jacobian(term, t, yd, y, st) or rescued
                st.patient = rescued or not self.adaptive or st.replay
                Ks = [k1d] if first else []
                Ys: list[Tensor | None] = [None] * s
                lus: list = [None] * s
                ok, theta_max = True, 0.0
                for i in range(first, s):
                    hg = h * co.diag[i]
                    lus[i] = lu = self._lu_dirk(st, h, co.diag[i])
                    psi = yd
                    for j in range(i):
                        if a[i][j] != 0.0:
                            psi = psi + (h * a[i][j]) * Ks[j]
                    # Starting value: one Newton step from the previous stage (value Y_prev, derivative K_prev
                    # from its stage equation): stays bounded on stiff components, unlike an extrapolation.
                    y_prev = yd if (i == 0 or Ys[i - 1] is None) else Ys[i - 1]
                    guess = y_prev + st.layout.solve(lu, psi + hg * (Ks[-1] if Ks else k1d) - y_prev)
                    st.stats["linear_solves"] += 1
                    Y, ok, theta = self._newton_stage(term, times[i], psi, hg, guess, lu, scale, tol, st)
                    if not ok:
                        fail_at = (times[i], Y)
                        break
                    theta_max = max(theta_max, theta)
                    Ys[i] = Y
                    Ks.append((Y - psi) / hg)
                if ok or attempt == 3:
                    break
                if fresh:  # the Jacobian where Newton got stuck, and no early give-up (fixed steps need this)
                    rescued = True
                    self._rescue_jacobian(term, fail_at[0], fail_at[1], t, y, st)
                else:
                    st.need_jac = True  # failed with an old Jacobian: recompute it and retry once
            if not ok:
                return self._failed(y, rows, st)
            st.need_jac = theta_max > self.jac_rate
            err = None
            if co.b_err is not None and not st.replay:  # a replay's steps are not judged again
                err = co.b_err @ torch.cat(Ks)
                if self.tableau.filter_error:
                    err = st.layout.solve(lus[-1], err)
                    st.stats["linear_solves"] += 1
                if co.dense_check is not None and self.dense_error:
                    err = err.abs() + self._dense_error(co, Ks, h, lus[-1], st)
                if self.tableau.proportional_below is not None:
                    err = err * self._error_factor(self._user_tolerances(y)[0], y.dtype)

        if self._needs_grad(y, k1):
            Kg = [k1.reshape(1, n)] if first else []
            for i in range(first, s):
                hg = h * co.diag[i]
                psi = y
                for j in range(i):
                    if a[i][j] != 0.0:
                        psi = psi + (h * a[i][j]) * Kg[j]
                Ystar = Ys[i]
                Yi = correct_stage(Ystar, dirk_residual(term, times[i], psi, hg),
                                   self.dirk_adjoint(term, times[i], hg, Ystar, lus[i], st))
                Ys[i] = Yi
                Kg.append((Yi - psi) / hg)
            Ks = Kg
        k = torch.cat(([k1.reshape(1, n)] if self._extra_f0 else []) + Ks)
        if self.tableau.stiffly_accurate:
            y1 = Ys[-1]
        else:
            y1 = y + h * (co.b @ torch.cat(Ks))
        st.last = (t, h, y, y1, None)
        return y1, k, err

    @staticmethod
    def _dense_error(co: _ImplicitCoefficients, Ks: list[Tensor], h: float, lu, st: SolveState) -> Tensor:
        """The continuous extension's error on stiff components, divided by ``h`` (``(1, n)``): the difference ``E``
        to a second stage-value extension at two interior points, with its non-stiff part removed,
        ``E - (I - h gamma J)^{-1} E = -h gamma J (I - h gamma J)^{-1} E``. Shampine's filter of the step's own
        estimate keeps the complementary part: on a very stiff forced component the step's end value is exact to
        ``O(1 / (h lambda))`` whatever ``h``, and steps grow until only the interpolant can tell (a step of 0.6 on
        ``y' = -1e6 (y - cos t)``)."""
        E = h * torch.mm(co.dense_check, torch.cat(Ks))  # (2, n)
        for _ in range(DENSE_FILTER_POWER):
            E = E - st.layout.solve(lu, E)
            st.stats["linear_solves"] += 1
        return E.abs().amax(0, keepdim=True) / h

    def dirk_adjoint(self, term, ti, hg, Ystar, lu, st) -> _AdjointSolve:
        layout = st.layout

        def g_of(Yd: Tensor) -> Tensor:
            return Yd - hg * term(ti, Yd).reshape(Yd.shape)

        return _AdjointSolve(g_of, Ystar, lambda v: layout.solve(lu, v, adjoint=True), st.stats,
                             lambda u: layout.solve(lu, u))

    def _predict_coupled(self, t, y, yd, h, k1d, co, st) -> Tensor:
        """Starting stages: extrapolate the collocation polynomial of the step that ended at ``(t, y)`` (as
        RADAU5), else ``Z_i = c_i h f(t, y)``."""
        acc = st.accepted
        if acc is not None and acc[3] is y:
            t0p, hp, y0p, _, Kp = acc
            th = torch.tensor([(t + ci * h - t0p) / hp for ci in co.c], dtype=torch.float64, device=yd.device)
            d = co.dense_t.shape[0]
            powers = th.view(-1, 1) ** torch.arange(1, d + 1, dtype=torch.float64, device=yd.device)
            w = torch.mm(powers, co.dense_t).to(yd.dtype)  # (s, s)
            return (y0p + hp * (w @ Kp)) - yd
        c = torch.tensor(co.c, dtype=yd.dtype, device=yd.device).view(-1, 1)
        return c * (h * k1d)

    def _step_coupled(self, term, t, y, h, k1, co, times, st, retry):
        s = self.stages
        n = y.shape[1]
        radau = self.kind == "radau5"
        tols, tol = self._step_tolerances(y, st)
        with torch.no_grad():
            yd = y.detach()
            k1d = k1.detach().reshape(1, n)
            scale = self._scale(tols, yd)
            Z0 = self._predict_coupled(t, y, yd, h, k1d, co, st)
            rescued = False
            for attempt in range(4):
                fresh = self._ensure_jacobian(term, t, yd, y, st) or rescued
                st.patient = rescued or not self.adaptive or st.replay
                if radau:
                    lu = self._lu_radau(st, co, h)
                    Z, ok, theta = self._newton_radau(term, yd, h, Z0, lu, scale, tol, co, times, st)
                else:
                    lu = self._lu_firk(st, co, h)
                    Z, ok, theta = self._newton_firk(term, t, yd, h, Z0, lu, scale, tol, co, times, st)
                if ok or attempt == 3:
                    break
                if fresh:  # the Jacobian at the end of the failing iterate, from there; no early give-up
                    rescued = True
                    self._rescue_jacobian(term, times[-1], yd + Z[-1:], t, y, st)
                    Z0 = Z if bool(torch.isfinite(Z).all()) else Z0
                else:
                    st.need_jac = True
            if not ok:
                return self._failed(y, s + 1, st)
            st.need_jac = theta > self.jac_rate
            err = None
            if radau and self.adaptive and not st.replay:
                rd = co.radau
                lur = lu[0]
                ZE = (rd["E"] @ Z) / h
                err = st.layout.solve(lur, k1d + ZE)
                st.stats["linear_solves"] += 1
                if retry or st.accepted is None:
                    # After a rejection (and on the first step) RADAU5 improves a large estimate once.
                    y1d = yd + Z[-1:]
                    sc = torch.maximum(yd.abs(), y1d.abs()) * tols[0] + tols[1]
                    if self.rms(err, sc) > 1.0:
                        err = st.layout.solve(lur, term(t, yd + err).reshape(1, n) + ZE)
                        st.stats["linear_solves"] += 1
                err = err / h
        Zk = Z
        if self._needs_grad(y, k1):
            def g_of(Zg: Tensor) -> Tensor:
                F = torch.cat([term(times[i], y + Zg[i:i + 1]).reshape(1, n) for i in range(s)])
                return (co.A_inv @ Zg) / h - F if radau else Zg - h * (co.A @ F)

            Zk = correct_stage(Z, g_of, self._coupled_adjoint(term, yd, h, Z, lu, co, times, st, radau))
        K = (co.A_inv @ Zk) / h
        if self.tableau.stiffly_accurate:
            y1 = y + Zk[-1:]
        else:
            y1 = y + h * (co.b @ K)
        k = torch.cat([k1.reshape(1, n), K])
        st.last = (t, h, y.detach(), y1, K.detach())
        return y1, k, err

    def _coupled_adjoint(self, term, yd, h, Zstar, lu, co, times, st, radau) -> _AdjointSolve:
        layout = st.layout
        s = Zstar.shape[0]

        def F_of(Zd: Tensor) -> Tensor:
            return torch.cat([term(times[i], yd + Zd[i:i + 1]).reshape(1, -1) for i in range(s)])

        if radau:
            rd = co.radau
            lur, luc, _ = lu
            T, TI = rd["T"], rd["TI"]

            def g_of(Zd: Tensor) -> Tensor:
                return (co.A_inv @ Zd) / h - F_of(Zd)

            def precond_t(v: Tensor) -> Tensor:  # M^{-T} v, M = (T (x) I)(Lambda/h (x) I - I (x) J)(TI (x) I)
                u = T.transpose(0, 1) @ v
                x0 = layout.solve(lur, u[0:1], adjoint=True)
                xc = layout.solve(luc, torch.complex(u[1:2], u[2:3]), adjoint=True)
                return TI.transpose(0, 1) @ torch.cat([x0, xc.real, xc.imag])

            def precond(u: Tensor) -> Tensor:  # M^{-1} u (Newton's solve)
                w = TI @ u
                x0 = layout.solve(lur, w[0:1])
                xc = layout.solve(luc, torch.complex(w[1:2], w[2:3]))
                return T @ torch.cat([x0, xc.real, xc.imag])
        else:
            def g_of(Zd: Tensor) -> Tensor:
                return Zd - h * (co.A @ F_of(Zd))

            def precond_t(v: Tensor) -> Tensor:
                return layout.firk_solve(lu, v, adjoint=True)

            def precond(u: Tensor) -> Tensor:
                return layout.firk_solve(lu, u)

        return _AdjointSolve(g_of, Zstar, precond_t, st.stats, precond)

    # -- dense output ------------------------------------------------------------------------------
    # dy/dt at the end of an accepted step: the explicit stepper's rule (the last stage derivative when
    # ``fsal``, which holds for stiffly accurate DIRKs).
    end_derivative = ExplicitRungeKutta.end_derivative

    def interpolate_floats(self, term: Term, st: Step, thetas: list[float], co: _ImplicitCoefficients,
                           interp: str = "auto") -> Tensor:
        """:meth:`interpolate` at plain-float fractions."""
        th = torch.tensor(thetas, dtype=torch.float64).to(dtype=st.y0.dtype, device=st.y0.device)
        return self.interpolate(term, st, th, co, interp)

    def interpolate(self, term: Term, st: Step, thetas: Tensor, co: _ImplicitCoefficients,
                    interp: str = "auto") -> Tensor:
        """The continuous extension of an accepted step at fractions ``thetas`` (shape ``(m,)``) -> ``(m, n)``.

        ``"auto"``: the collocation polynomial for collocation methods (``radau``, ``radauIIA3/5``, ``gl4``,
        ``gl6``), the stage-value extension for ``kvaerno3``/``4``/``5`` and ``trbdf2`` (:func:`_stage_dense`),
        cubic Hermite otherwise; ``"hermite"`` or ``"linear"`` force one.
        """
        m = thetas.shape[0]
        n = st.y0.shape[1]
        if interp == "linear":
            return linear(thetas.view(m, 1).to(st.y0.dtype), st.y0, st.y1)
        if interp == "auto" and co.dense_t is not None:
            d = co.dense_t.shape[0]
            th64 = thetas.view(m, 1).to(torch.float64)
            powers = th64 ** torch.arange(1, d + 1, dtype=torch.float64, device=thetas.device)
            weights = torch.mm(powers, co.dense_t).to(st.y0.dtype)  # (m, s)
            return torch.addmm(st.y0.expand(m, n), weights, st.k[co.dense_first:], alpha=st.h)
        f1 = self.end_derivative(term, st)
        return hermite(thetas.view(m, 1).to(st.y0.dtype), st.y0, st.y1, st.k[0], f1.reshape(-1), st.h)


def implicit_solver(method: str, **options: Any) -> ImplicitRungeKutta:
    """A new implicit stepper for ``method`` with options (see :class:`ImplicitRungeKutta`), to pass as
    ``solve(..., method=implicit_solver("radau", jac="batched", rtol=1e-6, atol=1e-9), rtol=1e-6, atol=1e-9)``."""
    return ImplicitRungeKutta(method, **options)
