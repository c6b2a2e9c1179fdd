"""Adams methods: explicit_adams / implicit_adams (torchdiffeq's fixed-step AB / ABM) and the adaptive
variable-order ``adams``: agreement with torchdiffeq, convergence orders, accuracy against scipy's DOP853,
the history across steps (rejections, restarts, jumps), dense output and gradients."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchdiffeq
from problems import A4, B5, E_VDP, KEPLER, max_error

import neurodyn
from neurodyn.core.term import ODETerm
from neurodyn.errors import InputError
from neurodyn.solvers import get_solver
from neurodyn.solvers.adams import FixedAdams, VariableAdams, quadrature_weights

F64 = torch.float64
KEPLER_03 = KEPLER[1]
KEPLER_07 = KEPLER[3]

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


def linear(t, y):
    return y @ A.T


def linear_exact(y0, ts):
    return torch.stack([torch.linalg.matrix_exp(A * float(s)) @ y0 for s in ts])


# A damped, non-autonomous 2-d field (smooth; eigenvalues near -0.1 +- 0.5i: AB11 is unstable there at h = 0.01 --
# its parasitic root leaves the unit circle near -1 -- and explicit_adams' guard lowers the order).
def damped(t, y):
    return 0.5 * torch.stack([y[1], -y[0] + 0.1 * torch.sin(t) * y[0]]) - 0.1 * y


# ----------------------------------------------------------------------------------- weights
def test_quadrature_weights_are_the_classical_coefficients():
    ab4 = quadrature_weights([0.0, -1.0, -2.0, -3.0])[4]
    np.testing.assert_allclose(ab4, [55 / 24, -59 / 24, 37 / 24, -9 / 24], rtol=0, atol=1e-14)
    am4 = quadrature_weights([1.0, 0.0, -1.0, -2.0])[4]
    np.testing.assert_allclose(am4, [9 / 24, 19 / 24, -5 / 24, 1 / 24], rtol=0, atol=1e-14)
    # AB10 (ten points), as in torchdiffeq's table.
    ab10 = quadrature_weights([-float(i) for i in range(10)])[10]
    ref = np.array([30277247, -104995189, 265932680, -454661776, 538363838, -444772162, 252618224, -94307320,
                    20884811, -2082753]) / 7257600
    np.testing.assert_allclose(ab10, ref, rtol=1e-11)
    # Uneven nodes: exact for polynomials of degree < p.
    z = [1.0, 0.0, -0.7, -1.9, -2.2]
    w = quadrature_weights(z)[5]
    for deg in range(5):
        assert abs(sum(wi * zi ** deg for wi, zi in zip(w, z)) - 1.0 / (deg + 1)) < 1e-13


# ----------------------------------------------------------------------------------- torchdiffeq
TD_CASES = [
    ("explicit_adams", None, A4, 1001),
    ("explicit_adams", {"max_order": 5}, B5, 401),
    ("implicit_adams", None, B5, 401),
    ("implicit_adams", None, E_VDP, 1001),
    ("implicit_adams", {"max_order": 7, "max_iters": 2}, B5, 201),
]


@pytest.mark.parametrize("method,options,problem,n", TD_CASES,
                         ids=[f"{m}-{o}-{p.name}" for m, o, p, _ in TD_CASES])
def test_matches_torchdiffeq_on_the_same_grid(method, options, problem, n):
    t = torch.linspace(problem.t0, problem.t1, n, dtype=F64)
    y0 = problem.y0_tensor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit: both warn on non-converged iterations the same way
        nd = neurodyn.odeint(problem.f, y0, t, method=method, options=options)
        td = torchdiffeq.odeint(problem.f, y0, t, method=method, options=options)
    assert bool(torch.isfinite(td).all())
    assert float((nd - td).abs().max()) <= 1e-10 * max(1.0, float(td.abs().max()))


def test_matches_torchdiffeq_with_step_size_and_failed_iterations():
    """step_size grid (outputs interpolated linearly) and non-converged corrector iterations (warning, and the
    oldest history point dropped), as torchdiffeq."""
    p = KEPLER_07
    t = torch.linspace(p.t0, p.t1, 41, dtype=F64)
    opts = {"step_size": 0.02}
    with pytest.warns(RuntimeWarning, match="did not converge"):
        nd = neurodyn.odeint(p.f, p.y0_tensor(), t, method="implicit_adams", options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        td = torchdiffeq.odeint(p.f, p.y0_tensor(), t, method="implicit_adams", options=opts)
    assert float((nd - td).abs().max()) <= 1e-9


def test_options_validation():
    t = torch.linspace(0, 1, 5, dtype=F64)
    y0 = torch.ones(2, dtype=F64)
    with pytest.raises(InputError, match="max_iters"):
        neurodyn.odeint(linear, y0, t, method="explicit_adams", options={"max_iters": 3})
    with pytest.raises(InputError, match="max_order"):
        neurodyn.odeint(linear, y0, t, method="implicit_adams", options={"max_order": 13})
    with pytest.raises(InputError, match="max_order"):
        VariableAdams(max_order=0)
    for m in ("adams", "explicit_adams", "implicit_adams"):
        assert m in neurodyn.available_methods()
    # Multistep steppers are fresh per solve (own history); a configured instance is used as given.
    assert get_solver("adams") is not get_solver("adams")
    s = FixedAdams(max_order=6)
    assert get_solver(s) is s


# ----------------------------------------------------------------------------------- orders
def _fixed_errors(stepper_factory, hs, t_end=4.0):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    tt = torch.tensor([0.0, t_end], dtype=F64)
    ref = neurodyn.solve(damped, y0, tt, method="dopri8", rtol=1e-14, atol=1e-15).ys[-1]
    return [float((neurodyn.solve(damped, y0, tt, method=stepper_factory(), step_size=h).ys[-1] - ref).abs().max())
            for h in hs]


ORDER_CASES = [
    # explicit: AB up to max_order - 1 points; the single AB3 step after the two RK4 starting steps caps the
    # global order at 4 (3 when AB3 is the highest formula).
    ("explicit max_order=4", lambda: FixedAdams(False, max_order=4), 3),
    ("explicit max_order=6", lambda: FixedAdams(False, max_order=6), 4),
    ("implicit max_order=4", lambda: FixedAdams(True, max_order=4, rtol=1e-14, atol=1e-16, max_iters=30), 4),
    ("implicit max_order=6", lambda: FixedAdams(True, max_order=6, rtol=1e-14, atol=1e-16, max_iters=30), 5),
]


@pytest.mark.parametrize("name,factory,order", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_fixed_convergence_order(name, factory, order):
    hs = [0.1, 0.05, 0.025, 0.0125] if "implicit" in name else [0.04, 0.02, 0.01, 0.005]
    errs = _fixed_errors(factory, hs)
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.3, (name, slope, errs)


def test_adaptive_error_tracks_tolerance():
    """Tolerance proportionality: three decades of tolerance buy about three decades of error."""
    p = B5
    t = torch.linspace(p.t0, p.t1, 11, dtype=F64)
    errs = [max_error(neurodyn.solve(p.f, p.y0_tensor(), t, method="adams", rtol=tol, atol=tol).ys, p, t)
            for tol in (1e-6, 1e-9)]
    assert 1e-4 < errs[1] / errs[0] < 1e-2


# ----------------------------------------------------------------------------------- accuracy vs scipy
@pytest.mark.parametrize("problem", [B5, E_VDP, KEPLER_03], ids=lambda p: p.name)
@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_adaptive_accuracy_against_scipy(problem, tol):
    """Irregular output times (the corrector polynomial as dense output) against solve_ivp DOP853 (rtol 1e-12)
    or the exact solution; fewer func calls than dopri5 at the same tolerance."""
    rng = np.random.default_rng(3)
    inner = np.sort(rng.uniform(problem.t0, problem.t1, 30))
    t = torch.tensor(np.concatenate([[problem.t0], inner, [problem.t1]]), dtype=F64)
    stepper = VariableAdams()
    sol = neurodyn.solve(problem.f, problem.y0_tensor(), t, method=stepper, rtol=tol, atol=tol)
    err = max_error(sol.ys, problem, t)
    assert err <= 300 * problem.amplification * problem.scale(tol, tol), err
    dp = neurodyn.solve(problem.f, problem.y0_tensor(), t, method="dopri5", rtol=tol, atol=tol)
    assert sol.stats["nfe"] < dp.stats["nfe"]
    if tol == 1e-10:
        assert max(stepper.order_counts) >= 8  # the order rises at tight tolerances


def test_dense_output_own_polynomial_beats_hermite():
    p = B5
    t = torch.linspace(p.t0, p.t1, 97, dtype=F64)
    own = max_error(neurodyn.solve(p.f, p.y0_tensor(), t, method="adams", rtol=1e-11, atol=1e-11).ys, p, t)
    herm = max_error(neurodyn.solve(p.f, p.y0_tensor(), t, method="adams", rtol=1e-11, atol=1e-11,
                                    interp="hermite").ys, p, t)
    assert own < 1e-8 and own < herm / 10
    sol = neurodyn.solve(p.f, p.y0_tensor(), t[[0, -1]], method="adams", rtol=1e-10, atol=1e-10, dense=True)
    assert max_error(sol.evaluate(t), p, t) < 1e-7


@pytest.mark.parametrize("method", ["adams", "implicit_adams"])
def test_backward_in_time(method):
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 5, 6, dtype=F64)
    ex = linear_exact(y0, t)
    kw = {} if method == "adams" else {"step_size": 0.01}
    sol = neurodyn.solve(linear, ex[-1], t.flip(0), method=method, rtol=1e-10, atol=1e-12, **kw)
    assert float((sol.ys - ex.flip(0)).abs().max()) < 1e-8


# ----------------------------------------------------------------------------------- history
def _term(shape=(1, 2)):
    return ODETerm(lambda t, y: damped(t, y.reshape(-1)).reshape(shape), torch.Size(shape), F64, torch.device("cpu"))


@pytest.mark.parametrize("make", [lambda: VariableAdams(), lambda: FixedAdams(True, max_order=6)],
                         ids=["adams", "implicit_adams"])
def test_rejected_attempt_leaves_no_trace(make):
    """A retry from the same (t, y) after a rejected attempt gives exactly what a stepper that never saw the
    attempt gives; the history only holds accepted points."""
    term = _term()
    y0 = torch.tensor([[1.0, 0.5]], dtype=F64)

    def run(with_rejection):
        s = make()
        t, y, k1 = 0.0, y0, term(0.0, y0)
        for i in range(6):
            h = 0.05 * (1 + 0.1 * i)
            if with_rejection and i in (2, 4):
                s.step(term, t, y, 4 * h, k1, None, None)  # attempt, "rejected" by the loop
                s.step(term, t, y, 2 * h, k1, None, None)  # second attempt, rejected too
            y1, k, _ = s.step(term, t, y, h, k1, None, None)
            t, y = t + h, y1
            k1 = k[-1].view(1, 2) if s.fsal else term(t, y)
        return y, list(s._hist.ts)

    y_a, ts_a = run(True)
    y_b, ts_b = run(False)
    assert torch.equal(y_a, y_b) and ts_a == ts_b


def test_new_solve_restarts_the_history():
    s = VariableAdams()
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 3, 4, dtype=F64)
    first = neurodyn.solve(linear, y0, t, method=s, rtol=1e-8, atol=1e-10).ys
    neurodyn.solve(linear, 3 * y0, t, method=s, rtol=1e-8, atol=1e-10)
    again = neurodyn.solve(linear, y0, t, method=s, rtol=1e-8, atol=1e-10).ys
    assert torch.equal(first, again)
    fresh = neurodyn.solve(linear, y0, t, method="adams", rtol=1e-8, atol=1e-10).ys
    assert torch.equal(first, fresh)


def test_rejections_in_a_full_solve():
    p = E_VDP
    t = torch.linspace(p.t0, p.t1, 5, dtype=F64)
    sol = neurodyn.solve(p.f, p.y0_tensor(), t, method="adams", rtol=1e-8, atol=1e-8)
    assert sol.stats["rejected"] > 0
    assert max_error(sol.ys, p, t) <= 300 * p.scale(1e-8, 1e-8)


def _jumpy(t, y):
    return -y * (1.0 if float(t) < 1.0 else 3.0)


@pytest.mark.parametrize("method", ["adams", "explicit_adams", "implicit_adams"])
def test_history_dropped_at_jumps(method):
    """With jump_t the formulas never interpolate across the discontinuity of func."""
    exact = math.exp(-1.0 - 3.0 * 1.0)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    m = FixedAdams(False, max_order=6) if method == "explicit_adams" else method
    kw = {} if method == "adams" else {"step_size": 0.01}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        across = abs(float(neurodyn.solve(_jumpy, y0, t, method=m, rtol=1e-9, atol=1e-12, **kw).ys[-1, 0]) - exact)
        m = FixedAdams(False, max_order=6) if method == "explicit_adams" else method
        sol = neurodyn.solve(_jumpy, y0, t, method=m, rtol=1e-9, atol=1e-12, jump_t=[1.0], **kw)
    err = abs(float(sol.ys[-1, 0]) - exact)
    assert err < 1e-7
    if method != "adams":  # fixed steps straddle the jump without jump_t: O(h) error
        assert across > 1e-5


def test_perturb_keeps_the_history():
    """perturb=True nudges every step; the multistep history is kept (after one restart at the first step), not
    restarted at every step (which would make every step an RK4 one)."""
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0, 2, 201, dtype=F64)
    a = neurodyn.solve(damped, y0, t, method="explicit_adams")
    b = neurodyn.solve(damped, y0, t, method="explicit_adams", perturb=True)
    assert b.stats["nfe"] <= a.stats["nfe"] + 3
    ref = neurodyn.solve(damped, y0, t, method="dopri8", rtol=1e-13, atol=1e-14).ys
    err_a, err_b = float((a.ys - ref).abs().max()), float((b.ys - ref).abs().max())
    assert err_a < 1e-6 and err_b < 2 * err_a


# ----------------------------------------------------------------------------------- gradients
def test_adaptive_gradient_matches_the_exact_one():
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    for gradient in ("direct", "adjoint"):
        y0.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the adjoint's backward reconstruction of y drifts on this problem
            sol = neurodyn.solve(linear, y0, t, method="adams", rtol=1e-10, atol=1e-12, gradient=gradient)
            sol.ys[-1].sum().backward()
        exact = torch.linalg.matrix_exp(A * 5.0).sum(0)
        assert float((y0.grad - exact).abs().max()) < 1e-7, gradient


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit_adams", "implicit_adams"])
def test_fixed_gradcheck(implicit):
    t = torch.linspace(0, 0.6, 3, dtype=F64)

    def run(y0, c):
        def f(t_, y):
            return torch.stack([y[1], -c * torch.sin(y[0])])
        stepper = FixedAdams(implicit, max_order=6, rtol=1e-12, atol=1e-14, max_iters=8)
        return neurodyn.solve(f, y0, t, method=stepper, step_size=0.05).ys

    y0 = torch.tensor([0.7, -0.2], dtype=F64, requires_grad=True)
    c = torch.tensor(1.4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, c))


# ----------------------------------------------------------------------------------- stability guard
# AB11 (explicit_adams' default max_order=12, as torchdiffeq) is stable on the negative real axis only for
# h |lambda| < 0.0034 (AB9: 0.0127): y' = -y with h = 0.01 grows a parasitic mode by 1.26 per step. Both libraries
# used to return 5e19 at t = 3 with status success; the guard lowers the order to a stable formula.
def _decay(t, y):
    return -y


def test_real_stability_intervals_are_the_classical_ones():
    from neurodyn.solvers.adams import _real_interval
    # Adams--Bashforth: 2, 1, 6/11, 3/10, 90/551 (Hairer, Norsett & Wanner I, III.3); Adams--Moulton: 6, 3, 90/49.
    ab = [_real_interval(k, False) for k in (1, 2, 3, 4, 5)]
    np.testing.assert_allclose(ab, [2.0, 1.0, 6 / 11, 0.3, 90 / 551], rtol=1e-6)
    am = [_real_interval(k, True) for k in (2, 3, 4)]
    np.testing.assert_allclose(am, [6.0, 3.0, 90 / 49], rtol=1e-6)
    assert 0.0033 < _real_interval(11, False) < 0.0035 and 0.0126 < _real_interval(9, False) < 0.0128


def test_explicit_adams_unstable_order_is_lowered():
    y0 = torch.ones(1, dtype=F64)
    t = torch.linspace(0, 3, 301, dtype=F64)
    # (the order ramp stops below the first formula unstable at h |lambda| = 0.01: AB10)
    with pytest.warns(RuntimeWarning, match=r"order-10 formula \(AB10\) is unstable at step 0.01"):
        sol = neurodyn.solve(_decay, y0, t, method="explicit_adams", step_size=0.01)
    assert sol.status == "success"
    err = float((sol.ys[:, 0] - torch.exp(-t)).abs().max())
    # torchdiffeq (which blows up with the default) is right with max_order=10 (AB9), to 3.7e-9 (the start-up AB3
    # step's error): the same answer to the method's accuracy (the parasitic mode grew for a few steps before the
    # guard acted), and bit for bit with the same max_order (the guard then never acts).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td = torchdiffeq.odeint(_decay, y0, t, method="explicit_adams", options={"step_size": 0.01, "max_order": 10})
        nd = neurodyn.odeint(_decay, y0, t, method="explicit_adams", options={"step_size": 0.01, "max_order": 10})
    td_err = float((td[:, 0] - torch.exp(-t)).abs().max())
    assert td_err < 5e-9 and err < 2.5 * td_err, (err, td_err)
    assert float((sol.ys - td).abs().max()) < 1e-8
    assert float((nd - td).abs().max()) < 1e-14


@pytest.mark.parametrize("implicit,h,t_end,tol", [(False, 0.05, 30.0, 1e-12), (False, 0.3, 30.0, 1e-4),
                                                   (True, 0.1, 30.0, 1e-15), (True, 0.6, 30.0, 1e-5)])
def test_fixed_adams_long_decay_stays_accurate(implicit, h, t_end, tol):
    """Before the guard: 6e160 (AB, h=0.05), 5e50 (AB, h=0.3), 7.6e3 (ABM, h=0.1), -337 (ABM, h=0.6) at t=30."""
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 1.0, t_end], dtype=F64)
    with pytest.warns(RuntimeWarning, match="unstable"):
        sol = neurodyn.solve(_decay, y0, t, method=FixedAdams(implicit), step_size=h)
    assert sol.status == "success"
    assert abs(float(sol.ys[-1, 0]) - math.exp(-t_end)) < tol


def test_explicit_adams_blow_up_ends_non_finite():
    """h = 1 on y' = -y: no Adams--Bashforth formula of order >= 3 is stable (AB3 needs h < 6/11); the solve stops
    with status non_finite (torchdiffeq returns 1e20 at t=30)."""
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 30.0], dtype=F64)
    with pytest.warns(RuntimeWarning, match="unstable at step 1 .*stopping"):
        sol = neurodyn.solve(_decay, y0, t, method="explicit_adams", step_size=1.0, on_failure="return")
    assert sol.status == "non_finite" and sol.t_final < 30.0
    with pytest.warns(RuntimeWarning, match="stopping"), pytest.raises(neurodyn.errors.NonFiniteError,
                                                                     match="step_size"):
        neurodyn.solve(_decay, y0, t, method="explicit_adams", step_size=1.0)


def test_lowered_order_replays_exactly_under_checkpoint():
    """The order the guard chose is a decision of the step: a checkpoint replay takes it again, so the gradient
    equals the direct one and the closed form d y(T) / d c = -T exp(-c T)."""
    t = torch.tensor([0.0, 1.5], dtype=F64)
    grads = {}
    for gradient in ("direct", "checkpoint"):
        c = torch.tensor(1.0, dtype=F64, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="unstable at step 0.01"):
            sol = neurodyn.solve(lambda t_, y, c=c: -c * y, torch.ones(1, dtype=F64), t, method="explicit_adams",
                                 step_size=0.01, gradient=gradient, checkpoints=4, params=[c])
        (g,) = torch.autograd.grad(sol.ys[-1, 0], c)
        grads[gradient] = float(g)
    assert abs(grads["checkpoint"] - grads["direct"]) < 1e-13
    assert abs(grads["direct"] + 1.5 * math.exp(-1.5)) < 2e-8  # the solution's own accuracy (4e-9)


@pytest.mark.parametrize("h,t_end,tol", [(0.1, 2.0, 2e-5), (0.2, 2.0, 2e-4), (0.05, 1.0, 2e-6)])
def test_explicit_adams_short_coarse_solve_is_accurate(h, t_end, tol):
    """Too few steps for the growth guard: the order ramp itself stops below the first unstable formula. Before:
    y' = -y, h = 0.1 to t = 2 returned 1.754 for e^-2 = 0.135 (AB formulas up to AB11, unstable there), status
    success, no warning; torchdiffeq returns the same wrong value."""
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, t_end], dtype=F64)
    with pytest.warns(RuntimeWarning, match="unstable at step"):
        sol = neurodyn.solve(_decay, y0, t, method="explicit_adams", step_size=h)
    assert sol.status == "success"
    assert abs(float(sol.ys[-1, 0]) - math.exp(-t_end)) < tol
