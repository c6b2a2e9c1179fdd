"""The per-solve savings of the eager loop and solve's set-up keep every result: the host-side screen of the underflow
rule's frozen-attempt test, the stage buffers kept between solves, and LoopConfig's constructor."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from problems import TanhMLP

import neurodyn
from neurodyn.core import loop as core_loop
from neurodyn.core.config import LoopConfig
from neurodyn.core.control import frozen_attempt, not_frozen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_not_frozen_never_contradicts_the_tensor_rule(dtype):
    """Wherever the screen says "not frozen", the tensor form of rule 3 says so too; and changes well above the bound
    are recognised by the screen (it is not a no-op)."""
    g = torch.Generator().manual_seed(0)
    eps = torch.finfo(dtype).eps
    decided = 0
    for trial in range(400):
        n = 1 + trial % 12
        y0 = (torch.randn(1, n, generator=g, dtype=torch.float64) * 10.0 ** (trial % 9 - 4)).to(dtype)
        # Relative changes from 0 to far above eps, some components exactly unchanged, some tiny or zero states.
        rel = torch.randn(1, n, generator=g, dtype=torch.float64) * 10.0 ** (-(trial % 20))
        y1 = (y0.double() * (1 + rel)).to(dtype)
        if trial % 7 == 0:
            y0[0, 0] = 0.0
        if trial % 11 == 0:
            y1[0, -1] = y0[0, -1]
        for shrink in (0.2, 0.5, 0.9, 1.0):
            screened = not_frozen(y0, y1, shrink, eps)
            exact = bool(frozen_attempt(y0, y1, shrink, eps)[0])
            assert not (screened and exact), (trial, shrink, y0, y1)
            decided += screened
    assert decided > 400  # most random changes are clearly resolved


def test_not_frozen_edge_values():
    eps = torch.finfo(torch.float64).eps
    f64 = dict(dtype=torch.float64)
    # Unchanged, NaN and inf rows: undecided (the tensor form settles them).
    assert not not_frozen(torch.ones(1, 3, **f64), torch.ones(1, 3, **f64), 0.5, eps)
    nan = torch.tensor([[float("nan"), 1.0]], **f64)
    assert not not_frozen(nan, nan, 0.5, eps)
    inf = torch.tensor([[float("inf")]], **f64)
    assert not not_frozen(inf, inf, 0.5, eps)
    # A change of one ulp scaled by 0.5 is within the bound: frozen, and the screen does not claim otherwise.
    y0 = torch.tensor([[1.0]], **f64)
    y1 = torch.nextafter(y0, torch.tensor(2.0, **f64))
    assert bool(frozen_attempt(y0, y1, 0.5, eps)[0])
    assert not not_frozen(y0, y1, 0.5, eps)
    # Only the first NOT_FROZEN_PROBE components are read: a change beyond them leaves it to the tensor form.
    y0 = torch.ones(1, 20, **f64)
    y1 = y0.clone()
    y1[0, 15] = 2.0
    assert not not_frozen(y0, y1, 0.5, eps)
    assert not bool(frozen_attempt(y0, y1, 0.5, eps)[0])
    y1[0, 2] = 2.0
    assert not_frozen(y0, y1, 0.5, eps)
    # Complex states: undecided.
    z = torch.ones(1, 2, dtype=torch.complex128)
    assert not not_frozen(z, 2 * z, 0.5, eps)


def _exp_decay_solve(y0: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    return neurodyn.solve(lambda t, y: -y, y0, t, rtol=1e-10, atol=1e-12).ys


def test_pooled_buffers_do_not_alias_earlier_results():
    """Solves reusing the pooled stage buffers return fresh tensors: an earlier solution is unchanged by later ones
    (closed form y0 exp(-t))."""
    with torch.no_grad():
        a = _exp_decay_solve(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
        a_copy = a.clone()
        for k in range(3):
            b = _exp_decay_solve(torch.tensor([[3.0 + k, -1.0]], dtype=torch.float64))
    assert torch.equal(a, a_copy)
    times = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    exact = torch.tensor([[1.0, 2.0]], dtype=torch.float64) * torch.exp(-times).view(3, 1, 1)
    torch.testing.assert_close(a, exact, rtol=1e-8, atol=0)
    torch.testing.assert_close(b[-1], torch.tensor([[5.0, -1.0]], dtype=torch.float64) * math.exp(-1.0), rtol=1e-8,
                               atol=0)


def test_nested_solves_do_not_share_buffers():
    """A field that itself solves (same method, shape and dtype, so the same pool entry) while the outer solve's
    stages are live: dy/dt = z(1) - y with dz/dt = -z, z(0) = y, i.e. dy/dt = -(1 - 1/e) y."""
    tt = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def field(t, y):
        inner = neurodyn.solve(lambda s, z: -z, y, tt, rtol=1e-11, atol=1e-13, max_steps=2000)
        return inner.ys[-1] - y

    y0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):  # the second time with pooled buffers from the first
            ys = neurodyn.solve(field, y0, t, rtol=1e-9, atol=1e-11, max_steps=2000).ys
            rate = 1.0 - math.exp(-1.0)
            exact = y0 * torch.exp(-rate * t).view(3, 1, 1)
            torch.testing.assert_close(ys, exact, rtol=1e-7, atol=0)


def test_pool_gives_the_same_bits_as_fresh_buffers(monkeypatch):
    f = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    y0 = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        pooled = [neurodyn.solve(lambda t, y: f(y), y0, t, rtol=1e-7).ys for _ in range(2)]
        monkeypatch.setattr(core_loop, "POOL_MAX_NUMEL", -1)
        fresh = neurodyn.solve(lambda t, y: f(y), y0, t, rtol=1e-7).ys
    assert torch.equal(pooled[0], fresh) and torch.equal(pooled[1], fresh)


def test_loop_config_constructor_matches_the_dataclass_fields():
    cfg = LoopConfig(rtol=1e-6, atol=1e-8, adaptive=True)
    for f in dataclasses.fields(LoopConfig):
        if f.name in ("rtol", "atol", "adaptive"):
            continue
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(cfg, f.name) == want, f.name
    other = LoopConfig(rtol=1e-6, atol=1e-8, adaptive=True)
    assert cfg == other and cfg.step_t is not other.step_t  # fresh lists from the default factories
    assert dataclasses.replace(cfg, record=True).record is True and cfg.record is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rtol = 1.0
    with pytest.raises(TypeError):
        LoopConfig(rtol=1e-6, atol=1e-8)  # adaptive is required



def _repeat_field():
    return TanhMLP(8)


def test_repeated_solve_checks_y0_and_t_every_call():
    """A repeated plain solve takes its settings from prepare's memo, but y0 and t are checked at every call: NaN/inf,
    non-monotonic or wrongly typed times, wrong dtypes and devices raise as on a first solve, and the results equal a
    fresh preparation's (another field object with the same weights)."""
    import importlib

    S = importlib.import_module("neurodyn.solve")
    f = _repeat_field()
    y0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    first = neurodyn.solve(f, y0, t, rtol=1e-6, atol=1e-8)
    assert S._PREPARED.get(f)  # kept
    again = neurodyn.solve(f, y0, t, rtol=1e-6, atol=1e-8)
    assert torch.equal(first.ys, again.ys) and first.stats == again.stats
    y_bad = y0.clone()
    y_bad[0, 1] = float("nan")
    with pytest.raises(neurodyn.InputError, match="y0 contains NaN"):
        neurodyn.solve(f, y_bad, t, rtol=1e-6, atol=1e-8)
    t_bad = t.clone()
    t_bad[2] = t_bad[1]
    with pytest.raises(neurodyn.InputError, match="strictly increasing"):
        neurodyn.solve(f, y0, t_bad, rtol=1e-6, atol=1e-8)
    t_inf = t.clone()
    t_inf[-1] = float("inf")
    with pytest.raises(neurodyn.InputError, match="NaN or inf"):
        neurodyn.solve(f, y0, t_inf, rtol=1e-6, atol=1e-8)
    with pytest.raises(neurodyn.InputError, match="dtype"):
        neurodyn.solve(f, y0, t.float(), rtol=1e-6, atol=1e-8)
    with pytest.raises(neurodyn.InputError):
        neurodyn.solve(f, y0.float(), t, rtol=1e-6, atol=1e-8)
    # other values of y0 and t under the same settings: a fresh preparation's results
    y1, t1 = torch.tensor([[1.0, 0.5]], dtype=torch.float64), torch.linspace(2, 0, 5, dtype=torch.float64)
    g = _repeat_field()
    for yy, tt in ((y1, t), (y0, t1), (y1, t1)):
        got = neurodyn.solve(f, yy, tt, rtol=1e-6, atol=1e-8)
        S._PREPARED.pop(g, None)
        ref = neurodyn.solve(g, yy, tt, rtol=1e-6, atol=1e-8)
        assert torch.equal(got.ys, ref.ys) and got.stats == ref.stats


def test_repeated_solve_options_keyed_by_value_and_type():
    """The memo is keyed on the options' values and types: max_steps=True is refused after max_steps=1 ran, a float
    max_steps after an int one, another rtol gives another solve, and an rtol raised to the dtype's floor warns at
    every call (nothing kept)."""
    import importlib
    import warnings

    S = importlib.import_module("neurodyn.solve")
    f = _repeat_field()
    y0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    neurodyn.solve(f, y0, t, max_steps=1, on_failure="return")
    with pytest.raises(neurodyn.InputError, match="max_steps"):
        neurodyn.solve(f, y0, t, max_steps=True, on_failure="return")
    neurodyn.solve(f, y0, t, max_steps=500)
    with pytest.raises(neurodyn.InputError, match="max_steps"):
        neurodyn.solve(f, y0, t, max_steps=500.0)
    a = neurodyn.solve(f, y0, t, rtol=1e-3, atol=1e-6)
    b = neurodyn.solve(f, y0, t, rtol=1e-9, atol=1e-12)
    assert b.stats["nfe"] > a.stats["nfe"]
    S._PREPARED.pop(f, None)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            neurodyn.solve(f, y0, t, rtol=1e-20, atol=1e-12)
        assert any(issubclass(w.category, neurodyn.PrecisionWarning) for w in caught)
    assert not any(k[0][1] == 1e-20 for k in S._PREPARED.get(f, {}))


def test_repeated_solve_grad_mode_and_time_gradients():
    """The grad mode is part of the key: a solve under no_grad and one under autograd (with gradients to y0 and t)
    after it give a fresh preparation's values and gradients."""
    f = _repeat_field()
    g = _repeat_field()
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    y0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    with torch.no_grad():
        neurodyn.solve(f, y0, t)
    grads = []
    for field in (f, f, g):
        yy, tt = y0.clone().requires_grad_(), t.clone().requires_grad_()
        sol = neurodyn.solve(field, yy, tt)
        sol.ys.pow(2).sum().backward()
        grads.append((sol.ys.detach(), yy.grad, tt.grad))
    for a, b in zip(grads[1], grads[2]):
        assert torch.equal(a, b)
    for a, b in zip(grads[0], grads[2]):
        assert torch.equal(a, b)


def test_repeated_solve_memo_does_not_keep_the_field_alive():
    """The memo of prepare holds its field weakly: an eagerly solved field is freed once the caller drops it."""
    import gc
    import importlib
    import weakref

    S = importlib.import_module("neurodyn.solve")
    f = _repeat_field()
    neurodyn.solve(f, torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64))
    assert S._PREPARED.get(f)
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None
