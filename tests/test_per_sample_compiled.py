"""compile=True with per_sample_steps=True: the compiled row step (neurodyn.compile.rows) against closed forms,
scipy per row, the eager per-sample loop (same steps, statuses, NFE) and finite differences."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import neurodyn
import neurodyn.compile.rows as compiled_rows

F64 = torch.float64


@pytest.fixture(params=["row-loop", "row-step"])
def form(request, monkeypatch):
    """Both compiled forms: the whole loop and one compiled attempt per step."""
    monkeypatch.setattr(compiled_rows, "FORM", request.param.removeprefix("row-"))
    return request.param


def _decay(lam):
    return lambda t, y: -lam.view(-1, 1) * y


def _solve_both(f, y0, t, **kw):
    eager = neurodyn.solve(f, y0, t, per_sample_steps=True, **kw)
    comp = neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, **kw)
    return eager, comp


def _same_decisions(eager, comp, exact=True):
    """Equal steps, rejections, NFE and statuses per row (``exact=False``, float32: stage sums fused in another order
    round differently, which can flip a borderline rejection: within one attempt per row)."""
    for key in ("steps_per_sample", "rejected_per_sample"):
        if exact:
            assert torch.equal(eager.stats[key], comp.stats[key]), key
        else:
            assert (eager.stats[key] - comp.stats[key]).abs().max() <= 1, key
    if exact:
        assert eager.stats["nfe"] == comp.stats["nfe"]
    assert eager.sample_status == comp.sample_status


def test_compiled_rows_match_closed_form_and_eager_with_many_outputs_per_step(form):
    """y' = -lam_i y on rows of stiffness 0.05..20 with per-row output grids dense enough that slow rows pass
    several outputs in one step (the eager dense output finishes those): each row against exp(-lam_i t), and the
    same decisions and outputs (to rounding) as the eager per-sample loop."""
    lam = torch.tensor([0.05, 0.5, 3.0, 20.0], dtype=F64)
    y0 = torch.tensor([[1.0, -2.0]] * 4, dtype=F64)
    t = torch.stack([torch.linspace(0, 2 + i, 41, dtype=F64) for i in range(4)])  # (B, T): a grid per row
    with torch.no_grad():
        eager, comp = _solve_both(_decay(lam), y0, t, rtol=1e-8, atol=1e-10)
    assert comp.stats["compiled"] == form and "compiled" not in eager.stats
    exact = torch.exp(-lam.view(1, -1, 1) * t.t().unsqueeze(-1)) * y0
    assert (comp.ys - exact).abs().max() < 1e-7
    _same_decisions(eager, comp)
    assert (comp.ys - eager.ys).abs().max() < 1e-12
    assert torch.equal(comp.t_final_per_sample, eager.t_final_per_sample)
    assert int(comp.stats["steps_per_sample"][0]) < 40  # the slow row did pass several outputs per step
    # The first steps (chosen inside the compiled program by the whole loop) are the eager rows' choice.
    assert torch.allclose(comp.stats["initial_step"], eager.stats["initial_step"], rtol=1e-14, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype,which", [("dopri5", F64, "loop"), ("dopri5", F64, "step"),
                                                ("tsit5", torch.float32, "loop"), ("bosh3", F64, "step")])
def test_compiled_rows_match_scipy_van_der_pol(method, dtype, which, monkeypatch):
    """Van der Pol rows with mu from 0.5 to 15 against scipy Radau per row; equal decisions to the eager rows
    (tsit5 in float32; bosh3 has no dense output of its own: cubic Hermite)."""
    monkeypatch.setattr(compiled_rows, "FORM", which)
    mu = torch.tensor([0.5, 2.0, 8.0, 15.0], dtype=dtype)

    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=dtype)
    t = torch.linspace(0, 6, 9, dtype=dtype)
    rtol = 1e-4 if dtype == torch.float32 else 1e-7
    with torch.no_grad():
        eager, comp = _solve_both(f, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2)
    assert comp.stats["compiled"] == "row-" + which
    ref = np.stack([solve_ivp(lambda tt, yy, m=float(m): [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (0, 6),
                              [2.0, 0.0], method="Radau", rtol=1e-11, atol=1e-12, t_eval=t.double().numpy()).y.T
                    for m in mu], 1)
    assert np.abs(comp.ys.double().numpy() - ref).max() < (2e-2 if dtype == torch.float32 else 5e-4)
    _same_decisions(eager, comp, exact=dtype == F64)
    assert (comp.ys - eager.ys).abs().max() < (1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.slow
def test_compiled_rows_failures_backward_time_and_max_steps(form):
    """y' = y^2: the rows with y0 = 1, 2 blow up inside [0, 1.5] (at t = 1, 0.5) and stop with the eager loop's
    status and time while the others reach the end (y = y0 / (1 - y0 t)); backward in time for every row; max_steps
    stops every row that is left."""
    y0 = torch.tensor([[0.5], [1.0], [2.0], [-1.0]], dtype=F64)
    t = torch.linspace(0, 1.5, 4, dtype=F64)

    def f(t, y):
        return y * y

    with torch.no_grad():
        eager, comp = _solve_both(f, y0, t, rtol=1e-8, atol=1e-10, on_failure="return")
    _same_decisions(eager, comp)
    assert comp.sample_status[0] == "success" and comp.sample_status[3] == "success"
    assert comp.sample_status[1] != "success" and comp.sample_status[2] != "success"
    ok = torch.tensor([0, 3])
    exact = y0[ok] / (1 - y0[ok] * t.view(-1, 1, 1))
    assert (comp.ys[:, ok] - exact).abs().max() < 1e-6
    assert torch.allclose(comp.t_final_per_sample, eager.t_final_per_sample, rtol=1e-12, atol=0)
    # Backward: y' = -lam y from t = 1 down to 0 (y(0) = y(1) e^lam).
    lam = torch.tensor([0.5, 4.0], dtype=F64)
    tb = torch.linspace(1, 0, 5, dtype=F64)
    yb = torch.tensor([[1.0], [1.0]], dtype=F64)
    with torch.no_grad():
        eager, comp = _solve_both(_decay(lam), yb, tb, rtol=1e-9, atol=1e-12)
    assert comp.stats["compiled"] == form
    _same_decisions(eager, comp)
    assert (comp.ys - torch.exp(lam.view(1, -1, 1) * (1 - tb.view(-1, 1, 1)))).abs().max() < 1e-7
    with torch.no_grad():
        eager, comp = _solve_both(_decay(lam), yb, tb, rtol=1e-9, atol=1e-12, max_steps=4, on_failure="return")
    _same_decisions(eager, comp)
    assert comp.sample_status == ["max_steps_reached"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_compiled_rows_gradients_match_finite_differences(gradient):
    """compile=True with per-sample steps under autograd: the direct gradient records the eager rows; the adjoint's
    forward pass runs compiled (no graph), its backward solve eagerly. d/d theta of sum(y(T)^2) for
    y' = -theta_i y against central differences."""
    theta = torch.tensor([0.3, 1.5, 6.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.5, 0.25]], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(theta.detach().clone())

        def forward(self, t, y):
            return -self.theta.view(-1, 1) * y

    f = Decay()

    def loss(th):
        with torch.no_grad():
            f.theta.copy_(th)
        return neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, rtol=1e-10, atol=1e-12,
                              gradient=gradient).ys[-1].pow(2).sum()

    f.theta.grad = None
    sol = neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, rtol=1e-10, atol=1e-12, gradient=gradient)
    # The direct gradient records the eager rows' graph; the adjoint's forward pass (no graph) runs compiled.
    assert sol.stats.get("compiled") == (None if gradient == "direct" else "row-loop")
    sol.ys[-1].pow(2).sum().backward()
    g = f.theta.grad.clone()
    eps = 1e-6
    fd = torch.stack([(loss(theta.detach() + eps * e) - loss(theta.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(3, dtype=F64)])
    exact = -2 * (y0 ** 2).sum(1) * torch.exp(-2 * theta.detach())
    assert torch.allclose(fd, exact, rtol=1e-6)
    assert torch.allclose(g, exact, rtol=1e-6), (g, exact)


def test_compiled_rows_unsupported_method_warns_and_runs_eagerly():
    """dopri8 has extra dense-output stages: its row step is not compiled; compile=True says so and the solve is the
    eager per-sample one (against exp(-t))."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.warns(RuntimeWarning, match="per-sample row step of 'dopri8'"):
        sol = neurodyn.solve(lambda t, y: -y, y0, t, method="dopri8", per_sample_steps=True, compile=True,
                             rtol=1e-9, atol=1e-11)
    assert "compiled" not in sol.stats
    assert torch.allclose(sol.ys, torch.exp(-t).view(3, 1, 1) * y0, rtol=1e-7, atol=0)
    assert math.isclose(float(sol.ys[-1, 0, 0]), math.exp(-1), rel_tol=1e-7)


@pytest.mark.slow
def test_compiled_rows_give_up_on_a_field_with_python_side_effects():
    """A field that increments a Python counter cannot run inside the compiled loop and would recompile the compiled
    attempt at every call: compile=True warns for both and runs the eager rows (exact: the closed form exp(-t)), and
    later solves of that field do not try again."""
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return -y

    y0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with torch.no_grad(), pytest.warns(RuntimeWarning) as rec:
        sol = neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, rtol=1e-9, atol=1e-11)
    text = " ".join(str(w.message) for w in rec)
    assert "could not be compiled as a whole" in text and "compiled again at every attempt" in text
    assert torch.allclose(sol.ys, torch.exp(-t).view(-1, 1, 1) * y0, rtol=1e-7, atol=0)
    with torch.no_grad():
        again = neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, rtol=1e-9, atol=1e-11)
    assert "compiled" not in again.stats
    assert torch.equal(again.ys, neurodyn.solve(f, y0, t, per_sample_steps=True, rtol=1e-9, atol=1e-11).ys)


def test_compiled_row_loop_one_output_program_hands_over_to_the_nested_output_loop(monkeypatch):
    """The whole row loop runs a program that writes at most one output per row and attempt
    (compile.rows.LOOP_ONE_OUTPUT); where some row's next step could pass two output times it stops and the program
    with the nested output loop goes on from its state (and runs from the start in later solves of the same key).
    Outputs, steps, rejections, NFE and final states are those of the nested program alone, bit for bit: with sparse
    outputs (the one-output program to the end) and with dense ones (handed over in the first solve, the nested
    program from the start in the second)."""
    monkeypatch.setattr(compiled_rows, "FORM", "loop")
    mu = torch.linspace(1.0, 8.0, 16, dtype=F64)

    def field():
        m = mu.clone()
        return lambda t, y: torch.stack([y[..., 1], m * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    y0 = torch.stack([torch.full((16,), 2.0, dtype=F64), torch.zeros(16, dtype=F64)], -1)
    for n_times, handed_over in ((5, False), (61, True)):
        t = torch.linspace(0, 6, n_times, dtype=F64)
        sols, marks = {}, {}
        for one in (False, True):
            monkeypatch.setattr(compiled_rows, "LOOP_ONE_OUTPUT", one)
            f = field()
            with torch.no_grad():
                sols[one] = [neurodyn.solve(f, y0, t, per_sample_steps=True, compile=True, rtol=1e-6, atol=1e-8)
                             for _ in range(2)]
            marks[one] = any(k[0] == "several outputs" and v for k, v in compiled_rows._CACHE[f].items())
        assert marks == {False: False, True: handed_over}
        for nested, one in zip(sols[False], sols[True]):
            assert one.stats["compiled"] == "row-loop"
            assert torch.equal(one.ys, nested.ys)
            assert one.stats["nfe"] == nested.stats["nfe"]
            for key in ("steps_per_sample", "rejected_per_sample", "initial_step"):
                assert torch.equal(one.stats[key], nested.stats[key]), key
            assert torch.equal(one.y_final, nested.y_final)
            assert torch.equal(one.t_final_per_sample, nested.t_final_per_sample)
    assert int(sols[True][0].stats["steps_per_sample"].min()) < n_times - 1  # (a row passed two outputs in a step)
