"""The torchdiffeq drop-in, item by item against torchdiffeq 0.2.5 itself (issue 12).

Every test runs the same call through ``torchdiffeq`` and ``neurodyn`` and compares the numbers: outputs,
gradients, warnings, callback arguments, backward evaluation counts.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import neurodyn
import neurodyn.compat.torchdiffeq as nd_torchdiffeq

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Linear2(nn.Module):
    """dy/dt = A y (+ b cos t), counting evaluations."""

    def __init__(self, forcing: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.3, 1.2], [-1.0, -0.2]], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.5, -0.25], dtype=F64))
        self.forcing = forcing
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        out = y @ self.A.T
        return out + self.b * torch.cos(t) if self.forcing else out


def grads_of(lib_call, field: nn.Module, y0: torch.Tensor, t: torch.Tensor, weights: torch.Tensor):
    field.zero_grad()
    y = y0.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    ys = lib_call(field, y, tt)
    (weights * ys).sum().backward()
    return ys.detach(), torch.cat([y.grad.reshape(-1), tt.grad.reshape(-1)]
                                  + [p.grad.reshape(-1) for p in field.parameters()])


# ------------------------------------------------------------------------------------------ one time
def test_single_time_returns_y0():
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    t = torch.tensor([0.3], dtype=F64)
    for method in (None, "rk4", "scipy_solver"):
        td = torchdiffeq.odeint(lambda t, y: -y, y0, t, method=method)
        nd = neurodyn.odeint(lambda t, y: -y, y0, t, method=method)
        assert nd.shape == (1, 3)
        torch.testing.assert_close(nd, td.reshape(1, 3), rtol=0, atol=0)
    # Tuple states, and the gradient to y0 (odeint and odeint_adjoint), as torchdiffeq's.
    a, b = torch.ones(2, dtype=F64), torch.zeros(1, 3, dtype=F64)
    out = neurodyn.odeint(lambda t, s: (s[1].sum(-1).expand(2), -s[1]), (a, b), t)
    ref = torchdiffeq.odeint(lambda t, s: (s[1].sum(-1).expand(2), -s[1]), (a, b), t)
    for x, r in zip(out, ref):
        torch.testing.assert_close(x, r, rtol=0, atol=0)
    lin = Linear2()
    grads = []
    for lib in (torchdiffeq, neurodyn):
        for call in (lib.odeint, lib.odeint_adjoint):
            y = y0[:2].clone().requires_grad_(True)
            (call(lin, y, t) * torch.tensor([[2.0, 3.0]], dtype=F64)).sum().backward()
            grads.append(y.grad)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)
    assert grads[0].tolist() == [2.0, 3.0]


# ------------------------------------------------------------------------------------------ odeint_dense
def test_odeint_dense_matches_torchdiffeq():
    assert hasattr(torchdiffeq, "odeint_dense") and "odeint_dense" in neurodyn.__all__
    lin = Linear2(forcing=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t0, t1 = torch.tensor(0.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    with torch.no_grad():
        fine = torchdiffeq.odeint(lin, y0, torch.linspace(0, 3, 13, dtype=F64), rtol=1e-12, atol=1e-14)
        td = torchdiffeq.odeint_dense(lin, y0, t0, t1, rtol=1e-8, atol=1e-10)
        nd = neurodyn.odeint_dense(lin, y0, t0, t1, rtol=1e-8, atol=1e-10)
        for i, tv in enumerate(torch.linspace(0, 3, 13, dtype=F64)[:-1]):  # torchdiffeq's fails at t1 itself
            a, b = nd(tv), td(tv)
            assert a.shape == b.shape == (2,)
            assert float((a - b).abs().max()) < 1e-6
            assert float((a - fine[i]).abs().max()) < 1e-6
        # Beyond torchdiffeq: any shape of times, t1 included.
        grid = torch.linspace(0, 3, 13, dtype=F64).view(13, 1)
        torch.testing.assert_close(nd(grid)[:, 0], fine, rtol=0, atol=1e-6)
    # Differentiable with respect to y0 as torchdiffeq's.
    gs = []
    for lib in (torchdiffeq, neurodyn):
        y = y0.clone().requires_grad_(True)
        lib.odeint_dense(lin, y, t0, t1, rtol=1e-10, atol=1e-12)(torch.tensor(1.7, dtype=F64)).sum().backward()
        gs.append(y.grad)
    torch.testing.assert_close(gs[1], gs[0], rtol=1e-6, atol=1e-8)
    with pytest.raises(neurodyn.InputError, match="tuple"):
        neurodyn.odeint_dense(lambda t, s: s, (y0,), t0, t1)


# ------------------------------------------------------------------------------------------ options
def test_step_size_with_adaptive_method_warns_and_stays_adaptive():
    lin = Linear2(forcing=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0, 4, 5, dtype=F64)
    opts = {"step_size": 1.0}
    with pytest.warns(UserWarning) as td_w:
        td = torchdiffeq.odeint(lin, y0, t, method="dopri5", options=opts)
    with pytest.warns(UserWarning) as nd_w:
        nd = neurodyn.odeint(lin, y0, t, method="dopri5", options=opts)
    assert [str(w.message) for w in nd_w] == [str(w.message) for w in td_w]
    assert str(td_w[0].message) == "Dopri5Solver: Unexpected arguments {'step_size': 1.0}"
    adaptive = neurodyn.odeint(lin, y0, t, method="dopri5")
    torch.testing.assert_close(nd, adaptive, rtol=0, atol=0)  # the option is ignored
    assert float((nd - td).abs().max().detach()) < 1e-6  # both adaptive at rtol=1e-7 (fixed h=1 would be off by ~1e-3)


def test_min_step_accepts_steps_at_min_step():
    """With min_step above the steps the tolerance asks for, torchdiffeq steps at min_step regardless of the
    error (neurodyn's own solve raises StepSizeUnderflow)."""
    f = lambda t, y: torch.stack([y[1], -y[0] + torch.sin(3 * t)])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    opts = {"min_step": 0.05}
    td = torchdiffeq.odeint(f, y0, t, rtol=1e-13, atol=1e-13, options=opts)
    nd = neurodyn.odeint(f, y0, t, rtol=1e-13, atol=1e-13, options=opts)
    exact = torchdiffeq.odeint(f, y0, t, rtol=1e-13, atol=1e-13)
    # Both took h = 0.05 dopri5 steps: the same error of ~1e-8 against the accurate solve.
    td_err, nd_err = float((td - exact).abs().max()), float((nd - exact).abs().max())
    assert 1e-10 < td_err < 1e-6 and 1e-10 < nd_err < 1e-6, (td_err, nd_err)
    assert float((nd - td).abs().max()) < 1e-7
    with pytest.raises(neurodyn.StepSizeUnderflow):
        neurodyn.solve(f, y0, t, rtol=1e-13, atol=1e-13, min_step=0.05)
    # And with gradients through the adjoint (whose backward inherits min_step, as torchdiffeq's).
    lin = Linear2(forcing=True)
    w = torch.linspace(0.5, 1.5, 10, dtype=F64).view(5, 2)

    def call(lib):
        return lambda m, y, tt: lib.odeint_adjoint(m, y, tt, rtol=1e-13, atol=1e-13, options=opts)

    _, g_td = grads_of(call(torchdiffeq), lin, y0, t, w)
    with warnings.catch_warnings():  # forced steps far above the tolerance: neurodyn reports the adjoint's drift
        warnings.filterwarnings("ignore", message=".*adjoint_drift", category=RuntimeWarning)
        _, g_nd = grads_of(call(neurodyn), lin, y0, t, w)
    assert rel(g_nd, g_td) < 1e-6, rel(g_nd, g_td)


# ------------------------------------------------------------------------------------------ adjoint norms
class MLPField(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).double()
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y)


def backward_nfe(lib, adjoint_options):
    m = MLPField()
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    ys = lib.odeint_adjoint(m, y0, t, rtol=1e-6, atol=1e-8, adjoint_options=adjoint_options)
    m.nfe = 0
    ys.pow(2).sum().backward()
    return m.nfe, torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def test_adjoint_default_norm_is_the_full_norm():
    """torchdiffeq controls the parameter channels too unless asked for the seminorm: the backward solve takes
    about as many steps as torchdiffeq's full norm, clearly more than with the seminorm."""
    td_full, g_td = backward_nfe(torchdiffeq, None)
    td_semi, _ = backward_nfe(torchdiffeq, {"norm": "seminorm"})
    nd_full, g_nd = backward_nfe(neurodyn, None)
    nd_semi, _ = backward_nfe(neurodyn, {"norm": "seminorm"})
    assert td_semi < 0.8 * td_full and nd_semi < 0.85 * nd_full, (td_semi, td_full, nd_semi, nd_full)
    # The forward takes torchdiffeq's steps (tests/test_torchdiffeq_steps.py); the backward solve is neurodyn's
    # (each interval starts from the last proposal, not a fresh starting step; RMS over the whole augmented state, not
    # the largest part's): 51 evaluations against torchdiffeq's 58 here.
    assert abs(nd_full - td_full) <= 0.15 * td_full, (nd_full, td_full)
    assert rel(g_nd, g_td) < 1e-5


def test_adjoint_callable_norm_gets_torchdiffeqs_tuple():
    seen = {}

    def make_norm(key):
        def norm(state):
            seen.setdefault(key, [tuple(s.shape) for s in state])
            return torch.stack([s.abs().max() for s in state]).max()
        return norm

    def run(lib, key, y0):
        m = Linear2(forcing=True)
        ys = lib.odeint_adjoint(m, y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), rtol=1e-8, atol=1e-10,
                                adjoint_options={"norm": make_norm(key)})
        y = ys if isinstance(ys, torch.Tensor) else torch.cat([x.reshape(3, -1) for x in ys], 1)
        y.pow(2).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    g_td = run(torchdiffeq, "td", torch.tensor([1.0, 0.5], dtype=F64))
    g_nd = run(neurodyn, "nd", torch.tensor([1.0, 0.5], dtype=F64))
    assert seen["nd"] == seen["td"] == [(), (2,), (2,), (2, 2), (2,)]
    assert rel(g_nd, g_td) < 1e-6, rel(g_nd, g_td)


def test_adjoint_of_a_field_of_time_alone():
    """dy/dt = c cos(t): no dependence on y (nor on parameters for the second field)."""

    class OfTime(nn.Module):
        def __init__(self, with_param: bool):
            super().__init__()
            self.c = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64)) if with_param else None

        def forward(self, t, y):
            c = self.c if self.c is not None else torch.tensor([1.0, -2.0], dtype=F64)
            return c * torch.cos(t)

    y0 = torch.tensor([0.5, 0.25], dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.5], dtype=F64)
    w = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]], dtype=F64)
    for with_param in (True, False):
        m = OfTime(with_param)
        ys_td, g_td = grads_of(lambda f, y, tt: torchdiffeq.odeint_adjoint(f, y, tt), m, y0, t, w)
        ys_nd, g_nd = grads_of(lambda f, y, tt: neurodyn.odeint_adjoint(f, y, tt), m, y0, t, w)
        torch.testing.assert_close(ys_nd, ys_td, rtol=0, atol=2e-6)  # both at rtol=1e-7
        torch.testing.assert_close(g_nd, g_td, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------ scipy_solver
def test_scipy_solver_with_y0_requiring_grad_is_forward_only_like_torchdiffeq():
    lin = Linear2(forcing=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=F64)
    td = torchdiffeq.odeint(lin, y0, t, method="scipy_solver", options={"solver": "DOP853"})
    nd = neurodyn.odeint(lin, y0, t, method="scipy_solver", options={"solver": "DOP853"})
    assert not td.requires_grad and not nd.requires_grad
    torch.testing.assert_close(nd, td, rtol=0, atol=1e-13)


@pytest.mark.parametrize("solver", ["DOP853", "LSODA"])
def test_scipy_solver_under_odeint_adjoint(solver):
    """Forward and backward solves in scipy: the augmented system is integrated by solve_ivp too."""
    lin = Linear2(forcing=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    w = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0]], dtype=F64)
    kw = dict(method="scipy_solver", options={"solver": solver}, rtol=1e-10, atol=1e-12)
    ys_td, g_td = grads_of(lambda f, y, tt: torchdiffeq.odeint_adjoint(f, y, tt, **kw), lin, y0, t, w)
    ys_nd, g_nd = grads_of(lambda f, y, tt: neurodyn.odeint_adjoint(f, y, tt, **kw), lin, y0, t, w)
    torch.testing.assert_close(ys_nd, ys_td, rtol=0, atol=1e-8)  # solve_ivp at rtol=1e-10 (LSODA: 1e-9 apart)
    assert rel(g_nd, g_td) < 1e-7, rel(g_nd, g_td)
    # And the gradient is right: direct differentiation through an accurate torch solve.
    _, g_ref = grads_of(lambda f, y, tt: neurodyn.odeint(f, y, tt, rtol=1e-12, atol=1e-14), lin, y0, t, w)
    assert rel(g_nd, g_ref) < 1e-6, rel(g_nd, g_ref)


# ------------------------------------------------------------------------------------------ callbacks
class WithCallbacks(Linear2):
    def __init__(self, adjoint: bool = False):
        super().__init__(forcing=True)
        self.log = []
        names = ["callback_step", "callback_accept_step", "callback_reject_step"]
        for name in names:
            setattr(self, name + ("_adjoint" if adjoint else ""), self._recorder(name))

    def _recorder(self, name):
        def cb(t0, y0, dt):
            y = torch.cat([x.reshape(-1) for x in y0]) if isinstance(y0, tuple) else y0
            self.log.append((name, float(t0), y.detach().clone(), float(dt)))
        return cb


def test_fixed_grid_callbacks_match_torchdiffeq():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.33, 1.0], dtype=F64)
    logs = []
    for lib in (torchdiffeq, neurodyn):
        m = WithCallbacks()
        with pytest.warns(UserWarning, match="does not support callbacks") as rec:
            lib.odeint(m, y0, t, method="rk4", options={"step_size": 0.1})
        logs.append((m.log, sorted(str(w.message) for w in rec)))
    (td_log, td_warn), (nd_log, nd_warn) = logs
    assert nd_warn == td_warn or {m.split(" {")[0] for m in nd_warn} == {m.split(" {")[0] for m in td_warn}
    assert [e[0] for e in nd_log] == [e[0] for e in td_log] == ["callback_step"] * 10
    for a, b in zip(nd_log, td_log):
        assert a[1] == pytest.approx(b[1], abs=1e-12) and a[3] == pytest.approx(b[3], abs=1e-12)
        torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-12)


def test_adaptive_callbacks_match_torchdiffeq():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    logs = {}
    for lib in (torchdiffeq, neurodyn):
        m = WithCallbacks()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # dopri5 supports all three: no warning
            lib.odeint(m, y0, t, rtol=1e-6, atol=1e-8, options={"first_step": 1.0})  # a first step to reject
        logs[lib.__name__] = m.log
    for name, log in logs.items():
        kinds = [e[0] for e in log]
        # callback_step before every attempt, then exactly one of accept/reject for it.
        assert kinds[0::2] == ["callback_step"] * (len(kinds) // 2), name
        assert all(k in ("callback_accept_step", "callback_reject_step") for k in kinds[1::2]), name
        assert "callback_reject_step" in kinds, name
        for step, decision in zip(log[0::2], log[1::2]):
            assert step[1] == decision[1] and torch.equal(step[2], decision[2]), name
        accepted = [e for e in log if e[0] == "callback_accept_step"]
        assert accepted[0][1] == 0.0 and sum(e[3] for e in accepted) >= 5.0 - 1e-12, name
        # The state handed to the callback is the solution at the step's start: check it against torchdiffeq.
        times = torch.tensor([e[1] for e in accepted], dtype=F64)
        ref = torchdiffeq.odeint(Linear2(forcing=True), y0, times, rtol=1e-12, atol=1e-14)
        assert float((torch.stack([e[2] for e in accepted]) - ref).abs().max()) < 1e-5, name
    n_td = sum(e[0] == "callback_accept_step" for e in logs["torchdiffeq"])
    n_nd = sum(e[0] == "callback_accept_step" for e in logs["neurodyn"])
    assert abs(n_nd - n_td) <= 0.25 * n_td, (n_nd, n_td)


def test_tuple_state_callbacks_get_tuples():
    got = {}
    for lib in (torchdiffeq, neurodyn):
        class F(nn.Module):
            def forward(self, t, s):
                return s[1], -s[0]

            def callback_accept_step(self, t0, y0, dt, _k=lib.__name__):
                got.setdefault(_k, (type(y0), [tuple(x.shape) for x in y0]))

        lib.odeint(F(), (torch.ones(2, dtype=F64), torch.zeros(2, 1, dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64))
    assert got["neurodyn"] == got["torchdiffeq"] == (tuple, [(2,), (2, 1)])


def test_adjoint_callbacks_match_torchdiffeq():
    """callback_*_adjoint are called during the backward solve with the augmented state (a_t, y, a_y, *a_params).
    With a fixed-step backward method both libraries take the same steps."""
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    w = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0]], dtype=F64)
    out = {}
    for lib in (torchdiffeq, neurodyn):
        m = WithCallbacks(adjoint=True)
        _, g = grads_of(lambda f, y, tt, _lib=lib: _lib.odeint_adjoint(
            f, y, tt, rtol=1e-10, atol=1e-12, adjoint_method="rk4", adjoint_options={"step_size": 0.125}), m, y0, t, w)
        out[lib.__name__] = (m.log, g)
    (td_log, g_td), (nd_log, g_nd) = out["torchdiffeq"], out["neurodyn"]
    assert [e[0] for e in nd_log] == [e[0] for e in td_log] == ["callback_step"] * 8
    for a, b in zip(nd_log, td_log):
        assert a[1] == pytest.approx(b[1], abs=1e-12) and a[3] == pytest.approx(b[3], abs=1e-12)
        assert a[2].shape == b[2].shape == (1 + 2 + 2 + 4 + 2,)
        torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-8)
    assert rel(g_nd, g_td) < 1e-8
    assert math.isfinite(float(g_nd.sum()))


def test_grid_points_with_eps_lands_on_the_kinks_and_matches_torchdiffeq():
    """torchdiffeq 0.1's ``options=dict(grid_points=..., eps=...)`` (torchcde's examples pass it): accepted as jump
    times (the field may jump there), agreeing with the closed form and with torchdiffeq (which ignores both options
    with a warning) run at tight tolerances."""
    knots = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    rates = torch.tensor([-1.0, 2.0, -3.0], dtype=F64)

    def f(t, y):  # piecewise-constant rate: the field jumps at the knots
        i = int(torch.searchsorted(knots[1:-1], t.detach(), right=True))
        return rates[i] * y

    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    exact = math.exp(-1.0 * 0.3 + 2.0 * 0.4 - 3.0 * 0.3)
    ours = nd_torchdiffeq.odeint(f, y0, t, rtol=1e-9, atol=1e-12, method="dopri5",
                                              options=dict(grid_points=knots, eps=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq: "Unexpected arguments {'grid_points': ..., 'eps': ...}"
        theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-12, atol=1e-14, method="dopri5",
                                    options=dict(grid_points=knots, eps=1e-5))
    as_jumps = nd_torchdiffeq.odeint(f, y0, t, rtol=1e-9, atol=1e-12, method="dopri5", options=dict(jump_t=knots))
    assert torch.equal(ours, as_jumps)
    assert abs(float(ours[-1, 0]) - exact) < 2e-9
    assert abs(float(ours[-1, 0]) - float(theirs[-1, 0])) < 2e-9
    with pytest.raises(neurodyn.errors.InputError, match="eps must be a number >= 0"):
        nd_torchdiffeq.odeint(f, y0, t, method="dopri5", options=dict(grid_points=knots, eps=-1.0))
