"""The variable-order BDF/NDF stepper ``bdf`` (``neurodyn.solvers.bdf``): the stiff test set against published
references, scipy's ``BDF`` (the same algorithm) step for step, convergence orders, dense output, Jacobian
modes, Newton failures, the history across accept/reject, and gradients (direct, adjoint, interpolated). The
batched (block-diagonal) Jacobian is tested with ``radau``'s in ``test_implicit.py``.

The default suite runs in about 15 s on 2 shared cores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from problems import B5
from stiff_problems import HIRES, PROBLEMS, ROBER, rober

import neurodyn
from neurodyn.core.term import ODETerm
from neurodyn.errors import InputError
from neurodyn.solvers import BDF, available_methods, get_solver

F64 = torch.float64


@pytest.fixture
def one_thread():
    """Batched LAPACK calls on 2 shared cores wait for the busy second core; one thread keeps tests fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def solve_bdf(f, y0, t_end, rtol, atol, **options):
    solver = get_solver("bdf").bind(rtol=rtol, atol=atol, **options)
    with torch.no_grad():
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, t_end], dtype=F64), method=solver, rtol=rtol, atol=atol,
                             max_steps=50_000)
    return sol, solver


# ----------------------------------------------------------------------------------------------------
# The stiff test set (issue target: relative error <= 1e-4 at rtol = 1e-6).
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["robertson", "hires", "vdp1000"])
def test_reference_values(name, one_thread):
    problem = PROBLEMS[name]
    sol, solver = solve_bdf(problem.f, problem.y0_tensor(), problem.t_end, 1e-6, problem.atol_tensor())
    assert sol.status == "success"
    err = problem.rel_error(sol.ys[-1].numpy())
    assert err <= 1e-4, f"bdf on {name}: relative error {err:.2e}"
    st = sol.stats
    assert st["jacobian_evals"] > 0 and st["factorizations"] >= st["jacobian_evals"] and st["newton_iters"] > 0
    assert max(st["orders"]) == 5 and sum(st["orders"].values()) == st["steps"] + st["rejected"]
    assert st["jacobian_evals"] < st["steps"] / 10  # J kept across steps, as scipy's BDF


@pytest.mark.parametrize("name,t_end,rtol", [("robertson", 1e3, 1e-10), ("hires", 321.8122, 1e-6)])
def test_matches_scipy_bdf(name, t_end, rtol, one_thread):
    """The same method as scipy's BDF: the same solution and (nearly) the same steps, evaluations, Jacobians and
    factorisations."""
    from scipy.integrate import solve_ivp

    p = PROBLEMS[name]
    atol = np.asarray(p.atol) if isinstance(p.atol, tuple) else p.atol
    ref = solve_ivp(p.f_np, (0.0, t_end), p.y0, method="BDF", rtol=rtol, atol=atol, jac=p.jac_np)
    sol, _ = solve_bdf(p.f, p.y0_tensor(), t_end, rtol, p.atol_tensor())
    diff = np.max(np.abs(sol.ys[-1].numpy() - ref.y[:, -1]) / np.abs(ref.y[:, -1]))
    assert diff < (1e-9 if rtol < 1e-8 else 1e-5), diff
    st = sol.stats
    for ours, theirs in ((st["steps"], len(ref.t) - 1), (st["nfe"], ref.nfev), (st["jacobian_evals"], ref.njev),
                         (st["factorizations"], ref.nlu)):
        assert abs(ours - theirs) <= 0.05 * theirs + 2, (ours, theirs)


# ----------------------------------------------------------------------------------------------------
# Convergence order k with max_order = k: error against the number of steps, at decreasing tolerances.
# ----------------------------------------------------------------------------------------------------
def _warped(t, y):
    return (1.0 + 0.5 * torch.cos(t)) * B5.f(t, y)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_convergence_order(order):
    t_end = 4.0
    exact = B5.exact(np.asarray([t_end + 0.5 * math.sin(t_end)]))[0]
    steps, errs = [], []
    for e in np.linspace(3 + order, 4 + 1.5 * order, 4):
        tol = 10.0 ** (-e)
        sol, solver = solve_bdf(_warped, torch.tensor(B5.y0, dtype=F64), t_end, tol, tol, max_order=order)
        steps.append(sol.stats["steps"])
        errs.append(float(np.abs(sol.ys[-1].numpy() - exact).max()))
        assert sol.stats["orders"][order] > 0.8 * sol.stats["steps"]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.35, (steps, errs, slope)


def test_classical_bdf_and_ndf_both_meet_the_tolerance():
    errs = {}
    for ndf in (True, False):
        sol, _ = solve_bdf(HIRES.f, HIRES.y0_tensor(), HIRES.t_end, 1e-7, 1e-11, ndf=ndf)
        errs[ndf] = HIRES.rel_error(sol.ys[-1].numpy())
    assert errs[True] < 1e-5 and errs[False] < 1e-5 and errs[True] != errs[False]


# ----------------------------------------------------------------------------------------------------
# Dense output, direction, dtypes, Jacobians.
# ----------------------------------------------------------------------------------------------------
def test_dense_output_hires():
    """Outputs between steps on HIRES's transient: the BDF interpolating polynomial (and Hermite)."""
    from scipy.integrate import solve_ivp

    ts = np.linspace(0.0, 20.0, 41)
    ref = solve_ivp(HIRES.f_np, (0.0, 20.0), HIRES.y0, method="Radau", rtol=1e-11, atol=1e-14,
                    jac=HIRES.jac_np, t_eval=ts).y.T
    plain, _ = solve_bdf(HIRES.f, HIRES.y0_tensor(), 20.0, 1e-7, 1e-11)
    for interp in ("auto", "hermite"):
        with torch.no_grad():
            sol = neurodyn.solve(HIRES.f, HIRES.y0_tensor(), torch.tensor(ts, dtype=F64), method="bdf", rtol=1e-7,
                                 atol=1e-11, interp=interp)
        assert sol.stats["steps"] == plain.stats["steps"]  # outputs are interpolated, not stepped onto
        err = np.abs(sol.ys.numpy() - ref) / (np.abs(ref) + 1e-6)
        assert err.max() < 1e-5, (interp, err.max())


def test_dense_polynomial_interpolates_the_past_points():
    """The step's polynomial passes through y1 (theta = 1), y0 (theta = 0) and the earlier solution points
    (theta = -1, -2, ...) on an equal-step stretch."""
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=F64)
    sol = neurodyn.solve(lambda t, y: A @ y, torch.tensor([1.0, 0.0], dtype=F64),
                         torch.tensor([0.0, 2.0], dtype=F64), method="bdf", rtol=1e-8, atol=1e-10, dense=True)
    stepper = get_solver("bdf")
    ts = torch.linspace(0.0, 2.0, 21, dtype=F64)
    ex = torch.stack([torch.linalg.matrix_exp(A * float(s)) @ torch.tensor([1.0, 0.0], dtype=F64) for s in ts])
    assert float((sol.evaluate(ts) - ex).abs().max()) < 1e-7
    # One step's polynomial at theta = 0, -1, ...: the earlier accepted states.
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    term = ODETerm(lambda t, y: y @ A.T, torch.Size([1, 2]), F64, torch.device("cpu"))
    t, y, k1, h = 0.0, y0, term(0.0, y0), 0.01
    states = [y]
    for _ in range(12):
        y, k, _ = stepper.step(term, t, y, h, k1, None)
        t, k1 = t + h, k[-1].view(1, 2)
        states.append(y)
    order = k.shape[0] - 3
    assert order >= 2
    from neurodyn.core.stepper import Step

    vals = stepper.interpolate(term, Step(t - h, h, states[-2], y, k), torch.tensor([1.0, 0.0, -1.0], dtype=F64))
    for row, state in zip(vals, [states[-1], states[-2], states[-3]]):
        assert torch.allclose(row, state[0], rtol=0, atol=1e-13)


def test_backward_in_time():
    M = torch.tensor([[1.0, -2.0, 0.0], [2.0, 1.0, -0.5], [0.0, -0.3, 5.0]], dtype=F64)  # stable backward
    yT = torch.tensor([1.0, 0.5, -0.2], dtype=F64)
    t = torch.linspace(2.0, 0.0, 5, dtype=F64)
    ex = torch.stack([torch.linalg.matrix_exp(M * (float(s) - 2.0)) @ yT for s in t])
    sol = neurodyn.solve(lambda t, y: M @ y, yT, t, method="bdf", rtol=1e-9, atol=1e-12)
    assert float((sol.ys - ex).abs().max()) < 1e-7


def test_float32_and_shapes():
    def f(t, y):  # (2, 3): two copies of Robertson
        r1, r2, r3 = 0.04 * y[..., 0], 3e7 * y[..., 1] ** 2, 1e4 * y[..., 1] * y[..., 2]
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)

    y0 = torch.tensor([[1.0, 0.0, 0.0]] * 2)
    with torch.no_grad():
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, 20.0, 40.0]), method="bdf", rtol=1e-4, atol=1e-8)
    assert sol.ys.shape == (3, 2, 3) and sol.ys.dtype == torch.float32
    assert float((sol.ys[-1, :, 0] - 0.7158270687193229).abs().max()) < 1e-3  # IVP test set / scipy, t = 40
    with pytest.raises(InputError, match="real"):
        neurodyn.solve(lambda t, y: -y, torch.ones(2, dtype=torch.complex128), torch.tensor([0.0, 1.0], dtype=F64),
                       method="bdf")


def test_callable_and_fd_jacobians():
    def jac(t, y):
        k1, k2, k3 = 0.04, 3e7, 1e4
        z = 0 * y[0]
        return torch.stack([torch.stack([-k1 + z, k3 * y[2], k3 * y[1]]),
                            torch.stack([k1 + z, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]]),
                            torch.stack([z, 2 * k2 * y[1], z])])

    ref, _ = solve_bdf(rober, ROBER.y0_tensor(), 1e5, 1e-6, ROBER.atol_tensor())
    for option in (jac, "fd"):
        sol, solver = solve_bdf(rober, ROBER.y0_tensor(), 1e5, 1e-6, ROBER.atol_tensor(), jac=option)
        assert torch.allclose(sol.ys[-1], ref.ys[-1], rtol=1e-4, atol=1e-14)
        assert solver.stats["jacobian_evals"] > 0


# ----------------------------------------------------------------------------------------------------
# Newton failures, the history across accept/reject, the controller.
# ----------------------------------------------------------------------------------------------------
def test_newton_failure_rejects_the_step():
    solver = get_solver("bdf").bind(rtol=1e-6, atol=1e-10, max_newton_iter=1)  # scipy's test needs 2 iterations
    y = ROBER.y0_tensor().view(1, 3)
    term = ODETerm(rober, torch.Size([3]), F64, torch.device("cpu"))
    with torch.no_grad():
        y1, k, err = solver.step(term, 0.0, y, 1e-3, term(0.0, y), None)
    assert torch.isnan(y1).all() and torch.isinf(err).all()
    assert solver.stats["newton_failures"] == 1 and solver.stats["jacobian_evals"] == 1
    with torch.no_grad():
        sol = neurodyn.solve(rober, ROBER.y0_tensor(), torch.tensor([0.0, 1.0], dtype=F64), method=solver,
                             on_failure="return")
    # Attempts fail (a NaN state, rejected) down to steps so small that f(y_pred) == f(y0) in floating point: the
    # solve stops there, with no unconverged step accepted.
    assert sol.status == "non_finite" and sol.n_valid == 1 and sol.t_final < 1e-6


def test_adaptive_solve_recovers_from_newton_failures():
    solver = get_solver("bdf").bind(rtol=1e-6, atol=ROBER.atol_tensor())
    with torch.no_grad():  # a far too large first step: Newton fails even with a fresh Jacobian, and again
        sol = neurodyn.solve(rober, ROBER.y0_tensor(), torch.tensor([0.0, 1e3], dtype=F64), method=solver,
                             rtol=1e-6, atol=ROBER.atol_tensor(), first_step=1.0)
    ref, _ = solve_bdf(rober, ROBER.y0_tensor(), 1e3, 1e-10, ROBER.atol_tensor())
    assert solver.stats["newton_failures"] > 5 and sol.stats["rejected"] >= solver.stats["newton_failures"]
    assert np.allclose(sol.ys[-1].numpy(), ref.ys[-1].numpy(), rtol=1e-4, atol=1e-12)


def test_rejected_attempt_leaves_no_trace():
    """A retry from the same (t, y) after rejected attempts gives exactly what a stepper that never saw them
    gives (linear problem: Newton is exact with any Jacobian evaluation)."""
    A = torch.tensor([[-1.0, 2.0], [-2.0, -30.0]], dtype=F64)
    term = ODETerm(lambda t, y: y @ A.T, torch.Size([1, 2]), F64, torch.device("cpu"))

    def run(with_rejection):
        s = BDF(rtol=1e-8, atol=1e-10)
        t, y = 0.0, torch.tensor([[1.0, 0.5]], dtype=F64)
        k1 = term(t, y)
        h = 0.01
        for i in range(20):
            if with_rejection and i in (3, 9, 14):
                s.step(term, t, y, 4 * h, k1, None)
                s.step(term, t, y, 2 * h, k1, None)
            y1, k, _ = s.step(term, t, y, h, k1, None)
            s.propose_step(h, 0.5, True)
            t, y, k1 = t + h, y1, k[-1].view(1, 2)
        return y, s.current_order, s._n_equal

    a, b = run(True), run(False)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_same_stepper_twice_and_fresh_per_solve():
    assert get_solver("bdf") is not get_solver("bdf")
    solver = get_solver("bdf").bind(rtol=1e-6, atol=ROBER.atol_tensor())
    runs = []
    for _ in range(2):  # the second solve starts from scratch (history, Jacobian, counters)
        with torch.no_grad():
            sol = neurodyn.solve(rober, ROBER.y0_tensor(), torch.tensor([0.0, 1e3], dtype=F64), method=solver,
                                 rtol=1e-6, atol=ROBER.atol_tensor())
        runs.append((sol.ys[-1].clone(), sol.stats["nfe"], dict(solver.stats)))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert set(runs[0][2]) >= {"jacobian_evals", "factorizations", "newton_iters", "orders", "order"}


def test_with_a_user_pi_controller():
    """A user's controller sizes the steps (D rescaled at every step); the orders still rise and fall."""
    sol, _ = solve_bdf(HIRES.f, HIRES.y0_tensor(), HIRES.t_end, 1e-6, 1e-10)
    with torch.no_grad():
        pi = neurodyn.solve(HIRES.f, HIRES.y0_tensor(), torch.tensor([0.0, HIRES.t_end], dtype=F64), method="bdf",
                            rtol=1e-6, atol=1e-10, controller=neurodyn.PIDController())
    assert HIRES.rel_error(pi.ys[-1].numpy()) < 1e-4 and max(pi.stats["orders"]) == 5
    assert pi.stats["factorizations"] > 2 * sol.stats["factorizations"]  # why bdf sizes its own steps


def test_options_are_validated_and_unsupported_paths_say_so():
    assert "bdf" in available_methods()
    for bad in ({"jac": "magic"}, {"max_order": 0}, {"max_order": 6}, {"max_newton_iter": 0}, {"nonsense": 1}):
        with pytest.raises(InputError):
            get_solver("bdf").bind(**bad)
    y0 = torch.ones(2, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(InputError, match="per_sample_steps"):
        neurodyn.solve(lambda t, y: -y, y0, t, method="bdf", per_sample_steps=True)
    sol = neurodyn.solve(lambda t, y: -y, y0, t, method="bdf", solver_options={"max_order": 2})
    assert max(sol.stats["orders"]) <= 2


def test_events_and_jumps():
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    sol = neurodyn.solve(osc, y0, torch.tensor([0.0, 10.0], dtype=F64), method="bdf", rtol=1e-8, atol=1e-10,
                         dense=True, event_fn=lambda t, y: y[0] - 0.5)
    assert sol.status == "event" and abs(float(sol.event_t) - math.pi / 3) < 1e-6

    def g(t, y):
        return torch.where(t < 1.0, -y, -3.0 * y)

    sol = neurodyn.solve(g, y0, torch.tensor([0.0, 2.0], dtype=F64), method="bdf", rtol=1e-8, atol=1e-10,
                         jump_t=[1.0])
    assert abs(float(sol.ys[-1, 0]) - math.exp(-4.0)) < 1e-7
    assert sol.stats["orders"][1] >= 2  # restarted at order 1 after the jump


# ----------------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------------
def _vdp_param(mu):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    return f


def _grad_and_central_differences(loss, y0, mu, loss_fd=None, eps=1e-6):
    """``d loss / d (y0, mu)`` by autograd and by central differences (of ``loss_fd``, default ``loss``)."""
    y0 = y0.clone().requires_grad_(True)
    mu = mu.clone().requires_grad_(True)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(y0, mu), (y0, mu))])
    loss_fd = loss_fd or loss
    with torch.no_grad():
        fd = [float(loss_fd(y0 + d[:2], mu + d[2]) - loss_fd(y0 - d[:2], mu - d[2])) / (2 * eps)
              for d in torch.eye(3, dtype=F64) * eps]
    return g, torch.tensor(fd, dtype=F64)


def test_gradient_fixed_steps_matches_finite_differences():
    """Fixed steps (a smooth discrete map): the implicit-function-theorem gradient of the discrete method."""
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    solvers = []

    def loss(y0, mu):
        solvers.append(get_solver("bdf").bind(rtol=1e-9, atol=1e-11))
        ys = neurodyn.solve(_vdp_param(mu), y0, ts, method=solvers[-1], step_size=0.02).ys
        return ys[1:].sum() + (ys[-1] ** 2).sum()

    g, fd = _grad_and_central_differences(loss, torch.tensor([2.0, 0.0], dtype=F64), torch.tensor(20.0, dtype=F64))
    assert solvers[0].stats["adjoint_solves"] > 0  # one implicit-function-theorem solve per step
    assert float((g - fd).abs().max() / fd.abs().max()) < 1e-7


@pytest.mark.parametrize("gradient,adjoint_method", [("direct", None), ("adjoint", None), ("interpolated", None),
                                                     ("adjoint", "dopri5")])
def test_gradients_of_a_linear_ode(gradient, adjoint_method):
    """y' = A y: d/dy0 and d/dA of w . y(T) against autograd through matrix_exp (adaptive steps; the backward solve
    with bdf itself, or with dopri5 under bdf's controller, which then falls back to PI control)."""
    a0 = torch.tensor([[-1.0, 2.0, 0.0], [-2.0, -1.0, 0.5], [0.0, 0.3, -3.0]], dtype=F64)
    w = torch.tensor([0.3, -0.7, 1.1], dtype=F64)
    y0 = torch.tensor([1.0, 0.5, -0.2], dtype=F64, requires_grad=True)
    A = torch.nn.Parameter(a0.clone())
    exact = torch.autograd.grad(w @ (torch.linalg.matrix_exp(A) @ y0), (y0, A))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no drift warning, no finite-difference Jacobian
        sol = neurodyn.solve(lambda t, y: A @ y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method="bdf",
                             rtol=1e-9, atol=1e-12, gradient=gradient, params=[A], adjoint_method=adjoint_method)
        got = torch.autograd.grad(w @ sol.ys[-1] + 0 * sol.ys[1].sum(), (y0, A))
    for g, e in zip(got, exact):
        assert float((g - e).abs().max()) < 1e-7 * float(e.abs().max())


def test_gradient_nonlinear_adaptive_matches_finite_differences():
    """Van der Pol (mu = 5), adaptive steps: the direct gradient of the discrete solve against central
    differences of tighter solves."""
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=F64)

    def loss(y0, mu, rtol=1e-10):
        ys = neurodyn.solve(_vdp_param(mu), y0, ts, method="bdf", rtol=rtol, atol=rtol * 1e-2).ys
        return ys[1:].sum() + (ys[-1] ** 2).sum()

    g, fd = _grad_and_central_differences(loss, torch.tensor([2.0, 0.0], dtype=F64), torch.tensor(5.0, dtype=F64),
                                          lambda y0, mu: loss(y0, mu, 1e-12))
    assert float((g - fd).abs().max() / fd.abs().max()) < 1e-6
