"""The state's precision sets the limits of a solve: half precision refused, tolerances below what the dtype resolves
raised with a warning, steps never below what it resolves (one underflow rule for the eager loop, the per-sample rows
and the compiled loop), bounded default step budgets; tolerances, norms and options that cannot work refused up
front."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.core.control import frozen_attempt, rtol_floor, step_underflow, step_underflow_tensor
from neurodyn.errors import PrecisionWarning

pytestmark = pytest.mark.usefixtures("single_thread")

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


class Counter:
    """``dy/dt = -y`` counting its evaluations."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return -y


def _mlp(dtype):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)  # the same weights in every dtype
    return net


class Field(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.net = _mlp(dtype)

    def forward(self, t, y):
        return self.net(y)


Y0_MLP = torch.tensor([[0.8, -1.1], [0.3, 0.4], [-1.2, 0.9], [1.5, 0.2]])


def _reference_mlp() -> torch.Tensor:
    """y(1) of the MLP field in float64 at rtol 1e-12 (the same weights as the float32 field)."""
    f64 = Field(F64)
    return neurodyn.solve(f64, Y0_MLP.double(), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-12, atol=1e-12).ys[-1]


# ------------------------------------------------------------------------------------------ item 4: half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_float32(dtype):
    f = Counter()
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    for call in (lambda: neurodyn.solve(f, torch.ones(2, dtype=dtype), t),
                 lambda: neurodyn.odeint(f, torch.ones(2, dtype=dtype), t)):
        with pytest.raises(neurodyn.InputError, match="float32") as info:
            call()
        assert str(dtype) in str(info.value)
    assert f.calls == 0  # refused before any work


def test_float32_still_solves_y_prime_minus_y():
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-7)
    assert sol.ys.dtype == F32
    assert abs(float(sol.ys[-1, 0]) - math.exp(-1.0)) < 1e-5


# ------------------------------------------------------------------------------- item 8: tolerances below the dtype
def test_rtol_floor_values():
    assert rtol_floor(F32) == pytest.approx(2 * EPS32) and 2e-7 < rtol_floor(F32) < 1e-6  # the common 1e-6 passes
    assert rtol_floor(F64) == pytest.approx(2 * torch.finfo(F64).eps)
    assert rtol_floor(torch.complex64) == rtol_floor(F32)


def _spiral(t, y):  # torchdiffeq's examples/ode_demo.py: dy/dt = y^3 A
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=y.dtype)
    return torch.mm(y ** 3, a)


def test_float32_rtol_1e_7_at_the_floor_is_as_accurate_as_torchdiffeq_at_1e_7():
    """ode_demo's float32 spiral at torchdiffeq's default rtol=1e-7: clamped to the floor (2 eps = 2.4e-7), the result
    is within 1.5x of torchdiffeq's error at 1e-7 (which honours it) against scipy DOP853 at rtol 1e-13. (Against the
    former floor of 8 eps the result depends on the CPU's rounding: 2x more accurate on the Intel machines of earlier
    sessions, 2x less on an AMD EPYC, 3.8e-6 against 1.9e-6: errors at 2-8 eps are round-off; docs/results.md.)"""
    import numpy as np
    import scipy.integrate
    import torchdiffeq

    t = torch.linspace(0.0, 25.0, 1000)
    y0 = torch.tensor([[2.0, 0.0]])
    ref = scipy.integrate.solve_ivp(
        lambda tt, y: _spiral(None, torch.from_numpy(y).reshape(1, 2)).reshape(-1).numpy(), (0.0, 25.0),
        np.array([2.0, 0.0]), method="DOP853", rtol=1e-13, atol=1e-15, t_eval=t.double().numpy()).y.T
    err = lambda ys: float(np.abs(ys.reshape(-1, 2).double().numpy() - ref).max())  # noqa: E731
    with pytest.warns(PrecisionWarning, match=r"rtol=1e-07 is below what float32 resolves"):
        sol = neurodyn.solve(_spiral, y0, t, rtol=1e-7, atol=1e-9)
    assert sol.success
    peer = torchdiffeq.odeint(_spiral, y0, t, rtol=1e-7, atol=1e-9)
    assert err(sol.ys) < 1.5 * err(peer), (err(sol.ys), err(peer))


def test_float32_rtol_1e_12_warns_clamps_and_meets_the_clamped_tolerance():
    t = torch.linspace(0.0, 2.0, 9)
    exact = torch.exp(-t.double())
    with pytest.warns(PrecisionWarning, match=r"rtol=1e-12 is below what float32 resolves") as rec:
        sol = neurodyn.solve(lambda t, y: -y, torch.ones(3), t, rtol=1e-12, atol=1e-12)
    assert len(rec) == 1
    floor = rtol_floor(F32)
    assert f"rtol={floor:.3g}" in str(rec[0].message)
    # Exactly the solve at the floor (the same steps), and within the clamped tolerance of exp(-t).
    at_floor = neurodyn.solve(lambda t, y: -y, torch.ones(3), t, rtol=floor, atol=1e-12)
    assert sol.stats["steps"] == at_floor.stats["steps"] and torch.equal(sol.ys, at_floor.ys)
    err = (sol.ys[:, 0].double() - exact).abs()
    assert float((err / (1e-12 + floor * exact)).max()) <= 5.0, err
    assert sol.stats["steps"] < 60  # dopri5 at rtol ~1e-6, not ~1e-12 (hundreds of steps)


def test_tensor_rtol_is_clamped_elementwise():
    rtol = torch.tensor([1e-10, 1e-4])
    with pytest.warns(PrecisionWarning, match="1e-10"):
        sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), rtol=rtol, atol=1e-9)
    assert sol.success
    assert abs(float(sol.ys[-1, 0]) - math.exp(-1.0)) < 1e-5


def test_rtol_zero_gets_the_floor_silently_where_atol_is_resolved():
    t = torch.tensor([0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # atol=1e-3 is well above float32's resolution at |y| = 1: no warning
        a = neurodyn.solve(lambda t, y: -y, torch.ones(2), t, rtol=0.0, atol=1e-3)
    assert abs(float(a.ys[-1, 0]) - math.exp(-1.0)) < 1e-2
    with pytest.warns(PrecisionWarning, match="rtol=0 with atol=1e-10"):
        b = neurodyn.solve(lambda t, y: -y, torch.ones(2), t, rtol=0.0, atol=1e-10, method="bdf", max_steps=2000)
    assert b.success and abs(float(b.ys[-1, 0]) - math.exp(-1.0)) < 1e-5


def test_float64_tolerances_are_not_touched():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = neurodyn.solve(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                             rtol=1e-13, atol=1e-15)
    assert abs(float(sol.ys[-1, 0]) - math.exp(-1.0)) < 1e-12


def test_trbdf2_float32_default_tolerances_end_quickly_and_correctly():
    """torchdiffeq's default rtol=1e-7 (below float32's resolution; trbdf2 tightened it further to 1e-9 inside) used
    to step at ~2e-7 with a frozen state until the step budget ran out."""
    ref = _reference_mlp()
    f = Field(F32)
    t = torch.tensor([0.0, 1.0])
    with pytest.warns(PrecisionWarning, match="float32"):
        sol = neurodyn.solve(f, Y0_MLP, t, method="trbdf2", max_steps=2000)
    assert sol.success
    # float64 at the same (floored) rtol takes ~370 steps: trbdf2 tightens its internal tolerance to ~3e-8, which
    # float64 resolves; float32 stops at its floor.
    assert sol.stats["steps"] + sol.stats["rejected"] <= 200, sol.stats
    assert float((sol.ys[-1].double() - ref).abs().max()) < 3e-5
    with pytest.warns(PrecisionWarning):
        ys = neurodyn.odeint(f, Y0_MLP, t, method="trbdf2", options={"max_num_steps": 2000})
    assert float((ys[-1].double() - ref).abs().max()) < 3e-5


def test_odeint_default_step_budget_is_solves():
    """odeint's default max_num_steps is solve's bounded default (torchdiffeq's 2**31 - 1 never ends a stall)."""
    import neurodyn.compat.torchdiffeq as td

    seen = {}
    real = td.solve

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    default = inspect.signature(neurodyn.solve).parameters["max_steps"].default
    assert default <= 10**6
    mp = pytest.MonkeyPatch()
    mp.setattr(td, "solve", spy)
    try:
        neurodyn.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
        assert seen.get("max_steps", default) == default
        neurodyn.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                        options={"max_num_steps": 500})
        assert seen["max_steps"] == 500
    finally:
        mp.undo()


# --------------------------------------------------------------------------------- item 8: the underflow rule
def test_underflow_rule_scalar_and_tensor_forms_agree():
    gen = torch.Generator().manual_seed(1)
    n = 400
    t = (torch.rand(n, generator=gen, dtype=F64) - 0.5) * 10.0 ** torch.randint(-3, 4, (n,), generator=gen)
    h = torch.rand(n, generator=gen, dtype=F64) * 10.0 ** torch.randint(-18, 0, (n,), generator=gen).double()
    h[:6] = torch.tensor([0.0, -1.0, math.inf, math.nan, 1e-300, 1.0], dtype=F64)
    t[:6] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    frozen = torch.rand(n, generator=gen) < 0.2
    for eps in (EPS32, torch.finfo(F64).eps):
        got = step_underflow_tensor(t, h, eps, frozen)
        want = [step_underflow(a, b, eps, c) for a, b, c in zip(t.tolist(), h.tolist(), frozen.tolist())]
        assert got.tolist() == want
        # the compiled row loop's form (compare and select instead of nan_to_num): the same results
        assert step_underflow_tensor(t, h, eps, frozen, blend=True).tolist() == want
        assert step_underflow_tensor(t, -h, eps, blend=True).tolist() == step_underflow_tensor(t, -h, eps).tolist()
    # rule 2 is "t + h rounds to t or its neighbour in the dtype"
    t32 = torch.tensor(1.0, dtype=F32)
    assert step_underflow(1.0, EPS32 / 4, EPS32) and bool(t32 + EPS32 / 4 == t32)
    assert not step_underflow(1.0, 2 * EPS32, EPS32) and bool(t32 + 2 * EPS32 != t32)


def test_frozen_attempt_rows_equal_one_row_at_a_time():
    gen = torch.Generator().manual_seed(2)
    y0 = torch.randn(64, 5, generator=gen)
    change = torch.randn(64, 5, generator=gen) * y0.abs() * EPS32 * 10.0 ** torch.randint(-1, 3, (64, 1), generator=gen)
    y1 = y0 + change
    y1[3, 2] = math.nan
    shrink = torch.rand(64, 1, generator=gen, dtype=F64) * 0.9 + 0.05
    rows = frozen_attempt(y0, y1, shrink, EPS32)
    one = [bool(frozen_attempt(y0[i:i + 1], y1[i:i + 1], float(shrink[i]), EPS32)[0]) for i in range(64)]
    assert rows.tolist() == one
    assert 0 < sum(one) < 64  # both outcomes occur
    assert not one[3]  # a NaN change is never frozen
    # the definition: every |change| * shrink within eps |y0|
    want = ((y1 - y0).abs() * shrink <= EPS32 * y0.abs()).all(1)
    assert rows.tolist() == want.tolist()


def _blowup(t, y):
    return y * y  # y = 1 / (1 - t): singular at t = 1


@pytest.mark.parametrize("per_sample", [False, True])
def test_float32_blowup_stops_at_float32_resolution(per_sample):
    """The steps near the singularity shrink until t + h is no longer distinct in float32 (~1e-7 at t = 1), where the
    state is ~1/(1 - t); before, they went on down to float64's resolution of t, passing t = 1 with a float32 state
    of ~1e15."""
    with pytest.warns(PrecisionWarning):
        sol = neurodyn.solve(_blowup, torch.ones(2, 1), torch.tensor([0.0, 0.5, 2.0]), on_failure="return",
                             per_sample_steps=per_sample)
    assert sol.status == "step_size_underflow"
    assert 1.0 - 1e-5 < sol.t_final < 1.0
    assert float(sol.y_final.max()) < 1e8
    assert abs(float(sol.ys[1, 0, 0]) - 2.0) < 1e-5  # the output before the blow-up is right
    if not per_sample:
        assert sol.stats["last_step"] >= EPS32 * sol.t_final  # no step below float32's resolution of t
        assert "float32" in sol.message


@pytest.mark.slow  # compiles the loop (~15 s on the CPU); the compiled underflow path is also in test_compiled_loop
def test_float32_blowup_stops_where_the_compiled_loop_stops():
    class Blowup(nn.Module):
        def forward(self, t, y):
            return y * y

    f = Blowup()
    y0 = torch.ones(1, 2)
    t = torch.tensor([0.0, 2.0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        eager = neurodyn.solve(f, y0, t, method="tsit5", rtol=1e-5, on_failure="return")
        comp = neurodyn.solve(f, y0, t, method="tsit5", rtol=1e-5, on_failure="return", compile=True)
    assert comp.stats["compiled"] == "loop"
    assert eager.status == comp.status == "step_size_underflow"
    # Near the singularity the last accepts hang on float32 rounding, which the compiled kernels' arithmetic does in
    # another order (measured on an AMD EPYC: 51 steps + 49 rejected compiled, 50 + 48 eager, t_final 2.3e-8 apart).
    assert abs(comp.stats["steps"] - eager.stats["steps"]) <= 2
    assert abs(comp.stats["rejected"] - eager.stats["rejected"]) <= 2
    # (at rtol 1e-5 the numerical solution's own singularity lies within ~1e-5 of t = 1, either side)
    assert abs(eager.t_final - 1.0) < 1e-4 and abs(comp.t_final - eager.t_final) < 1e-6
    assert float(eager.y_final.max()) < 1e8 and float(comp.y_final.max()) < 1e8


def test_error_control_below_the_state_resolution_underflows_at_once():
    """A norm 1e4 times the RMS asks float32 for ~1e-10 relative: trbdf2's error estimate (Newton's rounding) cannot
    get there, the controller shrinks the step until it cannot change the state; that is a step size underflow,
    found after a few attempts (before: rejected and frozen steps until the budget ran out)."""
    f = Counter()

    def tight(x):
        return 1e4 * x.pow(2).mean().sqrt()

    sol = neurodyn.solve(f, torch.ones(3), torch.tensor([0.0, 1.0]), method="trbdf2", rtol=1e-5, atol=1e-6,
                         norm=tight, max_steps=2000, on_failure="return")
    assert sol.status == "step_size_underflow", sol.message
    assert sol.stats["steps"] + sol.stats["rejected"] < 30
    assert "float32" in sol.message and "loosen rtol/atol" in sol.message
    # the same field and norm in float64 resolve it: a success close to exp(-1)
    ok = neurodyn.solve(f, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="trbdf2",
                        rtol=1e-5, atol=1e-6, norm=tight)
    assert ok.success and abs(float(ok.ys[-1, 0]) - math.exp(-1.0)) < 1e-6


# ------------------------------------------------------------------ item 9: arguments that cannot work, up front
@pytest.mark.parametrize("rtol, atol, count", [
    (0.0, torch.zeros(3), None),
    (torch.zeros(3), 0.0, None),
    (0.0, torch.tensor([1e-9, 0.0, 1e-9]), "1 of 3"),
    (torch.tensor([1e-6, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1e-9]), "1 of 3"),
])
def test_zero_tolerance_tensors_are_refused_before_work(rtol, atol, count):
    f = Counter()
    with pytest.raises(neurodyn.InputError, match="rtol and atol are both 0") as info:
        neurodyn.solve(f, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       rtol=rtol.double() if isinstance(rtol, torch.Tensor) else rtol,
                       atol=atol.double() if isinstance(atol, torch.Tensor) else atol)
    assert f.calls == 0
    if count:
        assert count in str(info.value)


def test_zero_tolerances_fine_for_a_fixed_step():
    sol = neurodyn.solve(lambda t, y: -y, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         method="rk4", step_size=0.01, rtol=0.0, atol=torch.zeros(3, dtype=F64))
    assert abs(float(sol.ys[-1, 0]) - math.exp(-1.0)) < 1e-9


def test_zero_adjoint_tolerances_are_refused():
    w = nn.Parameter(torch.tensor(-1.0, dtype=F64))
    with pytest.raises(neurodyn.InputError, match="backward solve"):
        neurodyn.solve(lambda t, y: w * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       gradient="adjoint", params=[w], adjoint_rtol=0.0, adjoint_atol=0.0)


@pytest.mark.parametrize("norm, what", [
    (lambda x: x.abs(), "shape (2, 3)"),
    (lambda x: x.abs().amax(dim=0), "shape (3,)"),
    (lambda x: "big", "str"),
    (lambda x: x.sum() * 1j, "complex"),
])
def test_a_norm_that_is_not_a_real_scalar_is_refused_before_work(norm, what):
    f = Counter()
    with pytest.raises(neurodyn.InputError, match="norm must return a real scalar") as info:
        neurodyn.solve(f, torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), norm=norm)
    assert what in str(info.value)
    assert f.calls == 0


def test_a_norm_that_fails_is_reported_up_front():
    f = Counter()
    with pytest.raises(neurodyn.InputError, match="norm"):
        neurodyn.solve(f, torch.ones(2, 3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       norm=lambda x: x @ torch.ones(5, dtype=F64))
    assert f.calls == 0


def test_scalar_norms_still_work():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for norm in (lambda x: x.abs().max(), lambda x: float(x.pow(2).mean().sqrt())):
        sol = neurodyn.solve(lambda t, y: -y, torch.ones(2, 3, dtype=F64), t, norm=norm, rtol=1e-8, atol=1e-10)
        assert abs(float(sol.ys[-1, 0, 0]) - math.exp(-1.0)) < 1e-7


def test_dense_with_per_sample_steps_is_refused_before_work():
    f = Counter()
    with pytest.raises(neurodyn.InputError, match="dense=True is not available with per_sample_steps"):
        neurodyn.solve(f, torch.ones(3, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), dense=True,
                       per_sample_steps=True)
    assert f.calls == 0
