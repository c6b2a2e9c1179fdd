"""Adaptive methods meet their tolerance on the DETEST-style problems (tests/problems.py).

Error is measured at 37 irregular output times (seeded, so they fall between the solver's steps),
against exact solutions where they exist and a DOP853 rtol=1e-12 reference otherwise.  The bound is
``GLOBAL_C[method] * problem.amplification * tol * scale`` -- see tests/problems.py for how the
constants were chosen (from independent implementations of the same pairs, with headroom).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from problems import (
    A3,
    ADAPTIVE_METHODS,
    ALL_PROBLEMS,
    B5,
    E_VDP,
    GLOBAL_C,
    PROBLEMS,
    irregular_times,
    max_error,
)

import neurodyn

# Tolerances per method: low orders loose so the suite stays fast, dopri8 also tight.
TOLS = {
    "adaptive_heun": [1e-4],
    "fehlberg2": [1e-4],
    "bosh3": [1e-5],
    "dopri5": [1e-6],
    "tsit5": [1e-6],
    "dopri8": [1e-6, 1e-10],
}
ATOL_FACTOR = 1e-3  # atol = rtol * 1e-3
CASES = [(m, tol) for m in ADAPTIVE_METHODS for tol in TOLS[m]]

KEPLER_05 = PROBLEMS["D_kepler_e0.5"]
SUBSET = [A3, B5, KEPLER_05]  # for the more expensive checks


def bound(method, problem, tol):
    return GLOBAL_C[method] * problem.amplification * problem.scale(tol, tol * ATOL_FACTOR)


def solve(problem, ts, method, tol, y0=None, **kwargs):
    y0 = problem.y0_tensor() if y0 is None else y0
    return neurodyn.solve(problem.f, y0, ts, method=method, rtol=tol, atol=tol * ATOL_FACTOR, **kwargs)


@pytest.mark.parametrize("problem", ALL_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("method,tol", CASES, ids=[f"{m}-{t:g}" for m, t in CASES])
def test_tolerance_met(method, tol, problem):
    ts = irregular_times(problem)
    sol = solve(problem, ts, method, tol)
    assert sol.status == "success" and sol.success
    assert sol.ys.shape == (len(ts), problem.n)
    assert sol.ys.dtype == torch.float64
    torch.testing.assert_close(sol.ts, ts, rtol=0, atol=0)
    torch.testing.assert_close(sol.ys[0], problem.y0_tensor(), rtol=0, atol=0)
    err = max_error(sol.ys, problem, ts)
    b = bound(method, problem, tol)
    assert err <= b, f"{method} rtol={tol:g} on {problem.name}: max error {err:.3e} > bound {b:.3e} " \
                     f"(= {err / b * GLOBAL_C[method]:.0f} x tol*scale*amp; C={GLOBAL_C[method]:g})"
    # The final time and state are reported consistently.
    assert math.isclose(sol.t_final, problem.t1, rel_tol=0, abs_tol=1e-12)
    torch.testing.assert_close(sol.y_final, sol.ys[-1], rtol=1e-13, atol=1e-13)


# Tolerance proportionality: with local extrapolation the global error is ~ proportional to tol, so a
# 100x tighter rtol should give ~100x smaller error; require at least 10x.
PROPORTIONALITY_TOLS = {
    "adaptive_heun": 1e-3,
    "fehlberg2": 1e-3,
    "bosh3": 1e-4,
    "dopri5": 1e-5,
    "tsit5": 1e-5,
    "dopri8": 1e-6,
}


@pytest.mark.parametrize("problem", [A3, B5, E_VDP], ids=lambda p: p.name)
@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_tolerance_proportionality(method, problem):
    ts = irregular_times(problem, seed=1)
    tol = PROPORTIONALITY_TOLS[method]
    err_loose = max_error(solve(problem, ts, method, tol).ys, problem, ts)
    err_tight = max_error(solve(problem, ts, method, tol / 100).ys, problem, ts)
    assert err_tight * 10 <= err_loose, (
        f"{method} on {problem.name}: error {err_loose:.3e} at rtol={tol:g} but {err_tight:.3e} at "
        f"rtol={tol / 100:g} (ratio {err_loose / err_tight:.1f}, want >= 10)"
    )


def test_stats_are_consistent():
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return A3.f(t, y)

    ts = irregular_times(A3)
    sol = neurodyn.solve(f, A3.y0_tensor(), ts, method="dopri5", rtol=1e-6, atol=1e-9)
    st = sol.stats
    for key in ("nfe", "steps", "rejected", "last_step", "initial_step"):
        assert key in st, key
    assert st["steps"] > 10 and st["rejected"] >= 0
    # nfe counts evaluations of func: the count we observed (possibly minus the one shape check).
    assert st["nfe"] in (calls[0], calls[0] - 1), (st["nfe"], calls[0])
    # dopri5 is FSAL: 6 new evaluations per attempted step, plus a handful for the start.
    attempts = st["steps"] + st["rejected"]
    assert 6 * attempts <= st["nfe"] <= 6 * attempts + 5, (st, attempts)
    assert 0 < st["initial_step"] < 20 and 0 < st["last_step"] <= 20


# --------------------------------------------------------------------------------- backward in time
BACKWARD_CASES = [(m, TOLS[m][0]) for m in ADAPTIVE_METHODS]


@pytest.mark.parametrize("problem", SUBSET, ids=lambda p: p.name)
@pytest.mark.parametrize("method,tol", BACKWARD_CASES, ids=[f"{m}-{t:g}" for m, t in BACKWARD_CASES])
def test_backward_meets_tolerance(method, tol, problem):
    ts = irregular_times(problem, seed=2).flip(0)  # t1 -> t0
    y1 = torch.from_numpy(problem.reference([problem.t1])[0].copy())
    sol = solve(problem, ts, method, tol, y0=y1)
    assert sol.success
    torch.testing.assert_close(sol.ts, ts, rtol=0, atol=0)
    torch.testing.assert_close(sol.ys[0], y1, rtol=0, atol=0)
    err = max_error(sol.ys, problem, ts)
    b = bound(method, problem, tol)
    assert err <= b, f"backward {method} on {problem.name}: error {err:.3e} > {b:.3e}"
    assert math.isclose(sol.t_final, problem.t0, abs_tol=1e-12)


@pytest.mark.parametrize("method,tol", BACKWARD_CASES, ids=[f"{m}-{t:g}" for m, t in BACKWARD_CASES])
def test_backward_equals_mirrored_forward(method, tol):
    """y' = f(t, y) on decreasing t is z' = -f(-s, z) on increasing s = -t: same values."""
    problem = B5
    ts = irregular_times(problem, seed=3).flip(0)
    y1 = torch.from_numpy(problem.reference([problem.t1])[0].copy())
    back = solve(problem, ts, method, tol, y0=y1)

    def mirrored(s, z):
        return -problem.f(-s, z)

    fwd = neurodyn.solve(mirrored, y1, -ts, method=method, rtol=tol, atol=tol * ATOL_FACTOR)
    diff = float((back.ys - fwd.ys).abs().max())
    assert diff <= 1e-3 * tol, f"{method}: backward vs mirrored forward differ by {diff:.3e}"
    assert back.stats["steps"] == fwd.stats["steps"]


# ---------------------------------------------------------------------------------- dense output
@pytest.mark.parametrize("problem", SUBSET, ids=lambda p: p.name)
@pytest.mark.parametrize("method,tol", CASES, ids=[f"{m}-{t:g}" for m, t in CASES])
def test_dense_output(method, tol, problem):
    ts = irregular_times(problem, seed=4)
    sol = solve(problem, ts, method, tol, dense=True)
    assert sol.success
    ymax = float(sol.ys.abs().max())
    # evaluate() at the output times is the solution there.
    at_outputs = sol.evaluate(ts)
    assert at_outputs.shape == sol.ys.shape
    d = float((at_outputs - sol.ys).abs().max())
    assert d <= 1e-12 * ymax, f"evaluate(ts) differs from ys by {d:.3e}"
    # ... and the exact solution anywhere in between.
    fine = torch.linspace(problem.t0, problem.t1, 401, dtype=torch.float64)
    err = max_error(sol.evaluate(fine), problem, fine)
    b = bound(method, problem, tol)
    assert err <= b, f"dense {method} on {problem.name}: error {err:.3e} > {b:.3e}"
    # Endpoints.
    torch.testing.assert_close(sol.evaluate(fine[0]), problem.y0_tensor(), rtol=0, atol=1e-14)
    torch.testing.assert_close(sol.evaluate(fine[-1]), sol.y_final, rtol=0, atol=1e-12 * ymax)


def test_dense_does_not_change_the_steps():
    for method in ADAPTIVE_METHODS:
        ts = irregular_times(B5)
        a = solve(B5, ts, method, TOLS[method][0])
        b = solve(B5, ts, method, TOLS[method][0], dense=True)
        assert (a.stats["steps"], a.stats["rejected"]) == (b.stats["steps"], b.stats["rejected"]), method
        torch.testing.assert_close(a.ys, b.ys, rtol=1e-12, atol=1e-12)


def test_dense_output_shapes_and_domain():
    ts = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)
    sol = solve(B5, ts, "dopri5", 1e-8, dense=True)
    g = torch.linspace(0.0, 2.0, 20, dtype=torch.float64).reshape(4, 5)
    out = sol.evaluate(g)
    assert out.shape == (4, 5, 3)
    ref = B5.reference(g.reshape(-1).numpy()).reshape(4, 5, 3)
    assert np.abs(out.numpy() - ref).max() < 1e-6
    assert sol.evaluate(torch.tensor(1.3, dtype=torch.float64)).shape == (3,)
    for bad in (-0.1, 2.1):
        with pytest.raises(neurodyn.InputError):
            sol.evaluate(torch.tensor([0.5, bad], dtype=torch.float64))
    no_dense = solve(B5, ts, "dopri5", 1e-8)
    with pytest.raises(neurodyn.InputError):
        no_dense.evaluate(torch.tensor([0.5], dtype=torch.float64))


def test_dense_output_backward():
    ts = torch.tensor([2.0, 1.2, 0.0], dtype=torch.float64)
    y1 = torch.from_numpy(B5.reference([2.0])[0].copy())
    sol = solve(B5, ts, "dopri5", 1e-8, y0=y1, dense=True)
    fine = torch.linspace(2.0, 0.0, 51, dtype=torch.float64)
    err = max_error(sol.evaluate(fine), B5, fine)
    assert err <= bound("dopri5", B5, 1e-8), err
    with pytest.raises(neurodyn.InputError):
        sol.evaluate(torch.tensor([2.5], dtype=torch.float64))


@pytest.mark.parametrize("ctrl", [neurodyn.PIDController(), neurodyn.PIDController(pcoeff=0.0, icoeff=1.0),
                                  neurodyn.PIDController(pcoeff=0.2, icoeff=0.6, dcoeff=0.1, ifactor=5.0),
                                  neurodyn.PIDController(accept_dfactor=1.0),
                                  neurodyn.PIDController(pcoeff=0.0, icoeff=1.0, accept_dfactor=0.5)])
def test_controller_tensor_form_equals_scalar_form(ctrl):
    """The per-row/compiled proposal (tensor form) is the eager loop's (scalar form), step after step."""
    gen = torch.Generator().manual_seed(3)
    ratios = torch.cat([10.0 ** (torch.rand(200, generator=gen, dtype=torch.float64) * 6 - 4),
                        torch.tensor([math.nan, math.inf, 0.0, 1.0], dtype=torch.float64)])
    scalar = ctrl.start(4)
    tensor = ctrl.start(4)
    prev = prev2 = torch.ones(1, dtype=torch.float64)
    h = 0.1
    for r in ratios.tolist():
        accept = r <= 1.0
        want = scalar.propose(h, r, accept)
        got, prev, prev2 = tensor.propose_tensor(torch.tensor([h], dtype=torch.float64),
                                                 torch.tensor([r], dtype=torch.float64),
                                                 torch.tensor([accept]), prev, prev2)
        assert got.item() == pytest.approx(want, rel=1e-14), r
        h = want


@pytest.mark.parametrize("ctrl,order", [(neurodyn.PIDController(), 4), (neurodyn.PIDController(dcoeff=0.1), 4),
                                        (neurodyn.PIDController(pcoeff=0.2, icoeff=0.3), 1)])
def test_controller_tensor_form_one_pow_is_the_two_pow_formula(ctrl, order):
    """propose_tensor on rows mixing accepted and rejected steps (one pow of the ratio per row, its exponent chosen by
    accept) gives bit for bit what the formula with a pow per exponent gives: r**-b1 * prev**b2 * prev2**-b3 where
    accepted, r**-(1/k) where rejected, times safety, clamped (order 1: k = 2, exponent -0.5, the two-pow path)."""
    gen = torch.Generator().manual_seed(5)
    r = 10.0 ** (torch.rand(257, generator=gen, dtype=torch.float64) * 6 - 4)
    prev = 10.0 ** (torch.rand(257, generator=gen, dtype=torch.float64) * 4 - 3)
    prev2 = 10.0 ** (torch.rand(257, generator=gen, dtype=torch.float64) * 4 - 3)
    h = torch.rand(257, generator=gen, dtype=torch.float64) + 0.01
    accept = r <= 1.0
    st = ctrl.start(order)
    got, new_prev, new_prev2 = st.propose_tensor(h, r, accept, prev, prev2)
    k = order + 1
    b1, b2, b3 = ((ctrl.pcoeff + ctrl.icoeff + ctrl.dcoeff) / k, (ctrl.pcoeff + 2 * ctrl.dcoeff) / k, ctrl.dcoeff / k)
    acc = r.pow(-b1)
    if b2:
        acc = acc * prev.pow(b2)
    if b3:
        acc = acc * prev2.pow(-b3)
    fac = torch.where(accept, acc, r.pow(-1.0 / k)) * ctrl.safety
    fac = fac.clamp(ctrl.dfactor, ctrl.ifactor)
    assert torch.equal(got, h * fac)
    assert torch.equal(new_prev, torch.where(accept, r, prev))
    assert st.one_pow == (order == 4)


@pytest.mark.parametrize("ctrl,order", [(neurodyn.PIDController(), 4), (neurodyn.PIDController(dcoeff=0.1), 4),
                                        (neurodyn.PIDController(pcoeff=0.2, icoeff=0.3), 1),
                                        (neurodyn.PIDController(accept_dfactor=0.8), 4)])
def test_controller_log_form_matches_the_pow_form(ctrl, order):
    """propose_tensor_log (one exp of a sum of logarithms, the compiled row loop's form) on rows mixing accepted and
    rejected steps, NaN and inf ratios: the same step sizes as propose_tensor to a few ulp, the same previous ratios
    bit for bit, and their logarithms carried as log(prev)."""
    gen = torch.Generator().manual_seed(6)
    r = 10.0 ** (torch.rand(259, generator=gen, dtype=torch.float64) * 6 - 4)
    r[-3:] = torch.tensor([float("nan"), float("inf"), 0.0], dtype=torch.float64)
    prev = 10.0 ** (torch.rand(259, generator=gen, dtype=torch.float64) * 4 - 3)
    prev2 = 10.0 ** (torch.rand(259, generator=gen, dtype=torch.float64) * 4 - 3)
    h = torch.rand(259, generator=gen, dtype=torch.float64) + 0.01
    accept = r <= 1.0
    want, want_prev, want_prev2 = ctrl.start(order).propose_tensor(h, r, accept, prev, prev2)
    got, got_prev, got_prev2, lp, lp2 = ctrl.start(order).propose_tensor_log(h, r, accept, prev, prev2, prev.log(),
                                                                             prev2.log())
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    assert not torch.equal(got, h)  # (the factors do change the steps)
    assert torch.equal(got_prev, want_prev) and torch.equal(got_prev2, want_prev2)
    assert torch.equal(lp, torch.where(accept, r.clamp_min(1e-10).log(), prev.log()))
    assert torch.equal(lp2, torch.where(accept, prev.log(), prev2.log()) if ctrl.dcoeff else prev2.log())
    assert got[-3] == h[-3] * ctrl.dfactor and got[-2] == h[-2] * ctrl.dfactor  # NaN, inf: shrink by dfactor
    # blend (the compiled row loop's NaN/inf replacement by compare and select): the same values bit for bit
    blend = ctrl.start(order).propose_tensor_log(h, r, accept, prev, prev2, prev.log(), prev2.log(), blend=True)
    assert all(torch.equal(a, b) for a, b in zip(blend, (got, got_prev, got_prev2, lp, lp2)))
    st = ctrl.start(order)
    fac = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-300, 0.5, 1.0, 3.0, 1e300],
                       dtype=torch.float64)
    for acc in (torch.zeros(9, dtype=torch.bool), torch.ones(9, dtype=torch.bool)):
        assert torch.equal(st._bounded(fac, acc, blend=True), st._bounded(fac, acc))


@pytest.mark.parametrize("rows", [1, 2])
def test_error_ratio_tensor_form_equals_scalar_form(rows):
    """control.rms_ratio (per-sample rows, compiled paths) equals make_error_ratio (eager loop), single estimate and
    DOP853's combined pair, with tolerance tensors."""
    from neurodyn.core.control import make_error_ratio, rms_ratio

    gen = torch.Generator().manual_seed(7)
    n, h = 5, 0.3
    for _ in range(20):
        err = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 1e-6
        y0, y1 = torch.randn(1, n, generator=gen, dtype=torch.float64), torch.randn(1, n, generator=gen,
                                                                                    dtype=torch.float64)
        rtol = torch.rand(1, n, generator=gen, dtype=torch.float64) * 1e-5
        atol = 1e-8
        want = make_error_ratio(rtol, atol, n)(err.clone(), y0, y1, h)
        root = math.sqrt(n)
        got = rms_ratio(err.unsqueeze(1) * h, y0, y1, rtol * root, torch.tensor(atol * root, dtype=torch.float64))
        assert got.item() == pytest.approx(want, rel=1e-13)


def test_initial_step_tensor_form_equals_scalar_form():
    """Hairer's starting step per row (core.control.initial_step_tensor: per-sample rows, compiled loop) equals the
    eager loop's initial_step, row by row, for fields of different scales and both directions."""
    from neurodyn.core.control import initial_step, initial_step_tensor

    gen = torch.Generator().manual_seed(11)
    n = 3
    A = torch.randn(n, n, generator=gen, dtype=torch.float64) * 5
    f = lambda t, y: torch.tanh(y @ A.T) * (1 + t.reshape(-1, 1))  # noqa: E731
    y0 = torch.randn(4, n, generator=gen, dtype=torch.float64)
    root = math.sqrt(n)
    for direction in (1.0, -1.0):
        for rtol, atol, max_step in ((1e-6, 1e-9, math.inf), (1e-3, 1e-5, 0.01)):
            t0 = torch.zeros(4, dtype=torch.float64)
            f0 = f(t0, y0)
            rt, at = torch.tensor(rtol * root, dtype=torch.float64), torch.tensor(atol * root, dtype=torch.float64)
            got = initial_step_tensor(f, t0, y0, f0, direction, 5, rt, at, max_step)
            for b in range(4):
                term = lambda t, y: f(torch.tensor([t], dtype=torch.float64), y)  # noqa: E731
                want = initial_step(term, 0.0, y0[b:b + 1], f0[b:b + 1], direction, 5, rtol, atol,
                                    lambda x: float(torch.linalg.vector_norm(x)) / root, max_step)
                assert got[b].item() == pytest.approx(want, rel=1e-12)


def test_accept_dfactor_never_shrinks_after_an_accepted_step():
    """accept_dfactor=1.0: an accepted step's successor is at least as large (the default PI shrinks it when the
    ratio is near 1: safety * 0.99^-(0.8/5) = 0.9015); rejected steps still shrink; bad values are refused."""
    keep, pi = neurodyn.PIDController(accept_dfactor=1.0).start(4), neurodyn.PIDController().start(4)
    assert keep.propose(0.1, 0.99, True) == pytest.approx(0.1, rel=1e-15)
    assert pi.propose(0.1, 0.99, True) == pytest.approx(0.1 * 0.9 * 0.99 ** -0.16, rel=1e-12)
    assert keep.propose(0.1, 4.0, False) == pytest.approx(0.1 * 0.9 * 4.0 ** -0.2, rel=1e-12)
    for bad in (0.1, 1.5, math.nan):
        with pytest.raises(neurodyn.InputError, match="accept_dfactor"):
            neurodyn.PIDController(accept_dfactor=bad)


def test_accept_dfactor_same_steps_in_eager_and_per_sample_loops():
    """The eager loop (scalar proposal) and per-sample rows (tensor proposal) take the same steps with
    accept_dfactor=1.0, and the solve meets its tolerance on Kepler e=0.5."""
    ctrl = neurodyn.PIDController(accept_dfactor=1.0)
    ts = irregular_times(KEPLER_05)
    y0 = KEPLER_05.y0_tensor()[None]

    def rows_field(t, y):  # (B, 4) rows through the problem's (4,)-state field
        return KEPLER_05.f(t, y.transpose(0, 1)).transpose(0, 1)

    kw = {"method": "dopri5", "rtol": 1e-7, "atol": 1e-10, "controller": ctrl}
    eager = neurodyn.solve(rows_field, y0, ts, **kw)
    rows = neurodyn.solve(rows_field, y0, ts, per_sample_steps=True, **kw)
    assert eager.stats["nfe"] > 0
    assert int(torch.as_tensor(rows.stats["nfe"]).max()) == eager.stats["nfe"]
    assert (rows.ys - eager.ys).abs().max() < 1e-8  # same steps; rounding differs (op order), solve error ~1e-6
    assert max_error(eager.ys[:, 0], KEPLER_05, ts) <= bound("dopri5", KEPLER_05, 1e-7)
