"""Gradient methods at their edges (issue 12): second derivatives, tensors a field uses only at some times,
random draws inside the field, and fields that make their own tensors requiring grad (FFJORD).

Truths: closed forms, central differences of first derivatives, ``gradient="direct"`` (for ``"checkpoint"``, the
exact gradient of the same discrete solve) and torchdiffeq 0.2.5's ``odeint_adjoint``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

import neurodyn as nd
from neurodyn.errors import InputError

DT = torch.float64
Y0, K = 0.8, 1.0


# ------------------------------------------------------------------------------------------------
# 1. Second-order gradients
# ------------------------------------------------------------------------------------------------
def _riccati_hessian(method: str, gradient: str = "direct", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """y' = -k y^2: the gradient and Hessian of y(1) with respect to (y0, k), by double backward."""
    y0 = torch.tensor([Y0], dtype=DT, requires_grad=True)
    k = torch.tensor(K, dtype=DT, requires_grad=True)
    sol = nd.solve(lambda t, y: -k * y**2, y0, torch.tensor([0.0, 1.0], dtype=DT), method=method,
                   gradient=gradient, params=[k], **kw)
    g = torch.autograd.grad(sol.ys[-1].sum(), (y0, k), create_graph=True)
    g = torch.cat([x.reshape(-1) for x in g])
    rows = [torch.cat([x.reshape(-1) for x in torch.autograd.grad(g[i], (y0, k), retain_graph=True)])
            for i in range(2)]
    return g.detach(), torch.stack(rows)


def _riccati_exact() -> tuple[torch.Tensor, torch.Tensor]:
    """y(1) = y0 / (1 + k y0)."""
    d = 1 + K * Y0
    grad = torch.tensor([1 / d**2, -Y0**2 / d**2], dtype=DT)
    hess = torch.tensor([[-2 * K / d**3, -2 * Y0 / d**3], [-2 * Y0 / d**3, 2 * Y0**3 / d**3]], dtype=DT)
    return grad, hess


@pytest.mark.parametrize("method,rtol,bound", [
    ("dopri5", 1e-10, 1e-5), pytest.param("radau", 1e-10, 1e-5, marks=pytest.mark.slow),  # radau: 5 s, slow
    ("kvaerno5", 1e-10, 1e-5), ("bdf", 1e-10, 1e-5),
    # trbdf2 (order 2) at rtol 1e-10 takes minutes; at 1e-6 its global error is 1e-5 (measured 9.5e-6 / 1.4e-5)
    ("trbdf2", 1e-6, 4e-5)])
def test_second_order_direct_matches_closed_form(method, rtol, bound):
    # Before: radau +0.066 for d2 y(1)^2 / dy0^2 (exact -0.114); every implicit method was wrong at second order.
    g, h = _riccati_hessian(method, rtol=rtol, atol=rtol * 1e-2)
    g_ex, h_ex = _riccati_exact()
    assert torch.allclose(g, g_ex, rtol=bound / 10 if rtol < 1e-8 else bound, atol=0)
    assert torch.allclose(h, h_ex, rtol=bound, atol=0), (h, h_ex)


def _coupled_grad(method: str, theta: torch.Tensor, y0: torch.Tensor, create_graph: bool = False):
    """A coupled nonlinear 2-D system with fixed steps (a smooth discrete map): d L / d(theta, y0)."""
    def f(t, y):
        return torch.stack([theta[0] * y[1] - y[0] ** 3, -theta[1] * y[0] * y[1] - torch.sin(y[1])])

    # (rtol/atol set Newton's tolerance: converged far below the differences' step)
    sol = nd.solve(f, y0, torch.tensor([0.0, 0.7, 1.5], dtype=DT), method=method, step_size=0.1, rtol=1e-12,
                   atol=1e-14, gradient="direct", params=[theta])
    loss = (sol.ys[1:] ** 2).sum() + sol.ys[-1, 0] * sol.ys[-1, 1]
    g = torch.autograd.grad(loss, (theta, y0), create_graph=create_graph)
    return torch.cat([x.reshape(-1) for x in g])


@pytest.mark.parametrize("method", ["radau", "gl4", pytest.param("gl6", marks=pytest.mark.slow),  # gl4's family
                                    pytest.param("radauIIA3", marks=pytest.mark.slow),  # radau's family
                                    pytest.param("kvaerno5", marks=pytest.mark.slow),  # 8 s on one core
                                    "trbdf2", "sdirk2", "rk4"])
def test_second_order_direct_matches_finite_differences(method):
    theta = torch.tensor([1.3, 0.7], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.9, -0.4], dtype=DT, requires_grad=True)
    g = _coupled_grad(method, theta, y0, create_graph=True)
    hess = torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(g[i], (theta, y0), retain_graph=True)])
                        for i in range(4)])
    # Central differences of the first derivative (exact gradients of the same fixed-step discrete map).
    eps = 1e-5
    x0 = torch.cat([theta.detach(), y0.detach()])
    fd = []
    for j in range(4):
        cols = []
        for sgn in (1, -1):
            x = x0.clone()
            x[j] += sgn * eps
            cols.append(_coupled_grad(method, x[:2].clone().requires_grad_(True), x[2:].clone().requires_grad_(True)))
        fd.append((cols[0] - cols[1]) / (2 * eps))
    fd = torch.stack(fd, 1)
    assert torch.allclose(hess, fd, rtol=1e-6, atol=1e-7 * float(fd.abs().max())), (hess - fd).abs().max()
    assert torch.allclose(hess, hess.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gradient", ["adjoint", "interpolated", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_second_order_refused_outside_direct(gradient, per_sample):
    # Before: gradient="checkpoint" gave a Hessian of exactly 0, the adjoints an unrelated RuntimeError.
    k = torch.tensor(K, dtype=DT, requires_grad=True)
    y0 = torch.full((3, 1) if per_sample else (1,), Y0, dtype=DT, requires_grad=True)
    sol = nd.solve(lambda t, y: -k * y**2, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient=gradient, params=[k],
                   per_sample_steps=per_sample, rtol=1e-9, atol=1e-11)
    g_y0, g_k = torch.autograd.grad(sol.ys[-1].sum(), (y0, k), create_graph=True)
    # First order is unaffected by create_graph=True ...
    d = 1 + K * Y0
    assert torch.allclose(g_y0.detach(), torch.full_like(y0, 1 / d**2), rtol=1e-6)
    assert math.isclose(float(g_k.detach()), -y0.numel() * Y0**2 / d**2, rel_tol=1e-6)
    # ... and differentiating it again says what to use instead, for y0 and for the parameters alike.
    for x in (g_y0.sum(), g_k):
        with pytest.raises(InputError, match="gradient='direct'"):
            torch.autograd.grad(x, (y0, k), retain_graph=True)


# ------------------------------------------------------------------------------------------------
# 2. Tensors the field uses only after some time
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["adjoint", "interpolated", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_hidden_tensor_used_late_is_caught(gradient, per_sample):
    # Before: w.grad stayed None (the check ran at t0 only, where the field does not use w).
    w = torch.tensor(1.5, dtype=DT, requires_grad=True)

    def f(t, y):
        return -(w if float(t.reshape(-1)[0]) > 0.5 else 1.0) * y

    y0 = torch.ones((2, 1) if per_sample else (1,), dtype=DT, requires_grad=True)
    sol = nd.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient=gradient, params=[],
                   per_sample_steps=per_sample)
    with pytest.raises(InputError, match=r"params=\[\.\.\.\]"):
        sol.ys[-1].sum().backward()
    assert w.grad is None


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "interpolated", "checkpoint"])
def test_late_tensor_as_parameter_gets_its_gradient(gradient):
    w = torch.tensor(1.5, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    sol = nd.solve(lambda t, y: -(w if t > 0.5 else 1.0) * y, y0, torch.tensor([0.0, 1.0], dtype=DT),
                   gradient=gradient, params=[w], rtol=1e-10, atol=1e-12)
    sol.ys[-1].sum().backward()
    y1 = math.exp(-0.5 - 0.5 * 1.5)  # y(1) = y0 exp(-0.5 - 0.5 w)
    assert math.isclose(float(w.grad), -0.5 * y1, rel_tol=1e-6)
    assert math.isclose(float(y0.grad), y1, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------
# 3. Random draws inside the field
# ------------------------------------------------------------------------------------------------
def _dropout_run(gradient: str, device: str = "cpu", **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(32, 2)).to(DT).to(device)
    torch.manual_seed(123)
    y0 = torch.tensor([[0.5, -0.3]], dtype=DT, device=device, requires_grad=True)
    sol = nd.solve(lambda t, y: net(y), y0, torch.linspace(0, 1, 4, dtype=DT, device=device), gradient=gradient,
                   params=list(net.parameters()), **kw)
    sol.ys.pow(2).sum().backward()
    after = torch.rand(3, device=device)  # the caller's generator after the backward pass
    grads = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in net.parameters()])
    return sol.ys.detach(), grads, after, sol.stats


@pytest.mark.parametrize("kw", [dict(method="dopri5", rtol=1e-2, atol=1e-3),  # adaptive, FSAL
                                dict(method="rk4", step_size=0.05),  # fixed, not FSAL (k1 evaluated per step)
                                dict(method="tsit5", rtol=1e-3, atol=1e-4, checkpoints=2),  # sub-checkpoints
                                dict(method="bosh3", rtol=1e-2, atol=1e-3)])
def test_checkpoint_replays_the_random_draws(kw):
    # Before: the replay drew new dropout masks (the gradient 5-10% off the forward that ran).
    ys_d, g_d, after_d, _ = _dropout_run("direct", **kw)
    ys_c, g_c, after_c, stats = _dropout_run("checkpoint", **kw)
    assert torch.equal(ys_d, ys_c)  # the same forward (same draws)
    assert torch.allclose(g_c, g_d, rtol=1e-12, atol=1e-14 * float(g_d.abs().max()))
    assert torch.equal(after_d, after_c)  # the caller's generator is where gradient="direct" leaves it
    if "rtol" in kw:
        assert stats["steps"] > 2


@pytest.mark.parametrize("mixed", [False, True])
def test_per_sample_checkpoint_replays_the_random_draws(mixed):
    """per_sample_steps: the replay restores the generators at every step and carries each segment's first
    derivative (not evaluated again), so a dropout field's gradient is gradient="direct"'s to rounding; rows
    integrating backward next to forward ones (mixed) included. Before: 1e-4 relative off."""
    out = {}
    for gradient in ("direct", "checkpoint"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                  torch.nn.Linear(32, 2)).to(DT)
        torch.manual_seed(123)
        y0 = torch.tensor([[0.5, -0.3], [0.1, 0.2], [-0.4, 0.3]], dtype=DT, requires_grad=True)
        t = torch.linspace(0, 1, 4, dtype=DT)
        if mixed:
            t = torch.stack([t, t.flip(0), 0.5 * t])
        sol = nd.solve(lambda t, y, net=net: net(y), y0, t, gradient=gradient, params=list(net.parameters()),
                       per_sample_steps=True, method="dopri5", rtol=1e-2, atol=1e-3, checkpoints=2)
        sol.ys.pow(2).sum().backward()
        out[gradient] = (sol.ys.detach(), torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1)
                                                                             for p in net.parameters()]),
                         torch.rand(3), sol.stats)
    (ys_d, g_d, after_d, _), (ys_c, g_c, after_c, stats) = out["direct"], out["checkpoint"]
    assert torch.equal(ys_d, ys_c)
    assert int(stats["steps_per_sample"].min()) > 2
    assert torch.allclose(g_c, g_d, rtol=1e-12, atol=1e-14 * float(g_d.abs().max()))
    assert torch.equal(after_d, after_c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_replays_the_cuda_generator():
    ys_d, g_d, after_d, _ = _dropout_run("direct", device="cuda", method="dopri5", rtol=1e-2, atol=1e-3)
    ys_c, g_c, after_c, _ = _dropout_run("checkpoint", device="cuda", method="dopri5", rtol=1e-2, atol=1e-3)
    assert torch.equal(ys_d, ys_c)
    assert torch.allclose(g_c, g_d, rtol=1e-12, atol=1e-14 * float(g_d.abs().max()))
    assert torch.equal(after_d, after_c)


def test_adjoint_with_noise_fixed_per_solve_is_consistent():
    """FFJORD-style: the noise is drawn once per solve (outside the field), so the backward solve sees the draws
    the forward saw and the continuous adjoint agrees with the discrete gradient to the solve tolerance."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(DT)
    grads = {}
    for gradient in ("direct", "adjoint"):
        torch.manual_seed(5)
        mask = (torch.rand(16, dtype=DT) > 0.3).to(DT) / 0.7  # one dropout mask for the whole solve

        def f(t, y, mask=mask):
            return net[2](net[1](net[0](y)) * mask)

        net.zero_grad()
        y0 = torch.tensor([0.4, 0.1], dtype=DT, requires_grad=True)
        sol = nd.solve(f, y0, torch.linspace(0, 1, 3, dtype=DT), gradient=gradient, params=list(net.parameters()),
                       rtol=1e-10, atol=1e-12)
        sol.ys.pow(2).sum().backward()
        grads[gradient] = torch.cat([y0.grad] + [p.grad.reshape(-1) for p in net.parameters()])
    assert torch.allclose(grads["adjoint"], grads["direct"], rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# 4. Fields that mark their own tensors requires_grad_ (FFJORD's CNF): torchdiffeq drop-in
# ------------------------------------------------------------------------------------------------
class _CNF(torch.nn.Module):
    """FFJORD's pattern: marks t and y requires_grad_ inside the call and takes the exact divergence."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, t, states):
        y = states[0]
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            gate = torch.ones((), dtype=y.dtype, requires_grad=True)  # a leaf made in the call, not captured
            dy = self.scale * gate * self.net(torch.cat([y, t.expand(y.shape[0], 1)], 1))
            div = sum(torch.autograd.grad(dy[:, i].sum(), y, create_graph=True)[0][:, i] for i in range(2))
        return dy, -div.view(-1, 1)


def test_ffjord_style_field_matches_torchdiffeq_odeint_adjoint():
    torch.manual_seed(0)
    f = _CNF().to(DT)
    x = torch.randn(4, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    out = {}
    for name, odeint_adjoint in (("neurodyn", nd.odeint_adjoint), ("torchdiffeq", torchdiffeq.odeint_adjoint)):
        f.zero_grad()
        x0 = x.clone().requires_grad_(True)
        z, dlogp = odeint_adjoint(f, (x0, torch.zeros(4, 1, dtype=DT)), t, rtol=1e-10, atol=1e-12)
        loss = (z[1:] ** 2).sum() + dlogp[-1].sum()
        loss.backward()
        out[name] = (loss.detach(), torch.cat([x0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]))
    assert math.isclose(float(out["neurodyn"][0]), float(out["torchdiffeq"][0]), rel_tol=1e-8)
    g, g_ref = out["neurodyn"][1], out["torchdiffeq"][1]
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-6 * float(g_ref.abs().max()))


def test_captured_tensor_still_refused_next_to_a_field_made_leaf():
    w = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def f(t, y):
        t.requires_grad_(True)
        return -w * t * y  # w is captured: it would get no gradient

    with pytest.raises(InputError, match=r"shapes \(\)"):
        nd.solve(f, torch.ones(2, dtype=DT, requires_grad=True), torch.tensor([0.0, 1.0], dtype=DT),
                 gradient="adjoint", params=[])


@pytest.mark.parametrize("gradient, kw", [("adjoint", {}), ("adjoint", dict(adjoint_method="radau")),
                                          ("interpolated", dict(method="radau")), ("checkpoint", {}),
                                          ("checkpoint", dict(method="radau")), ("checkpoint", dict(method="bdf"))])
def test_field_made_leaves_pass_and_gradient_is_exact(gradient, kw):
    # Before: refused at t0 (the field marks t requires_grad_ and makes a leaf of its own in every call).
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def f(t, y):
        gate = torch.ones((), dtype=DT, requires_grad=True)
        t.requires_grad_(True)
        return -gate * w * y * (1 + 0.1 * t)

    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    sol = nd.solve(f, y0, torch.tensor([0.0, 1.0], dtype=DT), gradient=gradient, params=[w], rtol=1e-10,
                   atol=1e-12, **kw)
    sol.ys[-1].sum().backward()
    # y(1) = y0 exp(-w (1 + 0.05))
    assert math.isclose(float(w.grad), -1.05 * 3 * math.exp(-0.7 * 1.05), rel_tol=1e-7)
    assert torch.allclose(y0.grad, torch.full((2,), math.exp(-0.7 * 1.05), dtype=DT), rtol=1e-7)
