"""Transforms users apply to a ``NeuralODE``: ``torch.compile`` and ``torch.func`` ensembling.

* ``torch.compile(model)`` compiles a bounded number of graphs: repeated calls with same-shaped inputs reuse
  them (no per-call recompilation), and the outputs and NFE counters equal the uncompiled model's.
* PyTorch's model-ensembling recipe (``torch.func.stack_module_state`` + ``functional_call`` under
  ``torch.func.vmap``) runs fixed-step solves; the times are not stacked as if they were a parameter.

Independent truths: the per-model loop, and for the linear field ``f(t, z) = A z`` a fixed-step explicit RK
method with ``s = p <= 4`` stages maps ``z_n`` (a row) to ``z_n R(h A^T)`` with ``R(x) = sum_k x^k / k!``
(k <= p), its stability polynomial -- a matrix polynomial, no ODE solver involved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import neurodyn
from neurodyn import InputError, NeuralODE
from neurodyn.solvers import get_solver

F64 = torch.float64
FIXED = ["euler", "midpoint", "heun2", "ralston", "heun3", "rk4"]  # rk4 is Kutta's 3/8 rule

pytestmark = pytest.mark.usefixtures("single_thread")


class Linear(nn.Module):
    """``f(t, z) = A z`` for ``z`` of shape ``(..., 2)``."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, z):
        return z @ self.A.T


def _matrices(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, 2, generator=g, dtype=F64) * 0.8 - 0.3 * torch.eye(2, dtype=F64)


def _states(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rk_flow(method: str, A: torch.Tensor, h: float, steps: int) -> torch.Tensor:
    """The matrix ``R(h A^T)^steps`` that ``steps`` fixed steps of ``method`` apply to a row state."""
    solver = get_solver(method)
    assert solver.stages == solver.order <= 4  # then R is the Taylor polynomial of exp to order p
    x = h * A.transpose(-1, -2)
    term = torch.eye(2, dtype=F64).expand_as(x)
    r = term
    for k in range(1, solver.order + 1):
        term = term @ x / k
        r = r + term
    return torch.linalg.matrix_power(r, steps)


def _ensemble(method: str, **kw) -> list[NeuralODE]:
    return [NeuralODE(Linear(A), t=(0.0, 1.0), method=method, **kw) for A in _matrices()]


def _vmapped(models: list[NeuralODE]):
    """The ensembling recipe: stacked parameters and buffers, a skeleton on the meta device."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    return params, buffers, vmap(call, in_dims=(0, 0, None))


# ----------------------------------------------------------------------------------------------
# torch.func ensembles
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FIXED)
def test_ensemble_vmap_equals_loop_and_stability_polynomial(method):
    models = _ensemble(method, step_size=0.1)
    params, buffers, run = _vmapped(models)
    x = _states(4)
    out = run(params, buffers, x)
    loop = torch.stack([m(x) for m in models])
    assert out.shape == (3, 4, 2)
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    truth = x @ rk_flow(method, _matrices(), 0.1, 10)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)

    # Gradients with respect to the stacked parameters: the loop's, and the matrix polynomial's.
    w = _states(3, 4, seed=11)
    (g,) = torch.autograd.grad((out * w).sum(), params["field.func.A"])
    g_loop = torch.stack([torch.autograd.grad((m(x) * wi).sum(), m.func.A)[0] for m, wi in zip(models, w)])
    A = _matrices().requires_grad_(True)
    (g_true,) = torch.autograd.grad(((x @ rk_flow(method, A, 0.1, 10)) * w).sum(), A)
    torch.testing.assert_close(g, g_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_true, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_ensemble_vmap_without_autograd(method):
    """Under ``torch.no_grad()`` the solver would reuse preallocated stage buffers; a vmapped field's stages
    are batched, so they are built out of place instead."""
    models = _ensemble(method, step_size=0.1)
    params, buffers, run = _vmapped(models)
    x = _states(4)
    with torch.no_grad():
        out = run(params, buffers, x)
        loop = torch.stack([m(x) for m in models])
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, x @ rk_flow(method, _matrices(), 0.1, 10), rtol=1e-12, atol=1e-12)


def test_ensemble_vmap_on_the_time_grid_and_between_steps():
    """Fixed steps on the grid of output times (no step_size), and a trajectory with output times between
    steps (cubic Hermite dense output)."""
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    models = [NeuralODE(Linear(A), t=t, method="rk4", output="trajectory") for A in _matrices()]
    params, buffers, run = _vmapped(models)
    x = _states(4)
    out = run(params, buffers, x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, -1], x @ rk_flow("rk4", _matrices(), 0.1, 10), rtol=1e-12, atol=1e-12)

    t_off = torch.tensor([0.0, 0.25, 0.5, 0.8], dtype=F64)  # 0.25 lies inside a step of 0.1
    models = [NeuralODE(Linear(A), t=t_off, method="midpoint", step_size=0.1, output="trajectory")
              for A in _matrices()]
    params, buffers, run = _vmapped(models)
    out = run(params, buffers, x)
    assert out.shape == (3, 4, 4, 2)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 2], x @ rk_flow("midpoint", _matrices(), 0.1, 5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_solve_vmapped_over_field_parameters(grad):
    """``neurodyn.solve`` itself: an unbatched initial state, a field whose matrix is vmapped."""
    As, y0 = _matrices(), _states(seed=5)
    t = torch.tensor([0.0, 0.6], dtype=F64)

    def one(A):
        return neurodyn.solve(lambda s, y: y @ A.T, y0, t, method="rk4", step_size=0.1).ys[-1]

    with torch.set_grad_enabled(grad):
        out = vmap(one)(As)
        loop = torch.stack([one(A) for A in As])
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, y0 @ rk_flow("rk4", As, 0.1, 6), rtol=1e-12, atol=1e-12)


def test_vmap_over_an_ensemble_still_refuses_adaptive_steps():
    models = _ensemble("dopri5")
    params, buffers, run = _vmapped(models)
    with pytest.raises(InputError, match="fixed-step method.*rk4"):
        run(params, buffers, _states(4))


# ----------------------------------------------------------------------------------------------
# The times are configuration, not state
# ----------------------------------------------------------------------------------------------
def test_times_are_neither_parameter_nor_buffer():
    models = _ensemble("rk4", step_size=0.1)
    params, buffers = stack_module_state(models)
    assert list(params) == ["field.func.A"] and buffers == {}
    assert "t" not in models[0].state_dict() and dict(models[0].named_buffers()) == {}
    meta = copy.deepcopy(models[0]).to("meta")
    assert meta.func.A.is_meta and not meta.t.is_meta
    assert meta.t.tolist() == [0.0, 1.0]


def test_times_follow_moves_without_losing_values():
    t = torch.tensor([0.0, 0.1, 1.3], dtype=F64)
    model = NeuralODE(Linear(_matrices()[0]), t=t, method="rk4", step_size=0.1)
    model.to(torch.float32)
    assert model.t.dtype == torch.float32 and model.func.A.dtype == torch.float32
    model.half().double()  # through float16 and back: the times come from the values given
    assert model.t.dtype == F64 and torch.equal(model.t, t)
    model.to_empty(device="cpu")  # the parameters become garbage, the times do not
    assert torch.equal(model.t, t)

    model = NeuralODE(Linear(_matrices()[0]), method="rk4", step_size=0.1)
    model.t = (0.0, 0.5)
    x = _states(2)
    torch.testing.assert_close(model(x), x @ rk_flow("rk4", _matrices()[0], 0.1, 5), rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="2 times"):
        model.t = [1.0]
    assert model.t.tolist() == [0.0, 0.5]  # a refused assignment leaves the times as they were


def test_times_given_as_a_parameter_stay_configuration():
    model = NeuralODE(Linear(_matrices()[0]), t=nn.Parameter(torch.tensor([0.0, 1.0], dtype=F64)))
    assert [n for n, _ in model.named_parameters()] == ["field.func.A"]
    assert not model.t.requires_grad


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "gradient", "calls"), [
    ("rk4", "direct", 4), pytest.param("dopri5", "adjoint", 8, marks=pytest.mark.slow)])  # 6 s, slow
def test_compiled_model_does_not_recompile_per_call(method, gradient, calls):
    """Dynamo compiles a bounded set of graphs (graph breaks at the solver's host-side decisions). Fixed steps:
    nothing more after the first call. Adaptive steps: a host-side number (a step size, an NFE count) is
    specialised until it first changes, then made dynamic -- one recompilation each, not one per call -- so
    only a few early calls compile anything and the last ones none. Outputs, gradients and NFE counters equal
    the uncompiled model's."""
    torch._dynamo.reset()
    kw = dict(step_size=0.1) if method == "rk4" else dict(rtol=1e-6, atol=1e-8)
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    model = NeuralODE(f, t=(0.0, 1.0), method=method, gradient=gradient, **kw)
    ref = copy.deepcopy(model)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend)
    per_call, nfes = [], set()
    for i in range(calls):
        x = _states(5, seed=20 + i)
        before = len(graphs)
        out = compiled(x)
        out.pow(2).sum().backward()
        per_call.append(len(graphs) - before)
        expect = ref(x)
        expect.pow(2).sum().backward()
        torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
        assert model.nfe_forward == ref.nfe_forward > 0
        assert model.nfe_backward == ref.nfe_backward
        if gradient == "adjoint":
            assert model.nfe_backward > 0
        nfes.add(model.nfe_forward)
    assert per_call[0] > 0, per_call
    if method == "rk4":
        assert per_call[1:] == [0] * (calls - 1), per_call
        assert nfes == {40}  # 10 steps of 4 stages
    else:
        assert len(nfes) > 1  # the inputs do change the adaptive solve's host-side numbers
        assert sum(1 for c in per_call[1:] if c) <= 3 and per_call[-2:] == [0, 0], per_call
