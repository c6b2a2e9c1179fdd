"""Per-sample stepping: every row its own step size, output times, status; against scipy per row."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import neurodyn

F64 = torch.float64


def _vdp_batch(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


def _scipy_vdp(m, t_eval):
    sol = solve_ivp(lambda tt, yy: [yy[1], m * (1 - yy[0] ** 2) * yy[1] - yy[0]], (t_eval[0], t_eval[-1]),
                    [2.0, 0.0], method="Radau", rtol=1e-11, atol=1e-12, t_eval=t_eval)
    return sol.y.T


# bosh3 and adaptive_heun (2 s each on one core) run with -m slow.
@pytest.mark.parametrize("method", ["dopri5", "tsit5", pytest.param("bosh3", marks=pytest.mark.slow), "dopri8",
                                    pytest.param("adaptive_heun", marks=pytest.mark.slow)])
def test_matches_scipy_per_row_and_steps_differ(method):
    mu = torch.tensor([0.5, 2.0, 8.0, 15.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=F64)
    t = torch.linspace(0, 6, 9, dtype=F64)
    rtol = 1e-4 if method == "adaptive_heun" else 1e-7
    sol = neurodyn.solve(_vdp_batch(mu), y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, per_sample_steps=True)
    ref = np.stack([_scipy_vdp(float(m), t.numpy()) for m in mu], 1)
    err = np.abs(sol.ys.numpy() - ref).max()
    assert err < (2e-2 if method == "adaptive_heun" else 5e-4), err
    steps = sol.stats["steps_per_sample"]
    assert len(set(steps.tolist())) > 1  # rows really step on their own
    assert sol.sample_status == ["success"] * 4


def test_each_row_equals_its_own_solve():
    """A per-sample solve of row b is the same computation as a plain solve of row b alone."""
    mu = torch.tensor([1.0, 5.0, 12.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    t = torch.linspace(0, 5, 7, dtype=F64)
    sol = neurodyn.solve(_vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, per_sample_steps=True)
    for b in range(3):
        one = neurodyn.solve(_vdp_batch(mu[b:b + 1]), y0[b:b + 1], t, rtol=1e-6, atol=1e-8)
        assert torch.allclose(sol.ys[:, b], one.ys[:, 0], rtol=1e-9, atol=1e-10)
        assert int(sol.stats["steps_per_sample"][b]) == one.stats["steps"]


def test_per_sample_output_times():
    a = torch.tensor([[-1.0], [-2.0], [-0.5]], dtype=F64)
    t = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.1, 0.2], [0.0, 2.0, 4.0]], dtype=F64)
    sol = neurodyn.solve(lambda tt, y: a * y, torch.ones(3, 1, dtype=F64), t, rtol=1e-10, atol=1e-12,
                         per_sample_steps=True)
    exact = torch.exp(a.view(1, 3) * t.T).unsqueeze(-1)
    assert torch.allclose(sol.ys, exact, rtol=1e-8, atol=1e-12)


def test_failure_of_one_sample_keeps_the_others():
    def f(t, y):  # row 1 blows up (y' = y^2 from 1: singular at t = 1), rows 0 and 2 decay
        rate = torch.tensor([[-1.0], [0.0], [-2.0]], dtype=F64)
        return rate * y + torch.tensor([[0.0], [1.0], [0.0]], dtype=F64) * y * y
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    sol = neurodyn.solve(f, torch.ones(3, 1, dtype=F64), t, per_sample_steps=True, on_failure="return")
    assert sol.sample_status[0] == "success" and sol.sample_status[2] == "success"
    assert sol.sample_status[1] in ("step_size_underflow", "non_finite")
    assert abs(float(sol.t_final_per_sample[1]) - 1.0) < 1e-3
    assert abs(float(sol.ys[2, 0, 0]) - np.exp(-2.0)) < 1e-6
    assert abs(float(sol.ys[1, 1, 0]) - 2.0) < 1e-5  # y(0.5) = 1 / (1 - 0.5)
    assert torch.isnan(sol.ys[2, 1, 0])
    with pytest.raises(neurodyn.SolveFailure):
        neurodyn.solve(f, torch.ones(3, 1, dtype=F64), t, per_sample_steps=True)


def test_direct_gradients_match_finite_differences():
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)

    def loss(w_, y0_):
        return neurodyn.solve(lambda tt, y: torch.tanh(y @ w_), y0_, t, rtol=1e-10, atol=1e-12,
                              per_sample_steps=True).ys.pow(2).sum()

    assert torch.autograd.gradcheck(loss, (w, y0), atol=1e-6, rtol=1e-5)


def test_bad_input():
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(neurodyn.InputError, match="adaptive"):
        neurodyn.solve(lambda tt, y: -y, y0, t, method="rk4", step_size=0.1, per_sample_steps=True)
    with pytest.raises(neurodyn.InputError, match="not the times"):
        neurodyn.solve(lambda tt, y: -y, y0, t.clone().requires_grad_(True), gradient="adjoint", per_sample_steps=True)
    with pytest.raises(neurodyn.InputError, match="adjoint_method"):
        neurodyn.solve(lambda tt, y: -y, y0, t, gradient="adjoint", adjoint_method="rk4", per_sample_steps=True)
    with pytest.raises(neurodyn.InputError, match="one row per sample"):
        neurodyn.solve(lambda tt, y: -y, y0, torch.zeros(3, 3, dtype=F64), per_sample_steps=True)
    calls = []
    with pytest.raises(neurodyn.InputError, match="step_callbacks"):  # not silently ignored
        neurodyn.solve(lambda tt, y: -y, y0, t, per_sample_steps=True,
                       step_callbacks={"accept": lambda tt, y, h: calls.append(tt)})
    with pytest.raises(neurodyn.InputError, match="callback"):
        neurodyn.solve(lambda tt, y: -y, y0, t, per_sample_steps=True, callback=lambda *a: calls.append(a))
    assert calls == []


def test_rows_in_both_directions_match_scipy():
    """Per-sample times may run forward for some rows and backward for others (a time-dependent field)."""
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5], [2.0, -1.0]], dtype=F64)
    t = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.3, -0.5], [0.0, 2.0, 3.0]], dtype=F64)
    sol = neurodyn.solve(lambda tt, y: torch.tanh(y @ w) * (1 + 0.1 * tt.view(-1, 1)), y0, t, rtol=1e-10,
                         atol=1e-12, per_sample_steps=True)
    wn = w.numpy()
    for b in range(3):
        ref = solve_ivp(lambda tt, y: np.tanh(y @ wn) * (1 + 0.1 * tt), (float(t[b, 0]), float(t[b, -1])),
                        y0[b].numpy(), t_eval=t[b].numpy(), method="DOP853", rtol=1e-12, atol=1e-13)
        assert np.abs(ref.y.T - sol.ys[:, b].numpy()).max() < 1e-8
    assert abs(float(sol.t_final_per_sample[1]) + 0.5) < 1e-15


def test_per_row_tolerances_and_a_row_with_nonfinite_start():
    """A (B, n) tolerance acts per row; a row whose derivative is NaN at the start stops there alone."""
    a = torch.tensor([[-1.0], [-2.0], [-0.5]], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    rtol = torch.tensor([[1e-3], [1e-10], [1e-6]], dtype=F64)
    sol = neurodyn.solve(lambda tt, y: a * y, torch.ones(3, 1, dtype=F64), t, rtol=rtol, atol=1e-12,
                         per_sample_steps=True)
    err = (sol.ys[:, :, 0] - torch.exp(a.view(1, 3) * t.view(-1, 1))).abs().max(0).values
    steps = sol.stats["steps_per_sample"]
    assert err[1] < 1e-9 < err[0] and steps[0] < steps[2] < steps[1]

    def f(tt, y):
        return torch.cat([-y[:1], torch.log(y[1:2] - 2.0), -y[2:]])  # row 1: log of a negative number

    sol = neurodyn.solve(f, torch.ones(3, 1, dtype=F64), t, per_sample_steps=True, on_failure="return")
    assert sol.sample_status == ["success", "non_finite", "success"]
    assert float(sol.t_final_per_sample[1]) == 0.0 and sol.stats["steps_per_sample"][1] == 0
    assert torch.allclose(sol.ys[-1, 2, 0], torch.exp(torch.tensor(-2.0, dtype=F64)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradient methods with per-sample steps
# ----------------------------------------------------------------------------------------------
def _mlp_rows():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y) * (1 + 0.2 * t.view(-1, 1))

    return Field(), torch.randn(4, 3, dtype=F64), torch.randn(5, 4, 3, dtype=F64)


# adaptive_heun's adjoint and interpolated cases (the longest, 2.5 s each on one core) run with -m slow.
@pytest.mark.parametrize("method,gradient", [
    pytest.param(m, g, marks=pytest.mark.slow) if m == "adaptive_heun" and g != "checkpoint" else (m, g)
    for m in ("dopri5", "dopri8", "bosh3", "adaptive_heun") for g in ("adjoint", "checkpoint", "interpolated")])
def test_gradient_methods_match_direct(gradient, method):
    """Every gradient method agrees with autograd through the per-sample loop; checkpoint replays the same
    computation (equal to rounding), the continuous adjoints to the tolerance."""
    field, y0, weights = _mlp_rows()
    y0.requires_grad_(True)
    t = torch.tensor([[0.0, 0.3, 0.6, 1.0, 1.5]] * 2 + [[0.0, -0.2, -0.5, -0.7, -1.0]] * 2, dtype=F64)
    rtol = 1e-6 if method == "adaptive_heun" else 1e-9
    grads = {}
    for g in ("direct", gradient):
        sol = neurodyn.solve(field, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, per_sample_steps=True,
                             gradient=g, checkpoints=3)
        assert sol.stats["gradient"] == g
        out = torch.autograd.grad((sol.ys * weights).sum(), [y0, *field.parameters()])
        grads[g] = torch.cat([x.reshape(-1) for x in out])
    scale = grads["direct"].abs().max()
    tol = 1e-12 if gradient == "checkpoint" else (2e-4 if method == "adaptive_heun" else 1e-6)
    assert (grads[gradient] - grads["direct"]).abs().max() <= tol * scale


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint", "interpolated"])
def test_gradient_methods_match_finite_differences(gradient):
    """d(loss)/d(w, y0) against central differences of tight per-sample solves (a closure: params=[w])."""
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.2, 0.5], [-1.0, 2.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=F64)
    mu = torch.tensor([[0.5], [1.0], [3.0]], dtype=F64)  # rows differ in stiffness: different steps
    weights = torch.randn(4, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def loss(w_, y0_, g="direct", rtol=1e-12):
        sol = neurodyn.solve(lambda tt, y: mu * torch.tanh(y @ w_), y0_, t, rtol=rtol, atol=rtol * 1e-2,
                             per_sample_steps=True, gradient=g, params=[w_])
        return (sol.ys * weights).sum()

    gw, gy = torch.autograd.grad(loss(w, y0, gradient, 1e-10), (w, y0))
    eps = 1e-6
    with torch.no_grad():
        for x, gx in ((w, gw), (y0, gy)):
            for i in range(x.numel()):
                xp, xm = x.clone(), x.clone()
                xp.view(-1)[i] += eps
                xm.view(-1)[i] -= eps
                args_p, args_m = ((xp, y0), (xm, y0)) if x is w else ((w, xp), (w, xm))
                fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
                assert abs(float(gx.view(-1)[i]) - float(fd)) < 1e-6 * (1 + abs(float(fd)))


def test_adjoint_backward_steps_per_sample_and_reports():
    """The backward solve steps per sample too (the stiffer row takes more backward steps); its stats are
    reported, and another adjoint method may be used."""
    mu = torch.tensor([0.5, 3.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    f = _vdp_batch(mu)
    ref = torch.autograd.grad(neurodyn.solve(f, y0, t, rtol=1e-10, atol=1e-12, per_sample_steps=True).ys.sum(),
                              (mu, y0))
    sol = neurodyn.solve(f, y0, t, rtol=1e-10, atol=1e-12, per_sample_steps=True, gradient="adjoint",
                         adjoint_method="tsit5", params=[mu])
    got = torch.autograd.grad(sol.ys.sum(), (mu, y0))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9)
    back = sol.stats["steps_backward_per_sample"]
    assert back[1] > back[0] > 0 and sol.stats["nfe_backward"] > 0 and sol.stats["adjoint_drift"] < 1e3


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint", "interpolated"])
def test_failed_sample_cannot_be_differentiated(gradient):
    """A per-sample solve with a failed row returns its partial solution, and its backward pass says why it stops."""
    w = torch.tensor([1.0], dtype=F64, requires_grad=True)

    def f(t, y):  # row 1 blows up at t = 1 (y' = y^2 from 1)
        return torch.cat([-w * y[:1], y[1:2] ** 2])

    sol = neurodyn.solve(f, torch.ones(2, 1, dtype=F64), torch.tensor([0.0, 0.5, 2.0], dtype=F64),
                         per_sample_steps=True, gradient=gradient, params=[w], on_failure="return")
    assert sol.sample_status[0] == "success" and sol.sample_status[1] != "success"
    assert abs(float(sol.ys[1, 1, 0].detach()) - 2.0) < 1e-5
    with pytest.raises(neurodyn.SolveFailure, match="cannot differentiate"):
        sol.ys[:2].sum().backward()


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_non_contiguous_y0(gradient):
    """A transposed (non-contiguous) y0: y' = -w y per row, y(1) = y0 exp(-w), dy(1)/dw summed = -sum(y0) exp(-w)."""
    y0 = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).t()
    assert not y0.is_contiguous()
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sol = neurodyn.solve(lambda t, y: -w * y, y0, torch.linspace(0, 1, 3, dtype=torch.float64), per_sample_steps=True,
                         gradient=gradient, params=[w], rtol=1e-10, atol=1e-12)
    sol.ys[-1].sum().backward()
    e = math.exp(-0.7)
    torch.testing.assert_close(sol.ys[-1].detach(), y0 * e, rtol=1e-9, atol=1e-10)
    assert abs(float(w.grad) + float(y0.sum()) * e) < 1e-8


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_row_dense_output_equals_shared_step_dense_output(method):
    """The rows' dense output (one product P^T kh, Horner's rule in theta) against the shared-step loop's own
    interpolation of the same steps: a single row takes the shared loop's steps, so the outputs between them agree to
    rounding."""
    mu = torch.tensor([4.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    t = torch.linspace(0, 7, 23, dtype=F64)  # outputs inside steps: interpolated
    rows = neurodyn.solve(_vdp_batch(mu), y0, t, method=method, rtol=1e-8, atol=1e-10, per_sample_steps=True)
    one = neurodyn.solve(_vdp_batch(mu), y0, t, method=method, rtol=1e-8, atol=1e-10)
    assert int(rows.stats["steps_per_sample"][0]) == one.stats["steps"]
    assert torch.allclose(rows.ys, one.ys, rtol=1e-11, atol=1e-11), (rows.ys - one.ys).abs().max()


@pytest.mark.parametrize("min_step, tol", [(0.3, 1e-6), (0.05, 1e-9)])
def test_accept_min_step_matches_each_rows_own_solve(min_step, tol):
    # torchdiffeq's min_step: per row, the same steps (count) and values as the shared loop solving that row alone
    def f(tt, y):
        return torch.stack([y[..., 1], -(1 + y[..., 0] ** 2) * y[..., 0]], -1)

    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.5], [0.1, -1.0]], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    kw = dict(min_step=min_step, accept_min_step=True, rtol=tol, atol=tol)
    sol = neurodyn.solve(f, y0, t, per_sample_steps=True, **kw)
    assert sol.status == "success"
    for i in range(3):
        ref = neurodyn.solve(f, y0[i:i + 1], t, **kw)
        assert int(sol.stats["steps_per_sample"][i]) == ref.stats["steps"]
        torch.testing.assert_close(sol.ys[:, i], ref.ys[:, 0], rtol=0, atol=1e-13)
    if min_step == 0.3:  # every step at least min_step (the interval is 2): far fewer than the tolerance asks for
        assert int(sol.stats["steps_per_sample"].max()) <= 2 / 0.3 + 1
