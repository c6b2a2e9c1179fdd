"""compile=True for fixed-step SDE solves (neurodyn.compile.driven): the compiled driven loop against the eager solve on
one Brownian path (the same increments, so the same discrete solution to rounding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.compile import driven, policy
from neurodyn.paths import BrownianInterval

B, D = 4, 3
TS = torch.tensor([0.0, 0.33, 0.5, 1.0], dtype=torch.float64)  # interior outputs (dense output) and a step end


class Small(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.scale = scale

    def f(self, t, y):
        return torch.tanh(self.a(y)) * self.scale + 0.1 * t

    def g(self, t, y):
        return 0.3 * torch.sigmoid(self.b(y))


def _path(levy: str = "none") -> BrownianInterval:
    return BrownianInterval(0.0, 1.0, shape=(B, D), dtype=torch.float64, entropy=3, levy_area=levy, cache_size=None)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(policy, "FORCE", "compiled")


def _solve(model, bm, method, compile_, sde_type="ito", **kw):
    term = neurodyn.sde_term(model.f, model.g, bm, noise="diagonal", sde_type=sde_type)
    y0 = torch.linspace(-1, 1, B * D, dtype=torch.float64).view(B, D)
    return neurodyn.solve(term, y0, TS, method=method, step_size=0.05, compile=compile_, **kw)


@pytest.mark.parametrize("method, sde_type, levy", [("euler", "ito", "none"),
                                                     pytest.param("reversible_heun", "stratonovich", "none",
                                                                  marks=pytest.mark.slow),
                                                     pytest.param("milstein", "ito", "none", marks=pytest.mark.slow),
                                                     pytest.param("srk", "ito", "space-time", marks=pytest.mark.slow)])
def test_compiled_matches_eager(forced, method, sde_type, levy):
    model = Small().double()
    bm = _path(levy)
    with torch.no_grad():
        a = _solve(model, bm, method, True, sde_type)
        b = _solve(model, bm, method, False, sde_type)
        # a second solve with a term built anew from the same methods reuses the compiled code
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        c = _solve(model, bm, method, True, sde_type)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert a.stats["compiled"] == "loop" and c.stats["compiled"] == "loop"
    assert b.stats.get("compiled") is None
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)
    torch.testing.assert_close(c.ys, b.ys, rtol=0, atol=1e-13)
    assert a.stats["steps"] == b.stats["steps"] == 20
    assert a.stats["nfe_diffusion"] == b.stats["nfe_diffusion"]
    # the drift at each step's end (one more than the eager loop, which evaluates it at the next step's start)
    assert a.stats["nfe"] - b.stats["nfe"] == (0 if method == "reversible_heun" else 1)


def test_compiled_reversible_heun_final_state(forced):
    """The carried (f(z), g(z), z) after a compiled solve, as torchsde's extra_solver_state returns it, equals the
    eager solve's: continuing from it gives the same result."""
    import neurodyn.compat.torchsde as tsde

    class SDE(nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.m = Small().double()

        def f(self, t, y):
            return self.m.f(t, y)

        def g(self, t, y):
            return self.m.g(t, y)

    sde = SDE()
    y0 = torch.linspace(-1, 1, B * D, dtype=torch.float64).view(B, D)
    ts = torch.tensor([0.0, 0.5], dtype=torch.float64)
    bm = _path()
    with torch.no_grad():
        ya, sa = tsde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.05, extra=True,
                             options={"compile": True})
        yb, sb = tsde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.05, extra=True)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-13)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)


def test_compiled_non_finite_stops_as_eager(forced):
    """A drift that blows up: the compiled solve stops before the step that made the state non-finite, with the
    eager solve's status, time, state and outputs."""

    class Blow(nn.Module):
        def f(self, t, y):
            return y * y * y * 40.0

        def g(self, t, y):
            return 0.1 * torch.ones_like(y)

    model = Blow()
    bm = _path()
    with torch.no_grad():
        a = _solve(model, bm, "euler", True, on_failure="return")
        b = _solve(model, bm, "euler", False, on_failure="return")
    assert a.status == b.status == "non_finite"
    assert a.stats["steps"] == b.stats["steps"] and 0 < b.stats["steps"] < 20
    assert float(a.t_final) == float(b.t_final)
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
def test_compiled_in_blocks_of_steps(forced, monkeypatch):
    """A solve whose stacked inputs exceed MAX_INPUT_ELEMENTS runs in blocks of steps (the last one padded): the same
    result as the eager solve, here 20 steps in blocks of 7, 7 and 6, with outputs inside and across blocks."""
    monkeypatch.setattr(driven, "MAX_INPUT_ELEMENTS", 7 * B * D)
    model = Small().double()
    bm = _path()
    with torch.no_grad():
        a = _solve(model, bm, "euler", True)
        b = _solve(model, bm, "euler", False)
    assert a.stats["compiled"] == "loop"
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)


def test_kept_input_buffers_carry_nothing_between_solves(forced):
    """The stacked increments go into buffers kept for the field's next solve: solves on two different Brownian
    paths, then the first again, each equal their eager solve to rounding (nothing of one path's increments left in the
    other's), and the second and third solves stack into the buffers the first made."""
    model = Small().double()
    paths = [_path(), BrownianInterval(0.0, 1.0, shape=(B, D), dtype=torch.float64, entropy=7, cache_size=None)]
    kept = []
    with torch.no_grad():
        for bm in (paths[0], paths[1], paths[0]):
            a = _solve(model, bm, "euler", True)
            b = _solve(model, bm, "euler", False)
            assert a.stats["compiled"] == "loop"
            torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)  # the dense output's rounding
            bufs = [v for d in driven._CACHE.values() for per in d.values() for k, v in per.items()
                    if isinstance(k, tuple) and k[0] == "inputs"]
            kept.append({x.data_ptr() for buf in bufs for x in buf})
    assert kept[0] and kept[0] == kept[1] == kept[2]
    assert not torch.equal(_solve(model, paths[0], "euler", False).ys, _solve(model, paths[1], "euler", False).ys)


def test_grad_mode_runs_eager_with_eager_gradients(forced):
    """With an autograd graph the compiled driven loop does not apply: the solve runs the eager stepper, and its
    gradients are the eager solve's."""
    model = Small().double()
    bm = _path()
    grads = []
    for comp in (True, False):
        model.zero_grad()
        sol = _solve(model, bm, "euler", comp)
        sol.ys[-1].pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if comp:
            assert sol.stats["compiled"] == "eager"
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_step_grid_lands_as_the_eager_loop():
    """The grid the driven loop precomputes: steps of dt from t0, landing on stops within LANDING_SLACK steps (the
    eager loop's rule), the last step shorter where dt does not divide the span; and backwards in time."""
    ts, hs = driven.step_grid([0.0, 1.0], [0.25, 1.0], 0.1)
    assert ts[:4] == [0.0, 0.1, 0.2, 0.25] and ts[-1] == 1.0 and ts[-2] == pytest.approx(0.95)
    assert len(hs) == len(ts) - 1 and all(h > 0 for h in hs)
    assert abs(sum(hs) - 1.0) < 1e-15
    ts, hs = driven.step_grid([1.0, 0.0], [0.0], 0.25)
    assert ts == [1.0, 0.75, 0.5, 0.25, 0.0] and hs == [-0.25] * 4
