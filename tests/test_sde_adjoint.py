"""The stochastic adjoint (gradient="adjoint" on SDEs) and reversible Heun's exact adjoint.

Truths: gradient="direct" (autograd through the steps: the discrete gradient), central finite differences of the
discrete solve on one fixed Brownian path, the closed-form Ito-Stratonovich correction, and the forward path
itself for the reversible reconstruction.
"""

from __future__ import annotations

import pytest
import torch

import neurodyn
from neurodyn.core.term import ControlTerm, ito_correction
from neurodyn.errors import InputError
from neurodyn.paths import BrownianInterval

F64 = torch.float64
B, D, M = 3, 2, 2


def _problem(noise: str, sde_type: str, entropy: int = 1):
    gen = torch.Generator().manual_seed(0)
    W = (0.4 * torch.randn(D, D, generator=gen, dtype=F64)).requires_grad_(True)
    s = torch.tensor([0.3, 0.5], dtype=F64, requires_grad=True)
    S = (0.3 * torch.randn(D, D, M, generator=gen, dtype=F64)).requires_grad_(True)
    y0 = torch.randn(B, D, generator=gen, dtype=F64).requires_grad_(True)

    def drift(t, y):
        return torch.tanh(y @ W) - 0.5 * y

    if noise == "diagonal":
        def diffusion(t, y):
            return s * torch.sin(y) + 0.1
        params, m = [W, s], D
    elif noise == "scalar":
        def diffusion(t, y):
            return (s * torch.cos(y)).unsqueeze(-1)
        params, m = [W, s], 1
    elif noise == "additive":
        def diffusion(t, y):
            return (s * (1.0 + t)).expand(B, D)
        params, m = [W, s], D
    else:
        def diffusion(t, y):
            return 0.2 * torch.tanh(torch.einsum("bi,ijk->bjk", y, S)) + 0.1
        params, m = [W, S], M
    bm = BrownianInterval(0.0, 1.0, shape=(B, m), dtype=F64, entropy=entropy)
    term = neurodyn.sde_term(drift, diffusion, bm, noise=noise, sde_type=sde_type)
    return term, y0, params


TS = torch.tensor([0.0, 0.5, 1.0], dtype=F64)


def _grads(noise, sde_type, method, gradient, dt, ts=TS, **kw):
    term, y0, params = _problem(noise, sde_type)
    sol = neurodyn.solve(term, y0, ts, method=method, step_size=dt, gradient=gradient,
                         params=None if gradient == "direct" else params, **kw)
    loss = (sol.ys[1:] ** 2).sum()
    return torch.autograd.grad(loss, [y0, *params]), sol


def _rel(a, b):
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("noise,sde_type,method", [
    ("diagonal", "stratonovich", "midpoint"),
    ("scalar", "stratonovich", "heun"),
    ("additive", "stratonovich", "euler_heun"),
    ("general", "stratonovich", "midpoint"),
    ("diagonal", "ito", "milstein"),
    ("scalar", "ito", "milstein"),
    ("additive", "ito", "euler"),
    ("general", "ito", "euler"),
])
def test_adjoint_consistent_with_direct(noise, sde_type, method):
    """The continuous adjoint approximates the discrete gradient, the error shrinking as dt does (same path)."""
    errs = []
    for dt in (1 / 16, 1 / 256):
        gd, _ = _grads(noise, sde_type, method, "direct", dt)
        ga, sol = _grads(noise, sde_type, method, "adjoint", dt)
        errs.append(_rel(ga, gd))
        assert sol.stats["gradient"] == "adjoint"
    # Strong order 0.5 on non-commutative general noise (Euler forward, midpoint backward): a slower decrease.
    assert errs[1] < (0.7 if noise == "general" and sde_type == "ito" else 0.5) * errs[0], errs
    assert errs[1] < 0.1, errs


def test_adjoint_against_finite_differences():
    """At a small step the adjoint gradient w.r.t. a diffusion parameter matches central differences of the solve."""
    dt = 1 / 512
    term, y0, params = _problem("diagonal", "stratonovich")
    s = params[1]
    sol = neurodyn.solve(term, y0, TS, method="midpoint", step_size=dt, gradient="adjoint", params=params)
    (gs,) = torch.autograd.grad((sol.ys[-1] ** 2).sum(), [s])
    eps = 1e-6
    fd = torch.zeros_like(s)
    with torch.no_grad():
        for k in range(s.numel()):
            vals = []
            for sign in (1.0, -1.0):
                s[k] += sign * eps
                vals.append(float((neurodyn.solve(term, y0, TS, method="midpoint", step_size=dt).ys[-1] ** 2).sum()))
                s[k] -= sign * eps
            fd[k] = (vals[0] - vals[1]) / (2 * eps)
    assert float((gs - fd).abs().max() / fd.abs().max()) < 2e-2


def test_adaptive_backward_and_methods():
    """adjoint_adaptive=True with tight tolerances lands near the fine fixed-step gradient; every adjoint method
    gives a consistent gradient; a method that cannot integrate the adjoint SDE is refused before work."""
    g_ref, _ = _grads("diagonal", "stratonovich", "midpoint", "direct", 1 / 256)
    g_ad, sol = _grads("diagonal", "stratonovich", "midpoint", "adjoint", 1 / 256, adjoint_adaptive=True,
                       adjoint_rtol=1e-4, adjoint_atol=1e-4)
    assert _rel(g_ad, g_ref) < 3e-2
    assert sol.stats["steps_backward"] > 0
    for m in ("heun", "euler_heun"):
        g_m, _ = _grads("diagonal", "stratonovich", "midpoint", "adjoint", 1 / 256, adjoint_method=m)
        assert _rel(g_m, g_ref) < 3e-2
    term, y0, params = _problem("diagonal", "stratonovich")
    with pytest.raises(InputError, match="midpoint, heun, euler_heun"):
        neurodyn.solve(term, y0, TS, method="midpoint", step_size=0.1, gradient="adjoint", params=params,
                       adjoint_method="milstein")


def test_ito_correction_closed_form():
    """1/2 (dg/dy) g for diagonal g = s sin(y) + 0.1 is 1/2 s cos(y) (s sin(y) + 0.1); general noise by columns."""
    s = torch.tensor([0.3, 0.5], dtype=F64)
    y = torch.randn(4, 2, dtype=F64, requires_grad=True)
    bm = BrownianInterval(0.0, 1.0, shape=(4, 2), dtype=F64, entropy=0)
    diag = ControlTerm(lambda t, x: s * torch.sin(x) + 0.1, bm, noise="diagonal")
    got = ito_correction(diag, torch.tensor(0.0), y)
    want = 0.5 * s * torch.cos(y) * (s * torch.sin(y) + 0.1)
    assert torch.allclose(got, want, atol=1e-14)
    A = torch.randn(2, 2, 3, dtype=F64)
    gen = ControlTerm(lambda t, x: torch.einsum("bi,ijk->bjk", x, A), bm, noise="general")
    got = ito_correction(gen, torch.tensor(0.0), y)
    # g_{jk}(y) = sum_i y_i A_ijk: sum_k sum_l dg_jk/dy_l g_lk = sum_k sum_l A_ljk g_lk
    g = torch.einsum("bi,ijk->bjk", y, A)
    want = 0.5 * torch.einsum("ljk,blk->bj", A, g)
    assert torch.allclose(got, want, atol=1e-13)


@pytest.mark.parametrize("noise", ["diagonal", "general", "additive", "scalar"])
def test_reversible_heun_exact_adjoint(noise):
    """method='reversible_heun', gradient='adjoint': the discrete gradient (== direct) to 1e-10, and the backward
    reconstruction reproduces the forward outputs to 1e-10 (float64)."""
    gd, sd = _grads(noise, "stratonovich", "reversible_heun", "direct", 1 / 64)
    ga, sa = _grads(noise, "stratonovich", "reversible_heun", "adjoint", 1 / 64)
    assert torch.equal(sd.ys, sa.ys)
    for a, b in zip(ga, gd, strict=True):
        assert float((a - b).abs().max()) < 1e-10
    assert sa.stats["reconstruction_error"] < 1e-10
    assert sa.stats["steps_backward"] == 64
    assert sa.stats["nfe_backward"] == 65  # one drift and diffusion evaluation per step backward, + the last point's


def test_reversible_heun_exact_adjoint_outputs_between_steps():
    """Output times off the step grid (linear dense output between step ends): still the direct gradient."""
    ts = torch.tensor([0.0, 0.3, 0.55, 0.56, 1.0], dtype=F64)
    gd, sd = _grads("diagonal", "stratonovich", "reversible_heun", "direct", 1 / 16, ts=ts)
    ga, sa = _grads("diagonal", "stratonovich", "reversible_heun", "adjoint", 1 / 16, ts=ts)
    assert torch.equal(sd.ys, sa.ys)
    for a, b in zip(ga, gd, strict=True):
        assert float((a - b).abs().max()) < 1e-10
    assert sa.stats["reconstruction_error"] < 1e-10


def test_reversible_heun_exact_adjoint_with_a_compiled_forward():
    """compile=True: the forward of the exact adjoint runs as the compiled driven loop (fixed steps, no per-step
    hook: the backward takes its steps from the step grid); the outputs and the gradient are the eager solve's to
    rounding, and the backward still reconstructs the forward (steps at 1/16 and output times off the grid, so a
    wrong grid would give another gradient)."""
    pytest.importorskip("torch._inductor")
    from neurodyn.compile import policy

    ts = torch.tensor([0.0, 0.3, 0.55, 0.56, 1.0], dtype=F64)
    gd, sd = _grads("diagonal", "stratonovich", "reversible_heun", "direct", 1 / 16, ts=ts)
    saved = policy.FORCE
    policy.FORCE = "compiled"
    try:
        ga, sa = _grads("diagonal", "stratonovich", "reversible_heun", "adjoint", 1 / 16, ts=ts, compile=True)
    finally:
        policy.FORCE = saved
    assert sa.stats["compiled"] == "loop"
    torch.testing.assert_close(sa.ys, sd.ys, rtol=0, atol=1e-13)
    for a, b in zip(ga, gd, strict=True):
        assert float((a - b).abs().max()) < 1e-10
    assert sa.stats["reconstruction_error"] < 1e-10
    assert sa.stats["steps_backward"] == 16


@pytest.mark.parametrize("method", ["reversible_heun", "midpoint"])
def test_adjoint_memory_flat(method):
    """Both adjoints keep no per-step tensors for backward: the saved-tensor count of the forward is the same for
    16x the steps (gradient='direct' grows with the steps)."""
    def saved(gradient, dt):
        count = [0]

        def pack(x):
            count[0] += 1
            return x
        term, y0, params = _problem("diagonal", "stratonovich")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            neurodyn.solve(term, y0, TS, method=method, step_size=dt, gradient=gradient,
                           params=None if gradient == "direct" else params)
        return count[0]

    assert saved("adjoint", 1 / 8) == saved("adjoint", 1 / 128)
    assert saved("direct", 1 / 128) > 8 * saved("direct", 1 / 8) / 2


def test_hidden_diffusion_tensor_refused():
    """A diffusion capturing a tensor requiring grad that params lacks: refused before work (it would get no
    gradient from the adjoint); given in params, it gets its gradient."""
    s = torch.tensor([0.3], dtype=F64, requires_grad=True)
    w = torch.tensor([0.5], dtype=F64, requires_grad=True)
    bm = BrownianInterval(0.0, 1.0, shape=(2, 1), dtype=F64, entropy=0)
    term = neurodyn.sde_term(lambda t, y: -w * y, lambda t, y: s * y, bm, sde_type="stratonovich")
    y0 = torch.ones(2, 1, dtype=F64)
    with pytest.raises(InputError, match="not among its parameters"):
        neurodyn.solve(term, y0, TS, method="midpoint", step_size=0.1, gradient="adjoint", params=[w])
    sol = neurodyn.solve(term, y0, TS, method="midpoint", step_size=0.1, gradient="adjoint", params=[w, s])
    sol.ys.sum().backward()
    assert s.grad is not None and float(s.grad.abs()) > 0


@pytest.mark.parametrize("mode", ["alive", "repeat"])
def test_hidden_guard_state_through_another_view(mode):
    """The hidden-tensor guard counts the tensor a call's input is a view of as that input: a value computed from
    the same state through another view (a diffusion reusing the g(y) its drift computed) is not a captured tensor;
    a tensor the field closes over still is."""
    from neurodyn.gradients.common import HiddenTensorGuard

    w = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    captured = torch.tensor([1.5, 0.5], dtype=F64, requires_grad=True)
    root = torch.randn(1, 4, dtype=F64, requires_grad=True)  # a replayed step's state; fields get views of it
    t = torch.tensor(0.0, dtype=F64)
    guard = HiddenTensorGuard([w], "checkpoint", mode=mode)
    for _ in range(2):  # "repeat" refuses a captured tensor seen in a second evaluation
        cached = torch.sin(root.view(2, 2)) * w  # computed by the drift's call at its own view
        guard.watch([cached + 1.0], [t, root.view(2, 2)])
    guard.settle()
    with pytest.raises(InputError, match="not among its parameters"):
        for _ in range(2):
            guard.watch([root.view(2, 2) * captured], [t, root.view(2, 2)])
        guard.settle()


class _Module(torch.nn.Module):
    """Drift and diagonal diffusion as a module's methods (what the compiled adjoint evaluations need)."""

    def __init__(self, hidden: torch.Tensor | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.a = torch.nn.Linear(D, D).double()
        self.b = torch.nn.Linear(D, D).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
        self.hidden = hidden

    def f(self, t, y):
        out = torch.tanh(self.a(y)) - 0.5 * y
        return out if self.hidden is None else out * self.hidden

    def g(self, t, y):
        return 0.3 * torch.sigmoid(self.b(y)) + 0.05 * t


def _module_grads(model, method, compile, sde_type="stratonovich", entropy=2):
    bm = BrownianInterval(0.0, 1.0, shape=(B, D), dtype=F64, entropy=entropy)
    term = neurodyn.sde_term(model.f, model.g, bm, sde_type=sde_type)
    y0 = torch.linspace(-1, 1, B * D, dtype=F64).view(B, D).requires_grad_(True)
    params = list(model.parameters())
    sol = neurodyn.solve(term, y0, TS, method=method, step_size=1 / 16, gradient="adjoint", params=params,
                         compile=compile)
    return torch.autograd.grad((sol.ys[1:] ** 2).sum(), [y0, *params]), sol, term


@pytest.mark.parametrize("method", ["midpoint", "heun"])
def test_stochastic_adjoint_compiled_evaluations_match_eager(method, compiled_adjoint_calls):
    """compile=True: the backward solve's augmented drift and diffusion products are compiled programs
    (neurodyn.compile.adjoint, seen returning their values); the gradients equal the eager adjoint's to rounding, and a
    second solve with a term built anew runs the same programs (nothing compiled again)."""
    calls = compiled_adjoint_calls
    model = _Module()
    ge = _module_grads(model, method, False)[0]
    assert not calls
    gc, sol, term = _module_grads(model, method, True)
    assert calls and all(calls)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    gc2 = _module_grads(model, method, True)[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(gc2, gc, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the compiled programs' cache (keyed weakly by the module) does not keep the module alive once it is dropped
    import gc as collector
    import weakref

    ref = weakref.ref(model)
    del model, sol, term
    collector.collect()
    assert ref() is None


def test_stochastic_adjoint_compiled_only_where_it_applies():
    """The compiled evaluations are not used (None: eager) for an Ito SDE with non-additive noise (its drift
    correction), for closures (what they capture is not known), and for params other than the modules' parameters."""
    from neurodyn.compile.adjoint import adjoint_fields

    model = _Module()
    y = torch.zeros(B, D, dtype=F64)
    bm = BrownianInterval(0.0, 1.0, shape=(B, D), dtype=F64, entropy=0)
    params = list(model.parameters())
    strat = neurodyn.sde_term(model.f, model.g, bm, sde_type="stratonovich")
    assert adjoint_fields(strat.rate, (B, D), params, y) is not None
    assert adjoint_fields(neurodyn.sde_term(model.f, model.g, bm, sde_type="ito").rate, (B, D), params, y) is None
    closure = neurodyn.sde_term(lambda t, y: model.f(t, y), model.g, bm, sde_type="stratonovich")
    assert adjoint_fields(closure.rate, (B, D), params, y) is None
    assert adjoint_fields(strat.rate, (B, D), params[:2], y) is None


def test_stochastic_adjoint_compiled_refuses_a_hidden_tensor():
    """A module method capturing a tensor requiring grad that params lacks (a plain attribute, not a parameter): with
    compile=True the solve refuses it as the eager adjoint does."""
    w = torch.tensor([1.5], dtype=F64, requires_grad=True)
    model = _Module(hidden=w)
    for compile in (False, True):
        with pytest.raises(InputError, match="not among its parameters"):
            _module_grads(model, "midpoint", compile)
    # The compiled evaluations themselves find it too (a graph input requiring grad) and give way to the eager ones,
    # whose guard reports it, without a warning of their own.
    from neurodyn.compile.adjoint import adjoint_fields

    bm = BrownianInterval(0.0, 1.0, shape=(B, D), dtype=F64, entropy=0)
    fields = adjoint_fields(neurodyn.sde_term(model.f, model.g, bm, sde_type="stratonovich").rate, (B, D),
                            list(model.parameters()), torch.zeros(B, D, dtype=F64))
    y = torch.zeros(B, D, dtype=F64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert fields.drift(torch.tensor(0.5, dtype=F64), y, y) is None
    assert fields.failed
