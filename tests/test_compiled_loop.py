"""``solve(..., compile=True)`` with the whole loop compiled (``stats["compiled"] == "loop"``): the same steps,
statuses and outputs as the eager loop, to rounding; the per-step path where a graph is recorded; a fallback
with a warning where the loop cannot be compiled."""

import math

import pytest
import torch
from torch import nn

import neurodyn

F64 = torch.float64
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


class Linear(nn.Module):
    """dy/dt = y A^T: exact solution by the matrix exponential."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.register_buffer("a_t", A.T.contiguous().to(dtype))

    def forward(self, t, y):
        return y @ self.a_t


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w) * (1.0 + 0.5 * torch.sin(t))


LIN = Linear()
TANH = Tanh()
Y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
T = torch.linspace(0, 3, 7, dtype=F64)


def _both(f, y0, t, **kw):
    with torch.no_grad():
        return neurodyn.solve(f, y0, t, **kw), neurodyn.solve(f, y0, t, compile=True, **kw)


def _same(eager, comp, nfe_extra=0):
    assert comp.stats["compiled"] == "loop"
    assert comp.status == eager.status
    for key in ("steps", "rejected"):
        assert comp.stats[key] == eager.stats[key], key
    assert comp.stats["nfe"] == eager.stats["nfe"] + nfe_extra
    assert comp.n_valid == eager.n_valid
    # step sizes follow the error estimate, a difference of nearly equal sums: equal to ~1e-9 relative
    assert math.isclose(comp.t_final, eager.t_final, rel_tol=1e-7, abs_tol=1e-12)
    assert math.isclose(comp.stats["initial_step"], eager.stats["initial_step"], rel_tol=1e-12)
    assert torch.allclose(comp.ys[: comp.n_valid], eager.ys[: eager.n_valid], rtol=1e-11, atol=1e-12)


# dopri5 runs in the default suite; tsit5 and bosh3 (the same loop with other tableaus, ~25 s of compilation each on
# one core) are slow.
@pytest.mark.parametrize("method", [pytest.param("tsit5", marks=pytest.mark.slow), "dopri5",
                                    pytest.param("bosh3", marks=pytest.mark.slow)])
def test_loop_matches_eager_and_the_exact_solution(method):
    eager, comp = _both(TANH, Y0, T, method=method, rtol=1e-8, atol=1e-10)
    _same(eager, comp)
    # the linear field: against the matrix exponential too
    eager, comp = _both(LIN, Y0, T, method=method, rtol=1e-8, atol=1e-10)
    _same(eager, comp)
    exact = torch.stack([Y0 @ torch.linalg.matrix_exp(A.T * float(ti)) for ti in T])
    assert torch.allclose(comp.ys, exact, atol=2e-6 if method == "bosh3" else 1e-7)


@pytest.mark.slow  # 9-15 s (a compile); tests/test_compile_entries.py runs rk4 with a step size in the loop by default
def test_loop_fixed_step_method_on_the_grid_and_with_a_step_size():
    # rk4 (not FSAL): the loop evaluates dy/dt at the end of every step, once more than the eager loop in all
    eager, comp = _both(TANH, Y0, T, method="rk4")
    _same(eager, comp, nfe_extra=1)
    eager, comp = _both(TANH, Y0, T, method="rk4", step_size=0.07)  # outputs between steps: Hermite
    _same(eager, comp, nfe_extra=1)


# The tests below solve TANH from Y0 over T with dopri5 where they can: the program the test above compiled (the
# tolerances, max_steps, min_step and on_failure are inputs of the program, not part of its cache key).
def test_loop_failure_statuses_keep_the_partial_solution():
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-10, on_failure="return")
    eager, comp = _both(TANH, Y0, T, max_steps=7, **kw)
    partial = comp
    assert comp.status == "max_steps_reached" and comp.n_valid < T.shape[0]
    _same(eager, comp)
    assert "max_steps=7" in comp.message
    assert torch.isnan(comp.ys[comp.n_valid:]).all()
    eager, comp = _both(TANH, Y0, T, min_step=0.5, **kw)  # the first rejected step falls below min_step
    assert comp.status == eager.status
    _same(eager, comp)
    with pytest.raises(neurodyn.MaxStepsReached) as err:
        with torch.no_grad():
            neurodyn.solve(TANH, Y0, T, method="dopri5", rtol=1e-8, atol=1e-10, max_steps=7, compile=True)
    assert err.value.solution.n_valid == partial.n_valid


def test_loop_non_finite_field_reports_non_finite():
    class Blowup(nn.Module):
        def forward(self, t, y):
            return y * y  # y' = y^2 blows up at t = 1 for y0 = 1

    f = Blowup()
    y0 = torch.ones(1, 2, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    eager, comp = _both(f, y0, t, method="tsit5", on_failure="return")
    assert comp.stats["compiled"] == "loop"
    assert comp.status == eager.status
    assert abs(comp.t_final - 1.0) < 1e-3 and abs(eager.t_final - 1.0) < 1e-3


@pytest.mark.slow
def test_loop_backward_in_time_stops_float32_and_tensor_tolerances():
    tb = torch.linspace(3, 0, 5, dtype=F64)
    eager, comp = _both(TANH, Y0, tb, method="tsit5", rtol=1e-8, atol=1e-10, step_t=[2.2, 1.1])
    _same(eager, comp)
    rtol = torch.tensor([1e-7, 1e-9], dtype=F64)
    eager, comp = _both(TANH, Y0, T, method="tsit5", rtol=rtol, atol=1e-10, first_step=0.01)
    _same(eager, comp)
    f32 = Linear(torch.float32)
    eager, comp = _both(f32, Y0.float(), T.float(), method="tsit5", rtol=1e-5, atol=1e-7)
    assert comp.stats["compiled"] == "loop" and comp.ys.dtype == torch.float32
    assert comp.stats["steps"] == eager.stats["steps"]
    assert torch.allclose(comp.ys, eager.ys, rtol=1e-5, atol=1e-6)


def test_recorded_graphs_use_the_compiled_steps(monkeypatch):
    """Gradients need the autograd graph: for a field that is not an ``nn.Module`` (its tensors needing gradients
    have no names the compiled backward could differentiate; modules: tests/test_compiled_train.py) the loop stays
    in Python with compiled steps; same gradients."""
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")  # the paths, not whether compiling pays here
    y0 = Y0.clone().requires_grad_(True)

    def field(t, y):
        return TANH(t, y)

    sols = [neurodyn.solve(field, y0, T, method="dopri5", rtol=1e-8, atol=1e-10, compile=c) for c in (False, True)]
    assert sols[1].stats["compiled"] == "step"
    grads = [torch.autograd.grad(s.ys[-1].sum(), [y0, TANH.w]) for s in sols]
    for ge, gc in zip(*grads):
        assert torch.allclose(ge, gc, rtol=1e-9, atol=1e-12)
    # nothing requires grad (even with grad mode on): the whole loop
    with torch.no_grad():
        TANH.w.requires_grad_(False)
    try:
        sol = neurodyn.solve(TANH, Y0, T, method="dopri5", rtol=1e-8, atol=1e-10, compile=True)
    finally:
        TANH.w.requires_grad_(True)
    assert sol.stats["compiled"] == "loop"


def test_views_made_inside_the_field_fall_back_with_a_warning(monkeypatch):
    """``y @ A.T`` inside func: torch cannot compile the loop around it (views of captured tensors); the solve
    warns, steps from Python with compiled steps, and gets the same answer."""
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")  # the fallback, not whether compiled steps pay here

    def f(t, y):
        return y @ A.T

    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"self\.w\.T"):
            sol = neurodyn.solve(f, Y0, T, method="tsit5", rtol=1e-8, atol=1e-10, compile=True)
        eager = neurodyn.solve(f, Y0, T, method="tsit5", rtol=1e-8, atol=1e-10)
    assert sol.stats["compiled"] == "step"
    assert torch.allclose(sol.ys, eager.ys, rtol=1e-11, atol=1e-12)


@pytest.mark.slow
def test_python_side_effects_in_the_field_fall_back_with_a_warning(monkeypatch):
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")  # the fallback, not whether compiling pays here

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            return -y

    f = Counting()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        exact = torch.exp(-t[-1]) * Y0
        sols = []
        with pytest.warns(RuntimeWarning, match="side effects"):
            for _ in range(5):  # the counter changes between solves: each solve would compile the loop anew
                sols.append(neurodyn.solve(f, Y0, t, method="tsit5", rtol=1e-8, atol=1e-10, compile=True))
    for sol in sols:
        assert torch.allclose(sol.ys[-1], exact, rtol=1e-7)
    assert sols[-1].stats["compiled"] == "step"


class Rate(nn.Module):
    """dy/dt = -rate y with ``rate`` a Python float attribute: exact solution exp(-rate t) y0."""

    def __init__(self):
        super().__init__()
        self.rate = 1.0

    def forward(self, t, y):
        return -self.rate * y


@pytest.mark.parametrize("loop", ["whole", pytest.param("rows", marks=pytest.mark.slow),
                                  pytest.param("sde", marks=pytest.mark.slow)])
def test_a_changed_float_attribute_compiles_the_loop_again(monkeypatch, loop):
    """A Python float the field reads, changed between solves, gives a new compiled loop of the same kind (a
    specialised one: Dynamo's automatic dynamic float made the while_loop's tracing fail, a fallback with a warning),
    whose solution follows the new value."""
    import warnings

    from neurodyn.compile import policy as compile_policy
    from neurodyn.paths import BrownianInterval

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")
    f = Rate()
    y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    kind = {"whole": "loop", "rows": "row-loop", "sde": "loop"}[loop]

    def solve():
        if loop == "sde":  # zero diffusion: the drift's Euler steps, exact to O(dt)
            bm = BrownianInterval(0.0, 1.0, shape=(2, 2), dtype=F64, entropy=1)
            term = neurodyn.sde_term(f, lambda t, y: torch.zeros_like(y), bm, noise="diagonal")
            return neurodyn.solve(term, y0, t, method="euler", step_size=1e-3, compile=True)
        return neurodyn.solve(f, y0, t, method="dopri5", rtol=1e-10, atol=1e-12, compile=True,
                              per_sample_steps=loop == "rows")

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for rate in (1.0, 0.5):
            f.rate = rate
            sol = solve()
            assert sol.stats["compiled"] == kind
            exact = torch.exp(-rate * t).view(-1, 1, 1) * y0
            assert torch.allclose(sol.ys, exact, rtol=1e-3 if loop == "sde" else 1e-8, atol=0)


def test_adjoint_forward_pass_runs_the_compiled_loop():
    """gradient="adjoint" solves forward without a graph: the compiled loop; the gradients equal eager's."""
    y0 = Y0.clone().requires_grad_(True)
    grads, sols = [], []
    for compile in (False, True):
        sol = neurodyn.solve(TANH, y0, T, method="dopri5", rtol=1e-9, atol=1e-11, gradient="adjoint",
                             compile=compile)
        sols.append(sol)
        grads.append(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, TANH.w]))
    assert sols[1].stats["compiled"] == "loop"
    assert torch.allclose(sols[1].ys, sols[0].ys, rtol=1e-10, atol=1e-12)
    for ge, gc in zip(*grads):
        assert torch.allclose(ge, gc, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("max_steps", [100_000, 7])
def test_several_attempts_per_loop_iteration_change_nothing(monkeypatch, max_steps):
    """On a GPU the loop runs 8 attempts between host reads of its condition; attempts after the end of the solve
    must leave everything as it was (checked here on the CPU with 3 per iteration)."""
    import neurodyn.compile.loop as compiled_loop

    monkeypatch.setattr(compiled_loop, "UNROLL", 3)
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-10, max_steps=max_steps, on_failure="return")
    eager, comp = _both(TANH, Y0, T, **kw)
    _same(eager, comp)
    assert comp.stats["steps"] + comp.stats["rejected"] == (7 if max_steps == 7 else eager.stats["steps"]
                                                           + eager.stats["rejected"])


def test_vmap_over_a_fixed_step_solve_steps_from_python():
    """torch.func.vmap cannot enter torch's compiled while_loop: compiled steps, no warning, same values."""
    import warnings

    t = torch.linspace(0, 1, 5, dtype=F64)
    ys = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.0, 1.0]], dtype=F64)

    def one(y0, c):
        return neurodyn.solve(LIN, y0, t, method="rk4", step_size=0.1, compile=c).ys[-1]

    eager = torch.func.vmap(lambda y: one(y, False))(ys)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=RuntimeWarning)
        comp = torch.func.vmap(lambda y: one(y, True))(ys)
    exact = ys @ torch.linalg.matrix_exp(A.T)
    assert torch.allclose(comp, eager, rtol=1e-12, atol=1e-14)
    assert torch.allclose(comp, exact, atol=5e-4)  # rk4 with h = 0.1 on eigenvalues of modulus 2


class WideTanh(nn.Module):
    """A batched MLP field whose tanh layers hold 32 x 64 = 2048 elements: compiled through ATen's tanh kernel."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(2, 64, generator=g, dtype=F64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(64, 2, generator=g, dtype=F64) * 0.2)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2


@pytest.mark.slow
def test_loop_with_library_tanh_matches_eager(monkeypatch):
    from neurodyn.compile import patches
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")
    f = WideTanh()
    y0 = torch.randn(patches.LIBRARY_TANH_ELEMENTS // 64, 2, generator=torch.Generator().manual_seed(2),
                     dtype=F64)
    eager, comp = _both(f, y0, T, rtol=1e-8, atol=1e-10)
    _same(eager, comp, nfe_extra=0)


@pytest.mark.parametrize("formula", [True, False])
def test_library_tanh_float32_formula_and_library(monkeypatch, formula):
    """float32 tanh of a large tensor in compiled code (patches.library_tanh): the fused formula where
    TANH_FORMULA_FLOAT32 is set (within 4e-7 relative of float64 tanh on [-50, 50] and 1e-38 .. 30, never beyond +-1,
    +-0, +-inf and NaN kept), ATen's kernel otherwise (bitwise ATen's float32 tanh)."""
    pytest.importorskip("torch._inductor.lowering")
    from neurodyn.compile import patches

    monkeypatch.setattr(patches, "TANH_FORMULA_FLOAT32", formula)
    grid = torch.linspace(-50, 50, 200001)
    tiny = torch.logspace(-38, 1.5, 20001)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 0.625, -0.625, 0.62499994, 9.0,
                            -9.0, 8.999999, 9.000001])
    x = torch.cat([grid, tiny, -tiny, special])
    x = torch.cat([x, x.new_zeros(-len(x) % 64)]).view(-1, 64)
    assert x.numel() >= patches.LIBRARY_TANH_ELEMENTS
    # the choice named in the options (as CPU_OPTIONS does), so that Inductor's caches tell the two programs apart
    options = {"post_grad_fusion_options": {"decompose_mm_pass": {
        "neurodyn_tanh_formula": formula and patches.TANH_FORMULA}}}
    fn = torch.compile(lambda v: torch.tanh(v), dynamic=False, options=options)
    with patches.library_tanh():
        out = fn(x)
    ref = torch.tanh(x.double())
    if not formula:
        torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=0, equal_nan=True)
        return
    finite = torch.isfinite(x)
    rel = (out.double() - ref).abs()[finite] / ref.abs()[finite].clamp_min(1e-300)
    assert float(rel.max()) < 4e-7
    assert float(out[finite].abs().max()) <= 1.0
    assert torch.equal(out[~finite & ~torch.isnan(x)], ref[~finite & ~torch.isnan(x)].float())
    assert bool(torch.isnan(out[torch.isnan(x)]).all())
    assert torch.equal(torch.signbit(out[x == 0]), torch.signbit(x[x == 0]))


@pytest.mark.parametrize("formula", [True, False])
def test_library_tanh_float64_formula_and_library(monkeypatch, formula):
    """float64 tanh of a large tensor in compiled code (patches.library_tanh), fused with a product before it: the
    rational formula (patches.tanh_formula_float64) where TANH_FORMULA_FLOAT64 is set (within 2 ulp of long double
    tanh on [-2, 2] densely, [-40, 40], 2e5 draws of N(0, 9), 1e-300 .. 1 both signs, and around its select bound and
    its clamp; within 2.5 ulp of eager float64 tanh; +-0, +-inf, NaN kept, exactly +-1 from the clamp on), ATen's
    kernel otherwise (bitwise eager's tanh). The float32 path is left to its own setting."""
    pytest.importorskip("torch._inductor.lowering")
    np = pytest.importorskip("numpy")
    from neurodyn.compile import patches

    monkeypatch.setattr(patches, "TANH_FORMULA_FLOAT64", formula)
    monkeypatch.setattr(patches, "TANH_FORMULA_FLOAT32", False)
    edges = [bound + torch.arange(-20000, 20001, dtype=F64) * math.ulp(bound)
             for bound in (patches._TANH_SMALL64, patches._TANH_CLAMP64)]
    tiny = torch.logspace(-300, 0, 30001, dtype=F64)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1e-310, 0.75, -0.75,
                            19.0, -19.0, 400.0, -400.0, 1e300, -1e300], dtype=F64)
    normal = 3 * torch.randn(200000, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.linspace(-2, 2, 400001, dtype=F64), torch.linspace(-40, 40, 100001, dtype=F64), normal,
                   tiny, -tiny, *edges, *(-e for e in edges), special])
    x = torch.cat([x, x.new_zeros(-len(x) % 64)]).view(-1, 64)
    one = torch.ones(64, dtype=F64)  # x * 1 == x for every x, -0 and NaN included
    assert x.numel() >= patches.LIBRARY_TANH_ELEMENTS
    # the choice named in the options (as CPU_OPTIONS does), so that Inductor's caches tell the two programs apart
    options = {"post_grad_fusion_options": {"decompose_mm_pass": {"neurodyn_tanh_formula_float64": formula}}}
    fn = torch.compile(lambda v, b: torch.tanh(v * b), dynamic=False, options=options)
    # Inductor's caches key on the graph and options, not on the lowering's code: compiled afresh, this code is tested
    with patches.library_tanh(), torch._inductor.config.patch(force_disable_caches=True):
        out = fn(x, one)
    eager = torch.tanh(x)
    if not formula:
        torch.testing.assert_close(out, eager, rtol=0, atol=0, equal_nan=True)
        return
    finite = torch.isfinite(x)
    xs, o = x[finite].numpy(), out[finite].numpy()
    ref = np.tanh(xs.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref.astype(np.float64)))
    ulps = np.abs(o.astype(np.longdouble) - ref) / spacing
    assert float(ulps.max()) <= 2.0
    assert float((np.abs(o - eager[finite].numpy()) / spacing).max()) <= 2.5
    assert torch.equal(out[~finite & ~torch.isnan(x)], eager[~finite & ~torch.isnan(x)])
    assert bool(torch.isnan(out[torch.isnan(x)]).all())
    assert torch.equal(torch.signbit(out[x == 0]), torch.signbit(x[x == 0]))
    big = x.abs() >= patches._TANH_CLAMP64  # tanh rounds to +-1 in float64 from ~19.06 on
    assert torch.equal(out[big], torch.sign(x[big]))


def test_compile_time_lowering_changes_are_undone():
    """The lowering changes made while compiling (library tanh, thin products) leave Inductor as it was."""
    pytest.importorskip("torch._inductor.lowering")
    from torch._inductor import lowering
    from torch._inductor.codegen.cpp import KernelOpStats
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    from neurodyn.compile.patches import library_tanh, small_cats, thin_products, vectorize_strided_loads
    from neurodyn.compile.train import decompose_thin_products

    op, cat = torch.ops.aten.tanh.default, torch.ops.aten.cat.default
    before_tanh, before_mm = lowering.lowerings[op], decompose_mem_bound_mm.should_decompose_mm
    before_cat = lowering.lowerings[cat]
    before_ratio = KernelOpStats.OVERHEAD_RATIO_THRESHOLD
    with library_tanh(), decompose_thin_products(), vectorize_strided_loads(), small_cats(8):
        assert lowering.lowerings[op] is not before_tanh
        assert lowering.lowerings[cat] is not before_cat
        outer_mm = decompose_mem_bound_mm.should_decompose_mm
        assert outer_mm is not before_mm
        assert KernelOpStats.OVERHEAD_RATIO_THRESHOLD == max(before_ratio, 0.5)
        with thin_products(8):  # nested (the compiled loop inside a compiled backward): restored to the outer rule
            assert decompose_mem_bound_mm.should_decompose_mm is not outer_mm
        assert decompose_mem_bound_mm.should_decompose_mm is outer_mm
    assert lowering.lowerings[op] is before_tanh
    assert lowering.lowerings[cat] is before_cat
    assert decompose_mem_bound_mm.should_decompose_mm is before_mm
    assert KernelOpStats.OVERHEAD_RATIO_THRESHOLD == before_ratio


def test_small_cats_write_small_stacks_as_one_loop_with_the_same_values():
    """small_cats: stacks of a few size-1 parts (last dimension and first) are written without views of their output,
    with eager's values bit for bit; a stack of larger parts keeps Inductor's own lowering."""
    pytest.importorskip("torch._inductor.lowering")
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from neurodyn.compile.patches import small_cats

    def f(y, mu):
        x, v = y[..., 0], y[..., 1]
        k = torch.stack([v, mu * (1 - x * x) * v - x], -1)  # a field's components (last dimension)
        s = torch.stack([x[0] * 0.5, v[1] * 3, mu[0] + 1])  # scalars
        big = torch.stack([y, k])  # parts of 2 columns: not small
        return k * 1.5, s * 2, big * 2

    y = torch.randn(64, 2, dtype=torch.float64)
    mu = torch.rand(64, dtype=torch.float64) + 0.5
    want = f(y, mu)
    with inductor_config.patch(fx_graph_cache=False), small_cats(8):
        got, code = run_and_get_code(torch.compile(f, fullgraph=True), y, mu)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    text = "\n".join(code)
    # Inductor's own lowering of the three stacks writes 2 + 3 + 2 parts through views of the outputs; the small ones
    # are single loops now (the stack of (64, 2) parts keeps its two views).
    assert sum("reinterpret_tensor(" in ln and "# alias" in ln for ln in text.splitlines()) <= 2


@pytest.mark.slow  # 9 s (a compile); test_column_major_copy_is_written_once_before_a_compiled_loop by default
def test_column_major_copy_keeps_values_and_stores_columns():
    from neurodyn.compile.loop import column_major_copy

    w = torch.arange(12.0, dtype=torch.float64).view(3, 4)
    c = column_major_copy(w)
    assert c.stride() == (1, 3) and torch.equal(c, w) and c.data_ptr() != w.data_ptr()
    b = torch.arange(3.0)
    assert column_major_copy(b) is b
    # A one-row state through an MLP (the matrices enter the compiled loop column-major): the same steps and values
    # as the eager loop, to rounding.
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    field = lambda t, y: f(y)  # noqa: E731
    y0, t = torch.tensor([0.5, -0.3], dtype=torch.float64), torch.linspace(0, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        eager = neurodyn.solve(field, y0, t, rtol=1e-8, atol=1e-10)
        comp = neurodyn.solve(field, y0, t, rtol=1e-8, atol=1e-10, compile=True)
    assert comp.stats["compiled"] == "loop"
    assert comp.stats["nfe"] == eager.stats["nfe"] and comp.stats["steps"] == eager.stats["steps"]
    assert (comp.ys - eager.ys).abs().max() < 1e-13


def test_module_tensors_lists_named_parameters_and_buffers():
    """module_tensors lists what named_parameters() + named_buffers() list (a shared tensor once, under its first name;
    None entries left out)."""
    from neurodyn.compile.loop import module_tensors

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    f = nn.Sequential(shared, nn.Tanh(), nn.BatchNorm1d(3), shared, nn.Linear(3, 2, bias=False))
    f.register_buffer("nothing", None)
    want = [*f.named_parameters(), *f.named_buffers()]
    got = module_tensors(f)
    assert [n for n, _ in got] == [n for n, _ in want] and all(a is b for (_, a), (_, b) in zip(got, want))

    class Own(nn.Module):  # a class with its own named_parameters: called, not walked
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, 2))

        def named_parameters(self, *a, **k):
            yield "renamed", self.w

    assert [n for n, _ in module_tensors(Own())] == ["renamed"]


def test_column_major_copy_is_written_once_before_a_compiled_loop():
    """Inside a compiled program the column-major copy is made by one kernel before a while_loop that reads it, not
    in the loop's own kernels (a copy written as x.t().contiguous().t() is fused into them: made at every
    iteration)."""
    pytest.importorskip("torch._inductor.inductor_prims")
    from torch._higher_order_ops import while_loop
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from neurodyn.compile.loop import column_major_copy

    def g(w, b, y, n):
        wc = column_major_copy(w)

        def body(i, y):
            return i + 1, torch.tanh(y @ wc.t() + b)

        return while_loop(lambda i, y: i < n, body, (torch.zeros((), dtype=torch.int64), y))

    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(16, 16, generator=gen, dtype=F64) * 0.3, torch.randn(16, generator=gen, dtype=F64)
    y, n = torch.randn(1, 16, generator=gen, dtype=F64), torch.tensor(5)
    with inductor_config.patch(fx_graph_cache=False):
        (_, got), code = run_and_get_code(torch.compile(g, fullgraph=True), w, b, y, n)
    want = y
    for _ in range(5):
        want = torch.tanh(want @ w.t() + b)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-14)
    text = "\n".join(code)
    loop_graphs = [text[i:text.index("return", i)] for i in range(len(text)) if text.startswith("def while_loop_", i)]
    assert len(loop_graphs) == 2 and not any("clone" in part or "force_stride_order" in part for part in loop_graphs)
    assert text.count("force_stride_order") >= 1  # the copy's own kernel, called once before the loop


@pytest.mark.parametrize("mkl_on_intel", [True, False])
def test_batch_column_major_stores_wide_matrices_by_columns(monkeypatch, mkl_on_intel):
    """For a batched state the matrices with more than LOOP_THIN_OUTPUTS rows are column-major copies with the same
    values: a thin first layer's always, a hidden layer's where MKL runs on an Intel CPU (elsewhere it stays as it is);
    a layer back to a small state and vectors stay as they are."""
    from neurodyn.compile import loop
    from neurodyn.compile.loop import LOOP_THIN_OUTPUTS, batch_column_major

    monkeypatch.setattr(loop, "MKL_ON_INTEL", mkl_on_intel)
    g = torch.Generator().manual_seed(7)
    wide, first = torch.randn(64, 64, generator=g, dtype=F64), torch.randn(64, 2, generator=g, dtype=F64)
    last, bias = torch.randn(LOOP_THIN_OUTPUTS, 64, generator=g, dtype=F64), torch.randn(64, generator=g, dtype=F64)
    for w in (wide, first) if mkl_on_intel else (first,):
        c = batch_column_major(w)
        assert c.stride() == (1, w.shape[0]) and torch.equal(c, w) and c.data_ptr() != w.data_ptr()
        # nn.Linear's product reads c.T, now row-major: the same product as with the row-major matrix, to rounding
        h = torch.randn(256, w.shape[1], generator=g, dtype=F64)
        assert c.t().is_contiguous() and torch.allclose(h @ c.t(), h @ w.t(), rtol=1e-14, atol=1e-13)
    if not mkl_on_intel:
        assert batch_column_major(wide) is wide
    assert batch_column_major(last) is last and batch_column_major(bias) is bias


def _products_graph(x, w1, b1, w2, b2):
    """A batched two-layer field's products (x: (B, 8); a wide hidden layer, a thin output layer), traced to ATen."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w1, b1, w2, b2):
        return torch.addmm(b2, torch.tanh(torch.addmm(b1, x, w1.t())), w2.t())

    return f, make_fx(f, tracing_mode="fake")(x, w1, b1, w2, b2)


def test_loop_products_pass_rewrites_library_products_and_keeps_values():
    """LoopProducts: the thin output layer as a transposed product, the wide layer as mm plus an in-place bias; the
    rewritten graph computes what eager ATen computes (to rounding) and holds no addmm."""
    from neurodyn.compile.loop import LoopProducts

    g = torch.Generator().manual_seed(3)
    x, w1, b1 = (torch.randn(*s, generator=g, dtype=F64) for s in ((32, 8), (16, 8), (16,)))
    w2, b2 = torch.randn(2, 16, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    f, gm = _products_graph(x, w1, b1, w2, b2)
    aten = torch.ops.aten
    assert sum(n.target is aten.addmm.default for n in gm.graph.nodes) == 2
    LoopProducts(8)(gm.graph)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.addmm.default not in targets
    assert targets.count(aten.mm.default) == 2
    # the thin layer's product has the short dimension first: (2, 16) @ (16, 32)
    mms = [n for n in gm.graph.nodes if n.target is aten.mm.default]
    assert [tuple(n.meta["val"].shape) for n in mms] == [(32, 16), (2, 32)]
    # the thin layer's result is written once as a row-major (32, 2) buffer (not left a transposed view)
    forced = [n for n in gm.graph.nodes if "force_stride_order" in str(n.target)]
    assert len(forced) == 1 and list(forced[0].args[1]) == [2, 1]
    out, ref = gm(x, w1, b1, w2, b2), f(x, w1, b1, w2, b2)
    assert out.shape == ref.shape == (32, 2)
    assert torch.allclose(out, ref, rtol=1e-14, atol=1e-14)
    # float32 too (its own rounding)
    args32 = [v.float() for v in (x, w1, b1, w2, b2)]
    f, gm = _products_graph(*args32)
    LoopProducts(8)(gm.graph)
    gm.recompile()
    assert torch.allclose(gm(*args32), f(*args32), rtol=1e-5, atol=1e-6)


def test_loop_products_pass_leaves_other_products():
    """Products with scaling (beta) and integer products stay as they are; a single-row product is not transposed
    (its bias is added after it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from neurodyn.compile.loop import LoopProducts

    def f(x, w, b, xi, wi):
        return (torch.addmm(b, x[:1], w.t()), torch.addmm(b, x, w.t(), beta=2.0), torch.mm(xi, wi))

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(8, 4, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    xi, wi = torch.ones(8, 4, dtype=torch.long), torch.ones(4, 2, dtype=torch.long)
    gm = make_fx(f, tracing_mode="fake")(x, w, b, xi, wi)
    LoopProducts(8)(gm.graph)
    gm.recompile()
    aten = torch.ops.aten
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    addmm = [n for n in calls if n.target is aten.addmm.default]
    assert len(addmm) == 1 and addmm[0].kwargs.get("beta") == 2.0
    assert not any(n.target is aten.permute.default and n.args[0].target is aten.mm.default for n in calls)
    assert sum(n.target is aten.mm.default for n in calls) == 2  # the single-row product and the integer one
    for got, want in zip(gm(x, w, b, xi, wi), f(x, w, b, xi, wi)):
        assert torch.equal(got, want)


def test_column_sums_pass_writes_leading_sums_as_products_and_keeps_values():
    """ColumnSums: a sum over the leading dimension of a matrix with at least min_rows rows (a bias gradient over the
    batch) becomes ones(1, m) @ x, with and without keepdim; a short matrix's sum, a sum over the last dimension and an
    integer sum stay as they are; the values are eager ATen's sums (to rounding)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from neurodyn.compile.loop import ColumnSums

    def f(x, short, xi):
        return x.sum(0), x.sum(0, keepdim=True), x.sum(1), short.sum(0), xi.sum(0)

    g = torch.Generator().manual_seed(8)
    x, short = torch.randn(256, 24, generator=g, dtype=F64), torch.randn(16, 24, generator=g, dtype=F64)
    xi = torch.arange(256 * 3).reshape(256, 3)
    gm = make_fx(f, tracing_mode="fake")(x, short, xi)
    aten = torch.ops.aten
    assert sum(n.target is aten.sum.dim_IntList for n in gm.graph.nodes) == 5
    ColumnSums(8, 128)(gm.graph)
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    mms = [n for n in calls if n.target is aten.mm.default]
    assert [tuple(n.meta["val"].shape) for n in mms] == [(1, 24), (1, 24)]
    assert all(tuple(n.args[0].meta["val"].shape) == (1, 256) for n in mms)
    assert sum(n.target is aten.sum.dim_IntList for n in calls) == 3
    got, want = gm(x, short, xi), f(x, short, xi)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    assert torch.equal(got[4], want[4])


def test_block_products_pass_rewrites_products_and_keeps_values():
    """BlockProducts: two products of one input with two weights (graph inputs, used transposed) become one product
    with the transposed weights side by side (made once, shared by both uses of the pair) and a lone one reads a
    row-major copy; a weight gradient a^T b with k > m > n is computed as (b^T a)^T; sums of products (directly, through
    a reshape, and a chain over "steps" of transposed weight gradients) become addmm chains. Values equal the eager
    function's to rounding (float64)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from neurodyn.compile.loop import BlockProducts

    def t(m):  # a transpose as Inductor's post-grad graphs hold it
        return m.permute(1, 0)

    def f(x1, x2, w1, w2, w3, d1, d2, a, h):
        # forward: two first layers at each of two states, a second layer at both (outputs wider than LoopProducts' 8)
        p1, q1 = x1 @ t(w1), x1 @ t(w2)
        p2, q2 = x2 @ t(w1), x2 @ t(w2)
        r1, r2 = p1.tanh() @ t(w3), p2.tanh() @ t(w3)
        # backward-like: weight gradients d^T x summed over two steps (k = 96 > m = 12 > n = 10)
        gw = t(d1) @ x1 + t(d2) @ x2
        # an input gradient: a + d1 @ w1 (through a reshape) + d2 @ w1
        gi = (a.reshape(1, -1) + (d1 @ w1).reshape(1, -1)).reshape(96, 10) + d2 @ w1
        return p1, q1, p2, q2, r1, r2, gw, gi, h

    g = torch.Generator().manual_seed(11)
    x1, x2 = torch.randn(96, 10, generator=g, dtype=F64), torch.randn(96, 10, generator=g, dtype=F64)
    w1, w2, w3 = (torch.randn(12, 10, generator=g, dtype=F64), torch.randn(11, 10, generator=g, dtype=F64),
                  torch.randn(9, 12, generator=g, dtype=F64))
    d1, d2 = torch.randn(96, 12, generator=g, dtype=F64), torch.randn(96, 12, generator=g, dtype=F64)
    a, h = torch.randn(96, 10, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)
    args = (x1, x2, w1, w2, w3, d1, d2, a, h)
    gm = make_fx(f, tracing_mode="fake")(*args)
    aten = torch.ops.aten
    BlockProducts(8, 128)(gm.graph)
    gm.graph.lint()
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    mms = [n for n in calls if n.target is aten.mm.default]
    addmms = [n for n in calls if n.target is aten.addmm.default]
    cats = [n for n in calls if n.target is aten.cat.default]
    assert len(cats) == 1 and tuple(cats[0].meta["val"].shape) == (10, 23)  # [w1.T, w2.T], made once
    assert sum(n.args[1] is cats[0] for n in mms) == 2  # x1 and x2 times it
    # the second layer reads one row-major copy of w3.T (nothing else is copied)
    clones = [n for n in calls if n.target is aten.clone.default]
    assert [tuple(n.meta["val"].shape) for n in clones] == [(12, 9)]
    assert sum(n.args[1] is clones[0] for n in mms) == 2
    # the weight gradient in the orientation (b^T a): a (10, 12) product, and its sum over the steps as an addmm
    assert any(tuple(n.meta["val"].shape) == (10, 12) for n in mms + addmms)
    assert len(addmms) == 3  # gw's sum, gi's two sums
    got, want = gm(*args), f(*args)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_loop_with_library_products_matches_eager(monkeypatch):
    """A batched MLP (nn.Linear layers: a thin first layer, a wide hidden one, a thin last one) through the compiled
    whole loop, whose products LoopProducts rewrites: same steps and NFE as eager, outputs to rounding."""
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")
    torch.manual_seed(5)
    f = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    y0 = torch.randn(24, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    eager, comp = _both(lambda t, y: f(y), y0, T, rtol=1e-7, atol=1e-9)
    _same(eager, comp)


@pytest.mark.slow
def test_inference_loop_above_the_training_size_limit(monkeypatch):
    """Under torch.no_grad() the whole loop is built up to CPU_MAX_INFERENCE_OUTPUT_ELEMENTS output elements (with a
    graph recorded, up to CPU_MAX_OUTPUT_ELEMENTS): a state past the smaller limit runs as the loop, equal to the eager
    solve and to the matrix exponential."""
    from neurodyn.compile import loop as compile_loop
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")
    rows = compile_loop.CPU_MAX_OUTPUT_ELEMENTS // (2 * T.shape[0]) + 1
    y0 = torch.randn(rows, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert not compile_loop.worthwhile(y0, T.shape[0])
    with torch.no_grad():
        assert compile_loop.worthwhile(y0, T.shape[0])
    eager, comp = _both(LIN, y0, T, rtol=1e-8, atol=1e-10)
    _same(eager, comp)
    exact = torch.stack([y0 @ torch.linalg.matrix_exp(A.T * float(ti)) for ti in T])
    assert torch.allclose(comp.ys, exact, atol=1e-7)


@pytest.mark.slow
def test_compiled_step_with_library_tanh_matches_eager(monkeypatch):
    """A compiled step (dense output: no whole loop) of a field whose tanh is large enough for ATen's kernel
    (patches.library_tanh, held by compiled_context while the step compiles): the eager solve's steps and values, the
    lowering put back after the solve."""
    from torch._inductor import lowering

    from neurodyn.compile import patches
    from neurodyn.compile import policy as compile_policy

    monkeypatch.setattr(compile_policy, "FORCE", "compiled")
    before = lowering.lowerings[torch.ops.aten.tanh.default]
    f = WideTanh()
    y0 = torch.randn(patches.LIBRARY_TANH_ELEMENTS // 64, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        eager = neurodyn.solve(f, y0, T, rtol=1e-8, atol=1e-10, dense=True)
        comp = neurodyn.solve(f, y0, T, rtol=1e-8, atol=1e-10, dense=True, compile=True)
    assert comp.stats["compiled"] == "step"
    assert lowering.lowerings[torch.ops.aten.tanh.default] is before
    for key in ("steps", "rejected", "nfe"):
        assert comp.stats[key] == eager.stats[key], key
    assert torch.allclose(comp.ys, eager.ys, rtol=1e-11, atol=1e-12)
    mid = torch.tensor(1.234, dtype=F64)
    assert torch.allclose(comp.evaluate(mid), eager.evaluate(mid), rtol=1e-11, atol=1e-12)


def test_compile_options_name_the_source_of_neurodyn_compile():
    """Every option set neurodyn compiles with carries the digest of neurodyn.compile's source, so Inductor's on-disk
    cache never serves a program compiled by other code under the same option values."""
    import hashlib
    from pathlib import Path

    from neurodyn.compile import loop, patches, step, train

    files = sorted(Path(patches.__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    assert patches.SOURCE_DIGEST == digest and {f.name for f in files} >= {"patches.py", "pool.py", "loop.py"}
    for options in (loop.CPU_OPTIONS, loop.LOOP_OPTIONS, loop.GRAPH_OPTIONS, step.STEP_CPU_OPTIONS):
        assert options["post_grad_fusion_options"]["decompose_mm_pass"]["neurodyn_source"] == digest
    assert train.CPU_OPTIONS is loop.CPU_OPTIONS
