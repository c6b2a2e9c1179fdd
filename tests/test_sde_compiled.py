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
    # the compiled code's cache (keyed weakly by the module) does not keep the module alive once it is dropped
    import gc
    import weakref

    ref = weakref.ref(model)
    del model, a, b, c
    gc.collect()
    assert ref() is None


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


def _train(model, bm, method, compile_, sde_type="ito", ts=TS, y0_grad=True, retain=False):
    """Gradients of ``sum(ys^2)`` with respect to ``y0`` and the model's parameters, and the solution."""
    model.zero_grad()
    y0 = torch.linspace(-1, 1, B * D, dtype=torch.float64).view(B, D).requires_grad_(y0_grad)
    term = neurodyn.sde_term(model.f, model.g, bm, noise="diagonal", sde_type=sde_type)
    sol = neurodyn.solve(term, y0, ts, method=method, step_size=0.05, compile=compile_)
    loss = sol.ys.pow(2).sum()
    loss.backward(retain_graph=retain)
    if retain:  # a second backward through the same graph adds the same gradients again
        loss.backward()
    grads = ([y0.grad] if y0_grad else []) + [p.grad.clone() for p in model.parameters()]
    return sol, grads


@pytest.mark.slow  # compiling a forward and a backward: 30-60 s on a loaded 2-core machine
@pytest.mark.parametrize("method, sde_type, levy", [("euler", "ito", "none"),
                                                     ("reversible_heun", "stratonovich", "none"),
                                                     ("milstein", "ito", "none"),
                                                     ("srk", "ito", "space-time")])
def test_grad_mode_compiled_blocks_match_eager_gradients(forced, monkeypatch, method, sde_type, levy):
    """With an autograd graph compile=True runs compiled blocks of steps (here 2 steps each; 20 steps, outputs at
    a step end only, so one compiled block): outputs and gradients with respect to y0 and every parameter equal the
    eager solve's to rounding (float64), also through backward(retain_graph=True) twice; a second solve with a term
    built anew compiles nothing."""
    monkeypatch.setattr(driven, "GRAPH_BLOCK", 2)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 2)
    model = Small().double()
    bm = _path(levy)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, ga = _train(model, bm, method, True, sde_type, ts, retain=True)
    b, gb = _train(model, bm, method, False, sde_type, ts, retain=True)
    assert a.stats["compiled"] == "loop" and b.stats.get("compiled") is None
    assert a.stats["steps"] == b.stats["steps"] == 20
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    c, gc = _train(model, bm, method, True, sde_type, ts, y0_grad=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for x, y in zip(gc, gb[1:]):  # (the first solve's gradients are doubled by the second backward)
        torch.testing.assert_close(2 * x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.slow
def test_grad_mode_compiled_gradients_match_finite_differences(forced, monkeypatch):
    """Gradients of compiled blocks (of 3 steps, with one-step blocks up to the interior outputs and a block cut by
    the outputs) against central differences of the eager solve (float64) along random directions in y0 and in the
    parameters."""
    monkeypatch.setattr(driven, "GRAPH_BLOCK", 3)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 3)
    model = Small().double()
    bm = _path()
    sol, grads = _train(model, bm, "euler", True)
    assert sol.stats["compiled"] == "loop"
    params = [torch.zeros(B, D, dtype=torch.float64), *[p.detach() for p in model.parameters()]]
    gen = torch.Generator().manual_seed(0)
    y0 = torch.linspace(-1, 1, B * D, dtype=torch.float64).view(B, D)
    term = neurodyn.sde_term(model.f, model.g, bm, noise="diagonal")

    def loss(shift: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for p, s in zip(model.parameters(), shift[1:]):
                p.add_(s)
            try:
                return float(neurodyn.solve(term, y0 + shift[0], TS, method="euler", step_size=0.05).ys.pow(2).sum())
            finally:
                for p, s in zip(model.parameters(), shift[1:]):
                    p.sub_(s)

    eps = 1e-6
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        fd = (loss([eps * x for x in v]) - loss([-eps * x for x in v])) / (2 * eps)
        an = sum(float((g * x).sum()) for g, x in zip(grads, v))
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an))


class _HostCounted(Small):
    """``Small`` counting the drift's evaluations made on the host (outside a graph being compiled)."""

    def __init__(self):
        super().__init__()
        self.host = 0

    def f(self, t, y):
        if not torch.compiler.is_compiling():
            self.host += 1
        return super().f(t, y)


@pytest.mark.slow  # compiling a block's forward and backward
def test_grad_mode_blocks_evaluate_the_first_drift_themselves(forced, monkeypatch):
    """Under autograd the blocks of a method that is not FSAL (Euler) evaluate the drift at each step's start: the
    solve evaluates no drift on the host (before, the direct solve's dy/dt at t0, checked, and the last block's drift
    at the final step's end, never used), counts the eager loop's evaluations, and its outputs and gradients equal the
    eager solve's to rounding (float64). An FSAL method (reversible Heun) still starts from the drift at t0."""
    monkeypatch.setattr(driven, "GRAPH_BLOCK", 5)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 5)
    model = _HostCounted().double()
    bm = _path()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _train(model, bm, "euler", True, ts=ts)  # compiles
    model.host = 0
    a, ga = _train(model, bm, "euler", True, ts=ts)
    assert a.stats["compiled"] == "loop" and model.host == 0
    b, gb = _train(model, bm, "euler", False, ts=ts)
    assert model.host == b.stats["nfe"] == a.stats["nfe"] == 20
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
    model.host = 0
    c, _ = _train(model, bm, "reversible_heun", True, "stratonovich", ts=ts)
    assert c.stats["compiled"] == "loop" and model.host >= 1


@pytest.mark.slow  # compiling two methods' blocks
def test_grad_mode_block_length_follows_the_step_cost(forced, monkeypatch):
    """Blocks of GRAPH_BLOCK_CHEAP steps for a method whose step evaluates the drift and the diffusion once each
    (Euler), of GRAPH_BLOCK steps for one that evaluates more (Milstein: the diffusion and its derivative term)."""
    monkeypatch.setattr(driven, "GRAPH_BLOCK", 2)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 4)
    sizes = []
    build = driven._build_block

    def spy(holder, n_carried, n_inputs, size, *args):
        sizes.append(size)
        return build(holder, n_carried, n_inputs, size, *args)

    monkeypatch.setattr(driven, "_build_block", spy)
    model = Small().double()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method, want in (("euler", 4), ("milstein", 2)):
        sizes.clear()
        a, ga = _train(model, _path(), method, True, ts=ts)
        b, gb = _train(model, _path(), method, False, ts=ts)
        assert a.stats["compiled"] == "loop" and sizes == [want]
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


def test_grad_mode_policy_keeps_eager_where_blocks_do_not_pay(monkeypatch):
    """Under autograd the policy times compiled blocks against eager steps (forward and backward): where the blocks
    are not faster it runs the eager stepper, whose gradients are those of compile=False exactly."""
    timing = policy.Timing(eager_s=1e-3, step_s=None, loop_s=1.5e-3, rounds=5)
    monkeypatch.setattr(driven.DrivenPlugIn, "_measure_graph", lambda self, *a: timing)
    model = Small().double()
    bm = _path()
    a, ga = _train(model, bm, "euler", True)
    b, gb = _train(model, bm, "euler", False)
    assert a.stats["compiled"] == "eager" and "does not pay" in a.stats["compile_reason"]
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_records_graph_sees_parameters_and_closures():
    """A solve records a graph where y0, the drift at t0 or a parameter of the drift's or diffusion's module requires
    grad, or where a function is a closure (what it captures is unknown); not under no_grad or with everything
    frozen."""
    model = Small().double()
    bm = _path()
    y0 = torch.zeros(1, B * D, dtype=torch.float64)
    term = neurodyn.sde_term(model.f, model.g, bm, noise="diagonal")
    assert driven.records_graph(term, y0, y0)
    with torch.no_grad():
        assert not driven.records_graph(term, y0, y0)
    model.a.requires_grad_(False)
    leaves, known = driven.graph_leaves(term, y0, y0)
    assert known and [id(x) for x in leaves] == [id(x) for x in model.b.parameters()]
    model.b.requires_grad_(False)
    assert not driven.records_graph(term, y0, y0)
    assert driven.records_graph(term, y0.requires_grad_(), y0)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    closure = neurodyn.sde_term(lambda t, y: model.f(t, y) * scale, model.g, bm, noise="diagonal")
    assert driven.records_graph(closure, torch.zeros(1, B * D, dtype=torch.float64), y0.detach())


def test_step_grid_lands_as_the_eager_loop():
    """The grid the driven loop precomputes: steps of dt from t0, landing on stops within control.landing_reach (the
    eager loop's rule), the last step shorter where dt does not divide the span; and backwards in time."""
    eps64 = torch.finfo(torch.float64).eps
    ts, hs = driven.step_grid([0.0, 1.0], [0.25, 1.0], 0.1, eps64)
    assert ts[:4] == [0.0, 0.1, 0.2, 0.25] and ts[-1] == 1.0 and ts[-2] == pytest.approx(0.95)
    assert len(hs) == len(ts) - 1 and all(h > 0 for h in hs)
    assert abs(sum(hs) - 1.0) < 1e-15
    ts, hs = driven.step_grid([1.0, 0.0], [0.0], 0.25, eps64)
    assert ts == [1.0, 0.75, 0.5, 0.25, 0.0] and hs == [-0.25] * 4


@pytest.mark.slow  # compiling a forward and a backward: 30-60 s on a loaded 2-core machine
def test_grad_mode_blocks_sum_bias_gradients_as_products_and_match_eager(forced, monkeypatch, no_compile_caches):
    """A batch of 160 samples (at least loop.GRAPH_SUM_ROWS): the compiled blocks' backward sums each layer's output
    gradient over the batch (the bias gradients) as library products (ColumnSums, seen rewriting them); outputs and
    gradients with respect to y0 and every parameter equal the eager solve's to rounding (float64)."""
    from neurodyn.compile import loop

    monkeypatch.setattr(driven, "GRAPH_BLOCK", 2)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 2)
    rewritten = []
    call = loop.ColumnSums.__call__

    def spy(self, graph):
        def sums():
            return sum(n.target is torch.ops.aten.sum.dim_IntList for n in graph.nodes)

        before = sums()
        call(self, graph)
        rewritten.append(before - sums())

    monkeypatch.setattr(loop.ColumnSums, "__call__", spy)
    model = Small().double()
    n = 160
    bm = BrownianInterval(0.0, 1.0, shape=(n, D), dtype=torch.float64, entropy=4, cache_size=None)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = []
    for comp in (True, False):
        model.zero_grad()
        y0 = torch.linspace(-1, 1, n * D, dtype=torch.float64).view(n, D).requires_grad_(True)
        term = neurodyn.sde_term(model.f, model.g, bm, noise="diagonal")
        sol = neurodyn.solve(term, y0, ts, method="euler", step_size=0.05, compile=comp)
        sol.ys.pow(2).sum().backward()
        out.append((sol, [y0.grad] + [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = out
    assert a.stats["compiled"] == "loop" and b.stats.get("compiled") is None
    assert sum(rewritten) >= 4  # the two layers' bias gradients of each of the block's two steps
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=1e-13)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("save", [True, False])
def test_block_options_keep_the_forward_sigmoid(save):
    """The compiled blocks' options (loop.GRAPH_OPTIONS, SaveSigmoids on the joint graph): the backward of a
    sigmoid layer reads the sigmoid the forward computed instead of computing it again (without the pass, AOTAutograd's
    partitioner recomputes it); gradients equal eager's."""
    from neurodyn.compile import loop as compile_loop

    class Recorder(compile_loop.CustomGraphPass):  # the targets of each post-grad graph, in compilation order
        def __init__(self):
            self.graphs = []

        def uuid(self):
            return None  # no caching: every compilation runs the pass

        def __call__(self, graph):
            self.graphs.append([n.target for n in graph.nodes if n.op == "call_function"])

    rec = Recorder()
    options = {**compile_loop.GRAPH_OPTIONS, "post_grad_custom_post_pass": rec}
    if not save:
        options.pop("joint_custom_post_pass")

    def f(x, w, b):
        return (0.2 * torch.sigmoid(x @ w + b) * x).sum()

    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(64, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(16, generator=g)
    args = [v.clone().requires_grad_(True) for v in (x, w, b)]
    ref = [v.clone().requires_grad_(True) for v in (x, w, b)]
    torch.compile(f, options=options, fullgraph=True, dynamic=False)(*args).backward()
    f(*ref).backward()
    for a, r in zip(args, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert len(rec.graphs) == 2  # forward, backward
    assert (torch.ops.aten.sigmoid.default in rec.graphs[1]) is not save


@pytest.mark.slow  # compiling a block's forward and backward twice (two Python states): ~1 min on a loaded machine
def test_repeat_solves_run_the_compiled_entries_with_guards_kept(forced, monkeypatch):
    """Repeat calls of the compiled blocks (under autograd) and of the forward-only loop run their compiled entries
    without Dynamo's frame machinery (compile.entries.Entries: the module's parameters read along Dynamo's paths):
    outputs and gradients equal those of the first, Dynamo-called solve bit for bit; Python state the drift reads
    changed, the entry's guards fail and Dynamo compiles a variant whose results follow the eager solve's."""
    from neurodyn.compile import entries as entries_mod

    counts = {"ran": 0, "left": 0}
    orig = entries_mod.Entries.__call__

    def counting(self, args):
        out = orig(self, args)
        counts["ran" if out is not None else "left"] += 1
        return out

    monkeypatch.setattr(entries_mod.Entries, "__call__", counting)
    monkeypatch.setattr(driven, "GRAPH_BLOCK", 5)
    monkeypatch.setattr(driven, "GRAPH_BLOCK_CHEAP", 5)
    model = Small().double()
    bm = _path()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # 20 steps: 4 blocks of 5; the first block call compiles (Dynamo's call), the other three run the entry
    first, g_first = _train(model, bm, "euler", True, ts=ts)
    assert counts == {"ran": 3, "left": 1} and first.stats["compiled"] == "loop"
    again, g_again = _train(model, bm, "euler", True, ts=ts)
    assert counts == {"ran": 7, "left": 1}
    assert torch.equal(first.ys, again.ys)
    assert all(torch.equal(a, b) for a, b in zip(g_first, g_again))
    model.scale = 0.5  # Python state the drift reads: guards fail, a new variant compiles
    changed, g_changed = _train(model, bm, "euler", True, ts=ts)
    assert counts == {"ran": 10, "left": 2}
    eager, g_eager = _train(model, bm, "euler", False, ts=ts)
    torch.testing.assert_close(changed.ys, eager.ys, rtol=0, atol=1e-13)
    for a, b in zip(g_changed, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(changed.ys, first.ys)
    # the forward-only loop (no graph): the repeat solve's call runs its entry, equal to the first solve bit for bit
    with torch.no_grad():
        a = _solve(model, bm, "euler", True).ys
        ran = counts["ran"]
        b = _solve(model, bm, "euler", True).ys
    assert counts["ran"] > ran and torch.equal(a, b)


def test_policy_measured_solve_then_repeat_solves_compile_nothing_anew():
    """The policy's measurement runs eager steps (which move the host's step end, ``SDEParts.end``) between calls of
    the compiled loop: the loop's graph does not read that float, so neither the measurement's later calls nor the
    next solves compile it anew (one graph in all, whichever path the policy chose; before, a second: guarded on the
    step end's value)."""
    model = Small(scale=0.75).double()
    bm = _path()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        first = _solve(model, bm, "euler", True)
        second = _solve(model, bm, "euler", True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert torch.equal(first.ys, second.ys)
