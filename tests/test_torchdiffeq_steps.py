"""The torchdiffeq drop-in takes torchdiffeq's steps: against torchdiffeq 0.2.5 itself, the same number of vector-field
evaluations, the same accepted and rejected steps, and the same outputs (float64: to rounding) for dopri5, bosh3,
fehlberg2 and adaptive_heun; torchcde's cdeint (dopri5) likewise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn
import neurodyn.compat.torchdiffeq as nd

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64
METHODS = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun")


class Field(nn.Module):
    """A linear rotation-decay field or a small tanh MLP; counts calls and logs the step callbacks."""

    def __init__(self, kind: str, dtype: torch.dtype, dim: int = 2):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(dtype)
        self.A = torch.tensor([[-0.1, -2.0], [2.0, -0.1]], dtype=dtype)
        self.kind, self.nfe, self.log = kind, 0, []

    def forward(self, t, y):
        self.nfe += 1
        if self.kind == "lin":
            return y @ self.A.T
        return self.net(y) * (1.0 + 0.3 * torch.sin(t))

    def callback_accept_step(self, t, y, dt):
        self.log.append((True, float(t.detach()), float(dt.detach())))

    def callback_reject_step(self, t, y, dt):
        self.log.append((False, float(t.detach()), float(dt.detach())))


def run(lib, kind, method, rtol, backward, dtype=F64, adjoint=False):
    f = Field(kind, dtype)
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.1]], dtype=dtype)
    t = torch.linspace(0.0, 4.0, 6, dtype=dtype)
    if backward:
        t = t.flip(0)
    solver = lib.odeint_adjoint if adjoint else lib.odeint
    ys = solver(f, y0, t, rtol=rtol, atol=rtol * 1e-2, method=method)
    return ys.detach(), f.nfe, f.log


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [(k, m, r, b) for k in ("lin", "mlp") for m in METHODS for r in (1e-3, 1e-5, 1e-7) for b in (False, True)
         if not (m in ("fehlberg2", "adaptive_heun") and r < 1e-5)]  # (thousands of steps: covered at 1e-5)


@pytest.mark.parametrize("kind,method,rtol,backward", CASES)
def test_same_steps_nfe_and_outputs_float64(kind, method, rtol, backward):
    y_td, n_td, log_td = run(torchdiffeq, kind, method, rtol, backward)
    y_nd, n_nd, log_nd = run(nd, kind, method, rtol, backward)
    assert n_nd == n_td
    assert [a for a, _, _ in log_nd] == [a for a, _, _ in log_td]  # the same accepted/rejected sequence
    # the same step starts and sizes, to rounding
    assert max(abs(x[1] - y[1]) / (1 + abs(y[1])) for x, y in zip(log_nd, log_td)) < 1e-8
    assert max(abs(x[2] - y[2]) / y[2] for x, y in zip(log_nd, log_td)) < 1e-7
    assert rel(y_nd, y_td) < 1e-10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rtol", [1e-3, 1e-5])
def test_same_nfe_float32(method, rtol):
    """float32 (the MLP field, whose error estimates stay above float32's rounding): the same steps."""
    y_td, n_td, _ = run(torchdiffeq, "mlp", method, rtol, False, torch.float32)
    y_nd, n_nd, _ = run(nd, "mlp", method, rtol, False, torch.float32)
    assert n_nd == n_td
    assert rel(y_nd, y_td) < 1e-4


@pytest.mark.parametrize("options", [dict(max_step=0.05), dict(max_step=0.4), dict(safety=0.8, ifactor=5.0),
                                     dict(first_step=0.01)])
def test_options_keep_torchdiffeqs_steps(options):
    out = {}
    for lib in (torchdiffeq, nd):
        f = Field("mlp", F64)
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64)
        ys = lib.odeint(f, y0, torch.linspace(0, 3, 4, dtype=F64), rtol=1e-6, atol=1e-8, options=options)
        out[lib] = (ys.detach(), f.nfe)
    assert out[nd][1] == out[torchdiffeq][1]
    assert rel(out[nd][0], out[torchdiffeq][0]) < 1e-10


def test_tuple_state_takes_torchdiffeqs_steps():
    """A tuple state: torchdiffeq's norm (the largest RMS over the tensors) and its steps."""
    out = {}
    for lib in (torchdiffeq, nd):
        f = Field("mlp", F64, dim=3)

        def g(t, s, f=f):
            x, v = s
            return v, f(t, x) - 0.5 * v

        y0 = (torch.tensor([[0.5, -1.0, 0.2]], dtype=F64), torch.tensor([[0.0, 0.3, -0.1]], dtype=F64))
        ys = lib.odeint(g, y0, torch.linspace(0, 3, 5, dtype=F64), rtol=1e-6, atol=1e-8)
        out[lib] = (torch.cat([y.reshape(-1) for y in ys]), f.nfe)
    assert out[nd][1] == out[torchdiffeq][1]
    assert rel(out[nd][0], out[torchdiffeq][0]) < 1e-10


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_odeint_adjoint_forward_steps_and_gradient(method):
    """odeint_adjoint: the forward solve takes torchdiffeq's steps; the gradient (neurodyn's adjoint) agrees to the
    tolerance of the backward solves."""
    res = {}
    for lib in (torchdiffeq, nd):
        f = Field("mlp", F64)
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64)
        ys = lib.odeint_adjoint(f, y0, torch.linspace(0, 2, 4, dtype=F64), rtol=1e-8, atol=1e-10, method=method)
        nfe = f.nfe
        ys.pow(2).sum().backward()
        res[lib] = (ys.detach(), nfe, torch.cat([p.grad.reshape(-1) for p in f.parameters()]))
    # One evaluation more: neurodyn's adjoint evaluates the field once at t0 before solving, to refuse fields that
    # hold tensors requiring grad outside the parameters it was given (the backward solve could not see them).
    assert res[nd][1] == res[torchdiffeq][1] + 1
    assert rel(res[nd][0], res[torchdiffeq][0]) < 1e-10
    assert rel(res[nd][2], res[torchdiffeq][2]) < 1e-6


def test_direct_gradient_matches_with_a_given_first_step():
    """Direct backpropagation through the same steps gives torchdiffeq's gradient to rounding once its starting step
    is given (torchdiffeq's chosen starting step is not detached: its gradient also flows through the step times)."""
    grads = []
    for lib in (torchdiffeq, nd):
        f = Field("mlp", F64)
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64)
        lib.odeint(f, y0, torch.linspace(0, 2, 4, dtype=F64), rtol=1e-6, atol=1e-8,
                   options=dict(first_step=0.05)).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in f.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-12


def test_cdeint_dopri5_takes_torchcdes_steps():
    torchcde = pytest.importorskip("torchcde")
    import neurodyn.compat.torchcde as ncde

    torch.manual_seed(0)
    B, L, C, H = 4, 12, 3, 8
    x = torch.cumsum(torch.randn(B, L, C, dtype=F64) * 0.3, dim=1)
    coeffs = torchcde.natural_cubic_coeffs(x)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        net = nn.Sequential(nn.Linear(H, 16), nn.Tanh(), nn.Linear(16, H * C)).double()
    z0 = torch.randn(B, H, dtype=F64) * 0.1
    out = {}
    for lib in (torchcde, ncde):
        n = [0]

        def field(t, z, n=n):
            n[0] += 1
            return net(z).view(B, H, C)

        X = lib.CubicSpline(coeffs)
        z = lib.cdeint(X=X, func=field, z0=z0, t=X.interval, adjoint=False, method="dopri5", rtol=1e-6, atol=1e-8)
        out[lib] = (z.detach(), n[0])
    assert out[ncde][1] == out[torchcde][1]
    # Not to rounding: here the step sizes amplify rounding differences (of the spline's and the field's arithmetic),
    # from 1e-14 to 1e-8 in the step times over the 74 steps, so the outputs agree to the tolerance.
    assert rel(out[ncde][0], out[torchcde][0]) < 1e-6


def test_step_rule_options_are_checked():
    with pytest.raises(neurodyn.InputError, match="first_step_rule"):
        neurodyn.PIDController(first_step_rule="scipy")
    ctrl = neurodyn.PIDController(land_on_end=False)
    with pytest.raises(neurodyn.InputError, match="land_on_end"):
        neurodyn.solve(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), controller=ctrl,
                       per_sample_steps=True)


def test_land_on_end_false_reads_the_final_time_off_the_dense_output():
    """land_on_end=False: the last step passes the final time, whose output is the dense output (y' = -y, exact
    solution e^-t to the tolerance), and solve's default still lands on it."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    over = neurodyn.solve(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-12, dense=True,
                          controller=neurodyn.PIDController(land_on_end=False))
    landed = neurodyn.solve(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-12, dense=True)
    assert abs(float(over.ys[-1, 0]) - torch.exp(torch.tensor(-1.0, dtype=F64)).item()) < 1e-8
    assert float(over.evaluate(torch.tensor(1.0, dtype=F64))[0]) == pytest.approx(float(over.ys[-1, 0]), abs=1e-14)
    assert float(landed.ys[-1, 0]) == pytest.approx(float(over.ys[-1, 0]), abs=1e-8)


def test_land_on_end_false_with_events_still_lands_on_the_final_time():
    """An event whose only crossing lies just past the final time: with land_on_end=False the last step would pass
    it; with events the solve lands on the final time all the same, so no crossing past it is reported."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.zeros(1, dtype=F64)
    ev = neurodyn.Event(lambda t, y: y[..., 0] - 1.05, terminal=False)  # y = t crosses 1.05 after the end
    sol = neurodyn.solve(lambda t, y: torch.ones_like(y), y0, t, rtol=1e-6, atol=1e-9, events=[ev],
                         controller=neurodyn.PIDController(land_on_end=False))
    assert sol.events.t.numel() == 0
    assert sol.t_final == 1.0 and float(sol.ys[-1, 0]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint", "interpolated"])
def test_gradient_methods_under_torchdiffeqs_step_rule(gradient):
    """With land_on_end=False (the last step past the final time) every gradient method gives direct
    backpropagation's gradient (the adjoint's backward solves, whose parameter quadrature sums whole steps, land)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    ctrl = neurodyn.PIDController(pcoeff=0.0, icoeff=1.0, accept_dfactor=1.0, first_step_rule="torchdiffeq",
                                  land_on_end=False)
    grads = []
    for g in ("direct", gradient):
        net.zero_grad()
        sol = neurodyn.solve(lambda t, y: net(y), y0, t, method="dopri5_shampine", rtol=1e-9, atol=1e-11,
                             controller=ctrl, gradient=g, params=None if g == "direct" else list(net.parameters()))
        sol.ys.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-7
