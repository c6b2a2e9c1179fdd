"""Mixed precision (docs/mixed_precision.md): ``solve`` inside ``torch.autocast`` runs the vector field in the
autocast dtype (bfloat16 here, on CPU) and its own arithmetic (stage sums, error norms, Newton solves) in the
state's dtype (float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn

T = torch.tensor([0.0, 1.0])


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: CPU bfloat16 matmuls of these tiny layers take ~20 ms each with 2 threads on a busy
    machine (oneDNN's threading), 7 us with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLPField(nn.Module):
    """``f(t, y) = mlp(y)``; records the dtypes it sees (input state, the network's output)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
        self.seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def forward(self, t, y):
        out = self.net(y)
        self.seen.add((y.dtype, out.dtype))
        return out


def _elementwise(t, y):  # no matmul: autocast leaves every op of it in float32
    return -y * torch.cos(t) + 0.1 * y.sin()


@pytest.mark.parametrize("method, kw", [("dopri5", {}), ("rk4", {"step_size": 0.1}), ("bdf", {}),
                                        ("adams", {})])
def test_solver_arithmetic_stays_in_the_state_dtype(method, kw):
    """A float32 field under autocast gives the float32 solve bitwise: the solver's own matmuls (stage sums,
    Newton's linear solves) are not autocast (before the fix: errors ~1e-3, 20x the NFE, and bdf raised a
    dtype mismatch in lu_solve)."""
    torch.manual_seed(0)
    y0 = torch.randn(16, 2)
    ref = neurodyn.solve(_elementwise, y0, T, method=method, rtol=1e-6, atol=1e-7, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = neurodyn.solve(_elementwise, y0, T, method=method, rtol=1e-6, atol=1e-7, **kw)
    assert sol.ys.dtype == torch.float32
    assert torch.equal(sol.ys, ref.ys)
    assert sol.stats["nfe"] == ref.stats["nfe"]


def test_bf16_field_float32_state_close_to_float32_solve():
    torch.manual_seed(0)
    f = MLPField()
    y0 = torch.randn(16, 2)
    ref = neurodyn.solve(f, y0, T, method="rk4", step_size=0.05)
    assert f.seen == {(torch.float32, torch.float32)}
    f.seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = neurodyn.solve(f, y0, T, method="rk4", step_size=0.05)
    # inside: the state arrives in float32, the network computes in bfloat16; outside: float32 results
    assert f.seen == {(torch.float32, torch.bfloat16)}
    assert sol.ys.dtype == torch.float32 and sol.y_final.dtype == torch.float32
    err = float((sol.ys[-1] - ref.ys[-1]).detach().abs().max() / ref.ys[-1].detach().abs().max())
    # bfloat16 keeps 8 significant bits (eps 2^-8 = 3.9e-3): the field's rounding, not the solver's, sets the error
    assert 1e-5 < err < 2e-2, err


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_gradients_flow_under_autocast(gradient):
    """Parameter gradients come out float32, finite and close to the float32 gradients."""
    torch.manual_seed(1)
    f = MLPField()
    y0 = torch.randn(16, 2)
    grads = []
    for enabled in (False, True):
        f.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            sol = neurodyn.solve(f, y0, T, method="rk4", step_size=0.1, gradient=gradient)
            loss = sol.ys[-1].pow(2).mean()
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in f.parameters()])
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
        grads.append(g)
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert 1e-5 < rel < 5e-2, rel


def test_adaptive_solve_under_autocast_with_bf16_appropriate_tolerances():
    """dopri5 at rtol=1e-3 (above the field's bfloat16 rounding): succeeds, close to float32, bounded NFE."""
    torch.manual_seed(2)
    f = MLPField()
    y0 = torch.randn(16, 2)
    ref = neurodyn.solve(f, y0, T, rtol=1e-3, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = neurodyn.solve(f, y0, T, rtol=1e-3, atol=1e-4)
    assert sol.status == "success"
    assert float((sol.ys[-1] - ref.ys[-1]).detach().abs().max()) < 1e-2
    assert sol.stats["nfe"] <= 3 * ref.stats["nfe"]


def test_neural_ode_module_under_autocast():
    """The NeuralODE layer: float32 output under autocast, parameters get float32 gradients."""
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    model = neurodyn.NeuralODE(mlp, method="rk4", step_size=0.1)
    x = torch.randn(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
        loss = z.pow(2).mean()
    loss.backward()
    assert z.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mlp.parameters())
    assert float((z - model(x)).detach().abs().max()) < 2e-2
