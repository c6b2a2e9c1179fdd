"""Gradients through the implicit, multistep and switching methods with every gradient method, against independent
truths: closed-form gradients (``matrix_exp`` for ``y' = A y``; the bump problem's closed form), and ``"direct"``
(autograd through the discrete solve, implicit stages by the implicit function theorem) for ``"checkpoint"``.

* The matrix: every implicit / multistep / switching method x every gradient method on a stiff linear ODE.
* ``"checkpoint"`` with implicit methods: the replay solves each step's stage equations afresh (Jacobian at the step
  start, Newton past the forward's tolerance, never rejecting), so it agrees with ``"direct"`` to the forward's Newton
  tolerance, also where the Jacobian changes fast in time (the bump) and on Robertson.
* ``"checkpoint"`` with multistep methods: the history is part of each checkpoint, so the forward is the plain solve
  and the gradient equals ``"direct"`` to rounding (``bdf``: to its Newton tolerance).
* The continuous adjoints on the bump: what limits them (adjoint tolerances; the forward dense output) and how their
  error converges.

Float64, seeded; one thread (tiny problems: intra-op threads only add contention on a shared machine).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_auto import bump_exact_gradients, bump_field

import neurodyn
from neurodyn.solvers.adams import FixedAdams

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the largest entry of ``b``."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------------
# The matrix: y' = A y, eigenvalues -1 and -50 (non-normal), loss on 21 outputs in [0, 1].
# ----------------------------------------------------------------------------------------------------
V = torch.tensor([[1.0, 1.0], [0.5, -1.0]], dtype=F64)
A0 = V @ torch.diag(torch.tensor([-1.0, -50.0], dtype=F64)) @ torch.linalg.inv(V)
Y0 = torch.tensor([1.0, 0.3], dtype=F64)
# Outputs every 0.05: also where "adjoint" resets its backward reconstruction of y, which grows the fast mode by
# e^(50 dt) between resets (e^100 over [0, 2] without them).
TS = torch.linspace(0.0, 1.0, 21, dtype=F64)
W = torch.randn(21, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

ADAPTIVE = ["radau", "kvaerno3", "kvaerno4", "kvaerno5", "trbdf2", "adams", "bdf", "auto"]
H = 0.01  # h |lambda| = 0.5 on the fast mode
FIXED_ORDER = {"implicit_euler": 1, "implicit_midpoint": 2, "trapezoid": 2, "sdirk2": 2, "radauIIA3": 3, "gl4": 4,
               "radauIIA5": 5, "gl6": 6}
# explicit_adams / implicit_adams with their default max_order=12 (AB11) are unstable here unless h |lambda| is
# below ~1e-3: the matrix runs the same methods with max_order=5 (AB4, and AB4 + AM5), h = 0.005.
H_ADAMS = 0.005
ADAMS = {"explicit_adams": (lambda: FixedAdams(max_order=5), 4), "implicit_adams":
         (lambda: FixedAdams(implicit=True, max_order=5), 5)}


def linear_exact() -> torch.Tensor:
    A = A0.clone().requires_grad_(True)
    y0 = Y0.clone().requires_grad_(True)
    ys = torch.stack([torch.linalg.matrix_exp(A * t) @ y0 for t in TS])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad((W * ys).sum(), (A, y0))])


def linear_numeric(method, gradient: str, **kw) -> torch.Tensor:
    A = A0.clone().requires_grad_(True)
    y0 = Y0.clone().requires_grad_(True)
    sol = neurodyn.solve(lambda t, y: A @ y, y0, TS, method=method, gradient=gradient, params=[A], **kw)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad((W * sol.ys).sum(), (A, y0))])


def matrix_case(name: str) -> tuple[object, dict, float]:
    """(method, solve options, bound on the relative gradient error) for a method of the matrix.

    Adaptive methods at rtol 1e-6 (atol 1e-9): 20 rtol (measured 5e-8 .. 5e-6). Fixed steps of order p: the global
    error of the gradient is C (10 h)^p with C 0.008 .. 0.1 for the one-step methods (measured: 1.0e-2, 1.0e-3,
    5.2e-4, 7.6e-5, 4.3e-6, 2.0e-7, 7.7e-9 for p = 1, 2, 2, 3, 4, 5, 6), bound 0.3 (10 h)^p; the Adams pairs have
    larger error constants and an RK4 / AB3 start (measured 6.8e-5, 4.6e-6), bound 50 (10 h)^p.
    """
    if name in ADAMS:
        make, p = ADAMS[name]
        return make(), {"step_size": H_ADAMS}, 50 * (10 * H_ADAMS) ** p
    if name in FIXED_ORDER:
        return name, {"step_size": H}, 0.3 * (10 * H) ** FIXED_ORDER[name]
    return name, {"rtol": 1e-6, "atol": 1e-9}, 2e-5


# The longest cases (1-4 s each on one core) run with -m slow; trbdf2's and kvaerno3's direct gradients (and
# trbdf2's checkpoint) stay in the default run, where kvaerno5 runs all four gradient methods.
MATRIX_SLOW = {("trbdf2", "adjoint"), ("trbdf2", "interpolated"), ("kvaerno3", "adjoint"), ("kvaerno3", "checkpoint"),
               ("kvaerno3", "interpolated"), ("kvaerno4", "adjoint"), ("kvaerno4", "interpolated")}


@pytest.mark.parametrize("name,gradient", [
    pytest.param(n, g, marks=pytest.mark.slow) if (n, g) in MATRIX_SLOW else (n, g)
    for n in [*ADAPTIVE, *FIXED_ORDER, *ADAMS] for g in ("direct", "adjoint", "interpolated", "checkpoint")])
def test_gradient_matrix_on_a_stiff_linear_ode(name, gradient):
    method, kw, bound = matrix_case(name)
    with warnings.catch_warnings():
        # adjoint: drift reports on the fast mode; implicit_adams: a corrector that stops unconverged (first steps)
        warnings.simplefilter("ignore", RuntimeWarning)
        got = linear_numeric(method, gradient, **kw)
        if gradient == "checkpoint":
            direct = linear_numeric(matrix_case(name)[0], "direct", **kw)
    err = rel(got, linear_exact())
    assert err < bound, f"{name}/{gradient}: relative gradient error {err:.2e} (bound {bound:.1e})"
    if gradient == "checkpoint":
        # The replay reproduces the discrete solve: "direct" to rounding for fixed steps and multistep methods, to the
        # forward's Newton tolerance for adaptive implicit ones (measured <= 2e-9; 3e-7 for radau before Newton's
        # first convergence test accounted for factorisations kept from another step size).
        assert rel(got, direct) < 1e-8, f"{name}: checkpoint vs direct {rel(got, direct):.2e}"


# ----------------------------------------------------------------------------------------------------
# "checkpoint" with implicit methods on the bump: lambda(t) = -1 - 1e4 exp(-((t - 2.5) / 0.5)^2)
# ----------------------------------------------------------------------------------------------------
def bump_grads(method, gradient: str, rtol: float, options=None, **kw):
    """d(y1(5) + y2(5)) / d(p, q, y2(0)) through the bump problem, and the solution."""
    p = torch.tensor(1.3, dtype=F64, requires_grad=True)
    q = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.0, 0.4], dtype=F64, requires_grad=True)
    sol = neurodyn.solve(bump_field(1e4, p, q), y0, torch.linspace(0.0, 5.0, 11, dtype=F64), method=method,
                         rtol=rtol, atol=rtol * 1e-3, gradient=gradient, params=[p, q], solver_options=options, **kw)
    gp, gq, gy = torch.autograd.grad(sol.ys[-1].sum(), (p, q, y0))
    return torch.stack([gp, gq, gy[1]]), sol


BUMP_EXACT = torch.tensor(list(bump_exact_gradients(1.3, 0.7, 5.0).values()), dtype=F64)


def bump_checkpoint_vs_direct(method, rtol, options, vs_direct, vs_exact):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # exact Jacobians, no fallback
        direct, sol = bump_grads(method, "direct", rtol, options)
        ckpt, sol_c = bump_grads(method, "checkpoint", rtol, options, checkpoints=4)
    assert rel(sol_c.ys, sol.ys) < 1e-12  # the same forward solve (bdf: rounding of its corrections)
    assert sol_c.stats["checkpoints"] <= 4
    err = float(((ckpt - direct) / direct).abs().max())
    assert err < vs_direct, f"{method}: checkpoint vs direct {err:.2e}"
    assert float(((ckpt - BUMP_EXACT) / BUMP_EXACT).abs().max()) < vs_exact


@pytest.mark.parametrize("method,rtol,options,vs_direct,vs_exact", [
    # (measured checkpoint vs direct; direct vs the closed form)
    ("radau", 1e-7, None, 1e-8, 1e-8),  # 9e-11; 4e-10
    ("kvaerno5", 1e-6, None, 1e-7, 1e-5),  # 2.7e-8; 1.1e-6 (7e-7 before Newton's first test had its floor)
    ("bdf", 1e-7, None, 1e-8, 3e-6),  # 3e-10; 2.4e-7
    # 6.2e-7 (Newton tolerance x steps, interior error control); 2.7e-5; 5 s: slow
    pytest.param("trbdf2", 1e-5, None, 1.5e-6, 2e-4, marks=pytest.mark.slow),
    ("auto", 1e-7, {"stiff": "radau"}, 1e-8, 1e-6),  # 1e-11; 1e-8 (NaN before: Newton stalled on the replay)
    pytest.param("auto", 1e-7, None, 3e-8, 1e-6, marks=pytest.mark.slow),  # 3e-9; 1e-8; 10 s: slow
])
def test_checkpoint_matches_direct_on_the_bump(method, rtol, options, vs_direct, vs_exact):
    bump_checkpoint_vs_direct(method, rtol, options, vs_direct, vs_exact)


@pytest.mark.slow
def test_checkpoint_matches_direct_on_the_bump_trbdf2_tight():
    """2332 steps: the forward's Newton error, summed over the steps, is what separates the two (7e-9)."""
    bump_checkpoint_vs_direct("trbdf2", 1e-7, None, 3e-8, 2e-6)


# radau and kvaerno5 (6 s each) run with -m slow; both replay checkpoints on the bump in the default run.
@pytest.mark.parametrize("method,options", [pytest.param("radau", None, marks=pytest.mark.slow),
                                            pytest.param("kvaerno5", None, marks=pytest.mark.slow),
                                            ("auto", {"stiff": "radau"}), ("bdf", None)])
def test_checkpoint_matches_direct_on_robertson(method, options):
    """Robertson to t = 100, d(weighted outputs) / d(k, y0); the gradients span 5 orders of magnitude."""
    grads = []
    for gradient in ("direct", "checkpoint"):
        k = torch.tensor([0.04, 3e7, 1e4], dtype=F64, requires_grad=True)

        def f(t, y, k=k):
            r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
            return torch.stack([-r1 + r3, r1 - r2 - r3, r2])

        y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, 1.0, 10.0, 100.0], dtype=F64), method=method, rtol=1e-7,
                             atol=torch.tensor([1e-10, 1e-14, 1e-10], dtype=F64), gradient=gradient, params=[k],
                             solver_options=options, checkpoints=4)
        gk, gy = torch.autograd.grad((sol.ys * torch.tensor([1.0, 1e4, 2.0], dtype=F64)).sum(), (k, y0))
        grads.append(torch.cat([gk * k.detach(), gy]))  # d loss / d log k
    scale = grads[0].abs()
    assert float(((grads[1] - grads[0]).abs() / scale).max()) < 1e-8  # measured <= 3e-14 (relative to each entry)


# ----------------------------------------------------------------------------------------------------
# "checkpoint" with multistep methods: the history travels with the checkpoints.
# ----------------------------------------------------------------------------------------------------
def vdp_grads(method, gradient: str, **kw):
    mu = torch.tensor(5.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    sol = neurodyn.solve(lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]), y0,
                         torch.linspace(0.0, 6.0, 13, dtype=F64), method=method, gradient=gradient, params=[mu], **kw)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad((sol.ys ** 2).sum(), (y0, mu))]), sol


@pytest.mark.parametrize("method,kw,bound", [
    ("adams", {"rtol": 1e-6, "atol": 1e-8}, 1e-12),  # rejected steps change the order: replayed as taken
    ("adams", {"rtol": 1e-7, "atol": 1e-9, "jump_t": [1.3, 2.9]}, 1e-12),  # restarts after the jumps
    ("adams", {"rtol": 1e-7, "atol": 1e-9, "perturb": True}, 1e-12),
    ("explicit_adams5", {"step_size": 0.01, "jump_t": [1.3]}, 1e-12),
    ("implicit_adams6", {"step_size": 0.01}, 1e-12),
    # Newton on the replay: to the forward's Newton tolerance (measured 2e-7 on this oscillator, whose gradient
    # amplifies perturbations; 7e-10 with the jumps; 7e-8 with a PI controller; 3e-10 on the bump, 2e-15 Robertson).
    ("bdf", {"rtol": 1e-6, "atol": 1e-8}, 2e-6),
    # with jumps and with a PI controller: 6 s and 3 s, slow
    pytest.param("bdf", {"rtol": 1e-7, "atol": 1e-9, "jump_t": [1.3, 2.9]}, 1e-8, marks=pytest.mark.slow),
    pytest.param("bdf", {"rtol": 1e-6, "atol": 1e-8, "controller": neurodyn.PIDController()}, 1e-6,
                 marks=pytest.mark.slow),
])
def test_multistep_checkpoint_matches_direct(method, kw, bound):
    make = {"explicit_adams5": lambda: FixedAdams(max_order=5),
            "implicit_adams6": lambda: FixedAdams(implicit=True, max_order=6)}.get(method, lambda: method)
    with warnings.catch_warnings():
        # implicit_adams6 at this step: the corrector sometimes stops unconverged and drops the oldest point (with a
        # warning), a branch the replay must reproduce too.
        warnings.simplefilter("ignore", RuntimeWarning)
        direct, sol_d = vdp_grads(make(), "direct", **kw)
        levels = (3,) if method == "bdf" else (2, 5)
        runs = [(c, *vdp_grads(make(), "checkpoint", checkpoints=c, **kw)) for c in levels]
    for checkpoints, ckpt, sol_c in runs:
        # No restart at the checkpoints: the forward is the plain solve (bdf: its corrections differ by rounding with
        # and without autograd, amplified to ~1e-12 by the oscillator).
        assert rel(sol_c.ys, sol_d.ys) <= (1e-10 if method == "bdf" else 0.0)
        assert sol_c.stats["checkpoints"] <= checkpoints
        assert rel(ckpt, direct) < bound, f"{method}: checkpoint vs direct {rel(ckpt, direct):.2e}"
    if method == "adams":
        assert sol_d.stats["rejected"] > 0


# ----------------------------------------------------------------------------------------------------
# The continuous adjoints on the bump.
# ----------------------------------------------------------------------------------------------------
def bump_errors(method, **kw) -> tuple[list[float], neurodyn.Solution]:
    got, sol = bump_grads(method, "interpolated", 1e-7, **kw)
    return ((got - BUMP_EXACT) / BUMP_EXACT).abs().tolist(), sol


@pytest.mark.slow  # 14 s on one core; the collocation test below checks both channels at the defaults
def test_interpolated_parameter_channel_converges_with_the_adjoint_tolerance():
    """dL/dp integrates a1 (-lambda sin t + cos t): a stiff adjoint component of size ~1/|lambda| times |lambda|, and
    with seminorm=True no error control on the parameter channel. It converges with the adjoint tolerance: 3.4e-8 at
    the defaults (the forward's tolerances), 8.6e-10 at adjoint_rtol=1e-9. dL/dq integrates y1 read from kvaerno5's
    dense output: 1.6e-8 / 2.1e-8 with the stage-value extension and its error control (4e-6 to 5e-6 with the cubic
    Hermite it replaced, 7e-5 off in the stiff phase).

    Before Newton's first convergence test had a floor (ETA_FLOOR) dL/dp was off by 2e-5 (1e-4 with method="auto"):
    forward and backward kvaerno5 steps accepted stages far from the stage solution."""
    loose, _ = bump_errors("kvaerno5")
    tight, sol = bump_errors("kvaerno5", adjoint_rtol=1e-9, adjoint_atol=1e-12)
    assert loose[0] < 1e-6 and tight[0] < 1e-9 and tight[0] < loose[0] / 20
    assert tight[1] < 1e-7 and loose[1] < 1e-7  # the dense output's share
    # The backward method's Newton follows the adjoint tolerances (998 steps, 597 before kvaerno5's dense output
    # joined its step control; without that, at adjoint_rtol=1e-10, no convergence within 20000 steps).
    assert sol.stats["steps_backward"] < 1200


def test_interpolated_with_collocation_dense_output():
    """radau's collocation polynomial is accurate in the stiff phase: both channels near 1e-9 at the defaults."""
    errs, _ = bump_errors("radau")
    assert max(errs) < 1e-8


@pytest.mark.slow
def test_interpolated_dense_output_share_shrinks_with_the_forward_tolerance():
    """The q-channel error follows kvaerno5's Hermite interpolation error, ~h^4: 4e-6, 6e-7, 2e-7 at rtol 1e-7, 1e-8,
    1e-9 (tight adjoint tolerances throughout)."""
    errs = []
    for rtol in (1e-7, 1e-9):
        got, _ = bump_grads("kvaerno5", "interpolated", rtol, adjoint_rtol=rtol * 1e-2, adjoint_atol=rtol * 1e-5)
        errs.append(float(((got - BUMP_EXACT) / BUMP_EXACT).abs()[1]))
    assert errs[1] < errs[0] / 10 and errs[1] < 5e-7
