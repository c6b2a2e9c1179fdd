"""Gradient methods ("direct", "adjoint", "checkpoint", "interpolated") against independent truths.

* Linear ODEs ``dy/dt = A y``: the exact solution is ``expm(A (t - t0)) y0``, so torch's
  ``matrix_exp`` (with autograd) gives exact gradients with respect to ``A``, ``y0`` and every
  output time.
* Nonlinear (MLP) fields: ``"checkpoint"`` replays the same discrete solve, so it must equal
  ``"direct"`` to rounding; the continuous adjoints agree with it to the solver tolerance.
* ``torch.autograd.gradcheck`` (finite differences) for every method.
* ``torchdiffeq.odeint_adjoint`` for the drop-in ``neurodyn.odeint_adjoint``.

Everything runs in float64 with seeded generators.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import neurodyn

F64 = torch.float64
GRADIENTS = ["direct", "adjoint", "checkpoint", "interpolated"]
NON_DIRECT = ["adjoint", "checkpoint", "interpolated"]
CONTINUOUS = ["adjoint", "interpolated"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: intra-op threads only add OpenMP contention (on a loaded 2-core
    machine a 30 ms backward took 5-20 s with 2 threads). Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tensors])


# ----------------------------------------------------------------------------------------------
# Linear ODE: exact gradients by matrix_exp
# ----------------------------------------------------------------------------------------------
def linear_setup(seed: int = 0, n: int = 4, batch: tuple[int, ...] = (), t_end: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    a = 0.4 * torch.randn(n, n, generator=g, dtype=F64) - 0.3 * torch.eye(n, dtype=F64)
    y0 = torch.randn(*batch, n, generator=g, dtype=F64)
    # Several output times, not on any step grid; t[0] != 0 so that the t0 gradient is non-trivial.
    t = 0.1 + torch.tensor([0.0, 0.15, 0.45, 0.8, 1.0], dtype=F64) * t_end
    w = torch.randn(len(t), *batch, n, generator=g, dtype=F64)
    return a, y0, t, w


def exact_linear_grads(a, y0, t, w):
    """Loss sum_i <w_i, expm(A (t_i - t_0)) y0> and its gradients wrt (A, y0, t), all exact."""
    a, y0, t = (x.detach().clone().requires_grad_(True) for x in (a, y0, t))
    ys = torch.stack([(torch.linalg.matrix_exp(a * (ti - t[0])) @ y0.unsqueeze(-1)).squeeze(-1) for ti in t])
    loss = (w * ys).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (a, y0, t)))


def solver_linear_grads(a, y0, t, w, gradient, **kw):
    a, y0, t = (x.detach().clone().requires_grad_(True) for x in (a, y0, t))

    def f(t, y):
        return y @ a.T  # batched: y has shape (..., n)

    sol = neurodyn.solve(f, y0, t, gradient=gradient, params=[a], **kw)
    loss = (w * sol.ys).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (a, y0, t))), sol


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_exact_gradients(gradient, direction):
    """dL/dA, dL/dy0 and dL/dt_i (including t_0) match matrix_exp to ~1e-7 relative at rtol=1e-10.

    direction="backward" integrates with decreasing t."""
    t_end = 2.0 if direction == "forward" else -2.0
    a, y0, t, w = linear_setup(seed=0, t_end=t_end)
    exact = exact_linear_grads(a, y0, t, w)
    got, sol = solver_linear_grads(a, y0, t, w, gradient, rtol=1e-10, atol=1e-12)
    assert sol.success
    names = ["loss", "dA", "dy0", "dt"]
    for name, g, e in zip(names, got, exact):
        assert rel_err(g, e) < 1e-7, (name, rel_err(g, e))
    # Every output time, t0 included, has a non-trivial gradient and each one matches.
    assert bool((exact[3].abs() > 1e-3).all())
    torch.testing.assert_close(got[3], exact[3], rtol=1e-7, atol=0)
    if gradient != "direct":
        assert sol.stats["nfe_backward"] > 0
    if gradient == "adjoint":
        assert sol.stats["adjoint_drift"] < 10
    if gradient == "checkpoint":
        assert 2 <= sol.stats["checkpoints"] <= 16


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_linear_exact_gradients_batched(gradient):
    """A batch of states (3, 2, n) through the same linear field: exact gradients again."""
    a, y0, t, w = linear_setup(seed=5, n=3, batch=(3, 2))
    exact = exact_linear_grads(a, y0, t, w)
    got, _ = solver_linear_grads(a, y0, t, w, gradient, rtol=1e-10, atol=1e-12)
    for name, g, e in zip(["loss", "dA", "dy0", "dt"], got, exact):
        assert rel_err(g, e) < 1e-7, (name, rel_err(g, e))


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_closure_with_several_explicit_params(gradient):
    """y' = A y + b sin(t), closure over A and b passed as params (plus a tensor not requiring grad,
    which is ignored). Compared with the exact gradients of the augmented linear system
    z = (y, s, c), z' = [[A, b, 0], [0, 0, 1], [0, -1, 0]] z, s = sin t, c = cos t."""
    g = torch.Generator().manual_seed(7)
    n = 3
    a0 = 0.3 * torch.randn(n, n, generator=g, dtype=F64) - 0.2 * torch.eye(n, dtype=F64)
    b0 = torch.randn(n, generator=g, dtype=F64)
    y00 = torch.randn(n, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.3, 2.0], dtype=F64)
    w = torch.randn(len(t), n, generator=g, dtype=F64)
    fixed = torch.tensor(1.0, dtype=F64)  # no grad: fine to leave out or to pass

    a, b, y0 = (x.clone().requires_grad_(True) for x in (a0, b0, y00))
    sol = neurodyn.solve(lambda t, y: fixed * (a @ y) + b * torch.sin(t), y0, t, gradient=gradient,
                         params=[b, fixed, a], rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((w * sol.ys).sum(), (a, b, y0))

    a, b, y0 = (x.clone().requires_grad_(True) for x in (a0, b0, y00))
    m = torch.zeros(n + 2, n + 2, dtype=F64)
    m = m.index_put((torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)), a.reshape(-1))
    m = m.index_put((torch.arange(n), torch.full((n,), n)), b)
    m = m + torch.tensor([[0.0] * (n + 2)] * n + [[0.0] * n + [0.0, 1.0], [0.0] * n + [-1.0, 0.0]], dtype=F64)
    z0 = torch.cat([y0, torch.tensor([0.0, 1.0], dtype=F64)])
    ys = torch.stack([torch.linalg.matrix_exp(m * ti)[:n] @ z0 for ti in t])
    exact = torch.autograd.grad((w * ys).sum(), (a, b, y0))
    for name, gv, e in zip(["dA", "db", "dy0"], got, exact):
        assert rel_err(gv, e) < 1e-7, (name, rel_err(gv, e))


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_non_leaf_params(gradient):
    """params may be computed tensors (A = 2 V, V the leaf): the gradient flows on to V."""
    a, y0, t, w = linear_setup(seed=15)
    v = (a / 2).requires_grad_()
    a_nl = 2 * v
    sol = neurodyn.solve(lambda t, y: a_nl @ y, y0, t, gradient=gradient, params=[a_nl], rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad((w * sol.ys).sum(), v)
    _, g_a, _, _ = exact_linear_grads(a, y0, t, w)
    assert rel_err(got, 2 * g_a) < 1e-7


@pytest.mark.parametrize("seminorm", [True, False])
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_per_element_tolerances(gradient, seminorm):
    """rtol/atol given as tensors of the state's shape (documented in solve): exact gradients."""
    a, y0, t, w = linear_setup(seed=16)
    rtol = torch.tensor([1e-10, 1e-11, 1e-10, 1e-11], dtype=F64)
    got, _ = solver_linear_grads(a, y0, t, w, gradient, rtol=rtol, atol=rtol * 1e-2, seminorm=seminorm)
    exact = exact_linear_grads(a, y0, t, w)
    for name, g, e in zip(["loss", "dA", "dy0", "dt"], got, exact):
        assert rel_err(g, e) < 1e-7, (name, rel_err(g, e))


# ----------------------------------------------------------------------------------------------
# MLP nn.Module fields: checkpoint == direct to rounding; continuous adjoints to tolerance
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int = 3, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim, hidden, dtype=F64)
        self.l2 = nn.Linear(hidden, dim, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[-1]))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) + 0.1 * torch.sin(t) * y


MLP_CONFIGS = {
    "dopri5": {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9},
    "tsit5": {"method": "tsit5", "rtol": 1e-7, "atol": 1e-9},
    "bosh3": {"method": "bosh3", "rtol": 1e-6, "atol": 1e-8},
    "dopri8": {"method": "dopri8", "rtol": 1e-9, "atol": 1e-11},
    "rk4": {"method": "rk4", "step_size": 0.03},
}
# Continuous adjoint vs discrete gradient: both within O(tolerance) of the true gradient. Observed
# ~0.5-1x rtol on these problems; the bound leaves 50x (rk4 at h=0.03: O(h^4) ~ 1e-6).
ADJOINT_BOUND = {"dopri5": 5e-6, "tsit5": 5e-6, "bosh3": 5e-5, "dopri8": 5e-8, "rk4": 1e-6}


def mlp_grads(field, y0, t, w, gradient, **kw):
    y0 = y0.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    sol = neurodyn.solve(field, y0, t, gradient=gradient, **kw)
    loss = (w * sol.ys).sum()
    grads = torch.autograd.grad(loss, (y0, t, *field.parameters()))
    return flat(grads), sol


def mlp_problem(n_times: int = 4, t_end: float = 2.0, batch: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    field = MLP(seed=seed)
    y0 = torch.randn(batch, 3, generator=g, dtype=F64)
    t = torch.cat([torch.zeros(1, dtype=F64), torch.sort(torch.rand(n_times - 1, generator=g, dtype=F64))[0]]) * t_end
    t[-1] = t_end
    w = torch.randn(n_times, batch, 3, generator=g, dtype=F64)
    return field, y0, t, w


@pytest.mark.parametrize("config", list(MLP_CONFIGS))
@pytest.mark.parametrize("variant", ["checkpoint", "checkpoint-3", "adjoint", "interpolated"])
def test_mlp_vs_direct(config, variant):
    field, y0, t, w = mlp_problem()
    kw = MLP_CONFIGS[config]
    g_direct, sol_d = mlp_grads(field, y0, t, w, "direct", **kw)
    gradient, extra = (variant, {}) if variant != "checkpoint-3" else ("checkpoint", {"checkpoints": 3})
    g, sol = mlp_grads(field, y0, t, w, gradient, **kw, **extra)
    assert sol.stats["steps"] == sol_d.stats["steps"]
    if gradient == "checkpoint":
        # The same discrete solve replayed: equal to rounding.
        assert rel_err(g, g_direct) < 1e-12, rel_err(g, g_direct)
        assert sol.stats["checkpoints"] <= extra.get("checkpoints", 16)
    else:
        assert rel_err(g, g_direct) < ADJOINT_BOUND[config], rel_err(g, g_direct)


@pytest.mark.parametrize("config", list(MLP_CONFIGS))
def test_checkpoint_recursion_and_outputs_between_steps(config):
    """Many output times, including a cluster 2e-4 apart (far below any step size here, so several
    outputs come from one step's interpolant), a long solve and checkpoints=3, so the segments are
    checkpointed recursively: still equal to direct to 1e-12."""
    field, y0, t, w = mlp_problem(n_times=30, t_end=6.0, batch=2, seed=3)
    t = torch.sort(torch.cat([t, 2.5 + 2e-4 * torch.arange(1, 6, dtype=F64)]))[0]
    w = torch.randn(len(t), *y0.shape, generator=torch.Generator().manual_seed(33), dtype=F64)
    kw = MLP_CONFIGS[config]
    g_direct, sol_d = mlp_grads(field, y0, t, w, "direct", **kw)
    assert sol_d.stats["steps"] > 3 * 3  # more than checkpoints**2: at least two levels
    for k in (3, 16):
        g, sol = mlp_grads(field, y0, t, w, "checkpoint", checkpoints=k, **kw)
        assert rel_err(g, g_direct) < 1e-12, (k, rel_err(g, g_direct))
        assert sol.stats["checkpoints"] <= k
        assert sol.stats["steps"] == sol_d.stats["steps"]


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_mlp_backward_in_time(gradient):
    """Decreasing t with an MLP field: checkpoint == direct to rounding, adjoints to tolerance."""
    field, y0, t, w = mlp_problem(n_times=6, t_end=-2.0, seed=4)
    assert bool((t[1:] < t[:-1]).all())
    g_direct, _ = mlp_grads(field, y0, t, w, "direct", rtol=1e-8, atol=1e-10)
    g, sol = mlp_grads(field, y0, t, w, gradient, rtol=1e-8, atol=1e-10)
    bound = 1e-12 if gradient in ("direct", "checkpoint") else 1e-6
    assert rel_err(g, g_direct) < bound, rel_err(g, g_direct)


# ----------------------------------------------------------------------------------------------
# gradcheck (finite differences)
# ----------------------------------------------------------------------------------------------
def gradcheck_inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(2, 2, generator=g, dtype=F64)).requires_grad_()
    b = (0.3 * torch.randn(2, generator=g, dtype=F64)).requires_grad_()
    y0 = torch.randn(2, generator=g, dtype=F64).requires_grad_()
    t = torch.tensor([0.1, 0.6, 1.2], dtype=F64).requires_grad_()
    return y0, t, w, b


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradcheck(gradient):
    """Finite differences of the whole solve wrt y0, every output time and the field's tensors.

    direct/checkpoint differentiate the discrete solve exactly: gradcheck's default tolerances. The
    continuous adjoints differ from it by O(solver tolerance): rtol=1e-10, and gradcheck atol=1e-8,
    rtol=1e-5 (100x the solver tolerance; they pass at atol=1e-9 today)."""

    def run(y0, t, w, b):
        def f(t, y):
            return torch.tanh(w @ y + b) - 0.2 * y * torch.cos(t)

        return neurodyn.solve(f, y0, t, gradient=gradient, params=[w, b], rtol=1e-10, atol=1e-12).ys

    inputs = gradcheck_inputs()
    if gradient in ("direct", "checkpoint"):
        assert torch.autograd.gradcheck(run, inputs)
    else:
        assert torch.autograd.gradcheck(run, inputs, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_gradcheck_fixed_step(gradient):
    """rk4 with a step size that does not divide the output spacing (outputs between steps)."""

    def run(y0, t, w, b):
        return neurodyn.solve(lambda t, y: torch.tanh(w @ y + b), y0, t, gradient=gradient, params=[w, b],
                              method="rk4", step_size=0.07, checkpoints=2).ys

    assert torch.autograd.gradcheck(run, gradcheck_inputs(seed=3))


# ----------------------------------------------------------------------------------------------
# Buffers, parameters found automatically
# ----------------------------------------------------------------------------------------------
class LinearWithBuffer(nn.Module):
    """y' = scale * (A y) + b with ``scale`` a registered buffer (a tensor, but not a parameter)."""

    def __init__(self, n: int = 3, seed: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(0.4 * torch.randn(n, n, generator=g, dtype=F64) - 0.3 * torch.eye(n, dtype=F64))
        self.b = nn.Parameter(torch.randn(n, generator=g, dtype=F64))
        self.register_buffer("scale", torch.tensor(0.8, dtype=F64))

    def forward(self, t, y):
        return self.scale * (y @ self.a.T) + self.b


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_module_with_buffer(gradient):
    """Parameters are found automatically, the buffer gets no gradient and raises nothing; the
    gradients equal the exact ones of the affine system (augmented with a constant 1 component)."""
    m = LinearWithBuffer()
    n = 3
    g = torch.Generator().manual_seed(9)
    y0 = torch.randn(4, n, generator=g, dtype=F64).requires_grad_()
    t = torch.tensor([0.0, 0.7, 1.5], dtype=F64)
    w = torch.randn(3, 4, n, generator=g, dtype=F64)
    sol = neurodyn.solve(m, y0, t, gradient=gradient, rtol=1e-10, atol=1e-12)
    (w * sol.ys).sum().backward()
    assert m.scale.grad is None and not m.scale.requires_grad
    got = (m.a.grad, m.b.grad, y0.grad)

    a, b, y0e = (x.detach().clone().requires_grad_(True) for x in (m.a, m.b, y0))
    aug = torch.cat([torch.cat([0.8 * a, b[:, None]], 1), torch.zeros(1, n + 1, dtype=F64)], 0)
    z0 = torch.cat([y0e, torch.ones(4, 1, dtype=F64)], 1)
    ys = torch.stack([z0 @ torch.linalg.matrix_exp(aug * ti).T for ti in t])[..., :n]
    exact = torch.autograd.grad((w * ys).sum(), (a, b, y0e))
    for name, gv, e in zip(["dA", "db", "dy0"], got, exact):
        assert rel_err(gv, e) < 1e-7, (name, rel_err(gv, e))


# ----------------------------------------------------------------------------------------------
# Error cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", NON_DIRECT)
def test_hidden_tensor_raises(gradient):
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(neurodyn.InputError, match=r"params="):
        neurodyn.solve(lambda t, y: a @ y, y0, t, gradient=gradient)
    # Passing it (or using direct) is fine.
    neurodyn.solve(lambda t, y: a @ y, y0, t, gradient=gradient, params=[a]).ys.sum().backward()
    assert a.grad is not None
    neurodyn.solve(lambda t, y: a @ y, y0, t, gradient="direct")


@pytest.mark.parametrize("gradient", NON_DIRECT)
def test_backward_through_failed_solve_raises(gradient):
    m = MLP(seed=10)
    y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(10), dtype=F64).requires_grad_()
    t = torch.linspace(0, 5, 4, dtype=F64)
    sol = neurodyn.solve(m, y0, t, gradient=gradient, max_steps=3, on_failure="return")
    assert sol.status == "max_steps_reached"
    loss = sol.ys[: sol.n_valid].sum()
    with pytest.raises(neurodyn.SolveFailure):
        loss.backward()


@pytest.mark.parametrize("gradient", NON_DIRECT)
def test_event_fn_with_non_direct_gradient(gradient):
    """A terminal event (event_fn): the continuous adjoints raise before work (they cannot differentiate through the
    stop); checkpoint replays it (tests/test_events_jumps.py holds its gradients against closed forms)."""
    m = MLP(seed=11)
    y0 = torch.ones(3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    if gradient in ("adjoint", "interpolated"):
        with pytest.raises(neurodyn.InputError, match="terminal event"):
            neurodyn.solve(m, y0, t, gradient=gradient, event_fn=lambda t, y: y[0] - 10.0)
    else:
        sol = neurodyn.solve(m, y0, t, gradient=gradient, event_fn=lambda t, y: y[0] - 10.0)
        assert sol.status == "success" and len(sol.events) == 0


def test_odeint_adjoint_plain_function_needs_adjoint_params():
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(neurodyn.InputError, match="adjoint_params"):
        neurodyn.odeint_adjoint(lambda t, y: a @ y, y0, t)
    neurodyn.odeint_adjoint(lambda t, y: a @ y, y0, t, adjoint_params=[a]).sum().backward()
    assert a.grad is not None


# ----------------------------------------------------------------------------------------------
# Reversibility diagnostic: adjoint_drift, and where the backsolve adjoint breaks down
# ----------------------------------------------------------------------------------------------
def test_adjoint_drift_small_on_well_behaved_problem():
    field, y0, t, w = mlp_problem(n_times=5, t_end=3.0, seed=12)
    _, sol = mlp_grads(field, y0, t, w, "adjoint", rtol=1e-6, atol=1e-8)
    assert sol.stats["adjoint_drift"] < 10, sol.stats["adjoint_drift"]


def test_adjoint_drift_large_on_dissipative_problem():
    """dy/dt = -50 y on [0, 5]: reconstructing y backward amplifies errors by up to e^250."""
    k = torch.tensor(50.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    sol = neurodyn.solve(lambda t, y: -k * y, y0, t, gradient="adjoint", params=[k], rtol=1e-6, atol=1e-8)
    with pytest.warns(RuntimeWarning, match="adjoint_drift"):
        sol.ys.sum().backward()
    assert sol.stats["adjoint_drift"] > 1e6, sol.stats["adjoint_drift"]


def test_interpolated_accurate_where_adjoint_is_not():
    """y1' = -50 y1 (strongly dissipative) drives y2' = y1 - 0.1 y2 on [0, 5]. The gradient wrt the
    coupling A[1, 0] needs y1 on the transient, which the backsolve reconstructs from y1(5) ~ noise
    amplified by e^250; the interpolated adjoint reads y1 from the forward solution."""
    a0 = torch.tensor([[-50.0, 0.0], [1.0, -0.1]], dtype=F64)
    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    w = torch.tensor([0.3, 1.0], dtype=F64)
    a = a0.clone().requires_grad_()
    (exact,) = torch.autograd.grad(w @ (torch.linalg.matrix_exp(a * 5.0) @ y0), a)

    errs, drifts = {}, {}
    for gradient in ("adjoint", "interpolated", "checkpoint"):
        a = a0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sol = neurodyn.solve(lambda t, y, a=a: a @ y, y0, t, gradient=gradient, params=[a], rtol=1e-6, atol=1e-8)
            (got,) = torch.autograd.grad(w @ sol.ys[-1], a)
        errs[gradient] = rel_err(got, exact)
        drifts[gradient] = sol.stats.get("adjoint_drift")
    assert drifts["adjoint"] > 1e6, drifts
    assert errs["interpolated"] < 1e-5, errs
    assert errs["checkpoint"] < 1e-5, errs
    assert not errs["adjoint"] < 1e-1, errs  # also catches NaN


# ----------------------------------------------------------------------------------------------
# Seminorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", CONTINUOUS)
def test_seminorm_needs_no_more_backward_evaluations(gradient):
    g = torch.Generator().manual_seed(13)
    field = MLP(dim=4, hidden=64, seed=13)  # 4*64 + 64 + 64*4 + 4 = 580 parameters
    y0 = torch.randn(8, 4, generator=g, dtype=F64)
    t = torch.linspace(0, 3, 5, dtype=F64)
    w = torch.randn(5, 8, 4, generator=g, dtype=F64)
    nfe, grads = {}, {}
    for semi in (True, False):
        grads[semi], sol = mlp_grads(field, y0, t, w, gradient, rtol=1e-6, atol=1e-8, seminorm=semi)
        nfe[semi] = sol.stats["nfe_backward"]
    assert nfe[True] <= nfe[False], nfe
    assert rel_err(grads[True], grads[False]) < 1e-4


# ----------------------------------------------------------------------------------------------
# torchdiffeq's odeint_adjoint
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["default", "seminorm"])
def test_odeint_adjoint_matches_torchdiffeq(norm):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field, y0, t, w = mlp_problem(n_times=5, t_end=2.0, batch=4, seed=14)
    tol = {"rtol": 1e-10, "atol": 1e-12, "method": "dopri5"}
    results = []
    # torchdiffeq spells the full norm by leaving adjoint_options out.
    runs = [(neurodyn.odeint_adjoint, {"norm": norm}),
            (torchdiffeq.odeint_adjoint, {"norm": norm} if norm == "seminorm" else None)]
    for odeint_adjoint, adjoint_options in runs:
        field.zero_grad()
        y = y0.clone().requires_grad_()
        ys = odeint_adjoint(field, y, t, adjoint_options=adjoint_options, **tol)
        loss = (w * ys).sum()
        loss.backward()
        results.append((loss.detach(), flat([y.grad, *(p.grad for p in field.parameters())])))
    (l_nd, g_nd), (l_td, g_td) = results
    assert rel_err(l_nd, l_td) < 1e-6
    assert rel_err(g_nd, g_td) < 1e-6, rel_err(g_nd, g_td)


class _Field(nn.Module):
    def __init__(self, d: int = 3, hidden: int = 16):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()

    def forward(self, t, y):
        return self.net(y) - 0.2 * y


@pytest.mark.parametrize("gradient", ["adjoint", "interpolated"])
def test_compiled_adjoint_evaluations_match_eager(gradient, compiled_adjoint_calls):
    """compile=True with gradient="adjoint"/"interpolated" on a module field (CPU): the backward solve's
    evaluations of the field and its vector-Jacobian products are compiled programs (neurodyn.compile.adjoint, seen
    returning their values); the gradients equal the eager solve's to rounding (same steps)."""
    calls = compiled_adjoint_calls
    field = _Field()
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    grads, sols = [], []
    for compile in (False, True):
        y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3).requires_grad_(True)
        sol = neurodyn.solve(field, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, gradient=gradient,
                             compile=compile)
        grads.append(torch.autograd.grad(sol.ys.pow(2).sum(), [y0, *field.parameters()]))
        sols.append(sol)
        assert bool(calls) == compile and all(calls)
    assert sols[0].stats["steps_backward"] == sols[1].stats["steps_backward"]
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_compiled_adjoint_evaluations_only_for_module_fields():
    """A closure field (what it captures is not known) or params other than its module's parameters: the compiled
    evaluations do not apply (None: eager)."""
    from neurodyn.compile.adjoint import adjoint_fields

    field = _Field()
    y = torch.zeros(4, 3, dtype=torch.float64)
    params = list(field.parameters())
    assert adjoint_fields(field, (4, 3), params, y) is not None
    assert adjoint_fields(lambda t, y: field(t, y), (4, 3), params, y) is None
    assert adjoint_fields(field, (4, 3), params[:1], y) is None
    assert adjoint_fields(field, (4, 3), params, y.float()) is not None
