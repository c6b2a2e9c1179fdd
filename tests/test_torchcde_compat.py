"""neurodyn.compat.torchcde against torchcde 0.2.5 itself: coefficients, interpolations, cdeint outputs and
gradients, torchcde's README example unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

import neurodyn
import neurodyn.compat.torchcde as ncde

torchcde = pytest.importorskip("torchcde")
D = torch.float64


def _data(seed=0, B=3, T=9, C=2, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=D)
    t = torch.cat([torch.zeros(1, dtype=D), torch.rand(T - 1, generator=g, dtype=D).add(0.3)]).cumsum(0)
    if nan:
        x[0, 0, 0] = x[0, 4, 1] = x[1, 2:4, 0] = x[2, -2:, 1] = float("nan")
        x[1, :3, 1] = float("nan")
    return x, t


@pytest.mark.parametrize("nan", [False, True])
def test_coefficients_equal_torchcde(nan):
    x, t = _data(nan=nan)
    pairs = [("natural_cubic_coeffs", (x, t)), ("hermite_cubic_coefficients_with_backward_differences", (x, t)),
             ("linear_interpolation_coeffs", (x, t))]
    for name, args in pairs:
        a, b = getattr(ncde, name)(*args), getattr(torchcde, name)(*args)
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ncde.natural_cubic_spline_coeffs(x, t), torchcde.natural_cubic_spline_coeffs(x, t)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    with pytest.warns(DeprecationWarning):
        ncde.natural_cubic_spline_coeffs(x, t)
    xr = torch.cat([t.expand(3, -1).unsqueeze(-1), x], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ncde.linear_interpolation_coeffs(xr, rectilinear=0),
                           torchcde.linear_interpolation_coeffs(xr, rectilinear=0))


def test_saved_torchcde_coefficients_evaluate_the_same():
    x, t = _data(1)
    cases = [("CubicSpline", torchcde.natural_cubic_coeffs(x, t)),
             ("CubicSpline", torchcde.hermite_cubic_coefficients_with_backward_differences(x, t)),
             ("LinearInterpolation", torchcde.linear_interpolation_coeffs(x, t))]
    for cls, coeffs in cases:
        A, B = getattr(ncde, cls)(coeffs, t), getattr(torchcde, cls)(coeffs, t)
        assert torch.equal(A.interval, B.interval) and torch.equal(A.grid_points, B.grid_points)
        pts = list(t) + [(t[i] + t[i + 1]) / 2 for i in range(8)] + [t[0] - 0.5, t[-1] + 0.5]
        for s in pts:
            assert torch.allclose(A.evaluate(s), B.evaluate(s), rtol=1e-12, atol=1e-12)
            assert torch.allclose(A.derivative(s), B.derivative(s), rtol=1e-12, atol=1e-12)
        v = torch.stack(pts[:6])
        assert torch.allclose(A.evaluate(v), B.evaluate(v), atol=1e-12)
        assert torch.allclose(A.derivative(v), B.derivative(v), atol=1e-12)


class _F(torch.nn.Module):
    def __init__(self, H=4, C=2):
        super().__init__()
        torch.manual_seed(3)
        self.lin = torch.nn.Linear(H, H * C).double()
        self.H, self.C = H, C

    def forward(self, t, z):
        return torch.tanh(self.lin(z)).view(*z.shape[:-1], self.H, self.C)


class _Prod(_F):
    def prod(self, t, z, dxdt):
        return (self.forward(t, z) @ dxdt.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("kind", ["cubic", "linear"])
def test_cdeint_matches_torchcde(kind, adjoint):
    x, t = _data(2)
    z0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=D)
    outs = []
    for lib, func in ((torchcde, _F()), (ncde, _F()), (ncde, _Prod())):
        xs = x.clone().requires_grad_(True)
        coeffs = lib.natural_cubic_coeffs(xs, t) if kind == "cubic" else lib.linear_interpolation_coeffs(xs, t)
        X = lib.CubicSpline(coeffs, t) if kind == "cubic" else lib.LinearInterpolation(coeffs, t)
        kw = dict(adjoint_params=tuple(func.parameters()) + (coeffs,)) if adjoint else {}
        tt = X.grid_points[[0, 3, -1]]
        z = lib.cdeint(X=X, func=func, z0=z0, t=tt, adjoint=adjoint, method="rk4",
                       options=dict(step_size=0.1), **kw)
        grads = torch.autograd.grad(z.pow(2).sum(), [xs, *func.parameters()])
        outs.append((z.detach(), grads))
    for z, grads in outs[1:]:
        assert z.shape == outs[0][0].shape == (3, 3, 4)
        assert torch.allclose(z, outs[0][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, outs[0][1]):
            assert torch.allclose(a, b, rtol=1e-7 if adjoint else 1e-10, atol=1e-9)


def test_cdeint_adaptive_matches_torchcde_to_tolerance():
    x, t = _data(5)
    z0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=D)
    res = []
    for lib in (torchcde, ncde):
        X = lib.CubicSpline(lib.natural_cubic_coeffs(x, t), t)
        res.append(lib.cdeint(X=X, func=_F(), z0=z0, t=X.interval, method="dopri5", rtol=1e-10, atol=1e-12))
    assert (res[0] - res[1]).abs().max() < 1e-7


def test_adjoint_path_gradients_without_adjoint_params_and_stacked_cdes():
    """Two stacked CDEs: the first's outputs on the grid are the second's data. Gradients for the coefficients, the
    knot times, the output times and the parameters equal direct backpropagation's (each reached exactly once)."""
    x, t = _data(7, B=2, T=6)
    z0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(8), dtype=D)
    f1, f2 = _F(), _F(4, 4)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in f2.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.3)
    res = []
    for adjoint in (False, True):
        xs, ts = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        X = ncde.CubicSpline(ncde.natural_cubic_coeffs(xs, ts), ts)
        opts = dict(step_size=0.1, jump_t=t)  # steps within pieces: direct and adjoint converge to one gradient
        z1 = ncde.cdeint(X=X, func=f1, z0=z0, t=ts, adjoint=adjoint, method="rk4", options=opts)
        Y = ncde.CubicSpline(ncde.natural_cubic_coeffs(z1, ts), ts)
        z2 = ncde.cdeint(X=Y, func=f2, z0=z1[:, 0], t=ts[[0, -1]], adjoint=adjoint, method="rk4", options=opts)
        loss = z2[:, -1].pow(2).sum() + z1[:, 2].sum()
        res.append(torch.autograd.grad(loss, [xs, ts, *f1.parameters(), *f2.parameters()]))
    for a, b in zip(*res):
        # continuous adjoint vs discrete gradient: close (rk4, h = 0.1), where a double count would be 2x
        assert (a - b).abs().max() <= 5e-3 * b.abs().max()
    assert res[0][1].abs().max() > 1e-3  # the times do get a gradient


def test_torchsde_backend_matches_torchcde():
    pytest.importorskip("torchsde")
    x, t = _data(10)
    z0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(11), dtype=D)
    res = []
    for lib in (torchcde, ncde):
        X = lib.CubicSpline(lib.natural_cubic_coeffs(x, t), t)
        tt = torch.tensor([0.0, 0.5, 1.0], dtype=D)
        res.append(lib.cdeint(X=X, func=_F(), z0=z0, t=tt, backend="torchsde", method="midpoint", dt=0.05,
                              adjoint=False))
    assert torch.allclose(res[0], res[1], rtol=1e-10, atol=1e-12)


README_EXAMPLE = '''
import torch
batch, length, input_channels = 1, 10, 2
hidden_channels = 3
t = torch.linspace(0, 1, length)
t_ = t.unsqueeze(0).unsqueeze(-1).expand(batch, length, 1)
x_ = torch.rand(batch, length, input_channels - 1)
x = torch.cat([t_, x_], dim=2)
coeffs = torchcde.hermite_cubic_coefficients_with_backward_differences(x)
X = torchcde.CubicSpline(coeffs)

class F(torch.nn.Module):
    def __init__(self):
        super(F, self).__init__()
        self.linear = torch.nn.Linear(hidden_channels, hidden_channels * input_channels)
    def forward(self, t, z):
        return self.linear(z).view(batch, hidden_channels, input_channels)

func = F()
z0 = torch.rand(batch, hidden_channels)
out = torchcde.cdeint(X=X, func=func, z0=z0, t=X.interval)
'''


def test_readme_example_runs_unchanged():
    outs = []
    for mod in (torchcde, ncde):
        torch.manual_seed(0)
        scope = {"torchcde": mod}
        exec(README_EXAMPLE, scope)
        outs.append(scope["out"])
    assert outs[1].shape == outs[0].shape == (1, 2, 3)
    assert torch.allclose(outs[0], outs[1], atol=2e-2)  # float32, both at torchcde's default rtol 1e-4


def test_bad_input_is_named():
    x, t = _data(12)
    X = ncde.CubicSpline(ncde.natural_cubic_coeffs(x, t), t)
    with pytest.raises(neurodyn.InputError, match="hidden_channels"):
        ncde.cdeint(X=X, func=lambda t, z: z, z0=torch.zeros(3, 4, dtype=D), t=X.interval, adjoint=False)
    with pytest.raises(neurodyn.InputError, match="backend"):
        ncde.cdeint(X=X, func=_F(), z0=torch.zeros(3, 4, dtype=D), t=X.interval, backend="jax")
    with pytest.raises(neurodyn.InputError, match="detach"):
        ncde.LinearInterpolation(x, t.clone().requires_grad_(True))
    assert neurodyn.cdeint is ncde.cdeint


class _TanhField(torch.nn.Module):
    """f(t, z) = tanh(z W + b) reshaped to (batch, hidden, channels)."""

    def __init__(self, hidden, channels):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = torch.nn.Linear(hidden, hidden * channels).double()
        with torch.no_grad():
            self.lin.weight.copy_(0.5 * torch.randn(self.lin.weight.shape, generator=g, dtype=torch.float64))
        self.shape = (hidden, channels)

    def forward(self, t, z):
        return self.lin(z).tanh().view(z.shape[0], *self.shape)


def test_linear_path_with_grid_points_and_eps_options_as_torchcde_examples_pass_them():
    """``cdeint(..., method="dopri5", options=dict(grid_points=X.grid_points, eps=1e-5))`` on a linear path (as
    torchcde's example.py calls it): accepted (the knots become jump times) and the solution agrees with
    torchcde's, which ignores both options with a warning, solved at tight tolerances."""
    x = _data(seed=4, B=2, T=12, C=2)[0]
    field = _TanhField(3, x.shape[-1])
    z0 = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]], dtype=torch.float64)
    X = ncde.LinearInterpolation(ncde.linear_interpolation_coeffs(x))
    Xt = torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x))
    opts = dict(grid_points=X.grid_points, eps=1e-5)
    ours = ncde.cdeint(X, field, z0, X.interval, adjoint=False, method="dopri5", rtol=1e-8, atol=1e-10, options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq: "Unexpected arguments {'grid_points': ..., 'eps': ...}"
        theirs = torchcde.cdeint(Xt, field, z0, Xt.interval, adjoint=False, method="dopri5", rtol=1e-11,
                                 atol=1e-13, options=opts)
    assert float((ours - theirs).abs().max()) < 1e-7
    assert float((ours[:, -1] - z0).abs().max()) > 0.05
