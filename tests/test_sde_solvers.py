"""SDE steppers (neurodyn.solvers.sde): strong and weak convergence against closed forms on one Brownian path,
agreement with torchsde on the same Brownian increments, fused forms, rejections, gradients, statuses."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import neurodyn
from neurodyn.core.term import ControlTerm, MultiTerm, ODETerm
from neurodyn.paths import BrownianInterval

F64 = torch.float64


class GridBrownian:
    """A Brownian sample path on a dyadic grid of ``2**levels`` intervals of [0, T]: exact joint samples of the
    increments ``W`` and the space-time Levy areas ``H`` on every interval between grid points (sampled on the
    finest intervals, combined exactly); ``A``: the Levy area of the piecewise-linear path through the grid values
    (Chen's relation). Queries must fall on the grid. Test-local path (the engine's Path methods)."""

    knots: tuple = ()
    levy_area = "davie"

    def __init__(self, shape, levels=10, T=1.0, seed=0, dtype=F64):
        g = torch.Generator().manual_seed(seed)
        self.n, self.T = 2 ** levels, T
        self.dt = T / self.n
        dW = torch.randn(self.n, *shape, generator=g, dtype=dtype) * math.sqrt(self.dt)
        Hf = torch.randn(self.n, *shape, generator=g, dtype=dtype) * math.sqrt(self.dt / 12)
        zero = torch.zeros(1, *shape, dtype=dtype)
        self.W = torch.cat([zero, dW.cumsum(0)])
        # int_{t_k}^{t_k+1} W_r dr = dt W_k + U_k, U_k = dt (H_k + dW_k / 2)
        integ = self.dt * self.W[:-1] + self.dt * (Hf + 0.5 * dW)
        self.C = torch.cat([zero, integ.cumsum(0)])
        outer = self.W[:-1].unsqueeze(-1) * dW.unsqueeze(-2)
        area = (outer - outer.transpose(-1, -2)).cumsum(0)
        self.S = torch.cat([torch.zeros(1, *shape, shape[-1], dtype=dtype), area])

    def _i(self, t):
        i = round(float(t) / self.dt)
        assert abs(i * self.dt - float(t)) < 1e-9, f"query {t} off the grid"
        return i

    def evaluate(self, t):
        return self.W[self._i(t)]

    def increment(self, s, t):
        return self.W[self._i(t)] - self.W[self._i(s)]

    def levy(self, s, t):
        i, j = self._i(s), self._i(t)
        h = float(t) - float(s)
        W = self.W[j] - self.W[i]
        U = self.C[j] - self.C[i] - h * self.W[i]
        Wi = self.W[i]
        cross = Wi.unsqueeze(-1) * W.unsqueeze(-2)
        A = 0.5 * (self.S[j] - self.S[i]) - 0.5 * (cross - cross.transpose(-1, -2))
        return SimpleNamespace(W=W, H=U / h - 0.5 * W, K=None, A=A)

    def grad_tensors(self):
        return []


class TorchsdePath:
    """A torchsde BrownianInterval seen through the Path methods (to drive neurodyn and torchsde alike)."""

    knots: tuple = ()

    def __init__(self, bm, levy_area):
        self.bm, self.levy_area = bm, levy_area

    def increment(self, s, t):
        return self.bm(float(s), float(t))

    def levy(self, s, t):
        s, t = float(s), float(t)
        if self.levy_area in ("davie", "foster"):
            W, U, A = self.bm(s, t, return_U=True, return_A=True)
        else:
            (W, U), A = self.bm(s, t, return_U=True), None
        return SimpleNamespace(W=W, H=U / (t - s) - 0.5 * W, K=None, A=A)

    def grad_tensors(self):
        return []


def slope(dts, errs):
    x = torch.tensor(dts, dtype=F64).log()
    y = torch.tensor(errs, dtype=F64).log()
    xm, ym = x.mean(), y.mean()
    return float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())


def strong_errors(term, y0, exact, method, dts, T=1.0, **kw):
    errs = []
    for dt in dts:
        sol = neurodyn.solve(term, y0, torch.tensor([0.0, T], dtype=F64), method=method, step_size=dt, **kw)
        errs.append(float((sol.ys[-1] - exact).abs().mean()))
    return errs


# ---------------------------------------------------------------------------------------------------------------
# Problems with closed-form solutions on the path
# ---------------------------------------------------------------------------------------------------------------
MU, SIG = 0.6, 0.5
P = 1000  # paths


def gbm(sde_type, levels=8, seed=1):
    """dy = mu y dt + sigma y dW (diagonal noise, 2 components)."""
    bm = GridBrownian((P, 2), levels=levels, seed=seed)
    mu = torch.tensor([MU, -0.3], dtype=F64)
    sig = torch.tensor([SIG, 0.8], dtype=F64)
    term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: sig * y, bm, noise="diagonal", sde_type=sde_type)
    y0 = torch.ones(P, 2, dtype=F64)
    corr = sig ** 2 / 2 if sde_type == "ito" else 0.0
    exact = torch.exp((mu - corr) * 1.0 + sig * bm.W[-1])
    return term, y0, exact


def scalar_gbm(sde_type, levels=8, seed=2):
    """Scalar noise: two components driven by one Brownian motion, g of shape (P, 2, 1)."""
    bm = GridBrownian((P, 1), levels=levels, seed=seed)
    mu = torch.tensor([MU, -0.3], dtype=F64)
    sig = torch.tensor([SIG, 0.8], dtype=F64)
    term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: (sig * y).unsqueeze(-1), bm, noise="scalar",
                             sde_type=sde_type)
    corr = sig ** 2 / 2 if sde_type == "ito" else 0.0
    exact = torch.exp((mu - corr) + sig * bm.W[-1])
    return term, torch.ones(P, 2, dtype=F64), exact


def general_commutative(sde_type, levels=8, seed=3):
    """General noise, commutative: dy_i = mu_i y_i dt + y_i sum_j S_ij dW_j (2 states, 3 Brownian channels)."""
    bm = GridBrownian((P, 3), levels=levels, seed=seed)
    mu = torch.tensor([0.4, -0.2], dtype=F64)
    S = torch.tensor([[0.3, -0.2, 0.25], [0.1, 0.4, -0.3]], dtype=F64)
    term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: y.unsqueeze(-1) * S, bm, noise="general",
                             sde_type=sde_type)
    corr = (S ** 2).sum(-1) / 2 if sde_type == "ito" else 0.0
    exact = torch.exp(mu - corr + bm.W[-1] @ S.T)
    return term, torch.ones(P, 2, dtype=F64), exact


def ou(sde_type="ito", levels=10, seed=4):
    """Ornstein-Uhlenbeck dy = -theta y dt + sigma dW (additive): y(1) = e^-theta y0 + sigma int e^-theta(1-r) dW_r,
    the integral summed over the finest grid intervals with its first-order correction (error ~ 2^-20)."""
    theta, sigma = 1.5, 0.8
    bm = GridBrownian((P, 2), levels=levels, seed=seed)
    n, dt = bm.n, bm.dt
    tk = torch.arange(n, dtype=F64) * dt
    dW = bm.W[1:] - bm.W[:-1]
    U = (bm.C[1:] - bm.C[:-1]) - dt * bm.W[:-1]  # int (W_r - W_tk) dr per interval
    wts = torch.exp(-theta * (1.0 - tk)).view(-1, 1, 1)
    # int e^{theta (r - 1)} dW over [tk, tk+dt] ~ e^{theta(tk-1)} (dW + theta int (r - tk) dW_r),
    # int (r - tk) dW_r = dt dW - U
    integral = (wts * (dW + theta * (dt * dW - U))).sum(0)
    y0 = torch.full((P, 2), 0.7, dtype=F64)
    exact = math.exp(-theta) * y0 + sigma * integral
    sig = torch.full((P, 2), sigma, dtype=F64)
    term = neurodyn.sde_term(lambda t, y: -theta * y, lambda t, y: sig, bm, noise="additive", sde_type=sde_type)
    return term, y0, exact


DTS = [2 ** -k for k in range(2, 7)]

CASES = [  # (method, problem, sde_type, theoretical strong order, options)
    ("euler", gbm, "ito", 0.5, None),
    ("euler", ou, "ito", 1.0, None),
    ("euler", scalar_gbm, "ito", 0.5, None),
    ("euler", general_commutative, "ito", 0.5, None),
    ("milstein", gbm, "ito", 1.0, None),
    ("milstein", gbm, "ito", 1.0, {"grad_free": True}),
    ("milstein", gbm, "stratonovich", 1.0, None),
    ("milstein", gbm, "stratonovich", 1.0, {"grad_free": True}),
    ("milstein", scalar_gbm, "ito", 1.0, None),
    ("srk", gbm, "ito", 1.5, None),
    ("srk", scalar_gbm, "ito", 1.5, None),
    # linear drift with additive noise: the terms limiting SRA1 to 1.5 involve f'' and vanish -> order 2 (measured 2.06)
    ("srk", ou, "ito", 2.0, None),
    ("heun", gbm, "stratonovich", 1.0, None),
    ("heun", general_commutative, "stratonovich", 1.0, None),
    ("midpoint", gbm, "stratonovich", 1.0, None),
    ("midpoint", scalar_gbm, "stratonovich", 1.0, None),
    ("euler_heun", gbm, "stratonovich", 1.0, None),
    ("euler_heun", general_commutative, "stratonovich", 1.0, None),
    ("log_ode", gbm, "stratonovich", 1.0, None),
    ("log_ode", general_commutative, "stratonovich", 1.0, None),
    ("reversible_heun", ou, "stratonovich", 1.0, None),
    # torchsde states 0.5 for non-additive noise (the general case); on diagonal (commutative) noise it is 1.0
    ("reversible_heun", gbm, "stratonovich", 1.0, None),
]


@pytest.mark.parametrize("method,problem,sde_type,order,opts", CASES,
                         ids=[f"{c[0]}-{c[1].__name__}-{c[2]}{'-gradfree' if c[4] else ''}" for c in CASES])
def test_strong_order(method, problem, sde_type, order, opts):
    """Mean |y_N - y(1)| over 1000 paths at dt = 1/4 .. 1/64: the fitted slope is within 0.15 of the order."""
    term, y0, exact = problem(sde_type)
    errs = strong_errors(term, y0, exact, method, DTS, solver_options=opts)
    s = slope(DTS, errs)
    assert abs(s - order) < 0.15, (s, errs)


def test_euler_weak_order():
    """|E y_N - E y(1)| for GBM: E y_N - E y(1) estimated as the mean of y_N - y(1) on the same paths (the exact
    solution as a control variate: E y(1) = e^mu is known, and the difference has a small variance); slope 1."""
    bm = GridBrownian((20000, 1), levels=6, seed=7)
    mu, sig = 1.0, 0.5
    term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: sig * y, bm, noise="diagonal")
    y0 = torch.ones(20000, 1, dtype=F64)
    exact = torch.exp(torch.tensor(mu - sig ** 2 / 2) + sig * bm.W[-1])
    dts = [2 ** -k for k in range(3, 7)]
    errs = []
    for dt in dts:
        sol = neurodyn.solve(term, y0, torch.tensor([0.0, 1.0], dtype=F64), method="euler", step_size=dt)
        errs.append(abs(float((sol.ys[-1] - exact).mean())))
    # the discrete expectation is (1 + mu dt)^(1/dt): the estimate is within Monte Carlo noise of it
    for dt, e in zip(dts, errs):
        assert abs(e - (math.exp(mu) - (1 + mu * dt) ** (1 / dt))) < 0.2 * e
    assert abs(slope(dts, errs) - 1.0) < 0.15, errs


# ---------------------------------------------------------------------------------------------------------------
# torchsde on the same Brownian increments
# ---------------------------------------------------------------------------------------------------------------
class _TSDE(torch.nn.Module):
    def __init__(self, noise, sde_type):
        super().__init__()
        self.noise_type, self.sde_type = noise, sde_type
        self.a = torch.tensor([[0.3, -0.5, 0.2]], dtype=F64)
        self.b = torch.tensor([[0.4, 0.6, -0.3]], dtype=F64)
        self.S = torch.tensor([[0.3, -0.2], [0.1, 0.4], [0.2, 0.1]], dtype=F64)

    def f(self, t, y):
        return self.a * torch.sin(y) + 0.1 * t

    def g(self, t, y):
        if self.noise_type == "diagonal":
            return self.b * torch.cos(y)
        if self.noise_type == "general":
            return torch.tanh(y).unsqueeze(-1) * self.S + 0.1
        return torch.diag_embed(self.b.expand(y.shape[0], 3))  # additive, (batch, 3, 3)


TS_CASES = [("euler", "ito", "diagonal", "none"), ("milstein", "ito", "diagonal", "none"),
            ("srk", "ito", "diagonal", "space-time"), ("srk", "ito", "additive", "space-time"),
            ("heun", "stratonovich", "diagonal", "none"), ("midpoint", "stratonovich", "general", "none"),
            ("euler_heun", "stratonovich", "general", "none"), ("milstein", "stratonovich", "diagonal", "none"),
            ("log_ode", "stratonovich", "general", "foster"), ("reversible_heun", "stratonovich", "general", "none"),
            ("euler", "ito", "general", "none")]


@pytest.mark.parametrize("source", ["torchsde", "neurodyn"])
@pytest.mark.parametrize("method,sde_type,noise,levy", TS_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in TS_CASES])
def test_agrees_with_torchsde(method, sde_type, noise, levy, source):
    """Both libraries on one Brownian path (torchsde's BrownianInterval, or neurodyn's, which torchsde accepts as
    bm), fixed dt: the same solution to rounding (torchsde's Levy-area conventions included: srk, log_ode)."""
    import torchsde

    sde = _TSDE(noise, sde_type)
    m = 2 if noise == "general" else 3
    if source == "torchsde":
        tbm = torchsde.BrownianInterval(0.0, 1.0, size=(4, m), dtype=F64, levy_area_approximation=levy, entropy=11)
        bm = TorchsdePath(tbm, levy)
    else:
        tbm = bm = BrownianInterval(0.0, 1.0, shape=(4, m), dtype=F64, levy_area=levy, entropy=11)
    y0 = torch.tensor([[0.1, 0.5, -0.3], [1.0, -0.2, 0.4], [0.0, 0.3, 0.3], [-0.7, 0.2, 0.9]], dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    ys_ts = torchsde.sdeint(sde, y0, ts, bm=tbm, method=method, dt=1 / 32)
    term = neurodyn.sde_term(sde.f, sde.g, bm, noise=noise, sde_type=sde_type)
    sol = neurodyn.solve(term, y0, ts, method=method, step_size=1 / 32)
    torch.testing.assert_close(sol.ys, ys_ts, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# Fused forms, term kinds, rejections
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,sde_type", [("euler", "ito"), ("milstein", "ito"), ("srk", "ito"),
                                             ("heun", "stratonovich"), ("midpoint", "stratonovich"),
                                             ("euler_heun", "stratonovich"), ("reversible_heun", "stratonovich"),
                                             ("log_ode", "stratonovich")])
def test_fused_forms_bitwise_equal(method, sde_type):
    """f_and_g, g_prod and f_and_g_prod (torchsde's fused forms) give the plain form's solution bit for bit, fixed
    and adaptive."""
    bm = GridBrownian((5, 3), levels=9, seed=9)
    a = torch.tensor([0.3, -0.5, 0.2], dtype=F64)

    def f(t, y):
        return a * torch.sin(y) + t

    def g(t, y):
        return 0.4 * torch.cos(y)

    def f_and_g(t, y):
        return f(t, y), g(t, y)

    def g_prod(t, y, v):
        return g(t, y) * v

    def f_and_g_prod(t, y, v):
        return f(t, y), g(t, y) * v

    y0 = torch.linspace(-1, 1, 15, dtype=F64).view(5, 3)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    plain = neurodyn.sde_term(f, g, bm, noise="diagonal", sde_type=sde_type)
    fused = neurodyn.sde_term(f, g, bm, noise="diagonal", sde_type=sde_type, f_and_g=f_and_g, g_prod=g_prod,
                              f_and_g_prod=f_and_g_prod)
    only_fused = neurodyn.sde_term(None, None, bm, noise="diagonal", sde_type=sde_type, f_and_g=f_and_g,
                                   g_prod=g_prod, f_and_g_prod=f_and_g_prod)
    for kw in ({"step_size": 2 ** -6},):
        a_ = neurodyn.solve(plain, y0, ts, method=method, **kw)
        b_ = neurodyn.solve(fused, y0, ts, method=method, **kw)
        c_ = neurodyn.solve(only_fused, y0, ts, method=method, **kw)
        assert torch.equal(a_.ys, b_.ys) and torch.equal(a_.ys, c_.ys)
        assert b_.stats["nfe"] <= a_.stats["nfe"]


def test_multiterm_form_equals_sde_term():
    bm = GridBrownian((3, 2), levels=6, seed=3)
    f, g = (lambda t, y: -y), (lambda t, y: 0.5 * y)
    y0 = torch.ones(3, 2, dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    a = neurodyn.solve(neurodyn.sde_term(f, g, bm, noise="diagonal"), y0, ts, method="euler", step_size=1 / 16)
    b = neurodyn.solve(MultiTerm(ODETerm(f), ControlTerm(g, bm, noise="diagonal", sde_type="ito")), y0, ts,
                       method="euler", step_size=1 / 16)
    assert torch.equal(a.ys, b.ys)
    # the same name on an ODE is the ODE's Euler: untouched
    ode = neurodyn.solve(f, y0, ts, method="euler", step_size=1 / 16)
    torch.testing.assert_close(ode.ys[-1], y0 * (15 / 16) ** 16)


def _bad(match, term, method, **kw):
    with pytest.raises(neurodyn.InputError, match=match):
        neurodyn.solve(term, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method, **kw)


def test_rejections_before_work():
    calls = []
    bm = GridBrownian((2, 2), levels=4)

    def f(t, y):
        calls.append(1)
        return -y

    strat = neurodyn.sde_term(f, lambda t, y: y, bm, noise="diagonal", sde_type="stratonovich")
    ito = neurodyn.sde_term(f, lambda t, y: y, bm, noise="diagonal", sde_type="ito")
    general = neurodyn.sde_term(f, lambda t, y: y.unsqueeze(-1).expand(2, 2, 2), bm, noise="general")
    _bad("integrates ito SDEs, but this SDE is stratonovich.*heun", strat, "euler", step_size=0.25)
    _bad("integrates ito SDEs, but this SDE is stratonovich", strat, "srk", step_size=0.25)
    _bad("integrates stratonovich SDEs, but this SDE is ito.*euler, milstein, srk", ito, "heun", step_size=0.25)
    _bad("not 'general'.*euler", general, "milstein", step_size=0.25)
    _bad("not 'general'", general, "srk", step_size=0.25)
    nolevy = neurodyn.sde_term(f, lambda t, y: y, TorchsdePath(None, "none"), noise="diagonal")
    _bad("levy_area='space-time'", nolevy, "srk", step_size=0.25)
    nolevy_s = neurodyn.sde_term(f, lambda t, y: y, TorchsdePath(None, "space-time"), noise="diagonal",
                                 sde_type="stratonovich")
    _bad("levy_area='davie'", nolevy_s, "log_ode", step_size=0.25)
    _bad("adjoint_method='srk'.*midpoint, heun, euler_heun", ito, "euler", step_size=0.25, gradient="adjoint",
         adjoint_method="srk")
    _bad("not implemented yet", ito, "euler", step_size=0.25, gradient="interpolated")
    _bad("interp='hermite'", ito, "euler", step_size=0.25, interp="hermite")
    _bad("integrates 'ode', 'sde' terms|methods that do: .*milstein", ito, "dopri5")
    _bad("must be the state's shape|must be", neurodyn.sde_term(f, lambda t, y: y[:, :1], bm, noise="diagonal"),
         "euler", step_size=0.25)
    _bad("solver option", ito, "euler", step_size=0.25, solver_options={"grad_free": True})
    with pytest.raises(neurodyn.InputError, match="plain vector field"):
        neurodyn.solve(f, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="milstein")
    with pytest.raises(neurodyn.InputError, match="noise must be one of"):
        ControlTerm(lambda t, y: y, bm, noise="diag")
    assert calls == []  # nothing was integrated (the drift never ran)
    t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    with pytest.raises(neurodyn.InputError, match="output times"):
        neurodyn.solve(ito, torch.ones(2, 2, dtype=F64), t, method="euler", step_size=0.25)


def test_adaptive_euler_warns_on_multiplicative_noise():
    bm = BrownianInterval(0.0, 1.0, shape=(4, 2), dtype=F64, entropy=1)
    y0 = torch.ones(4, 2, dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    term = neurodyn.sde_term(lambda t, y: -y, lambda t, y: 0.5 * y, bm, noise="diagonal")
    with pytest.warns(UserWarning, match="not guaranteed to converge"):
        neurodyn.solve(term, y0, ts, method="euler", rtol=1e-2, atol=1e-2)
    add = neurodyn.sde_term(lambda t, y: -y, lambda t, y: torch.full_like(y, 0.5), bm, noise="additive")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neurodyn.solve(add, y0, ts, method="euler", rtol=1e-2, atol=1e-2)  # additive: no warning
        neurodyn.solve(term, y0, ts, method="euler", step_size=0.25)  # fixed steps: no warning


# ---------------------------------------------------------------------------------------------------------------
# Adaptive stepping
# ---------------------------------------------------------------------------------------------------------------
def test_adaptive_milstein_error_follows_tolerance():
    """Step doubling through the PID controller, on a Brownian interval (any query time): the error against the
    closed form falls with the tolerance while the steps grow; every solve succeeds."""
    bm = BrownianInterval(0.0, 1.0, shape=(8, 2), dtype=F64, entropy=5)
    mu = torch.tensor([MU, -0.3], dtype=F64)
    sig = torch.tensor([SIG, 0.8], dtype=F64)
    term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: sig * y, bm, noise="diagonal")
    y0 = torch.ones(8, 2, dtype=F64)
    exact = torch.exp(mu - sig ** 2 / 2 + sig * bm(0.0, 1.0))
    errs, steps = [], []
    for tol in (1e-2, 1e-3, 1e-4):  # (measured: 0.34 / 0.12 / 0.042 with 7 / 27 / 110 steps)
        sol = neurodyn.solve(term, y0, torch.tensor([0.0, 1.0], dtype=F64), method="milstein", rtol=tol, atol=tol)
        assert sol.status == "success"
        errs.append(float((sol.ys[-1] - exact).abs().max()))
        steps.append(sol.stats["steps"])
    assert errs[2] < errs[1] < errs[0] and steps[0] < steps[1] < steps[2]
    assert errs[2] < 0.08


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------
class _Drift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T)


class _Diff(torch.nn.Module):
    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.c = torch.nn.Parameter(torch.tensor([0.5, 0.3], dtype=F64))

    def forward(self, t, y):
        g = self.c * torch.sigmoid(y)
        return g if self.noise == "diagonal" else g.unsqueeze(-1) * torch.tensor([1.0, -0.5], dtype=F64)


@pytest.mark.parametrize("method,sde_type,noise", [("euler", "ito", "diagonal"), ("milstein", "ito", "diagonal"),
                                                   ("srk", "ito", "diagonal"), ("heun", "stratonovich", "general"),
                                                   ("reversible_heun", "stratonovich", "general"),
                                                   ("log_ode", "stratonovich", "general")])
def test_direct_checkpoint_finite_differences(method, sde_type, noise):
    """d loss / d (y0, drift parameters, diffusion parameters): checkpoint equals direct to rounding; both equal
    central finite differences on the fixed Brownian path."""
    bm = GridBrownian((3, 2), levels=7, seed=4)
    drift, diff = _Drift(), _Diff(noise)
    term = neurodyn.sde_term(drift, diff, bm, noise=noise, sde_type=sde_type)
    y0 = torch.tensor([[0.2, -0.4], [0.5, 0.1], [-0.3, 0.8]], dtype=F64, requires_grad=True)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    params = [y0, drift.w, diff.c]

    def loss(gradient):
        sol = neurodyn.solve(term, y0, ts, method=method, step_size=2 ** -4, gradient=gradient, checkpoints=3)
        return (sol.ys ** 2).sum() + sol.ys[-1].sin().sum()

    gd = torch.autograd.grad(loss("direct"), params)
    gc = torch.autograd.grad(loss("checkpoint"), params)
    for a, b in zip(gd, gc):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(params, gd):
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                lp = float(loss("direct"))
                flat[i] = old - eps
                lm = float(loss("direct"))
                flat[i] = old
                assert abs((lp - lm) / (2 * eps) - float(g.view(-1)[i])) < 1e-6 * (1 + abs(float(g.view(-1)[i])))


# ---------------------------------------------------------------------------------------------------------------
# Statuses and partial results
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_non_finite_keeps_partial_solution(adaptive):
    """dy = y^2 dt + 0.1 y dW from y0 = 1 blows up near t = 1: the solve stops non-finite, the outputs before the
    blow-up are kept (and match a fixed-step solve there), the rest is NaN."""
    if adaptive:
        bm = BrownianInterval(0.0, 2.0, shape=(1, 1), dtype=F64, entropy=0)
    else:
        bm = GridBrownian((1, 1), levels=12, seed=0, T=2.0)
    term = neurodyn.sde_term(lambda t, y: y * y, lambda t, y: 0.1 * y, bm, noise="diagonal", sde_type="stratonovich")
    ts = torch.linspace(0, 2, 9, dtype=F64)
    kw = {"rtol": 1e-3, "atol": 1e-3, "first_step": 2 ** -8} if adaptive else {"step_size": 2 ** -11}
    sol = neurodyn.solve(term, torch.ones(1, 1, dtype=F64), ts, method="heun", on_failure="return", **kw)
    # fixed steps: the state turns NaN/inf; adaptive: the controller shrinks the step at the blow-up until it
    # underflows (as for an ODE blowing up)
    assert sol.status == ("step_size_underflow" if adaptive else "non_finite")
    k = sol.n_valid
    assert 2 <= k < 9 and torch.isfinite(sol.ys[:k]).all() and torch.isnan(sol.ys[k:]).all()
    assert sol.t_final < 2.0
    with pytest.raises(neurodyn.StepSizeUnderflow if adaptive else neurodyn.NonFiniteError) as err:
        neurodyn.solve(term, torch.ones(1, 1, dtype=F64), ts, method="heun", **kw)
    assert err.value.solution.n_valid == k


def _adaptive_solve(method, sde_type, tol, estimate):
    """An adaptive solve of a diagonal-noise SDE on a fixed Brownian path; returns the term, y0, ts, the solution
    and its accepted steps ``[(t, h), ...]``."""
    bm = BrownianInterval(0.0, 1.0, shape=(6, 2), dtype=F64, entropy=3, levy_area="space-time")
    term = neurodyn.sde_term(lambda t, y: torch.sin(y) - 0.5 * y, lambda t, y: 0.6 * torch.cos(y) + 0.2, bm,
                             noise="diagonal", sde_type=sde_type)
    y0 = torch.linspace(-1, 1, 12, dtype=F64).view(6, 2)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    grid = []
    sol = neurodyn.solve(term, y0, ts, method=method, rtol=tol, atol=tol, solver_options={"error_estimate": estimate},
                         step_callbacks={"accept": lambda t, y, h: grid.append((t, h))})
    return term, y0, ts, sol, grid


@pytest.mark.parametrize("method,sde_type", [("srk", "ito"), ("heun", "stratonovich")])
def test_rejected_steps_leave_the_path_unchanged(method, sde_type):
    """An adaptive solve with rejected steps equals a fixed-step solve over its accepted half steps (step doubling
    keeps the two halves): the rejected attempts' queries did not change the Brownian path. Not bit for bit: the
    fixed solve's landing steps end within an ulp of the adaptive ones' times, and W moves ~sqrt(ulp) ~ 1e-9 there
    (measured difference ~1e-7); another path differs by > 1e-2."""
    term, y0, ts, sol, grid = _adaptive_solve(method, sde_type, 1e-4, "doubling")
    assert sol.status == "success" and sol.stats["rejected"] > 0
    stops = sorted({t + 0.5 * h for t, h in grid} | {t + h for t, h in grid[:-1]})
    fixed = neurodyn.solve(term, y0, ts, method=method, step_size=1.0, step_t=stops)
    assert fixed.stats["steps"] == 2 * len(grid)
    torch.testing.assert_close(fixed.ys, sol.ys, rtol=0, atol=1e-6)
    other = BrownianInterval(0.0, 1.0, shape=(6, 2), dtype=F64, entropy=4, levy_area="space-time")
    term2 = neurodyn.sde_term(term.terms[0].func, term.terms[1].vector_field, other, noise="diagonal",
                              sde_type=sde_type)
    fixed2 = neurodyn.solve(term2, y0, ts, method=method, step_size=1.0, step_t=stops)
    assert float((fixed2.ys - sol.ys).abs().max()) > 1e-2


def test_levy_area_rejection_with_brownian_interval():
    bm = BrownianInterval(0.0, 1.0, shape=(2, 2), dtype=F64, entropy=0)  # levy_area="none"
    ito = neurodyn.sde_term(lambda t, y: -y, lambda t, y: y, bm, noise="diagonal")
    strat = neurodyn.sde_term(lambda t, y: -y, lambda t, y: y, bm, noise="diagonal", sde_type="stratonovich")
    _bad("built with levy_area='none'.*levy_area='space-time'", ito, "srk", step_size=0.25)
    _bad("built with levy_area='none'.*levy_area='davie'", strat, "log_ode", step_size=0.25)


def test_checkpoint_refuses_a_captured_diffusion_tensor():
    """A diffusion closure over a tensor requiring grad that params lacks would get no gradient from the checkpoint
    replay: refused before work (solve checks the diffusion as it checks the drift; the replay watches the
    diffusion's evaluations too); with params=[c] it matches direct."""
    bm = GridBrownian((2, 2), levels=5, seed=1)
    c = torch.tensor(0.4, dtype=F64, requires_grad=True)
    term = neurodyn.sde_term(lambda t, y: -y, lambda t, y: c * torch.cos(y), bm, noise="diagonal")
    y0 = torch.ones(2, 2, dtype=F64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(neurodyn.InputError, match="not among its parameters"):  # before work (solve checks g too)
        neurodyn.solve(term, y0, ts, method="euler", step_size=1 / 16, gradient="checkpoint")
    gd = torch.autograd.grad(neurodyn.solve(term, y0, ts, method="euler", step_size=1 / 16).ys.sum(), (y0, c))
    sol = neurodyn.solve(term, y0, ts, method="euler", step_size=1 / 16, gradient="checkpoint", params=[c])
    gc = torch.autograd.grad(sol.ys.sum(), (y0, c))
    for a, b in zip(gd, gc):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_dense_output_and_events_are_linear_between_steps():
    """dy = dt + 0.3 dW (additive): Euler is exact at the step ends; between them the dense solution is the linear
    interpolant (what the stepper declares), and an event y = 1 is located on it."""
    bm = BrownianInterval(0.0, 2.0, shape=(1, 1), dtype=F64, entropy=2)
    term = neurodyn.sde_term(lambda t, y: torch.ones_like(y), lambda t, y: torch.full_like(y, 0.3), bm,
                             noise="additive")
    sol = neurodyn.solve(term, torch.zeros(1, 1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method="euler",
                         step_size=0.01, event_fn=lambda t, y: y - 1.0, dense=True)
    assert sol.status == "event"
    te = float(sol.event_t)
    k = int(te / 0.01)
    ya = 0.01 * k + 0.3 * float(bm.increment(0.0, 0.01 * k))
    yb = 0.01 * (k + 1) + 0.3 * float(bm.increment(0.0, 0.01 * (k + 1)))
    assert ya < 1.0 <= yb or yb <= 1.0 < ya
    assert abs(te - (0.01 * k + 0.01 * (1.0 - ya) / (yb - ya))) < 1e-8  # the event root finder's tolerance
    mid = float(sol.evaluate(torch.tensor(0.005, dtype=F64)))
    assert abs(mid - 0.5 * (0.01 + 0.3 * float(bm.increment(0.0, 0.01)))) < 1e-14


@pytest.mark.parametrize("method,estimate", [("milstein", "auto"), ("milstein", "embedded"), ("srk", "auto")])
def test_adaptive_checkpoint_equals_direct(method, estimate):
    """Adaptive steps with rejections: the checkpoint replay of the accepted steps (step doubling or the embedded
    step again, milstein's embedded one carrying its end drift as the next step's first, the same Brownian interval)
    gives direct's gradient to rounding."""
    bm = BrownianInterval(0.0, 1.0, shape=(3, 2), dtype=F64, entropy=2, levy_area="space-time")
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    c = torch.tensor(0.4, dtype=F64, requires_grad=True)
    term = neurodyn.sde_term(lambda t, y: -w * torch.sin(y), lambda t, y: c * torch.cos(y), bm, noise="diagonal")
    y0 = torch.ones(3, 2, dtype=F64, requires_grad=True)
    ts = torch.linspace(0, 1, 4, dtype=F64)
    grads = []
    for gradient in ("direct", "checkpoint"):
        tol = 1e-3 if method == "milstein" else 1e-4
        sol = neurodyn.solve(term, y0, ts, method=method, rtol=tol, atol=tol, gradient=gradient, params=[w, c],
                             checkpoints=3, solver_options={"error_estimate": estimate})
        assert sol.stats["rejected"] > 0
        grads.append(torch.autograd.grad(sol.ys.sum(), (y0, w, c)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Embedded error estimates
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,sde_type,levy", [("milstein", "ito", "none"), ("srk", "ito", "space-time"),
                                                  ("heun", "stratonovich", "none"),
                                                  ("midpoint", "stratonovich", "none"),
                                                  ("euler_heun", "stratonovich", "none"),
                                                  ("log_ode", "stratonovich", "davie")])
def test_embedded_estimate_tracks_true_local_error(method, sde_type, levy):
    """One step of GBM (closed form on the step's own Brownian increment) with the embedded estimate ``est = y1 -
    y_low``: ``est`` equals the lower-order solution's true local error ``exact - y_low`` up to the method's own
    local error, so ``mean|est - (exact - y_low)| / mean|exact - y_low|`` falls like ``h^(p - p_low) = h^0.5``
    (measured slopes 0.49-0.51) and is small at small ``h``; the estimate costs no evaluation beyond the step
    (milstein: one drift evaluation at the step's end, which the next step starts from)."""
    from neurodyn.core.term import ODETerm as Bound
    from neurodyn.solvers.sde import make_sde

    n = 4000
    mu, sig = 0.4, 0.7
    y0 = torch.ones(n, 1, dtype=F64)
    rels, hs = [], [2.0 ** -k for k in (4, 7, 10)]
    for h in hs:
        bm = BrownianInterval(0.0, h, shape=(n, 1), dtype=F64, entropy=11, levy_area=levy)
        term = neurodyn.sde_term(lambda t, y: mu * y, lambda t, y: sig * y, bm, noise="diagonal", sde_type=sde_type)
        bound = Bound(term.rate, (n, 1), F64, torch.device("cpu"))
        stepper = make_sde(method).bind(error_estimate="embedded")
        stepper.check_term(term, y0, torch.tensor(0.0, dtype=F64), True)
        assert stepper.embedded
        flat = y0.reshape(1, -1)
        k1 = bound(0.0, flat)
        nfe0, nfg0 = bound.nfe, stepper.stats["nfe_diffusion"]
        y1, _, err = stepper.step(bound, 0.0, flat, h, k1)
        per_step = (bound.nfe - nfe0, stepper.stats["nfe_diffusion"] - nfg0)
        fixed = make_sde(method)
        fixed.check_term(term, y0, torch.tensor(0.0, dtype=F64), True)
        fixed.fixed_step()
        nfe0, nfg0 = bound.nfe, fixed.stats["nfe_diffusion"]
        y1_fixed, _, _ = fixed.step(bound, 0.0, flat, h, k1)
        # the estimate is free (milstein: its drift at the step's end is the next step's first, FSAL)
        assert (bound.nfe - nfe0 + int(stepper.fsal), fixed.stats["nfe_diffusion"] - nfg0) == per_step
        assert torch.equal(y1, y1_fixed)  # the step itself is the solution
        W = bm(0.0, h)
        drift = mu if sde_type == "stratonovich" else mu - sig ** 2 / 2
        exact = torch.exp(drift * h + sig * W).reshape(1, -1)
        est = err * h
        y_low = y1 - est
        true_low = exact - y_low
        rels.append(float((est - true_low).abs().mean() / true_low.abs().mean()))  # = mean|y1 - exact| / ...
    s = slope(hs, rels)
    assert abs(s - 0.5) < 0.15, (s, rels)
    assert rels[-1] < 0.1


@pytest.mark.parametrize("method,sde_type", [("milstein", "ito"), ("srk", "ito"), ("heun", "stratonovich")])
def test_embedded_adaptive_path_and_cost(method, sde_type):
    """Adaptive steps with the embedded estimate: the accepted steps are plain steps of the method (a fixed-step
    solve on the accepted grid gives the same solution: rejected attempts did not change the Brownian path), each
    attempt costs one step's evaluations (drift: one per accepted step for milstein and heun, whose retries reuse
    the step-start drift; milstein's rejected attempts one drift evaluation each)."""
    term, y0, ts, sol, grid = _adaptive_solve(method, sde_type, 1e-3, "embedded")
    assert sol.status == "success" and sol.stats["rejected"] > 0
    fixed = neurodyn.solve(term, y0, ts, method=method, step_size=1.0, step_t=[t + h for t, h in grid[:-1]])
    assert fixed.stats["steps"] == len(grid)
    torch.testing.assert_close(fixed.ys, sol.ys, rtol=0, atol=1e-6)
    attempts = sol.stats["steps"] + sol.stats["rejected"]
    per_attempt = fixed.stats["nfe_diffusion"] / fixed.stats["steps"]
    assert sol.stats["nfe_diffusion"] == per_attempt * attempts
    # the initial step size's drift evaluation, then per accepted step: heun two (its start, its predictor), milstein
    # one (its end: the next start); per rejected attempt one (heun: its predictor; milstein: its end)
    if method == "heun":
        assert sol.stats["nfe"] == 1 + 2 * sol.stats["steps"] + sol.stats["rejected"]
    elif method == "milstein":
        assert sol.stats["nfe"] == 2 + sol.stats["steps"] + sol.stats["rejected"]


def test_error_estimate_option_rejections():
    bm = BrownianInterval(0.0, 1.0, shape=(2, 2), dtype=F64, entropy=0)
    term = neurodyn.sde_term(lambda t, y: -y, lambda t, y: 0.3 * y, bm, noise="diagonal")
    y0 = torch.ones(2, 2, dtype=F64)
    ts = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(neurodyn.InputError, match="'auto', 'embedded' or 'doubling'"):
        neurodyn.solve(term, y0, ts, method="milstein", solver_options={"error_estimate": "richardson"})
    with pytest.raises(neurodyn.InputError, match="no embedded error estimate"):
        neurodyn.solve(term, y0, ts, method="euler", solver_options={"error_estimate": "embedded"})
    add = neurodyn.sde_term(lambda t, y: -y, lambda t, y: 0.3 * torch.ones_like(y), bm, noise="additive")
    with pytest.raises(neurodyn.InputError, match="not 'additive'"):
        neurodyn.solve(add, y0, ts, method="milstein", solver_options={"error_estimate": "embedded"})
    sol = neurodyn.solve(add, y0, ts, method="milstein", rtol=1e-3, atol=1e-3)  # auto: step doubling
    assert sol.status == "success"


@pytest.mark.parametrize("method,sde_type,levy", [("srk", "ito", "space-time"), ("heun", "stratonovich", "none"),
                                                  ("milstein", "ito", "none"), ("euler_heun", "stratonovich", "none"),
                                                  ("midpoint", "stratonovich", "none")])
@pytest.mark.parametrize("step_size", [0.07, None])
def test_stages_at_a_jump_take_the_left_limit(method, sde_type, levy, step_size):
    """A step landing on a jump time (``jump_t``) evaluates its end-of-step stages just before the jump, the next
    step just past it (as the ODE steppers do): with a drift that jumps from a to b at t = 0.3 and constant noise,
    every method here integrates each step exactly, so y(1) = y0 + 0.3 a + 0.7 b + sigma W(1) to rounding, fixed
    and adaptive steps alike. (Stages at t + h evaluated at the jump itself took b there: srk's error was h / 6
    (b - a) per jump, the plateau of its error on benchmarks/bench_sde.py's latent SDE.)"""
    a = torch.tensor([1.0, -2.0], dtype=F64)
    b = torch.tensor([-3.0, 0.5], dtype=F64)
    sigma = torch.tensor([0.3, 0.2], dtype=F64)
    bm = BrownianInterval(0.0, 1.0, shape=(4, 2), dtype=F64, entropy=3, levy_area=levy)
    y0 = torch.ones(4, 2, dtype=F64)
    term = neurodyn.sde_term(lambda t, y: torch.where(t < 0.3, a, b).expand_as(y),
                             lambda t, y: sigma.expand_as(y), bm, sde_type=sde_type)
    kw = {"step_size": step_size} if step_size else {"rtol": 1e-6, "atol": 1e-6}
    sol = neurodyn.solve(term, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method, jump_t=[0.3], **kw)
    exact = y0 + 0.3 * a + 0.7 * b + sigma * bm.increment(0.0, 1.0)
    torch.testing.assert_close(sol.ys[-1], exact, rtol=0, atol=1e-12)
