"""CNF (neurodyn.models.CNF): closed-form log-densities of linear flows, Hutchinson unbiasedness, invertibility,
gradients vs finite differences for every gradient method, the probe held fixed per solve, RNODE penalties,
trace estimators, and FFJORD's toy samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from neurodyn.data.toy2d import TOY_2D, eight_gaussian_centers, sample_2d
from neurodyn.errors import InputError
from neurodyn.fields import draw_probe, jacobian_trace
from neurodyn.models import CNF, CNFStack, ConcatSquashLinear, ODEnet

D64 = torch.float64
TIGHT = dict(method="dopri5", rtol=1e-11, atol=1e-12)


class Linear(nn.Module):
    """dz/dt = A z (autonomous)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, z):
        return z @ self.A.T


def _std_normal_logpdf(z):
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


def _A(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, d, generator=g, dtype=D64) * 0.6)


def test_linear_cnf_exact_log_density_closed_form():
    A = _A()
    t1 = 0.7
    flow = CNF(Linear(A), dim=3, trace="exact", t1=t1, **TIGHT)
    x = torch.randn(6, 3, dtype=D64, generator=torch.Generator().manual_seed(1))
    z, ld = flow(x)
    z_true = x @ torch.linalg.matrix_exp(A * t1).T
    assert torch.allclose(z, z_true, atol=1e-9, rtol=0)
    assert torch.allclose(ld, torch.full_like(ld, t1 * float(torch.trace(A))), atol=1e-8, rtol=0)
    # pushforward of N(0, I) by exp(A t1) evaluated at x: closed form
    lp_true = _std_normal_logpdf(z_true) + t1 * float(torch.trace(A))
    assert torch.allclose(flow.log_prob(x), lp_true, atol=1e-8, rtol=0)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_linear_cnf_per_probe_and_unbiased(noise):
    A = _A(seed=2)
    t1 = 0.5
    n = 4000
    flow = CNF(Linear(A), dim=3, trace="hutchinson", noise=noise, t1=t1,
               generator=torch.Generator().manual_seed(3), **TIGHT)
    x = torch.randn(n, 3, dtype=D64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, ld = flow(x)
    eps = flow.field.eps
    # for a linear field the estimate is constant in time: t1 * eps^T A eps, one probe per sample for the solve
    assert torch.allclose(ld, t1 * torch.einsum("bi,ij,bj->b", eps, A, eps), atol=1e-8, rtol=0)
    truth = t1 * float(torch.trace(A))
    se = float(ld.std()) / math.sqrt(n)
    assert abs(float(ld.mean()) - truth) < 4 * se


def test_invertibility_forward_then_inverse():
    torch.manual_seed(0)
    net = ODEnet(2, (16, 16), "tanh").double()
    flow = CNF(net, dim=2, trace="exact", t1=1.0, **TIGHT)
    x = torch.randn(10, 2, dtype=D64)
    with torch.no_grad():
        z, ld = flow(x)
        x_back, ld_inv = flow.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-8, rtol=0)
    assert torch.allclose(ld + ld_inv, torch.zeros_like(ld), atol=1e-8)
    assert float((z - x).abs().max()) > 1e-2  # the flow moved the points


def _fd_check(gradient, trace="hutchinson", per_sample=False):
    torch.manual_seed(1)
    net = ODEnet(2, (8,), "tanh").double()
    kw = dict(rtol=1e-10, atol=1e-10, method="dopri5", gradient=gradient)
    if per_sample:
        kw["per_sample_steps"] = True
    gen = torch.Generator()
    flow = CNF(net, dim=2, trace=trace, t1=0.8, generator=gen, **kw)
    x = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
    params = list(net.parameters())
    direction = [torch.randn_like(p) for p in params]

    def loss():
        gen.manual_seed(11)  # the same probe on every evaluation
        return flow.log_prob(x).mean()

    flow.zero_grad()
    loss().backward()
    g = sum(float((p.grad * v).sum()) for p, v in zip(params, direction))
    h = 1e-5
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(h * v)
        lp = float(loss())
        for p, v in zip(params, direction):
            p.sub_(2 * h * v)
        lm = float(loss())
        for p, v in zip(params, direction):
            p.add_(h * v)
    fd = (lp - lm) / (2 * h)
    return g, fd


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint", "interpolated"])
def test_log_prob_gradient_matches_finite_differences(gradient):
    g, fd = _fd_check(gradient)
    assert abs(g - fd) < 1e-6 * max(1.0, abs(fd)), (g, fd)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_log_prob_gradient_per_sample_steps(gradient):
    g, fd = _fd_check(gradient, trace="exact", per_sample=True)
    assert abs(g - fd) < 1e-6 * max(1.0, abs(fd)), (g, fd)


def test_end_time_gradient_matches_finite_differences():
    torch.manual_seed(2)
    net = ODEnet(2, (8,), "tanh").double()
    flow = CNF(net, dim=2, trace="exact", t1=0.6, train_t1=True, rtol=1e-11, atol=1e-11, gradient="adjoint")
    flow.double()
    x = torch.randn(4, 2, dtype=D64)
    flow.log_prob(x).mean().backward()
    g = float(flow.sqrt_end_time.grad)
    h = 1e-6
    with torch.no_grad():
        flow.sqrt_end_time.add_(h)
        lp = float(flow.log_prob(x).mean())
        flow.sqrt_end_time.sub_(2 * h)
        lm = float(flow.log_prob(x).mean())
    assert abs(g - (lp - lm) / (2 * h)) < 1e-6


def test_probe_fixed_per_solve_checkpoint_equals_direct():
    torch.manual_seed(3)
    net = ODEnet(2, (16,), "tanh").double()
    x = torch.randn(7, 2, dtype=D64)
    grads = {}
    for gradient in ("direct", "checkpoint"):
        flow = CNF(net, dim=2, trace="hutchinson", noise="rademacher", generator=torch.Generator().manual_seed(9),
                   gradient=gradient, rtol=1e-6, atol=1e-6)
        net.zero_grad()
        flow.log_prob(x).mean().backward()
        grads[gradient] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert torch.allclose(grads["checkpoint"], grads["direct"], rtol=1e-10, atol=1e-12)


def test_rnode_penalties_closed_form():
    a, t1, d = -0.4, 0.9, 3
    A = a * torch.eye(d, dtype=D64)
    x = torch.randn(5, d, dtype=D64, generator=torch.Generator().manual_seed(6))
    flow = CNF(Linear(A), dim=d, trace="hutchinson", t1=t1, kinetic=1.0, jacobian=1.0,
               generator=torch.Generator().manual_seed(7), **TIGHT)
    with torch.no_grad():
        flow(x)
    eps = flow.field.eps
    kin = a / 2 * (math.exp(2 * a * t1) - 1) * x.pow(2).sum(1)  # int ||a e^{at} x||^2 dt
    assert torch.allclose(flow.penalties["kinetic"], kin, atol=1e-9, rtol=0)
    assert torch.allclose(flow.penalties["jacobian"], a * a * eps.pow(2).sum(1) * t1, atol=1e-9, rtol=0)
    assert abs(float(flow.penalty()) - float(kin.mean() + (a * a * eps.pow(2).sum(1) * t1).mean())) < 1e-9


def test_stack_and_base_distribution():
    A1, A2 = _A(2, 10), _A(2, 11)
    t1 = 0.3
    base = torch.distributions.MultivariateNormal(torch.tensor([0.5, -1.0], dtype=D64),
                                                  torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=D64))
    stack = CNFStack([CNF(Linear(A1), dim=2, t1=t1, **TIGHT), CNF(Linear(A2), dim=2, t1=t1, **TIGHT)], base=base)
    x = torch.randn(4, 2, dtype=D64)
    M = torch.linalg.matrix_exp(A2 * t1) @ torch.linalg.matrix_exp(A1 * t1)
    lp = base.log_prob(x @ M.T) + t1 * float(torch.trace(A1) + torch.trace(A2))
    assert torch.allclose(stack.log_prob(x), lp, atol=1e-8, rtol=0)


def test_per_sample_steps_log_prob_matches_batch():
    torch.manual_seed(4)
    net = ODEnet(2, (16,), "tanh").double()
    x = torch.randn(6, 2, dtype=D64)
    a = CNF(net, dim=2, rtol=1e-9, atol=1e-9)
    b = CNF(net, dim=2, rtol=1e-9, atol=1e-9, per_sample_steps=True)
    with torch.no_grad():
        assert torch.allclose(a.log_prob(x), b.log_prob(x), atol=1e-7)


def test_jacobian_trace_exact_vs_jacrev():
    torch.manual_seed(5)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    z = torch.randn(3, 4, dtype=D64, requires_grad=True)
    tr, fro = jacobian_trace(mlp(z), z, frobenius=True)
    J = torch.func.vmap(torch.func.jacrev(mlp))(z.detach())
    assert torch.allclose(tr, J.diagonal(dim1=1, dim2=2).sum(1), atol=1e-12)
    assert torch.allclose(fro, J.pow(2).sum((1, 2)), atol=1e-12)
    eps = draw_probe(z.shape, "gaussian", dtype=D64)
    tr_h, fro_h = jacobian_trace(mlp(z), z, eps, frobenius=True)
    assert torch.allclose(tr_h, torch.einsum("bi,bij,bj->b", eps, J, eps), atol=1e-12)
    assert torch.allclose(fro_h, torch.einsum("bi,bij->bj", eps, J).pow(2).sum(1), atol=1e-12)


def test_concatsquash_formula():
    layer = ConcatSquashLinear(3, 2).double()
    x = torch.randn(4, 3, dtype=D64)
    t = torch.tensor(0.3, dtype=D64)
    want = (x @ layer.layer.weight.T + layer.layer.bias) * torch.sigmoid(t * layer.hyper_gate.weight.T[0]
                                                                         + layer.hyper_gate.bias) \
        + t * layer.hyper_bias.weight.T[0]
    assert torch.allclose(layer(t, x), want, atol=1e-14)
    # per-sample times (B,) give row-wise results
    ts = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64)
    rows = torch.stack([layer(ts[i], x[i:i + 1])[0] for i in range(4)])
    assert torch.allclose(layer(ts, x), rows, atol=1e-14)


def test_bad_input_errors():
    with pytest.raises(InputError, match="trace"):
        CNF(ODEnet(2), dim=2, trace="brute")
    with pytest.raises(InputError, match="t1"):
        CNF(ODEnet(2), dim=2, t1=-1.0)
    flow = CNF(ODEnet(2), dim=2)
    with pytest.raises(InputError, match="features per sample"):
        flow.log_prob(torch.randn(4, 3))
    with pytest.raises(InputError, match="unknown density"):
        sample_2d("nope", 3)


# ------------------------------------------------------------------------------------------ toy samplers
@pytest.mark.parametrize("name", sorted(TOY_2D))
def test_toy_shapes_and_reproducibility(name):
    a = sample_2d(name, 101, torch.Generator().manual_seed(0))
    b = sample_2d(name, 101, torch.Generator().manual_seed(0))
    assert a.shape == (101, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert 0.5 < float(a.std()) < 3.0


def test_eight_gaussians_components():
    n = 80_000
    x = sample_2d("8gaussians", n, torch.Generator().manual_seed(1), dtype=D64)
    c = eight_gaussian_centers(D64)
    k = torch.cdist(x, c).argmin(1)
    s = 0.5 / 1.414
    for j in range(8):
        xj = x[k == j]
        assert abs(xj.shape[0] / n - 1 / 8) < 0.01
        assert float((xj.mean(0) - c[j]).abs().max()) < 4 * s / math.sqrt(xj.shape[0]) + 1e-3
        assert abs(float(xj.std(0).mean()) - s) < 0.01


def test_checkerboard_on_dark_squares():
    x = sample_2d("checkerboard", 5000, torch.Generator().manual_seed(2))
    cell = torch.floor(x / 2).long()
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())
    assert float(x.abs().max()) <= 4.0


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_moons_circles_match_sklearn(name):
    sk = pytest.importorskip("sklearn.datasets")
    n = 20_000
    if name == "moons":
        ref = sk.make_moons(n, noise=0.1, random_state=0)[0] * 2 + np.array([-1, -0.2])
    else:
        ref = sk.make_circles(n, factor=0.5, noise=0.08, random_state=0)[0] * 3
    ours = sample_2d(name, n, torch.Generator().manual_seed(0), dtype=D64).numpy()
    assert np.allclose(ours.mean(0), ref.mean(0), atol=0.03)
    assert np.allclose(np.cov(ours.T), np.cov(ref.T), atol=0.05)
    r_o, r_r = np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1)
    assert np.allclose(np.quantile(r_o, [0.1, 0.5, 0.9]), np.quantile(r_r, [0.1, 0.5, 0.9]), atol=0.05)


# ------------------------------------------------------------------------------------------ FFJORD experiment
def test_eight_gaussians_density_normalised_and_matches_samples():
    from neurodyn.demos.ffjord import eight_gaussians_log_density

    xs = torch.linspace(-6, 6, 601, dtype=D64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    p = eight_gaussians_log_density(grid).exp()
    h = float(xs[1] - xs[0])
    assert abs(float(p.sum()) * h * h - 1.0) < 1e-6
    entropy_grid = -float((p * p.clamp_min(1e-300).log()).sum()) * h * h
    x = sample_2d("8gaussians", 100_000, torch.Generator().manual_seed(3), dtype=D64)
    lp = eight_gaussians_log_density(x)
    # the samples follow the density: Monte-Carlo entropy equals the grid entropy (about 2.84 nats)
    assert abs(-float(lp.mean()) - entropy_grid) < 4 * float(lp.std()) / math.sqrt(x.shape[0])
    assert 2.8 < entropy_grid < 2.9


@pytest.mark.slow
def test_ffjord_experiment_quick(tmp_path):
    from neurodyn.demos.ffjord import ffjord_experiment

    m = ffjord_experiment(tmp_path, iters=20, quick=True, test_n=500, log_every=10, plots=True)
    assert m["iters"] == 20 and len(m["history"]) == 2
    assert m["samples"].shape == (2000, 2) and torch.isfinite(m["samples"]).all()
    assert m["history"][-1][1] < m["history"][0][1] + 0.5 and math.isfinite(m["test_nll"])
    assert m["test_nll"] > m["data_entropy"] - 0.1  # no model beats the density's own entropy (test set noise aside)
    for f in ("metrics.json", "log.txt", "density.png", "samples.png", "trajectories.png"):
        assert (tmp_path / f).exists()


def test_taynode_penalty_closed_form():
    a, t1, d = 0.3, 0.8, 2
    x = torch.randn(4, d, dtype=D64, generator=torch.Generator().manual_seed(8))
    flow = CNF(Linear(a * torch.eye(d, dtype=D64)), dim=d, t1=t1, taylor=1.0, taylor_order=2, **TIGHT)
    with torch.no_grad():
        flow(x)
    # d^2 z/dt^2 = a^2 z(t): int ||a^2 e^{at} x||^2 dt = a^4 |x|^2 (e^{2 a t1} - 1) / (2 a)
    want = a ** 4 * x.pow(2).sum(1) * (math.exp(2 * a * t1) - 1) / (2 * a)
    assert torch.allclose(flow.penalties["taylor"], want, atol=1e-9, rtol=0)
    flow.zero_grad()
    flow(x)
    flow.penalty().backward()  # differentiable in the parameters
    assert flow.field.net.A.grad is not None and torch.isfinite(flow.field.net.A.grad).all()
