"""Physics-structured models (HNN, port-Hamiltonian, LNN, baseline) and multiple shooting."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import neurodyn
from neurodyn.errors import InputError
from neurodyn.models import HNN, LNN, DerivativeMLP, MultipleShooting, penalty_schedule

F64 = torch.float64


def _pendulum_hnn() -> HNN:
    return HNN(kinetic=lambda p: 0.5 * p.pow(2).sum(-1), potential=lambda q: -torch.cos(q).sum(-1))


# ------------------------------------------------------------------------------------ known H / L: exact fields
def test_hnn_given_h_recovers_the_analytic_field():
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    q, p = x[:, 0], x[:, 1]
    # non-separable H = p^2 (1 + q^2) / 2 + q^4 / 4
    hnn = HNN(hamiltonian=lambda z: 0.5 * z[..., 1] ** 2 * (1 + z[..., 0] ** 2) + z[..., 0] ** 4 / 4)
    exact = torch.stack([p * (1 + q ** 2), -(p ** 2 * q + q ** 3)], -1)
    assert torch.allclose(hnn.time_derivative(x), exact, rtol=0, atol=1e-14)
    assert torch.allclose(hnn(torch.tensor(0.0), x), exact, rtol=0, atol=1e-14)
    sep = _pendulum_hnn()
    assert torch.allclose(sep.time_derivative(x), torch.stack([p, -torch.sin(q)], -1), rtol=0, atol=1e-15)
    with torch.no_grad():  # evaluation mode still differentiates H
        assert torch.allclose(sep.time_derivative(x), torch.stack([p, -torch.sin(q)], -1), rtol=0, atol=1e-15)


def test_port_hamiltonian_is_the_damped_oscillator():
    # H = (q^2 + p^2) / 2, D = c = L^2: dq/dt = p, dp/dt = -q - c p (underdamped closed form)
    c = 0.3
    hnn = HNN(2, hamiltonian=lambda z: 0.5 * z.pow(2).sum(-1), dissipation=torch.tensor([[math.sqrt(c)]], dtype=F64))
    t = torch.linspace(0, 5, 11, dtype=F64)
    sol = neurodyn.solve(hnn, torch.tensor([1.0, 0.0], dtype=F64), t, rtol=1e-11, atol=1e-13)
    w = math.sqrt(1 - c * c / 4)
    q_exact = torch.exp(-c * t / 2) * (torch.cos(w * t) + c / (2 * w) * torch.sin(w * t))
    assert torch.allclose(sol.ys[:, 0], q_exact, atol=1e-9)
    energy = hnn.energy(sol.ys)
    assert bool((energy.diff() < 0).all())


def test_learned_dissipation_is_positive_semidefinite():
    hnn = HNN(4, 16, dissipation=True).double()
    x = torch.randn(32, 4, dtype=F64)
    dH = hnn.grad_energy(x)
    dHdt = (dH * hnn.time_derivative(x)).sum(-1)  # = -dH/dp^T D dH/dp
    assert bool((dHdt <= 1e-12).all())


def _double_pendulum_exact(x: torch.Tensor, g: float) -> torch.Tensor:
    q1, q2, w1, w2 = x.unbind(-1)
    d = q1 - q2
    den = 3 - torch.cos(2 * d)  # 2 m1 + m2 - m2 cos(2 d), unit masses and lengths
    a1 = (-3 * g * torch.sin(q1) - g * torch.sin(q1 - 2 * q2)
          - 2 * torch.sin(d) * (w2 ** 2 + w1 ** 2 * torch.cos(d))) / den
    a2 = 2 * torch.sin(d) * (2 * w1 ** 2 + 2 * g * torch.cos(q1) + w2 ** 2 * torch.cos(d)) / den
    return torch.stack([a1, a2], -1)


def test_lnn_given_l_recovers_the_double_pendulum():
    g = 9.81

    def L(x):
        q1, q2, w1, w2 = x.unbind(-1)
        return w1 ** 2 + 0.5 * w2 ** 2 + w1 * w2 * torch.cos(q1 - q2) + 2 * g * torch.cos(q1) + g * torch.cos(q2)

    lnn = LNN(lagrangian=L)
    x = torch.randn(9, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # well conditioned: no warning
        acc = lnn.accelerations(x)
    assert torch.allclose(acc, _double_pendulum_exact(x, g), rtol=1e-13, atol=1e-12)
    assert torch.allclose(lnn.time_derivative(x)[:, :2], x[:, 2:])
    # its energy, qdot . dL/dqdot - L, is conserved by the flow: dE/dx . f(x) = 0
    xg = x.clone().requires_grad_(True)
    (dE,) = torch.autograd.grad(lnn.energy(xg).sum(), xg)
    assert float((dE * lnn.time_derivative(x)).sum(-1).abs().max()) < 1e-11


def test_lnn_ill_conditioned_hessian_regularised_with_warning():
    eps_m = 1e-12  # d2L/dqdot2 = diag(1, 1e-12): cond 1e12 > 1/sqrt(eps64) = 6.7e7
    lnn = LNN(lagrangian=lambda x: 0.5 * (x[..., 2] ** 2 + eps_m * x[..., 3] ** 2) + torch.cos(x[..., 0])
              + torch.cos(x[..., 1]))
    x = torch.tensor([[0.4, -0.7, 0.1, 0.2]], dtype=F64)
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        acc = lnn.accelerations(x)
    # independent truth: the Tikhonov solution by SVD, lam = sqrt(eps) * ||A||_F
    A = np.diag([1.0, eps_m])
    b = np.array([-math.sin(0.4), -math.sin(-0.7)])
    lam = math.sqrt(np.finfo(np.float64).eps) * np.linalg.norm(A)
    U, s, Vt = np.linalg.svd(A)
    expected = Vt.T @ np.diag(s / (s ** 2 + lam ** 2)) @ U.T @ b
    assert np.allclose(acc.numpy()[0], expected, rtol=1e-10, atol=0)
    assert abs(expected[1]) < 1e-3 * abs(b[1] / eps_m)  # the unregularised answer (6.4e11) is damped away
    assert lnn.last_condition == pytest.approx(1e12, rel=1e-6)
    # an exactly singular Hessian still gives a finite answer
    sing = LNN(lagrangian=lambda x: 0.5 * x[..., 2] ** 2 + torch.cos(x[..., 0]) + torch.cos(x[..., 1]))
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        acc = sing.accelerations(x)
    assert torch.isfinite(acc).all() and abs(float(acc[0, 1])) < 1e-12
    assert float(acc[0, 0]) == pytest.approx(-math.sin(0.4), rel=1e-12)


@pytest.mark.parametrize("act", ["softplus", "tanh", "sigmoid"])
def test_lnn_closed_form_mlp_path_equals_full_hessian_solve(act):
    """The closed-form MLP path (qdot columns of the Hessian, batched) against the per-sample full Hessian by
    torch.func and a plain solve: accelerations and parameter gradients equal to rounding (float64)."""
    from neurodyn.models.physics import mlp, mlp_gradient_and_qdot_jacobian

    torch.manual_seed(3)
    d = 3
    net = mlp(2 * d, 24, 1, act).double()
    x = torch.randn(11, 2 * d, dtype=F64, generator=torch.Generator().manual_seed(4))
    x[0, :] = 30.0   # softplus above its threshold (linear there): its exact derivatives 1 and 0
    tgt = torch.randn(11, d, dtype=F64, generator=torch.Generator().manual_seed(5))

    def reference(z):   # the previous path: full Hessian per sample, then the Euler-Lagrange solve
        hess = torch.func.vmap(torch.func.hessian(lambda r: net(r).squeeze(-1)))(z)
        grad = torch.func.vmap(torch.func.grad(lambda r: net(r).squeeze(-1)))(z)
        A, B = hess[:, d:, d:], hess[:, d:, :d]
        rhs = grad[:, :d] - (B @ z[:, d:].unsqueeze(-1)).squeeze(-1)
        return torch.linalg.solve(A, rhs)

    g, J = mlp_gradient_and_qdot_jacobian(net, x)
    hess = torch.func.vmap(torch.func.hessian(lambda r: net(r).squeeze(-1)))(x)
    assert torch.allclose(J, hess[:, :, d:], rtol=1e-12, atol=1e-14)
    fast = LNN(lagrangian=net, regularization=0.0, warn=False)           # closed-form path
    generic = LNN(lagrangian=lambda z: net(z), regularization=0.0, warn=False)   # torch.func path
    grads = []
    for f in (reference, fast.accelerations, generic.accelerations):
        net.zero_grad()
        acc = f(x)
        (acc - tgt).pow(2).sum().backward()
        grads.append((acc.detach(), torch.cat([p.grad.flatten() for p in list(net.parameters())[:-1]])))
    (a_ref, p_ref), (a_fast, p_fast), (a_gen, p_gen) = grads
    scale = float(a_ref.abs().max())
    assert float((a_fast - a_ref).abs().max()) < 1e-11 * scale
    assert float((a_gen - a_ref).abs().max()) < 1e-11 * scale
    assert float((p_fast - p_ref).abs().max()) < 1e-10 * float(p_ref.abs().max())
    assert float((p_gen - p_ref).abs().max()) < 1e-10 * float(p_ref.abs().max())
    with pytest.raises(InputError, match="nn.Sequential"):
        mlp_gradient_and_qdot_jacobian(torch.nn.Sequential(torch.nn.Linear(2, 1)), x[:, :2])


# ----------------------------------------------------------------------------- symplectic integration, energy
def _energy_errors(n_steps: int, h: float) -> dict[str, torch.Tensor]:
    hnn = _pendulum_hnn()
    y0 = torch.tensor([1.5, 0.0], dtype=F64)
    t = torch.linspace(0, n_steps * h, 101, dtype=F64)
    out = {}
    for method, field in (("leapfrog", hnn.split_term()), ("rk4", hnn)):
        sol = neurodyn.solve(field, y0, t, method=method, step_size=h)
        out[method] = (hnn.energy(sol.ys) - hnn.energy(y0)).abs()
    return out


def _check_energy(err: dict[str, torch.Tensor], h: float) -> None:
    lf, rk = err["leapfrog"], err["rk4"]
    # leapfrog: bounded O(h^2) oscillation, no growth (late maximum ~ early maximum)
    assert float(lf.max()) < 0.25 * h ** 2
    assert float(lf[-20:].max()) < 1.3 * float(lf[1:21].max())
    # rk4: secular drift, growing linearly in time
    assert float(rk[-1]) > 5 * float(rk[10])


def test_hnn_flow_energy_bounded_with_leapfrog_rk4_drifts():
    h = 0.25
    _check_energy(_energy_errors(1_000, h), h)


@pytest.mark.slow
def test_hnn_flow_energy_bounded_over_1e5_steps():
    h = 0.25
    _check_energy(_energy_errors(100_000, h), h)


def test_split_term_equals_whole_field_and_gl4_conserves():
    hnn = _pendulum_hnn()
    y0 = torch.tensor([[1.0, 0.2], [0.3, -0.1]], dtype=F64)
    t = torch.linspace(0, 5, 6, dtype=F64)
    a = neurodyn.solve(hnn.split_term(), y0, t, method="yoshida4", step_size=0.05).ys
    b = neurodyn.solve(hnn, y0, t, method="yoshida4", step_size=0.05).ys
    assert torch.allclose(a, b, rtol=0, atol=1e-13)
    # a non-separable H with Gauss-Legendre (symplectic): bounded O(h^4) energy error, no drift
    ns = HNN(hamiltonian=lambda z: 0.5 * z[..., 1] ** 2 * (1 + z[..., 0] ** 2) + z[..., 0] ** 4 / 4)
    sol = neurodyn.solve(ns, y0, torch.linspace(0, 20, 11, dtype=F64), method="gl4", step_size=0.1)
    err = (ns.energy(sol.ys) - ns.energy(y0)).abs()
    assert float(err.max()) < 1e-5
    assert float(err[6:].max()) < 1.5 * float(err[1:6].max())
    with pytest.raises(InputError, match="separable"):
        ns.split_term()


# --------------------------------------------------------------------------------- gradients vs finite differences
@pytest.mark.parametrize("gradient,method,extra", [
    ("direct", "dopri5", {}),
    ("adjoint", "dopri5", {}),
    ("checkpoint", "dopri5", {}),
    ("interpolated", "dopri5", {}),
    ("direct", "gl4", {"step_size": 0.05}),
    ("checkpoint", "leapfrog", {"step_size": 0.05}),
])
def test_hnn_gradients_match_finite_differences(gradient, method, extra):
    torch.manual_seed(0)
    model = HNN(2, 8).double()
    x0 = torch.tensor([[0.8, -0.3]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    tol = {} if "step_size" in extra else {"rtol": 1e-11, "atol": 1e-12}
    if gradient in ("adjoint", "interpolated") and "step_size" not in extra:
        extra = {**extra, "adjoint_rtol": 1e-11, "adjoint_atol": 1e-12}

    def loss_fn() -> torch.Tensor:
        sol = neurodyn.solve(model, x0, t, method=method, gradient=gradient, **tol, **extra)
        return (sol.ys ** 2).sum() + sol.ys[-1, 0, 0]

    loss = loss_fn()
    w = model.hamiltonian[0].weight
    gw, gx = torch.autograd.grad(loss, (w, x0))
    eps = 1e-6
    with torch.no_grad():
        for tensor, grad, idx in ((w, gw, (3, 1)), (w, gw, (5, 0)), (x0, gx, (0, 0)), (x0, gx, (0, 1))):
            old = float(tensor[idx])
            tensor[idx] = old + eps
            up = float(loss_fn())
            tensor[idx] = old - eps
            down = float(loss_fn())
            tensor[idx] = old
            fd = (up - down) / (2 * eps)
            assert float(grad[idx]) == pytest.approx(fd, rel=2e-5, abs=1e-7), (idx, float(grad[idx]), fd)


@pytest.mark.slow
def test_lnn_adjoint_gradient_matches_direct():
    torch.manual_seed(0)
    lnn = LNN(2, 8, warn=False).double()
    x0 = torch.tensor([[0.3, 0.5]], dtype=F64)
    t = torch.linspace(0, 0.3, 2, dtype=F64)
    grads = []
    for gradient in ("direct", "adjoint"):
        lnn.zero_grad()
        sol = neurodyn.solve(lnn, x0, t, gradient=gradient, rtol=1e-9, atol=1e-11)
        sol.ys.pow(2).sum().backward()
        grads.append(lnn.lagrangian[0].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_hnn_learns_mass_spring_from_derivatives_and_conserves_energy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, dtype=F64, generator=gen)
    dx = torch.stack([2 * x[:, 1], -2 * x[:, 0]], -1)  # H = q^2 + p^2
    torch.manual_seed(0)
    models = {"hnn": HNN(2, 32).double(), "node": DerivativeMLP(2, 32).double()}
    for m in models.values():
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss = (m.time_derivative(x) - dx).pow(2).mean()
            loss.backward()
            opt.step()
    y0 = torch.tensor([[0.8, 0.0]], dtype=F64)
    t = torch.linspace(0, 30, 61, dtype=F64)
    hnn_sol = neurodyn.solve(models["hnn"], y0, t, method="gl4", step_size=0.05).ys
    # the learned H is conserved by the symplectic Gauss-Legendre flow (bounded O(h^4) error)
    h_learned = models["hnn"].energy(hnn_sol)
    assert float((h_learned - h_learned[0]).abs().max()) < 1e-4
    true_e = hnn_sol.pow(2).sum(-1)
    assert float((true_e - 0.64).abs().max()) < 0.05


# ----------------------------------------------------------------------------------------- multiple shooting
def _linear_problem():
    A_true = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
    t = torch.linspace(0, 6, 13, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    clean = torch.stack([torch.linalg.matrix_exp(A_true * s) @ y0 for s in t])
    noisy = clean + 0.05 * torch.randn(clean.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    return t, noisy


def _lbfgs(params, closure, iters=300):
    opt = torch.optim.LBFGS(params, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def step():
        opt.zero_grad()
        loss = closure()
        loss.backward()
        return loss

    opt.step(step)


@pytest.mark.slow
def test_multiple_shooting_reaches_the_single_shooting_optimum_on_a_linear_system():
    t, obs = _linear_problem()
    opts = {"method": "rk4", "step_size": 0.125}  # both fits on the same discretisation: the same optimum
    # single shooting: parameters A and the initial state
    A1 = torch.nn.Parameter(torch.zeros(2, 2, dtype=F64))
    s0 = torch.nn.Parameter(obs[0].clone())
    _lbfgs([A1, s0], lambda: (neurodyn.solve(lambda tt, y: y @ A1.T, s0, t, params=[A1], **opts).ys - obs)
           .pow(2).mean(), iters=100)
    # multiple shooting, 4 segments, continuity by a penalty schedule
    A2 = torch.nn.Parameter(torch.zeros(2, 2, dtype=F64))
    ms = MultipleShooting(lambda tt, y: y @ A2.T, t, 4, y_obs=obs, params=[A2], **opts)
    for weight in penalty_schedule(1e2, 1e2, 3):
        _lbfgs([A2, ms.starts], lambda wt=weight: ms.loss(obs, weight=wt), iters=100)
    traj, defects = ms()
    assert float(defects.abs().max()) < 1e-4
    assert torch.allclose(A2, A1, atol=2e-4), (A1, A2)
    assert torch.allclose(ms.starts[0], s0, atol=2e-4)
    assert torch.allclose(ms.single_shooting(), traj, atol=1e-3)


def test_multiple_shooting_layout_and_errors():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    t = torch.linspace(0, 3, 13, dtype=F64)
    truth = neurodyn.solve(lambda tt, y: y @ A.T, torch.tensor([1.0, 0.5], dtype=F64), t, rtol=1e-11,
                           atol=1e-12).ys
    ms = MultipleShooting(lambda y: y @ A.T, t, 3, y_obs=truth, rtol=1e-11, atol=1e-12)
    traj, defects = ms()
    assert traj.shape == (13, 2) and defects.shape == (2, 2)
    assert torch.allclose(traj, truth, atol=1e-9)  # exact starts: the pieces are the true trajectory
    assert float(defects.abs().max()) < 1e-9
    assert ms.last_solution.ys.shape == (5, 3, 2)  # one batched solve of the 3 segments
    with pytest.raises(InputError, match="does not divide 12"):
        MultipleShooting(lambda y: y, t, 5, y_obs=truth)
    with pytest.raises(InputError, match="uniform"):
        MultipleShooting(lambda y: y, t ** 2, 3, y_obs=truth)
    with pytest.raises(InputError, match="y_obs"):
        MultipleShooting(lambda y: y, t, 3)


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="input_dim"):
        HNN(3, 10)
    with pytest.raises(InputError, match="hamiltonian"):
        HNN()
    with pytest.raises(InputError, match="even size"):
        HNN(hamiltonian=lambda z: z.sum(-1)).time_derivative(torch.zeros(4, 3))
    with pytest.raises(InputError, match="one scalar per state"):
        HNN(hamiltonian=lambda z: z).time_derivative(torch.zeros(4, 2))
    with pytest.raises(InputError, match="nonlinearity"):
        HNN(2, 8, "swish-ish")
    with pytest.raises(InputError, match="regularization"):
        LNN(2, 8, regularization=2.0)


def test_demo_physics_quick_smoke(tmp_path):
    import json

    from neurodyn.cli import main

    out = tmp_path / "physics"
    rc = main(["demo", "physics", "--quick", "--only", "mass_spring", "--models", "hnn,node", "--no-plots",
               "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ms = metrics["experiments"]["mass_spring"]
    assert ms["trajectories"] == 50 and ms["train_points"] == 750 and ms["test_points"] == 750
    for kind in ("hnn", "node"):
        m = ms["models"][kind]
        assert m["rollout_status"] == "success"
        assert all(math.isfinite(m[k]) and m[k] >= 0 for k in ("train_mse", "test_mse", "energy_mse"))
