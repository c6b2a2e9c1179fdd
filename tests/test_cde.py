"""Control paths, neural CDEs and log-signatures against independent truths (scipy, closed forms, finite
differences, Chen's identity)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.interpolate
import scipy.linalg
import torch

import neurodyn
from neurodyn.paths import (
    CubicPath,
    LinearPath,
    fill_missing,
    logsig_windows,
    natural_cubic_coeffs,
    observation_channels,
)

D = torch.float64


def _times(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(1, dtype=D), torch.rand(n - 1, generator=g, dtype=D).add(0.2)]).cumsum(0)


def _paths(ts, xs):
    return {"linear": LinearPath(ts, xs), "natural": CubicPath.natural(ts, xs), "hermite": CubicPath.hermite(ts, xs)}


def test_paths_reproduce_linear_functions_exactly():
    ts = _times(7)
    xs = torch.stack([2.0 - 3.0 * ts, 0.5 * ts + 1.0], -1).expand(3, 7, 2)
    for name, X in _paths(ts, xs).items():
        for s in torch.linspace(float(ts[0]) - 0.3, float(ts[-1]) + 0.3, 23, dtype=D):
            want = torch.stack([2.0 - 3.0 * s, 0.5 * s + 1.0]).expand(3, 2)
            assert torch.allclose(X.evaluate(s), want, rtol=0, atol=1e-12), name
            assert torch.allclose(X.derivative(s), torch.tensor([-3.0, 0.5], dtype=D).expand(3, 2), atol=1e-11), name


def test_cubic_path_reproduces_a_cubic_from_its_taylor_coefficients():
    ts = _times(6, 1)
    p = np.polynomial.Polynomial([0.3, -1.0, 0.7, 0.25])
    tk = ts[:-1].numpy()
    coeffs = torch.tensor(np.stack([p(tk), p.deriv(1)(tk), p.deriv(2)(tk), p.deriv(3)(tk) / 2], -1), dtype=D)
    X = CubicPath(ts, coeffs)
    for s in np.linspace(float(ts[0]), float(ts[-1]), 31):
        assert abs(float(X.evaluate(float(s))) - p(s)) < 1e-12
        assert abs(float(X.derivative(float(s))) - p.deriv(1)(s)) < 1e-12


def test_natural_cubic_matches_scipy():
    ts = _times(12, 2)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 3, 12, 4, generator=g, dtype=D)
    X = CubicPath.natural(ts, xs)
    q = np.linspace(float(ts[0]), float(ts[-1]), 101)
    cs = scipy.interpolate.CubicSpline(ts.numpy(), xs.numpy(), axis=-2, bc_type="natural")
    got = torch.stack([X.evaluate(float(s)) for s in q], -2).numpy()
    dgot = torch.stack([X.derivative(float(s)) for s in q], -2).numpy()
    assert np.abs(got - cs(q)).max() < 1e-12
    assert np.abs(dgot - cs(q, 1)).max() < 1e-11


def test_hermite_is_c1_and_causal():
    ts = _times(8, 4)
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(8, 2, generator=g, dtype=D)
    X = CubicPath.hermite(ts, xs)
    for k in range(1, 7):
        eps = 1e-9
        left, right = X.derivative(float(ts[k]) - eps), X.derivative(float(ts[k]) + eps)
        assert torch.allclose(left, right, atol=1e-7)
        assert torch.allclose(X.evaluate(float(ts[k])), xs[k], atol=1e-12)
    # causal: X on [t_0, t_4] does not change when the data after x_4 change
    ys = xs.clone()
    ys[5:] += 10.0
    Y = CubicPath.hermite(ts, ys)
    for s in torch.linspace(0, float(ts[4]), 17, dtype=D):
        assert torch.equal(X.evaluate(s), Y.evaluate(s))


@pytest.mark.parametrize("name", ["linear", "natural", "hermite"])
def test_derivative_matches_finite_differences(name):
    ts = _times(9, 6)
    g = torch.Generator().manual_seed(7)
    X = _paths(ts, torch.randn(3, 9, 2, generator=g, dtype=D))[name]
    h = 1e-6
    for k in range(8):
        s = float(ts[k] + 0.37 * (ts[k + 1] - ts[k]))
        fd = (X.evaluate(s + h) - X.evaluate(s - h)) / (2 * h)
        assert torch.allclose(X.derivative(s), fd, rtol=1e-7, atol=1e-7)


def test_missing_values_and_observation_channels():
    nan = float("nan")
    ts = torch.tensor([0.0, 1.0, 3.0, 4.0, 6.0], dtype=D)
    x = torch.tensor([[nan, 1.0], [2.0, nan], [nan, nan], [5.0, 3.0], [nan, nan]], dtype=D)
    f = fill_missing(x, ts)
    assert torch.allclose(f[:, 0], torch.tensor([2.0, 2.0, 4.0, 5.0, 5.0], dtype=D))  # ends constant, 2->5 linear
    assert torch.allclose(f[:, 1], torch.tensor([1.0, 1.5, 2.5, 3.0, 3.0], dtype=D))  # 1 at t=0 -> 3 at t=4
    oc = observation_channels(x)
    assert torch.equal(oc[:, 2:], torch.tensor([[0, 1], [1, 1], [1, 1], [2, 2], [2, 2]], dtype=D))
    m = observation_channels(x, "mask")[:, 2:]
    assert torch.equal(m, (~torch.isnan(x)).to(D))
    # the natural spline with a gap is the spline through the observed points only (scipy on them)
    c = natural_cubic_coeffs(x[:, :1].T.unsqueeze(-1).squeeze(0).reshape(5, 1), ts)
    obs_t, obs_x = np.array([0.0, 1.0, 4.0, 6.0]), np.array([2.0, 2.0, 5.0, 5.0])
    cs = scipy.interpolate.CubicSpline(obs_t, obs_x, bc_type="natural")
    X = CubicPath(ts, c)
    for s in np.linspace(0, 6, 25):
        assert abs(float(X.evaluate(float(s))) - cs(s)) < 1e-12


def _linear_field(A):
    # f(t, z) = [A_c z]_c : (B, H) -> (B, H, C)
    return lambda t, z: torch.einsum("cij,bj->bic", A, z)


def test_cde_linear_field_matches_matrix_exponentials():
    g = torch.Generator().manual_seed(8)
    H, C, T = 3, 2, 6
    A = torch.randn(C, H, H, generator=g, dtype=D) * 0.5
    ts = _times(T, 9)
    xs = torch.randn(2, T, C, generator=g, dtype=D)
    z0 = torch.randn(2, H, generator=g, dtype=D)
    sol = neurodyn.solve(neurodyn.ControlTerm(_linear_field(A), LinearPath(ts, xs)), z0, ts, rtol=1e-11, atol=1e-13)
    for b in range(2):
        z = z0[b].numpy()
        for k in range(T - 1):
            dx = (xs[b, k + 1] - xs[b, k]).numpy()
            z = scipy.linalg.expm(np.einsum("cij,c->ij", A.numpy(), dx)) @ z
            assert np.abs(sol.ys[k + 1, b].numpy() - z).max() < 1e-9
    # one channel: the solution depends on X(t) - X(t_0) only, whatever the path between (any interpolant)
    x1 = xs[..., :1]
    for X in (CubicPath.natural(ts, x1), CubicPath.hermite(ts, x1)):
        sol = neurodyn.solve(neurodyn.ControlTerm(_linear_field(A[:1]), X), z0, ts[[0, -1]], rtol=1e-11, atol=1e-13)
        for b in range(2):
            want = scipy.linalg.expm(A[0].numpy() * float(x1[b, -1, 0] - x1[b, 0, 0])) @ z0[b].numpy()
            assert np.abs(sol.ys[-1, b].numpy() - want).max() < 1e-9


def test_cubic_knots_are_step_times_and_linear_knots_jump_times():
    ts = _times(5)
    xs = torch.zeros(5, 1, dtype=D)
    f = lambda t, z: z.unsqueeze(-1)  # noqa: E731
    lin, cub = neurodyn.ControlTerm(f, LinearPath(ts, xs)), neurodyn.ControlTerm(f, CubicPath.natural(ts, xs))
    assert lin.knots == tuple(ts.tolist()) and lin.step_knots == ()
    assert cub.step_knots == tuple(ts.tolist()) and cub.knots == ()
    assert CubicPath(ts, natural_cubic_coeffs(xs, ts), land=False).knots == ()
    # data requiring grad: the knots are jump times (the sensitivities of dX/dt jump there)
    grad_term = neurodyn.ControlTerm(f, CubicPath.hermite(ts, xs.clone().requires_grad_(True)))
    assert grad_term.knots == tuple(ts.tolist()) and grad_term.step_knots == ()


class _Field(torch.nn.Module):
    def __init__(self, H, C):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.W = torch.nn.Parameter(torch.randn(H * C, H, generator=g, dtype=D) * 0.4)
        self.b = torch.nn.Parameter(torch.randn(H * C, generator=g, dtype=D) * 0.1)
        self.H, self.C = H, C

    def forward(self, t, z):
        return torch.tanh(z @ self.W.T + self.b).view(*z.shape[:-1], self.H, self.C)


_FAST = {("natural", "adjoint"), ("hermite", "direct"), ("linear", "checkpoint")}


@pytest.mark.parametrize("kind,gradient", [
    pytest.param(k, g, marks=() if (k, g) in _FAST else pytest.mark.slow)
    for k in ("linear", "natural", "hermite") for g in ("direct", "adjoint", "checkpoint", "interpolated")])
def test_gradients_data_knot_times_params_vs_finite_differences(gradient, kind):
    H, C, T = 3, 2, 5
    g = torch.Generator().manual_seed(11)
    ts0 = _times(T, 12)
    xs0 = torch.randn(2, T, C, generator=g, dtype=D)
    z0 = torch.randn(2, H, generator=g, dtype=D)
    w = torch.randn(2, 2, H, generator=g, dtype=D)
    f = _Field(H, C)
    t_grad = kind != "linear"

    def loss(xs, ts):
        X = LinearPath(ts, xs) if kind == "linear" else getattr(CubicPath, kind)(ts, xs)
        tout = torch.stack([ts[0], ts[2], ts[-1]]).detach()
        sol = neurodyn.solve(neurodyn.ControlTerm(f, X), z0, tout, rtol=1e-9, atol=1e-11, gradient=gradient)
        return (sol.ys[1:] * w).sum()

    xs = xs0.clone().requires_grad_(True)
    ts = ts0.clone().requires_grad_(t_grad)
    L = loss(xs, ts)
    grads = torch.autograd.grad(L, [xs, f.W] + ([ts] if t_grad else []))
    eps = 1e-5
    with torch.no_grad():
        def fd(tensor, idx):
            old = tensor[idx].item()
            tensor[idx] = old + eps
            up = loss(xs0 if tensor is not xs0 else tensor, ts0 if tensor is not ts0 else tensor)
            tensor[idx] = old - eps
            dn = loss(xs0 if tensor is not xs0 else tensor, ts0 if tensor is not ts0 else tensor)
            tensor[idx] = old
            return float(up - dn) / (2 * eps)
        for idx in [(0, 0, 0), (1, 4, 1)]:
            assert grads[0][idx].item() == pytest.approx(fd(xs0, idx), rel=2e-4, abs=1e-6)
        W = f.W.data
        for idx in [(3, 2)]:
            old = W[idx].item()
            W[idx] = old + eps
            up = loss(xs0, ts0)
            W[idx] = old - eps
            dn = loss(xs0, ts0)
            W[idx] = old
            assert grads[1][idx].item() == pytest.approx(float(up - dn) / (2 * eps), rel=2e-4, abs=1e-6)
        if t_grad:
            for idx in [(1,), (3,)]:  # interior knots (the output times are detached copies of other knots)
                assert grads[2][idx].item() == pytest.approx(fd(ts0, idx), rel=2e-4, abs=1e-6)
            assert grads[2].abs().max() > 1e-3


def test_linear_path_refuses_knot_time_gradients():
    ts = _times(4).requires_grad_(True)
    with pytest.raises(neurodyn.InputError, match="detach"):
        LinearPath(ts, torch.zeros(4, 1, dtype=D))


def _exact_logsig(points):
    """Depth-2 log-signature of the piecewise-linear path through ``points`` (m+1, C) by Chen's identity."""
    c = points.shape[1]
    s1, s2 = np.zeros(c), np.zeros((c, c))
    for d in np.diff(points, axis=0):
        s2 = s2 + np.outer(s1, d) + np.outer(d, d) / 2
        s1 = s1 + d
    log2 = s2 - np.outer(s1, s1) / 2
    iu, ju = np.triu_indices(c, 1)
    return np.concatenate([s1, log2[iu, ju]])


def test_logsig_windows_match_chens_identity():
    g = torch.Generator().manual_seed(13)
    T, C = 23, 3
    ts = _times(T, 14)
    xs = torch.randn(2, T, C, generator=g, dtype=D)
    wl = 1.3
    out = logsig_windows(xs, 2, wl, ts)
    t_np, n_win = ts.numpy(), int(np.ceil((float(ts[-1]) - float(ts[0])) / wl))
    assert out.shape == (2, n_win + 1, C + C * (C - 1) // 2)
    assert torch.equal(out[:, 0, :C], xs[:, 0]) and torch.all(out[:, 0, C:] == 0)
    ends = np.minimum(t_np[0] + wl * np.arange(n_win + 1), t_np[-1])
    for b in range(2):
        x_np = xs[b].numpy()
        for k in range(n_win):
            inner = t_np[(t_np > ends[k]) & (t_np < ends[k + 1])]
            tt = np.concatenate([[ends[k]], inner, [ends[k + 1]]])
            pts = np.stack([np.interp(tt, t_np, x_np[:, c]) for c in range(C)], -1)
            got = (out[b, k + 1] - out[b, k]).numpy()
            assert np.abs(got - _exact_logsig(pts)).max() < 1e-12
    assert torch.allclose(logsig_windows(xs, 1, wl, ts), out[..., :C])


def test_logsig_is_differentiable():
    xs = torch.randn(1, 9, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: logsig_windows(x, 2, 3.0), (xs,))


def test_neural_cde_shapes_gradients_and_causality():
    torch.manual_seed(0)
    model = neurodyn.NeuralCDE(3, 6, 2, path="hermite", method="rk4", step_size=0.25).double()
    x = torch.randn(4, 9, 3, dtype=D)
    x[1, 3, 0] = float("nan")
    t = torch.linspace(0, 8, 9, dtype=D)
    times = torch.tensor([2.0, 5.0, 8.0], dtype=D)
    y = model(x, t, times)
    assert y.shape == (4, 3, 2) and torch.isfinite(y).all()
    assert torch.allclose(model(x, t), y[:, -1])
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Hermite: the output at t = 5 uses observations up to t = 6 only
    x2 = x.clone()
    x2[:, 7:] += 3.0
    assert torch.equal(model(x2, t, times)[:, :2], y[:, :2].detach())
    assert not torch.allclose(model(x2, t, times)[:, 2], y[:, 2].detach())
    with pytest.raises(neurodyn.InputError, match="channels"):
        model(torch.randn(4, 9, 2, dtype=D), t)


@pytest.mark.parametrize("activation", ["softplus", "relu", "tanh"])
def test_cde_field_layers_match_the_written_mlp(activation):
    from neurodyn.models import CDEField

    torch.manual_seed(0)
    f = CDEField(5, 3, width=7, depth=4, activation=activation).double()
    z = torch.randn(6, 5, dtype=D)
    act = {"softplus": lambda u: torch.log1p(torch.exp(u)), "relu": lambda u: u.clamp_min(0), "tanh": torch.tanh}
    lins = [m for m in f.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(5, 7), (7, 7), (7, 7), (7, 15)]
    h = z
    for m in lins[:-1]:
        h = act[activation](h @ m.weight.T + m.bias)
    want = torch.tanh(h @ lins[-1].weight.T + lins[-1].bias).reshape(6, 5, 3)
    assert torch.allclose(f(torch.tensor(0.0, dtype=D), z), want, rtol=0, atol=1e-14)


def test_cde_field_rejects_unknown_activation_and_depth():
    from neurodyn.models import CDEField

    with pytest.raises(neurodyn.InputError, match="activation must be one of softplus, relu, tanh"):
        CDEField(4, 2, activation="gelu")
    with pytest.raises(neurodyn.InputError, match="depth"):
        CDEField(4, 2, depth=0)
