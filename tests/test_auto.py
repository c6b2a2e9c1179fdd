"""``method="auto"`` (``neurodyn.solvers.auto``): stiffness detection and switching between ``tsit5`` and an
implicit method, against the stiff references of ``stiff_problems.py``, exact solutions and finite differences.

The default suite's part runs in about 15 s on 2 shared cores; ``-m slow`` adds HIRES against ``tsit5`` alone.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from problems import B1, E_VDP
from stiff_problems import HIRES, ROBER, VDP_SHORT

import neurodyn
from neurodyn.errors import InputError, MaxStepsReached
from neurodyn.solvers import available_methods, get_solver
from neurodyn.solvers.auto import AutoSwitch, stability_boundary
from neurodyn.solvers.tableaus import TABLEAUS

F64 = torch.float64


def solve_reference(problem, method="auto", rtol=1e-6, t_end=None, **kw):
    atol = problem.atol_tensor()
    kw.setdefault("max_steps", 50_000)
    t = torch.tensor([0.0, t_end or problem.t_end], dtype=F64)
    with torch.no_grad():
        return neurodyn.solve(problem.f, problem.y0_tensor(), t, method=method, rtol=rtol, atol=atol, **kw)


# ----------------------------------------------------------------------------------------------------
# A linear problem with a time-dependent eigenvalue: non-stiff, stiff around t = c, non-stiff again.
# y1' = lam(t) (y1 - p sin t) + p cos t (y1 = p sin t from y1(0) = 0), y2' = q y1 - y2 / 2.
# ----------------------------------------------------------------------------------------------------
def bump_field(amp: float, p, q, center: float = 2.5, width: float = 0.5):
    def f(t, y):
        lam = -1.0 - amp * torch.exp(-((t - center) / width) ** 2)
        y1, y2 = y.unbind(-1)
        return torch.stack([lam * (y1 - p * torch.sin(t)) + p * torch.cos(t), q * y1 - 0.5 * y2], -1)
    return f


def bump_exact_gradients(p: float, q: float, T: float) -> dict:
    """d(y1(T) + y2(T)) / d(p, q, y2(0)) from y1 = p sin t, y2 = q p z(t) + y2(0) e^(-t/2), z' = -z/2 + sin t."""
    z = (0.5 * math.sin(T) - math.cos(T) + math.exp(-0.5 * T)) / 1.25
    return {"p": math.sin(T) + q * z, "q": p * z, "y20": math.exp(-0.5 * T)}


def test_registered_and_stability_boundaries():
    assert "auto" in available_methods()
    assert isinstance(get_solver("auto"), AutoSwitch) and get_solver("auto") is not get_solver("auto")
    assert stability_boundary(TABLEAUS["dopri5"]) == pytest.approx(3.3066, abs=1e-4)  # Hairer & Wanner II, IV.2
    assert stability_boundary(TABLEAUS["tsit5"]) == pytest.approx(3.5068, abs=1e-4)  # OrdinaryDiffEq's value


# ----------------------------------------------------------------------------------------------------
# Stiff references: accuracy, switches, and far fewer steps than tsit5 alone.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", [ROBER, HIRES, VDP_SHORT], ids=lambda p: p.name)
def test_reference_problems(problem):
    sol = solve_reference(problem)
    assert sol.status == "success"
    err = problem.rel_error(sol.ys[-1].numpy())
    assert err <= 1e-4, f"auto on {problem.name}: relative error {err:.2e}"
    st = sol.stats
    assert st["switches"] and st["switches"][0][1:] == ("tsit5", "kvaerno5")
    assert sum(st["steps_per_method"].values()) == st["steps"]
    assert st["steps_per_method"]["kvaerno5"] > 0 and st["jacobian_evals"] > 0
    assert st["steps"] < 600


def test_tight_tolerance_switches_on_the_stiffness_ratio():
    """Robertson at rtol 1e-8: tsit5's steps are held near |h rho| ~ 0.05 beta by the fast components' errors (not at
    the stability boundary: tsit5 would take 11000 steps to t = 15); the stiffness ratio switches within t < 0.1
    (stability alone: none before t = 1, > 700 steps)."""
    sol = solve_reference(ROBER, rtol=1e-8)
    assert ROBER.rel_error(sol.ys[-1].numpy()) <= 1e-5
    # 645 steps since kvaerno5's dense output joined its step control (its error on the stiff components).
    assert sol.stats["switches"][0][0] < 0.1 and sol.stats["steps"] < 700
    stability_only = solve_reference(ROBER, rtol=1e-8, solver_options={"stiff_ratio": math.inf}, t_end=1.0)
    assert stability_only.stats["switches"] == [] and stability_only.stats["steps"] > 700


@pytest.mark.parametrize("problem", [ROBER, VDP_SHORT], ids=lambda p: p.name)
def test_tsit5_alone_needs_far_more_steps(problem):
    """tsit5 with 5x the steps auto takes gets nowhere near the end (Robertson: t < 1e3 of 1e11; Van der Pol:
    less than half way), and stops with a message that suggests method='auto'."""
    steps = solve_reference(problem).stats["steps"]
    sol = solve_reference(problem, method="tsit5", on_failure="return", max_steps=5 * steps)
    assert sol.status == "max_steps_reached" and sol.t_final < 0.5 * problem.t_end
    assert "method='auto'" in sol.message


@pytest.mark.slow
def test_tsit5_alone_on_hires():
    auto = solve_reference(HIRES)
    alone = solve_reference(HIRES, method="tsit5")
    assert alone.stats["steps"] > 10 * auto.stats["steps"]


def test_radau_as_the_stiff_method():
    sol = solve_reference(VDP_SHORT, solver_options={"stiff": "radau"})
    assert VDP_SHORT.rel_error(sol.ys[-1].numpy()) <= 1e-4
    assert [s[1:] for s in sol.stats["switches"]][:2] == [("tsit5", "radau"), ("radau", "tsit5")]
    assert sol.stats["steps_per_method"]["radau"] > 0


def test_van_der_pol_switches_back_on_the_relaxation_jump():
    """mu = 1e3: stiff on the slow branches, not stiff during the fast jump near t = 807."""
    sw = solve_reference(VDP_SHORT).stats["switches"]
    assert [s[1:] for s in sw] == [("tsit5", "kvaerno5"), ("kvaerno5", "tsit5"), ("tsit5", "kvaerno5")]
    assert sw[0][0] < 0.1 and 800 < sw[1][0] < sw[2][0] < 810


# ----------------------------------------------------------------------------------------------------
# Not stiff: auto is tsit5, bit for bit.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", [B1, E_VDP], ids=lambda p: p.name)
@pytest.mark.parametrize("rtol", [1e-3, 1e-6, 1e-9])
def test_nonstiff_problem_never_switches_and_is_tsit5(problem, rtol):
    y0 = torch.tensor(problem.y0, dtype=F64)
    t = torch.linspace(problem.t0, problem.t1, 21, dtype=F64)
    a = neurodyn.solve(problem.f, y0, t, method="auto", rtol=rtol, atol=rtol * 1e-2)
    b = neurodyn.solve(problem.f, y0, t, method="tsit5", rtol=rtol, atol=rtol * 1e-2)
    assert a.stats["switches"] == [] and a.stats["steps_per_method"] == {"tsit5": b.stats["steps"], "kvaerno5": 0}
    assert torch.equal(a.ys, b.ys) and a.stats["nfe"] == b.stats["nfe"]


# ----------------------------------------------------------------------------------------------------
# Non-stiff -> stiff -> non-stiff.
# ----------------------------------------------------------------------------------------------------
def test_switches_to_stiff_and_back_with_dense_output():
    f = bump_field(1e4, 1.0, 0.7)
    ts = torch.linspace(0.0, 5.0, 201, dtype=F64)
    with torch.no_grad():
        sol = neurodyn.solve(f, torch.tensor([0.0, 0.4], dtype=F64), ts, method="auto", rtol=1e-7, atol=1e-10,
                             dense=True)
    sw = sol.stats["switches"]
    assert [s[1:] for s in sw] == [("tsit5", "kvaerno5"), ("kvaerno5", "tsit5")]
    # lam(t) = -1 - 1e4 exp(-((t - 2.5) / 0.5)^2): -26 at t = 1.5, -1.2 at t = 3.7.
    assert 1.0 < sw[0][0] < 2.5 < sw[1][0] < 4.5
    # Outputs through both methods' dense output (and evaluate() between them) follow y1 = sin t: tsit5's own
    # 4th-order interpolant, kvaerno5's cubic Hermite (3e-5 in its long steps, as kvaerno5 alone).
    err = (sol.ys[:, 0] - torch.sin(ts)).abs()
    assert float(err[ts < sw[0][0]].max()) < 1e-6 and float(err.max()) < 1e-4
    tq = torch.linspace(0.01, 4.99, 333, dtype=F64)
    assert float((sol.evaluate(tq)[:, 0] - torch.sin(tq)).abs().max()) < 1e-4
    # tsit5 alone is held to |h lam| <= 3.51: at least int |lam| dt / 3.51 ~ 2500 steps on [0, 5].
    bound = (5.0 + 1e4 * 0.5 * math.sqrt(math.pi)) / stability_boundary(TABLEAUS["tsit5"])
    assert 5 * sol.stats["steps"] < bound


def test_event_in_the_stiff_phase():
    f = bump_field(1e4, 1.0, 0.7)
    with torch.no_grad():
        sol = neurodyn.solve(f, torch.tensor([0.0, 0.4], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64),
                             method="auto", rtol=1e-8, atol=1e-10, event_fn=lambda t, y: y[0])
    assert sol.status == "event" and abs(float(sol.event_t) - math.pi) < 1e-6  # y1 = sin t = 0 at t = pi
    assert sol.stats["switches"][0][0] < math.pi  # found by the implicit method's dense output


# ----------------------------------------------------------------------------------------------------
# Gradients: each replayed or differentiated step uses the method that took it.
# ----------------------------------------------------------------------------------------------------
# checkpoint: 5 s on one core, slow (test_checkpoint_replays_each_step_with_its_method replays auto's steps by default)
@pytest.mark.parametrize("gradient,options", [("direct", {}), pytest.param("checkpoint", {}, marks=pytest.mark.slow),
                                              ("interpolated", {"stiff": "radau"}), ("adjoint", "mild")])
def test_gradients_against_the_exact_solution(gradient, options):
    """d(y1(T) + y2(T))/d(p, q, y2(0)) in closed form. The backward reconstruction of ``"adjoint"`` is unstable
    through a strongly stiff phase (for any method), so it gets a milder bump and lower switching thresholds."""
    amp, n_out = 1e4, 11
    if options == "mild":
        amp, n_out = 50.0, 51
        options = {"stiff_threshold": 0.1, "nonstiff_threshold": 0.03, "stiff_steps": 3, "nonstiff_steps": 3}
    p = torch.tensor(1.3, dtype=F64, requires_grad=True)
    q = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.0, 0.4], dtype=F64, requires_grad=True)
    sol = neurodyn.solve(bump_field(amp, p, q), y0, torch.linspace(0.0, 5.0, n_out, dtype=F64), method="auto",
                         rtol=1e-7, atol=1e-10, gradient=gradient, params=[p, q], solver_options=options,
                         checkpoints=4)
    assert [s[1:3] for s in sol.stats["switches"]][:1] == [("tsit5", options.get("stiff", "kvaerno5"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the backward solves' Jacobians: exact, no fallback
        gp, gq, gy = torch.autograd.grad(sol.ys[-1].sum(), (p, q, y0))
    ex = bump_exact_gradients(1.3, 0.7, 5.0)
    bound = 1e-6 if gradient in ("direct", "checkpoint") else 1e-5  # the continuous adjoints: their own solve
    for got, want in ((gp, ex["p"]), (gq, ex["q"]), (gy[1], ex["y20"])):
        assert abs(float(got) / want - 1.0) < bound, (gradient, float(got), want)


def test_checkpoint_replays_each_step_with_its_method():
    grads = []
    for gradient in ("direct", "checkpoint"):
        p = torch.tensor(1.3, dtype=F64, requires_grad=True)
        y0 = torch.tensor([0.3, 0.4], dtype=F64, requires_grad=True)
        sol = neurodyn.solve(bump_field(1e4, p, 0.7), y0, torch.linspace(0.0, 5.0, 6, dtype=F64), method="auto",
                             rtol=1e-6, atol=1e-9, gradient=gradient, params=[p], checkpoints=8)
        assert len(sol.stats["switches"]) == 2
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad((sol.ys ** 2).sum(), (p, y0))]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)


def test_gradient_matches_finite_differences_on_van_der_pol():
    """mu = 1e3 on [0, 1] (switches to kvaerno5 at t ~ 0.02): d loss / d (mu, y0) against central differences."""
    def loss(mu, y0):
        f = lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])  # noqa: E731
        sol = neurodyn.solve(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method="auto", rtol=1e-10,
                             atol=1e-10)
        return sol.ys[1:].sum() + (sol.ys[-1] ** 2).sum(), sol

    mu = torch.tensor(1000.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    val, sol = loss(mu, y0)
    assert sol.stats["switches"] and sol.stats["steps_per_method"]["kvaerno5"] > 0
    g_mu, g_y = torch.autograd.grad(val, (mu, y0))
    with torch.no_grad():
        fd_mu = (loss(mu + 1e-3, y0)[0] - loss(mu - 1e-3, y0)[0]) / 2e-3
        e = torch.eye(2, dtype=F64) * 1e-6
        fd_y = torch.stack([(loss(mu, y0 + e[i])[0] - loss(mu, y0 - e[i])[0]) / 2e-6 for i in range(2)])
    assert abs(float(g_mu / fd_mu) - 1.0) < 1e-4
    assert float((g_y - fd_y).abs().max()) < 1e-5 * float(fd_y.abs().max())


# ----------------------------------------------------------------------------------------------------
# Messages and options.
# ----------------------------------------------------------------------------------------------------
def test_explicit_method_stalling_on_a_stiff_problem_suggests_auto():
    with pytest.raises(MaxStepsReached, match="method='auto'"):
        neurodyn.solve(ROBER.f, ROBER.y0_tensor(), torch.tensor([0.0, 1e4], dtype=F64), method="tsit5", rtol=1e-6,
                       atol=1e-10, max_steps=1000)
    sol = neurodyn.solve(ROBER.f, ROBER.y0_tensor(), torch.tensor([0.0, 1e4], dtype=F64), method="tsit5", rtol=1e-6,
                         atol=1e-10, max_steps=1000, on_failure="return")
    assert sol.status == "max_steps_reached" and "auto" in sol.message and "radau" in sol.message


def test_options_are_validated():
    y0, t = ROBER.y0_tensor(), torch.tensor([0.0, 1.0], dtype=F64)
    for bad in ({"stiff": "bdf"}, {"nonstiff": "bosh3"}, {"nonstiff": "rk4"}, {"bogus": 1},
                {"stiff_threshold": 0.4, "nonstiff_threshold": 0.5}, {"stiff_steps": 0}):
        with pytest.raises(InputError):
            neurodyn.solve(ROBER.f, y0, t, method="auto", solver_options=bad)
    solver = AutoSwitch(stiff="radau", jac="fd").bind(rtol=1e-6, atol=1e-10)
    assert solver.stiff.name == "radau" and solver.stiff.jac == "fd" and solver.stiff.rtol == 1e-6
    assert repr(solver) == "AutoSwitch(nonstiff='tsit5', stiff='radau')"
