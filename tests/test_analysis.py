"""Dynamics analysis against independent values: eigenvalues/singular values of known matrices, the
analytic Jacobian of a tanh MLP, and forward/backward solves of conservative and dissipative flows."""

import math

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.analysis import jacobian_spectrum, lipschitz_estimate, reversibility, spectral_radius, stiffness_ratio
from neurodyn.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func

D64 = torch.float64


def _sorted(ev: torch.Tensor) -> torch.Tensor:
    """Order-independent comparison of eigenvalue sets: sort by (real, imag) rounded."""
    key = torch.round(ev.real * 1e6) * 1e7 + torch.round(ev.imag * 1e6) / 1e7
    return torch.gather(ev, -1, torch.argsort(key, dim=-1))


def _A() -> torch.Tensor:
    return torch.tensor([[-0.3, 1.2, 0.0], [-0.8, -0.1, 0.4], [0.2, -0.5, -0.6]], dtype=D64)


def test_spectrum_of_linear_field_equals_eigvals_at_every_time():
    A = _A()
    f = lambda t, y: y @ A.T
    t = torch.linspace(0, 2, 6, dtype=D64)
    ys = neurodyn.solve(f, torch.randn(4, 3, dtype=D64), t).ys  # (6, 4, 3)
    truth = _sorted(torch.linalg.eigvals(A))
    assert truth.imag.abs().max() > 0.1  # a complex pair: the test sees complex eigenvalues
    ev = jacobian_spectrum(f, t, ys)
    assert ev.shape == (6, 4, 3) and ev.is_complex()
    torch.testing.assert_close(_sorted(ev), truth.expand(6, 4, 3), rtol=0, atol=1e-12)
    # 1-d state, and the full Jacobian of the batch (block diagonal: A's eigenvalues B times)
    ev1 = jacobian_spectrum(f, t, ys[:, 0])
    assert ev1.shape == (6, 3)
    torch.testing.assert_close(_sorted(ev1), truth.expand(6, 3), rtol=0, atol=1e-12)
    evf = jacobian_spectrum(f, t, ys, per_sample=False)
    assert evf.shape == (6, 12)
    torch.testing.assert_close(_sorted(evf), _sorted(truth.repeat(4)).expand(6, 12), rtol=0, atol=1e-10)
    torch.testing.assert_close(spectral_radius(ev), truth.abs().max().expand(6, 4), rtol=1e-12, atol=0)


def _mlp_and_jacobian(seed=0):
    torch.manual_seed(seed)
    f = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    W1, b1, W2 = f[0].weight.detach(), f[0].bias.detach(), f[2].weight.detach()

    def jac(z):  # analytic df/dz = W2 diag(1 - tanh^2(W1 z + b1)) W1, for z (..., 3)
        return W2 @ torch.diag_embed(1 - torch.tanh(z @ W1.T + b1) ** 2) @ W1

    return f, jac


def test_spectrum_of_mlp_equals_analytic_jacobian_and_fallback_path():
    f, jac = _mlp_and_jacobian()
    t = torch.linspace(0, 1, 4, dtype=D64)
    ys = torch.randn(4, 5, 3, dtype=D64)
    truth = _sorted(torch.linalg.eigvals(jac(ys)))  # (4, 5, 3)
    torch.testing.assert_close(_sorted(jacobian_spectrum(f, t, ys)), truth, rtol=0, atol=1e-12)

    class NeedsBatch(nn.Module):  # cannot be vmapped row by row: the per-sample path falls back
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, t, z):
            if z.shape[0] < 2:
                raise RuntimeError("needs the whole batch")
            return self.f(z)

    torch.testing.assert_close(_sorted(jacobian_spectrum(NeedsBatch(), t, ys)), truth, rtol=0, atol=1e-12)


def test_stiffness_ratio_and_spectral_radius_of_diagonal_field():
    A = torch.diag(torch.tensor([-1.0, -1000.0], dtype=D64))
    f = lambda t, y: y @ A.T
    t = torch.linspace(0, 0.01, 3, dtype=D64)
    ys = neurodyn.solve(f, torch.ones(2, 2, dtype=D64), t, method="bosh3").ys
    ev = jacobian_spectrum(f, t, ys)
    assert stiffness_ratio(ev).tolist() == [[1000.0, 1000.0]] * 3
    assert spectral_radius(ev).tolist() == [[1000.0, 1000.0]] * 3
    # eigenvalues with Re >= 0 are left out; none negative -> NaN
    r = stiffness_ratio(torch.tensor([[-2 + 1j, -2 - 1j, 3 + 0j, -50 + 0j], [1 + 0j, 0j, 2 + 0j, 5 + 0j]]))
    assert r[0].item() == 25.0 and math.isnan(r[1].item())


def test_lipschitz_of_linear_field_is_largest_singular_value():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D64, generator=g))
    A = U @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=D64)) @ V.T
    f = lambda t, y: y @ A.T
    t = torch.linspace(0, 1, 3, dtype=D64)
    ys = torch.randn(3, 4, dtype=D64, generator=g)
    sigma = torch.linalg.svdvals(A)[0].item()
    assert sigma == pytest.approx(5.0, rel=1e-12)
    assert lipschitz_estimate(f, t, ys) == pytest.approx(sigma, rel=1e-6)
    # batched states, per sample and as one block-diagonal operator
    yb = torch.randn(3, 6, 4, dtype=D64, generator=g)
    assert lipschitz_estimate(f, t, yb) == pytest.approx(sigma, rel=1e-6)
    assert lipschitz_estimate(f, t, yb, per_sample=False) == pytest.approx(sigma, rel=1e-6)
    with pytest.raises(InputError):
        lipschitz_estimate(f, t, ys, iters=0)


def test_lipschitz_of_mlp_matches_analytic_jacobian_norm():
    f, jac = _mlp_and_jacobian(seed=1)
    t = torch.linspace(0, 1, 4, dtype=D64)
    ys = torch.randn(4, 5, 3, dtype=D64, generator=torch.Generator().manual_seed(2))
    truth = torch.linalg.matrix_norm(jac(ys), ord=2)  # (4, 5)
    est = lipschitz_estimate(f, t, ys, iters=40, return_all=True)
    torch.testing.assert_close(est, truth.amax(-1), rtol=1e-6, atol=0)
    assert lipschitz_estimate(f, t, ys, iters=40) == pytest.approx(truth.max().item(), rel=1e-6)


def test_reversibility_conservative_rotation_is_tiny():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D64)
    y0 = torch.tensor([1.0, 0.5], dtype=D64)
    r = reversibility(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 10.0], dtype=D64),
                      method="tsit5", rtol=1e-10, atol=1e-12)
    assert r["status_forward"] == r["status_backward"] == "success"
    assert r["rel_drift"] < 1e-8 and r["abs_drift"] < 1e-8
    assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0
    # the forward end state is the exact rotation
    c, s = math.cos(10.0), math.sin(10.0)
    torch.testing.assert_close(r["y1"], torch.tensor([c * 1.0 + s * 0.5, -s * 1.0 + c * 0.5], dtype=D64),
                               rtol=0, atol=1e-8)


def test_reversibility_dissipative_field_is_large():
    y0 = torch.tensor([1.0, 0.5], dtype=D64)
    t = torch.tensor([0.0, 5.0], dtype=D64)
    r = reversibility(lambda t, y: -30.0 * y, y0, t, rtol=1e-7, atol=1e-9)
    # y(5) = e^{-150} y0 ~ 1e-65: the forward errors (~atol) come back amplified by e^{150} ~ 1e65
    assert r["status_backward"] == "success"
    assert r["y1"].abs().max() < 1e-8
    assert r["rel_drift"] > 1e30
    assert r["nfe_backward"] > 3 * r["nfe_forward"]  # the backward leg is a growing exponential
    drift_t = r["drift_t"]
    assert drift_t.shape == (2,) and drift_t[-1].item() == 0.0 and drift_t[0].item() == pytest.approx(r["abs_drift"])


def test_reversibility_failed_leg_reports_infinite_drift_and_input_checks():
    r = reversibility(lambda t, y: -30.0 * y, torch.ones(2, dtype=D64), torch.tensor([0.0, 5.0], dtype=D64),
                      max_steps=50)
    assert math.isinf(r["abs_drift"]) and r["status_backward"] in ("max_steps_reached", "not_run")
    with pytest.raises(InputError):
        jacobian_spectrum(lambda t, y: y, torch.arange(3.0), torch.zeros(2, 3))
    with pytest.raises(InputError):
        jacobian_spectrum(lambda t, y: y, torch.arange(3.0), torch.zeros(3, 2), per_sample=True)
