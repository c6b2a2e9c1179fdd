"""Regularisers: every penalty against an independent value (scipy quadrature of the exact solution,
closed forms, jacrev along the trajectory), gradients through every penalty, STEER end times."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

import neurodyn
from neurodyn.errors import InputError
from neurodyn.regularizers import RegularizedField, regularized_solve, steer_time

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp

D64 = torch.float64
TIGHT = dict(method="tsit5", rtol=1e-10, atol=1e-12)


def _A() -> np.ndarray:
    return np.array([[-0.3, 1.2, 0.0], [-0.8, -0.1, 0.4], [0.2, -0.5, -0.6]])


class Linear(nn.Module):
    """f(t, y) = y A^T with A a parameter (a batch of rows, or one 1-d state)."""

    def __init__(self, A: np.ndarray):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(A, dtype=D64))

    def forward(self, t, y):
        return y @ self.A.T


def _quad_exact(A: np.ndarray, y0: np.ndarray, T: float, integrand) -> float:
    """int_0^T integrand(y(t)) dt on the exact solution y(t) = expm(A t) y0 (scipy quad)."""
    val, _ = scipy.integrate.quad(lambda s: integrand(scipy.linalg.expm(A * s) @ y0), 0.0, T,
                                  epsabs=1e-13, epsrel=1e-12, limit=200)
    return val


# ----------------------------------------------------------------------------------------------
# Kinetic energy
# ----------------------------------------------------------------------------------------------
def test_kinetic_equals_quadrature_of_exact_solution_linear_field():
    A = _A()
    y0 = np.array([[1.0, -0.5, 0.3], [0.2, 0.7, -1.1]])
    T = 2.0
    t = torch.tensor([0.0, 1.0, T], dtype=D64)
    zs, reg, pens = regularized_solve(Linear(A), torch.tensor(y0), t, kinetic=0.5, **TIGHT)
    exact = [_quad_exact(A, y0[b], T, lambda y: float(np.sum((A @ y) ** 2))) for b in range(2)]
    assert pens["kinetic"].shape == (2,)
    np.testing.assert_allclose(pens["kinetic"].detach().numpy(), exact, rtol=1e-8)
    # the state itself is untouched by the augmentation
    np.testing.assert_allclose(zs[-1].detach().numpy(), y0 @ scipy.linalg.expm(A * T).T, rtol=1e-8, atol=1e-10)
    assert zs.shape == (3, 2, 3)
    assert reg.item() == pytest.approx(0.5 * float(np.mean(exact)), rel=1e-8)


def test_kinetic_one_dimensional_state_and_backward_time():
    A = _A()
    y0 = np.array([0.4, -1.0, 0.6])
    exact = _quad_exact(A, y0, 1.5, lambda y: float(np.sum((A @ y) ** 2)))
    _, _, pens = regularized_solve(Linear(A), torch.tensor(y0), torch.tensor([0.0, 1.5], dtype=D64), kinetic=1.0,
                                   **TIGHT)
    assert pens["kinetic"].shape == ()
    assert pens["kinetic"].item() == pytest.approx(exact, rel=1e-8)
    # Backward in time from y(1.5) to 0: the same integral, reported positive.
    y1 = torch.tensor(scipy.linalg.expm(A * 1.5) @ y0)
    _, _, back = regularized_solve(Linear(A), y1, torch.tensor([1.5, 0.0], dtype=D64), kinetic=1.0, **TIGHT)
    assert back["kinetic"].item() == pytest.approx(exact, rel=1e-7)


# ----------------------------------------------------------------------------------------------
# Jacobian Frobenius norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_mean_over_draws_equals_frobenius_linear(noise):
    A = _A()
    B, T = 2000, 1.5
    frob2 = float(np.sum(A ** 2))
    field = RegularizedField(Linear(A), jacobian=1.0, noise=noise, generator=torch.Generator().manual_seed(3))
    z0 = torch.randn(B, 3, dtype=D64, generator=torch.Generator().manual_seed(4))
    # each sample carries its own noise row: B independent draws in one solve
    _, _, pens = regularized_solve(field, z0, torch.tensor([0.0, T], dtype=D64), method="tsit5", rtol=1e-6, atol=1e-8)
    est = pens["jacobian"].detach()
    # per draw: ||eps^T A||^2 T exactly (df/dz = A is constant along the trajectory)
    eps = field.eps
    per_draw = ((eps @ torch.tensor(A)) ** 2).sum(-1) * T
    torch.testing.assert_close(est, per_draw, rtol=1e-9, atol=1e-12)
    # the mean over the draws is ||A||_F^2 T within its standard error (4 sigma, fixed seed)
    se = float(est.std()) / math.sqrt(B)
    assert abs(float(est.mean()) - frob2 * T) < 4 * se
    assert se < 0.05 * frob2 * T


def test_hutchinson_resamples_per_call_and_exact_mode_is_exact():
    A = _A()
    T = 2.0
    t = torch.tensor([0.0, T], dtype=D64)
    field = RegularizedField(Linear(A), jacobian=1.0, generator=torch.Generator().manual_seed(0))
    z0 = torch.randn(2, 3, dtype=D64)
    a = regularized_solve(field, z0, t, **TIGHT)[2]["jacobian"]
    eps_a = field.eps.clone()
    b = regularized_solve(field, z0, t, **TIGHT)[2]["jacobian"]
    assert not torch.equal(eps_a, field.eps)
    assert not torch.allclose(a, b)
    _, _, ex = regularized_solve(Linear(A), z0, t, jacobian=1.0, estimator="exact", **TIGHT)
    torch.testing.assert_close(ex["jacobian"].detach(), torch.full((2,), float(np.sum(A ** 2)) * T, dtype=D64),
                               rtol=1e-10, atol=0)


def _mlp(seed=0, d=3, h=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, d)).double()


def test_exact_jacobian_mlp_equals_jacrev_quadrature():
    f = _mlp()
    z0 = torch.tensor([[0.5, -1.0, 0.3], [1.2, 0.1, -0.7]], dtype=D64)
    T = 1.0
    _, _, pens = regularized_solve(f, z0, torch.tensor([0.0, T], dtype=D64), jacobian=1.0, kinetic=1.0,
                                   estimator="exact", **TIGHT)
    # Truth: Gauss-Legendre quadrature of ||df/dz||_F^2 and ||f||^2 on a plain solve of the trajectory.
    x, w = np.polynomial.legendre.leggauss(24)
    nodes = torch.tensor(np.concatenate([[0.0], (x + 1) * T / 2]), dtype=D64)
    with torch.no_grad():
        ys = neurodyn.solve(lambda t, z: f(z), z0, nodes, **TIGHT).ys[1:]  # (24, 2, 3)
    jac = torch.stack([torch.stack([torch.func.jacrev(f)(ys[k, b]) for b in range(2)]) for k in range(24)])
    frob = jac.pow(2).sum((-1, -2)).detach().numpy()  # (24, 2)
    kin = f(ys).pow(2).sum(-1).detach().numpy()
    wq = w[:, None] * T / 2
    np.testing.assert_allclose(pens["jacobian"].detach().numpy(), (wq * frob).sum(0), rtol=1e-8)
    np.testing.assert_allclose(pens["kinetic"].detach().numpy(), (wq * kin).sum(0), rtol=1e-8)


def test_hutchinson_mean_equals_exact_mlp():
    f = _mlp(seed=1)
    B = 1500
    z0 = torch.tensor([[0.5, -1.0, 0.3]], dtype=D64).expand(B, 3).contiguous()  # one trajectory, B noise draws
    t = torch.tensor([0.0, 0.8], dtype=D64)
    kw = dict(method="tsit5", rtol=1e-7, atol=1e-9)
    _, _, ex = regularized_solve(f, z0[:1], t, jacobian=1.0, estimator="exact", **kw)
    _, _, hu = regularized_solve(f, z0, t, jacobian=1.0, noise="rademacher",
                                 generator=torch.Generator().manual_seed(5), **kw)
    est, exact = hu["jacobian"].detach(), ex["jacobian"].detach()[0].item()
    se = float(est.std()) / math.sqrt(B)
    assert abs(float(est.mean()) - exact) < 4 * se
    assert se < 0.05 * exact


# ----------------------------------------------------------------------------------------------
# TayNODE
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
def test_taylor_linear_equals_quadrature(order):
    A = _A()
    y0 = np.array([[1.0, -0.5, 0.3], [0.2, 0.7, -1.1]])
    T = 1.5
    Ak = np.linalg.matrix_power(A, order)
    _, _, pens = regularized_solve(Linear(A), torch.tensor(y0), torch.tensor([0.0, T], dtype=D64), taylor=1.0,
                                   taylor_order=order, **TIGHT)
    exact = [_quad_exact(A, y0[b], T, lambda y: float(np.sum((Ak @ y) ** 2))) for b in range(2)]
    np.testing.assert_allclose(pens["taylor"].detach().numpy(), exact, rtol=1e-8)


def test_taylor_order2_time_dependent_field_includes_df_dt():
    A = _A()
    b, om = np.array([0.5, -0.2, 0.8]), 3.0
    At, bt = torch.tensor(A), torch.tensor(b)
    f = lambda t, y: y @ At.T + bt * torch.cos(om * t)
    y0 = np.array([0.3, 1.0, -0.4])
    T = 2.0
    _, _, pens = regularized_solve(f, torch.tensor(y0), torch.tensor([0.0, T], dtype=D64), taylor=1.0, **TIGHT)
    # z'' = A f + df/dt = A (A y + b cos wt) - w b sin wt, on scipy's trajectory
    ref = scipy.integrate.solve_ivp(lambda s, y: A @ y + b * np.cos(om * s), (0, T), y0, method="DOP853",
                                    rtol=1e-13, atol=1e-14, dense_output=True)
    acc = lambda s: A @ (A @ ref.sol(s) + b * np.cos(om * s)) - om * b * np.sin(om * s)
    exact, _ = scipy.integrate.quad(lambda s: float(np.sum(acc(s) ** 2)), 0, T, epsabs=1e-13, epsrel=1e-12, limit=200)
    assert pens["taylor"].item() == pytest.approx(exact, rel=1e-8)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
class Scalar(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=D64))

    def forward(self, t, y):
        return self.a * y


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_gradients_of_each_penalty_match_closed_form(gradient):
    # y' = a y, y(0) = 1 on [0, 1]:  kinetic = a (e^{2a} - 1)/2,  jacobian (exact) = a^2,
    # taylor (K=2) = a^3 (e^{2a} - 1)/2, each differentiated in a by hand.
    a = 0.7
    e = math.exp(2 * a)
    truth = {
        "kinetic": (a * (e - 1) / 2, (e - 1) / 2 + a * e),
        "jacobian": (a * a, 2 * a),
        "taylor": (a ** 3 * (e - 1) / 2, 3 * a * a * (e - 1) / 2 + a ** 3 * e),
    }
    for name, (val, grad) in truth.items():
        m = Scalar(a)
        _, reg, pens = regularized_solve(m, torch.ones(1, dtype=D64), torch.tensor([0.0, 1.0], dtype=D64),
                                         estimator="exact", gradient=gradient, **{name: 1.0}, **TIGHT)
        reg.backward()
        assert pens[name].item() == pytest.approx(val, rel=1e-8), name
        assert m.a.grad.item() == pytest.approx(grad, rel=1e-6), (name, gradient)


def test_hutchinson_gradient_closed_form_adjoint():
    # jacobian penalty of y' = a y with noise eps: a^2 eps^2 T; d/da = 2 a eps^2 T (the same eps in the backward pass)
    m = Scalar(0.7)
    field = RegularizedField(m, jacobian=1.0, generator=torch.Generator().manual_seed(2))
    _, reg, pens = regularized_solve(field, torch.ones(1, dtype=D64), torch.tensor([0.0, 2.0], dtype=D64),
                                     gradient="adjoint", **TIGHT)
    reg.backward()
    eps2 = float(field.eps[0]) ** 2
    assert pens["jacobian"].item() == pytest.approx(0.49 * eps2 * 2.0, rel=1e-8)
    assert m.a.grad.item() == pytest.approx(2 * 0.7 * eps2 * 2.0, rel=1e-6)


def test_adjoint_agrees_with_direct_all_penalties_mlp():
    grads = {}
    for gradient in ("direct", "adjoint"):
        f = _mlp(seed=2)
        z0 = torch.tensor([[0.5, -1.0, 0.3], [1.2, 0.1, -0.7], [-0.3, 0.4, 0.9]], dtype=D64, requires_grad=True)
        field = RegularizedField(f, kinetic=0.1, jacobian=0.2, taylor=0.05, generator=torch.Generator().manual_seed(9))
        zs, reg, pens = regularized_solve(field, z0, torch.tensor([0.0, 1.0], dtype=D64), gradient=gradient,
                                          method="dopri5", rtol=1e-9, atol=1e-11)
        assert set(pens) == {"kinetic", "jacobian", "taylor"}
        for v in pens.values():
            assert bool((v > 0).all())
        if gradient == "direct":  # each penalty alone reaches every parameter tensor
            for name in pens:
                g = torch.autograd.grad(pens[name].sum(), list(f.parameters()), retain_graph=True)
                assert all(bool(torch.isfinite(x).all()) and float(x.abs().sum()) > 0 for x in g), name
        (zs[-1].pow(2).sum() + reg).backward()
        grads[gradient] = [p.grad.clone() for p in f.parameters()] + [z0.grad.clone()]
    for gd, ga in zip(grads["direct"], grads["adjoint"]):
        torch.testing.assert_close(ga, gd, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Layout, validation, STEER
# ----------------------------------------------------------------------------------------------
def test_augment_split_layout_and_validation():
    field = RegularizedField(lambda t, z: -z, kinetic=1.0, taylor=2.0)
    z0 = torch.arange(12.0).view(4, 3)
    s0 = field.augment(z0)
    assert s0.shape == (12 + 2 * 4,)
    z, pens = field.split(torch.stack([s0, s0]))
    assert torch.equal(z[1], z0) and set(pens) == {"kinetic", "taylor"} and pens["taylor"].shape == (2, 4)
    with pytest.raises(InputError):
        RegularizedField(lambda t, z: z, kinetic=-1.0)
    with pytest.raises(InputError):
        RegularizedField(lambda t, z: z, taylor=1.0, taylor_order=0)
    with pytest.raises(InputError):
        RegularizedField(lambda t, z: z, jacobian=1.0, estimator="bogus")
    with pytest.raises(InputError):
        RegularizedField(lambda t, z: z, kinetic=1.0).split(torch.zeros(5))
    with pytest.raises(InputError):
        regularized_solve(field, z0, torch.tensor([0.0, 1.0]), kinetic=1.0)
    _, reg, pens = regularized_solve(lambda t, z: -z, z0, torch.tensor([0.0, 1.0]))
    assert pens == {} and reg.item() == 0.0


def test_steer_time_range_and_use_with_neural_ode():
    g = torch.Generator().manual_seed(0)
    draws = np.array([steer_time(1.0, 0.5, g, t0=0.0) for _ in range(2000)])
    assert draws.min() >= 0.5 and draws.max() <= 1.5
    assert abs(draws.mean() - 1.0) < 4 * (1 / math.sqrt(12)) / math.sqrt(2000)  # uniform on [0.5, 1.5]
    assert draws.min() < 0.52 and draws.max() > 1.48
    seeded = lambda: torch.Generator().manual_seed(7)
    assert steer_time(1.0, 0.5, seeded()) == steer_time(1.0, 0.5, seeded())
    assert steer_time(2.0, 0.0) == 2.0
    with pytest.raises(InputError):
        steer_time(1.0, 1.0, t0=0.0)
    with pytest.raises(InputError):
        steer_time(1.0, -0.1)
    # NeuralODE with the sampled end time: y' = -y gives exp(-t_end)
    model = neurodyn.NeuralODE(lambda t, z: -z, t=(0.0, 1.0), rtol=1e-9, atol=1e-11)
    z0 = torch.ones(2, dtype=D64)
    t_end = steer_time(1.0, 0.5, torch.Generator().manual_seed(1), t0=0.0)
    z1 = model(z0, t=torch.tensor([0.0, t_end]))
    torch.testing.assert_close(z1, torch.full((2,), math.exp(-t_end), dtype=D64), rtol=1e-7, atol=0)
    torch.testing.assert_close(model(z0), torch.full((2,), math.exp(-1.0), dtype=D64), rtol=1e-7, atol=0)


def test_return_solution_counts_the_field_calls():
    """``return_solution=True`` hands back the augmented solve: its ``nfe`` is the number of calls of the
    (augmented) field in the forward solve, and after an adjoint backward ``nfe_backward`` is the number of
    calls the backward pass made (counted independently by wrapping the field)."""
    calls = {"n": 0}

    class Counted(RegularizedField):
        def forward(self, t, state):
            calls["n"] += 1
            return super().forward(t, state)

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    field = Counted(f, kinetic=0.1)
    z0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    zs, penalty, parts, sol = regularized_solve(field, z0, t, method="dopri5", rtol=1e-6, atol=1e-8,
                                                return_solution=True)
    assert isinstance(sol, neurodyn.Solution) and sol.status == "success"
    assert sol.stats["nfe"] == calls["n"] > 0
    torch.testing.assert_close(field.split(sol.ys)[0], zs)
    # the adjoint (its forward also runs a one-off check of the field, which the solver does not count)
    zs, penalty, parts, sol = regularized_solve(field, z0, t, method="dopri5", rtol=1e-6, atol=1e-8,
                                                gradient="adjoint", return_solution=True)
    before = calls["n"]
    (zs[-1].sum() + penalty).backward()
    assert sol.stats["nfe_backward"] == calls["n"] - before > 0
    assert len(regularized_solve(field, z0, t, method="rk4", step_size=0.5)) == 3  # default: three values
