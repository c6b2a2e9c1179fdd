"""``solve(..., compile=True)``: the compiled step agrees with the eager stepper to rounding, takes the same
steps, carries gradients, and falls back to eager with a warning when compilation fails."""

import pytest
import torch
from torch import nn

import neurodyn

F64 = torch.float64


def _mlp(dim: int = 2, hidden: int = 16, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    return Field()


# tsit5 and dopri8 (6-9 s each on one core: a compile) run with -m slow; dopri5's tableau shape (7 stages, FSAL) meets
# the compiled loop in tests/test_compiled_loop.py by default.
@pytest.mark.parametrize("method", [pytest.param("tsit5", marks=pytest.mark.slow),
                                    pytest.param("dopri8", marks=pytest.mark.slow),
                                    pytest.param("dopri5", marks=pytest.mark.slow),
                                    pytest.param("bosh3", marks=pytest.mark.slow), "rk4"])
def test_compiled_matches_eager(method):
    f = _mlp()
    y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=F64)
    t = torch.linspace(0, 2, 7, dtype=F64)
    kw = dict(method=method, rtol=1e-7, atol=1e-9, step_size=0.05 if method == "rk4" else None)
    with torch.no_grad():
        eager = neurodyn.solve(f, y0, t, **kw)
        comp = neurodyn.solve(f, y0, t, compile=True, **kw)
    assert comp.stats["steps"] == eager.stats["steps"]
    assert comp.stats["rejected"] == eager.stats["rejected"]
    # the compiled loop evaluates dy/dt at the end of every step of a method without FSAL: once more in all
    extra = 1 if comp.stats["compiled"] == "loop" and method == "rk4" else 0
    assert comp.stats["nfe"] == eager.stats["nfe"] + extra
    assert torch.allclose(comp.ys, eager.ys, rtol=1e-12, atol=1e-13)


@pytest.mark.slow  # an nn.Module under a graph: the compiled training step, two compilations (test_compiled_train.py)
def test_compiled_direct_gradient_matches_eager():
    f = _mlp(seed=1)
    y0 = torch.tensor([[0.5, -0.3]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    grads = []
    for compile in (False, True):
        sol = neurodyn.solve(f, y0, t, method="tsit5", rtol=1e-6, atol=1e-8, compile=compile)
        grads.append(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, *f.parameters()]))
    for ge, gc in zip(*grads):
        assert torch.allclose(ge, gc, rtol=1e-10, atol=1e-12)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    """A backend that fails (simulated: torch.compile returns a function that raises) -> one warning,
    then the eager stepper, with the eager result; the field is marked so later solves skip compiling."""
    import neurodyn.compile.step as compiled

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("backend failed")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)

    def f(t, y):
        return -y

    y0 = torch.ones(3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    eager = neurodyn.solve(f, y0, t, method="dopri5")
    with pytest.warns(RuntimeWarning, match="falling back to the eager stepper"):
        sol = neurodyn.solve(f, y0, t, method="dopri5", compile=True)
    assert sol.status == "success"
    assert torch.equal(sol.ys, eager.ys)
    assert sol.stats["nfe"] == eager.stats["nfe"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = neurodyn.solve(f, y0, t, method="dopri5", compile=True)
    assert torch.equal(again.ys, eager.ys)
