"""``neurodyn.NeuralODE``: output modes, signatures, gradients, NFE counters, torch.compile and torch.func.

Every numerical check is against an independent truth: the linear field ``f(t, z) = A z`` has the exact
flow ``z(t) = expm(A (t - t0)) z0`` (``torch.linalg.matrix_exp``), whose gradients with respect to ``A``
and ``z0`` come from autograd through ``matrix_exp`` (no ODE solver involved).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn import InputError, NeuralODE, Solution

F64 = torch.float64
A0 = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=F64)
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: intra-op threads only add contention on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Linear(nn.Module):
    """``f(t, z) = A z`` for ``z`` of shape ``(..., 2)``; counts its calls."""

    def __init__(self, A: torch.Tensor = A0):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return z @ self.A.T


class LinearAutonomous(Linear):
    """The same field written as ``f(z)``."""

    def forward(self, z):
        self.calls += 1
        return z @ self.A.T


def exact(z0: torch.Tensor, t, t0: float = 0.0, A: torch.Tensor = A0) -> torch.Tensor:
    """``expm(A (t - t0)) z0`` for a float ``t`` (shape of ``z0``) or a 1-d tensor ``t`` (``(T, *z0.shape)``)."""
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        return torch.stack([exact(z0, float(ti), t0, A) for ti in t])
    return z0 @ torch.linalg.matrix_exp(A * (float(t) - t0)).T


def _z0(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, 2, generator=g, dtype=F64)


def test_exported():
    assert neurodyn.NeuralODE is NeuralODE
    assert "NeuralODE" in neurodyn.__all__


# ----------------------------------------------------------------------------------------------
# Output modes and shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (5,), (3, 4)], ids=["unbatched", "batch", "batch2d"])
def test_final_is_exact_state_at_t1(shape):
    z0 = _z0(shape)
    model = NeuralODE(Linear(), t=(0.5, 2.0), **TOL)
    z1 = model(z0)
    assert z1.shape == z0.shape and z1.dtype == F64
    torch.testing.assert_close(z1, exact(z0, 2.0, t0=0.5), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("shape", [(), (5,)], ids=["unbatched", "batch"])
def test_trajectory_is_exact_at_every_time(shape):
    z0 = _z0(shape)
    t = torch.tensor([0.0, 0.3, 0.7, 1.1, 2.5], dtype=F64)
    model = NeuralODE(Linear(), t=t, output="trajectory", **TOL)
    ys = model(z0)
    assert ys.shape == (5, *z0.shape)
    torch.testing.assert_close(ys[0], z0)
    torch.testing.assert_close(ys, exact(z0, t), rtol=1e-8, atol=1e-9)


def test_trajectory_backward_in_time():
    z0 = _z0((3,))
    t = torch.tensor([1.0, 0.4, -0.5], dtype=F64)
    ys = NeuralODE(Linear(), t=t, output="trajectory", **TOL)(z0)
    torch.testing.assert_close(ys, exact(z0, t, t0=1.0), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("shape", [(), (4,)], ids=["unbatched", "batch"])
def test_solution_dense_output_is_exact_anywhere_in_the_span(shape):
    """Continuous depth: ``sol.evaluate`` at times that are not output times, against the exact flow."""
    z0 = _z0(shape)
    model = NeuralODE(Linear(), t=(0.0, 2.0), output="solution", **TOL)
    sol = model(z0)
    assert isinstance(sol, Solution) and sol.success
    assert sol.ys.shape == (2, *z0.shape)
    assert model.last_solution is sol
    torch.testing.assert_close(sol.ys[-1], exact(z0, 2.0), rtol=1e-8, atol=1e-9)
    tq = torch.tensor([0.0, 0.123, 0.777, 1.3141, 1.999, 2.0], dtype=F64)
    zq = sol.evaluate(tq)
    assert zq.shape == (6, *z0.shape)
    # dopri5's 4th-order dense output: a little looser than the step-end states
    torch.testing.assert_close(zq, exact(z0, tq), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sol.evaluate(1.3141), exact(z0, 1.3141), rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError):
        sol.evaluate(2.5)  # outside the solved span


def test_dense_solution_is_differentiable():
    """d z(t_q) / d z0 through ``sol.evaluate`` equals the exact ``expm(A t_q)``."""
    z0 = _z0(()).requires_grad_(True)
    sol = NeuralODE(Linear(), t=(0.0, 2.0), output="solution", **TOL)(z0)
    tq, w = 0.9, torch.tensor([0.3, -1.2], dtype=F64)
    (sol.evaluate(tq) * w).sum().backward()
    torch.testing.assert_close(z0.grad, torch.linalg.matrix_exp(A0 * tq).T @ w, rtol=1e-6, atol=1e-7)


def test_default_span_is_zero_to_one():
    z0 = _z0((2,))
    model = NeuralODE(Linear(), **TOL).to(F64)
    torch.testing.assert_close(model(z0), exact(z0, 1.0), rtol=1e-8, atol=1e-9)
    assert "t=[0.0, 1.0]" in repr(model)


# ----------------------------------------------------------------------------------------------
# Vector-field signatures
# ----------------------------------------------------------------------------------------------
def _time_field(t, z):
    """``dz/dt = t z``: ``z(t) = z0 exp((t^2 - t0^2) / 2)``; wrong if ``t`` is not passed through."""
    return t * z


@pytest.mark.parametrize("func", [
    Linear(),
    LinearAutonomous(),
    lambda t, z: z @ A0.T,
    lambda z: z @ A0.T,
], ids=["module_tz", "module_z", "callable_tz", "callable_z"])
def test_signatures_detected(func):
    z0 = _z0((3,))
    model = NeuralODE(func, t=(0.0, 1.5), **TOL)
    torch.testing.assert_close(model(z0), exact(z0, 1.5), rtol=1e-8, atol=1e-9)


def test_autonomous_detection_flags():
    assert NeuralODE(Linear()).field.takes_time
    assert not NeuralODE(LinearAutonomous()).field.takes_time
    assert not NeuralODE(nn.Sequential(nn.Linear(2, 2), nn.Tanh())).field.takes_time
    assert NeuralODE(_time_field).field.takes_time
    # optional parameters do not count: f(z, scale=1.0) is autonomous
    assert not NeuralODE(lambda z, scale=1.0: scale * z).field.takes_time


def test_sequential_field_is_autonomous():
    lin = nn.Linear(2, 2, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.copy_(A0)
    z0 = _z0((4,))
    out = NeuralODE(nn.Sequential(lin), t=(0.0, 1.0), **TOL)(z0)
    torch.testing.assert_close(out, exact(z0, 1.0), rtol=1e-8, atol=1e-9)


def test_time_dependent_field_receives_t():
    z0 = _z0((3,))
    out = NeuralODE(_time_field, t=(0.5, 1.5), **TOL)(z0)
    torch.testing.assert_close(out, z0 * math.exp((1.5**2 - 0.5**2) / 2), rtol=1e-8, atol=1e-9)


class _VarArgs:
    """A callable whose signature says nothing (``*args``); records how it is called."""

    def __init__(self):
        self.nargs = set()

    def __call__(self, *args):
        self.nargs.add(len(args))
        if len(args) == 2:
            return _time_field(*args)
        return -args[0]


def test_uninformative_signature_defaults_to_t_z():
    """``*args`` says nothing: the solver's convention ``f(t, z)`` is used (as for uninspectable callables)."""
    f = _VarArgs()
    z0 = _z0((2,))
    out = NeuralODE(f, t=(0.5, 1.5), **TOL)(z0)
    assert f.nargs == {2}
    torch.testing.assert_close(out, z0 * math.exp((1.5**2 - 0.5**2) / 2), rtol=1e-8, atol=1e-9)


def test_compiled_field_signature_is_looked_through():
    """``torch.compile(module)`` has ``forward(*args, **kwargs)``: detection reads the original module's."""
    torch._dynamo.reset()
    assert NeuralODE(torch.compile(Linear(), backend="eager")).field.takes_time
    assert not NeuralODE(torch.compile(LinearAutonomous(), backend="eager")).field.takes_time
    z0 = _z0((2,))
    for cls in (Linear, LinearAutonomous):
        f = cls()
        out = NeuralODE(torch.compile(f, backend="eager"), method="rk4", step_size=0.5)(z0)
        torch.testing.assert_close(out, NeuralODE(f, method="rk4", step_size=0.5)(z0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("autonomous", [True, False])
def test_autonomous_override(autonomous):
    f = _VarArgs()
    z0 = _z0((2,))
    out = NeuralODE(f, t=(0.5, 1.5), autonomous=autonomous, **TOL)(z0)
    if autonomous:
        assert f.nargs == {1}
        torch.testing.assert_close(out, z0 * math.exp(-1.0), rtol=1e-8, atol=1e-9)
    else:
        assert f.nargs == {2}
        torch.testing.assert_close(out, z0 * math.exp((1.5**2 - 0.5**2) / 2), rtol=1e-8, atol=1e-9)


def test_autonomous_override_beats_signature():
    """``autonomous=False`` on an ``f(z)``-looking module would call it as ``f(t, z)``: the flag wins."""
    model = NeuralODE(LinearAutonomous(), autonomous=False)
    assert model.field.takes_time
    model = NeuralODE(Linear(), autonomous=True)
    assert not model.field.takes_time


# ----------------------------------------------------------------------------------------------
# Parameters and gradients
# ----------------------------------------------------------------------------------------------
def test_field_parameters_are_the_models():
    f = Linear()
    model = NeuralODE(f, t=(0.0, 1.0), **TOL)
    params = list(model.parameters())
    assert len(params) == 1 and params[0] is f.A
    assert model.func is f
    assert "field.func.A" in model.state_dict()
    assert "t" not in model.state_dict()  # the times are a non-persistent buffer

    z0, target = _z0((8,)), torch.zeros(8, 2, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss0 = (model(z0) - target).pow(2).mean()
    opt.zero_grad()
    loss0.backward()
    assert f.A.grad is not None and f.A.grad.abs().sum() > 0
    a_before = f.A.detach().clone()
    opt.step()
    assert not torch.equal(f.A.detach(), a_before)
    with torch.no_grad():
        out = model(z0)
        loss1 = (out - target).pow(2).mean()
        # the step moved the output to exactly the flow of the updated matrix, and lowered the loss
        torch.testing.assert_close(out, exact(z0, 1.0, A=f.A.detach()), rtol=1e-8, atol=1e-9)
    assert loss1 < loss0


def test_to_dtype_moves_field_parameters():
    f = Linear(A0.float())
    model = NeuralODE(f, t=(0.0, 1.0), rtol=1e-5, atol=1e-7)
    assert f.A.dtype == torch.float32
    model.to(F64)
    assert f.A.dtype == F64 and model.t.dtype == F64
    z0 = _z0((2,))
    torch.testing.assert_close(model(z0), exact(z0, 1.0), rtol=1e-5, atol=1e-6)
    # float32 input with float64 times: forward casts the times to the state's precision
    z32 = z0.float()
    out32 = NeuralODE(Linear(A0.float()), t=torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-5, atol=1e-7)(z32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, exact(z0, 1.0).float(), rtol=1e-4, atol=1e-5)


def _exact_grads(z0: torch.Tensor, w: torch.Tensor, T: float):
    A = A0.clone().requires_grad_(True)
    z0 = z0.detach().clone().requires_grad_(True)
    loss = (exact(z0, T, A=A) * w).sum() + exact(z0, T, A=A).pow(2).sum()
    return torch.autograd.grad(loss, (A, z0))


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint", "interpolated"])
def test_gradients_match_exact(gradient):
    T = 1.5
    z0 = _z0((4,)).requires_grad_(True)
    w = _z0((4,)).flip(0)
    f = Linear()
    model = NeuralODE(f, t=(0.0, T), gradient=gradient, **TOL)
    z1 = model(z0)
    forward_calls = f.calls
    torch.testing.assert_close(z1, exact(z0.detach(), T), rtol=1e-8, atol=1e-9)
    loss = (z1 * w).sum() + z1.pow(2).sum()
    calls = f.calls
    loss.backward()
    backward_calls = f.calls - calls
    gA, gz0 = _exact_grads(z0, w, T)
    torch.testing.assert_close(f.A.grad, gA, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(z0.grad, gz0, rtol=1e-6, atol=1e-7)

    # NFE counters
    sol = model.last_solution
    assert model.nfe_forward == sol.stats["nfe"] > 0
    # the user's own count: the solver's calls, plus (not direct) one probe for hidden tensors
    assert forward_calls == model.nfe_forward + (gradient != "direct")
    if gradient == "direct":
        assert model.nfe_backward == 0
        assert backward_calls == 0  # autograd replays the recorded graph
    else:
        assert model.nfe_backward > 0
        assert backward_calls == model.nfe_backward


def test_nfe_forward_counts_field_calls():
    """Fixed-step rk4: 4 stages x 4 steps; the user's own call count agrees."""
    f = Linear()
    model = NeuralODE(f, t=(0.0, 1.0), method="rk4", step_size=0.25)
    z0 = _z0((3,))
    out = model(z0)
    assert model.nfe_forward == 16 == f.calls
    assert model.last_solution.stats["steps"] == 4
    torch.testing.assert_close(out, exact(z0, 1.0), rtol=1e-4, atol=1e-5)  # rk4, h = 1/4: O(h^4)
    # each forward resets the counter (not cumulative)
    model(z0)
    assert model.nfe_forward == 16 and f.calls == 32


def test_nfe_forward_matches_user_calls_adaptive():
    f = Linear()
    model = NeuralODE(f, t=(0.0, 3.0), **TOL)
    with torch.no_grad():
        model(_z0((2,)))
    assert model.nfe_forward == model.last_solution.stats["nfe"] == f.calls > 0
    assert model.nfe_backward == 0


def test_nfe_backward_adjoint_counts_backward_solve():
    f = Linear()
    model = NeuralODE(f, t=(0.0, 1.0), gradient="adjoint", rtol=1e-6, atol=1e-8)
    z0 = _z0((2,)).requires_grad_(True)
    out = model(z0)
    assert model.nfe_backward == 0  # nothing until backward runs
    calls = f.calls
    out.sum().backward()
    assert model.nfe_backward > 0
    # the backward solve evaluates the field (via a vjp) once per augmented-dynamics evaluation
    assert f.calls - calls == model.nfe_backward


def test_solver_options_are_used():
    """method / tolerances / step_size / max_steps reach the solver."""
    z0 = _z0((2,))
    loose = NeuralODE(Linear(), t=(0.0, 2.0), rtol=1e-3, atol=1e-5)
    tight = NeuralODE(Linear(), t=(0.0, 2.0), rtol=1e-10, atol=1e-12)
    loose(z0), tight(z0)
    assert loose.nfe_forward < tight.nfe_forward
    euler = NeuralODE(Linear(), t=(0.0, 1.0), method="euler", step_size=0.1)
    out = euler(z0)
    assert euler.nfe_forward == 10
    # explicit Euler, exactly: (I + h A)^10 z0
    M = torch.linalg.matrix_power(torch.eye(2, dtype=F64) + 0.1 * A0, 10)
    torch.testing.assert_close(out, z0 @ M.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(neurodyn.MaxStepsReached):
        NeuralODE(Linear(), t=(0.0, 1.0), method="euler", step_size=0.01, max_steps=5)(z0)
    assert "method='euler'" in repr(euler)


# ----------------------------------------------------------------------------------------------
# forward(z0, t=...) override
# ----------------------------------------------------------------------------------------------
def test_forward_time_override():
    z0 = _z0((3,))
    model = NeuralODE(Linear(), t=(0.0, 1.0), **TOL)
    torch.testing.assert_close(model(z0, t=torch.tensor([0.0, 2.0], dtype=F64)), exact(z0, 2.0),
                               rtol=1e-8, atol=1e-9)
    # a plain list, float32 tensor, or a different start time all work
    torch.testing.assert_close(model(z0, t=[0.5, 1.25]), exact(z0, 1.25, t0=0.5), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(model(z0, t=torch.tensor([0.0, 0.75])), exact(z0, 0.75), rtol=1e-8, atol=1e-9)
    # the module's own times are untouched
    torch.testing.assert_close(model(z0), exact(z0, 1.0), rtol=1e-8, atol=1e-9)
    # with a trajectory output, the override sets the output times too
    traj = NeuralODE(Linear(), output="trajectory", **TOL)
    t = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=F64)
    ys = traj(z0, t=t)
    assert ys.shape == (4, 3, 2)
    torch.testing.assert_close(ys, exact(z0, t), rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def test_torch_compile_matches_eager():
    """Tiny case (2 rk4 steps) with the ``aot_eager`` backend: Dynamo + AOTAutograd trace the module
    (with graph breaks at the solver's host-side checks) without inductor's slow CPU code generation."""
    torch._dynamo.reset()
    f = Linear()
    model = NeuralODE(f, t=(0.0, 1.0), method="rk4", step_size=0.5)
    z0 = _z0((2,))
    eager = model(z0)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(z0)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-14)
    assert model.nfe_forward == 8


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["adjoint"])  # "direct" passes too, but compiles for ~5 min on CPU
def test_torch_compile_inductor_adaptive_with_gradients(gradient):
    torch._dynamo.reset()
    f = Linear()
    model = NeuralODE(f, t=(0.0, 1.0), gradient=gradient, rtol=1e-8, atol=1e-10)
    z0 = _z0((2,)).requires_grad_(True)
    out = torch.compile(model)(z0)
    torch.testing.assert_close(out, exact(z0.detach(), 1.0), rtol=1e-6, atol=1e-7)
    out.pow(2).sum().backward()
    gA, gz0 = _exact_grads(z0, torch.zeros(2, 2, dtype=F64), 1.0)
    torch.testing.assert_close(f.A.grad, gA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z0.grad, gz0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# torch.func
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(**TOL), dict(method="rk4", step_size=0.01)], ids=["dopri5", "rk4"])
def test_jacrev_wrt_z0_is_matrix_exp(kw):
    T = 1.3
    model = NeuralODE(Linear(), t=(0.0, T), **kw)
    z0 = _z0(())
    J = torch.func.jacrev(model)(z0)
    assert J.shape == (2, 2)
    torch.testing.assert_close(J, torch.linalg.matrix_exp(A0 * T), rtol=1e-6, atol=1e-7)
    # and it is the Jacobian autograd gives for the same solve
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(model, z0), rtol=1e-12, atol=1e-12)


def test_jacrev_wrt_parameters_via_functional_call():
    """d z(T) / d A through ``torch.func.functional_call`` against the Jacobian of ``expm(A T) z0``."""
    T = 0.8
    model = NeuralODE(Linear(), t=(0.0, T), **TOL)
    z0 = _z0(())
    A = A0.clone()
    J = torch.func.jacrev(lambda a: torch.func.functional_call(model, {"field.func.A": a}, (z0,)))(A)
    J_ref = torch.func.jacrev(lambda a: torch.linalg.matrix_exp(a * T) @ z0)(A)
    assert J.shape == (2, 2, 2)
    torch.testing.assert_close(J, J_ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kw", [dict(method="rk4", step_size=0.1), dict(method="rk4")],
                         ids=["rk4_step_size", "rk4_grid"])
def test_vmap_fixed_step(kw):
    """``torch.func.vmap`` over the module works for fixed-step methods: equal to the batched solve and to
    the exact flow up to rk4's error; ``jacrev`` inside ``vmap`` gives the exact Jacobian per sample."""
    model = NeuralODE(Linear(), t=(0.0, 1.0), **kw)
    zb = _z0((3,))
    out = torch.func.vmap(model)(zb)
    torch.testing.assert_close(out, model(zb), rtol=1e-12, atol=1e-12)
    tol = 1e-5 if "step_size" in kw else 2e-2  # on the grid (0, 1): one rk4 step of h = 1
    torch.testing.assert_close(out, exact(zb, 1.0), rtol=tol, atol=tol)
    jac = torch.func.vmap(torch.func.jacrev(model))(zb)
    torch.testing.assert_close(jac, torch.func.vmap(torch.func.jacrev(lambda z: model(z)))(zb), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, torch.linalg.matrix_exp(A0 * 1.0).expand(3, -1, -1), rtol=tol, atol=tol)


def test_vmap_adaptive_is_refused_with_the_alternatives():
    """An adaptive solve chooses its steps on the host from the values, which vmap cannot batch: a clear
    InputError names the alternatives (per_sample_steps=True, or a fixed-step method)."""
    model = NeuralODE(Linear(), t=(0.0, 1.0), **TOL)
    zb = _z0((3,))
    with pytest.raises(InputError, match="per_sample_steps"):
        torch.func.vmap(model)(zb)
    batched = model(zb)  # the supported way: native batching equals solving each initial state alone
    torch.testing.assert_close(batched, torch.stack([model(z) for z in zb]), rtol=1e-7, atol=1e-9)


def test_per_sample_steps_batch():
    model = NeuralODE(Linear(), t=(0.0, 1.0), per_sample_steps=True, **TOL)
    zb = _z0((3,))
    torch.testing.assert_close(model(zb), exact(zb, 1.0), rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input():
    with pytest.raises(InputError, match="output"):
        NeuralODE(Linear(), output="states")
    with pytest.raises(InputError, match="2 times"):
        NeuralODE(Linear(), t=(0.0,))
    with pytest.raises(InputError, match="2 times"):
        NeuralODE(Linear(), t=torch.tensor([1.0], dtype=F64))
    with pytest.raises(InputError):
        NeuralODE(Linear(), t=[[0.0, 1.0]])
    with pytest.raises(InputError, match="callable"):
        NeuralODE("not a function")
    model = NeuralODE(Linear())
    z0 = _z0(())
    with pytest.raises(InputError):
        model(z0, t=[0.0])  # one time in the override
    with pytest.raises(InputError):
        model(z0, t=[0.0, 1.0, 0.5])  # not monotonic
    with pytest.raises(InputError):
        NeuralODE(Linear(), method="no_such_method")(z0)
    with pytest.raises(InputError):
        NeuralODE(Linear(), gradient="no_such_gradient")(z0)
    with pytest.raises(TypeError):
        NeuralODE(Linear(), no_such_option=1)(z0)


def test_deepcopy_of_a_model_after_a_forward_pass_with_gradients():
    """A model keeping its last solution (its tensors inside an autograd graph, which torch refuses to deep-copy) can
    be deep-copied after a training step (EMA copies, checkpointing): the copy's solution holds the same values,
    detached, and the copy computes what the original does."""
    from neurodyn.data import interpolation_mask, periodic_toy
    from neurodyn.models import LatentODE

    torch.manual_seed(0)
    t, x = periodic_toy(8, 40, seed=0)
    full = torch.ones_like(x)
    model = LatentODE(1, latent_size=4, rec_size=6, units=16)
    mask = interpolation_mask(full, 20, torch.Generator().manual_seed(0))
    loss = model.loss(x, t[0], mask, t[0], x, full, n_samples=2, kl_weight=0.0)["loss"]
    loss.backward()
    assert model.ode.last_solution.ys.grad_fn is not None
    twin = copy.deepcopy(model)
    assert twin.ode.last_solution.ys.grad_fn is None and not twin.ode.last_solution.ys.requires_grad
    torch.testing.assert_close(twin.ode.last_solution.ys, model.ode.last_solution.ys.detach(), rtol=0, atol=0)
    assert twin.ode.last_solution.stats == model.ode.last_solution.stats
    with torch.no_grad():
        a = model.ode(torch.ones(3, 4), t[0][:5])
        b = twin.ode(torch.ones(3, 4), t[0][:5])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deepcopy_of_a_solution_detaches_its_events():
    y0 = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    sol = neurodyn.solve(lambda t, y: torch.stack([y[1], -y[0]]), y0, torch.tensor([0.0, 7.0], dtype=torch.float64),
                         events=[neurodyn.Event(lambda t, y: y[0], terminal=False)], rtol=1e-10, atol=1e-12, dense=True)
    assert sol.events.t.requires_grad
    twin = copy.deepcopy(sol)
    assert not twin.events.t.requires_grad and not twin.ys.requires_grad
    torch.testing.assert_close(twin.events.t, sol.events.t.detach(), rtol=0, atol=0)
    torch.testing.assert_close(twin.evaluate(torch.tensor([1.0], dtype=torch.float64)),
                               sol.evaluate(torch.tensor([1.0], dtype=torch.float64)).detach(), rtol=0, atol=0)
    assert twin.status == sol.status and twin.n_valid == sol.n_valid
