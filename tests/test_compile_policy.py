"""``compile=True`` compiles only where it pays (``neurodyn.compile.policy``): the decision rule on given timings,
the eager fallback returning exactly the ``compile=False`` result, the measurement leaving the solve untouched,
and the decision cached per field and problem. No timing is asserted: timings are injected where a path matters.
The compiled solves are all dopri5's on the same linear field: each test's field is new (the decision is cached per
field), and the programs after the first are Inductor's cache hits."""

import math

import pytest
import torch
from torch import nn

import neurodyn
from neurodyn.compile import policy as compile_policy
from neurodyn.compile.policy import Timing, decide

F64 = torch.float64
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
A_T = A.T.contiguous()  # not a view made inside the field (the compiled whole loop cannot trace those)
Y0 = torch.tensor([[1.0, 0.5]], dtype=F64)
T = torch.linspace(0, 3, 7, dtype=F64)


class Linear(nn.Module):
    """dy/dt = y A^T: exact solution y(t) = y0 expm(A t)^T."""

    def forward(self, t, y):
        return y @ A_T


def exact(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([Y0 @ torch.linalg.matrix_exp(A * float(ti)).T for ti in t])


def _timing(step: float | None, loop: float | None = None) -> Timing:
    """Costs relative to an eager step of 100 us."""
    return Timing(eager_s=1e-4, step_s=None if step is None else step * 1e-4,
                  loop_s=None if loop is None else loop * 1e-4, rounds=5)


def _calibrated(step, loop=None):
    """A stand-in for compile_policy.calibrate: fixed timings (the loop's only where it applies)."""
    return lambda *a, **k: (_timing(step, loop if a[-1] else None), False)


# ---------------------------------------------------------------------------------------------- the rule
R = compile_policy.MAX_RATIO


@pytest.mark.parametrize("step, loop, path", [
    (None, 0.2, "loop"), (0.2, None, "step"), (0.5, 0.3, "loop"), (0.3, 0.95, "step"), (None, R, "loop"),
    (R, None, "step"), (R * 1.01, None, "eager"), (None, R * 1.01, "eager"), (1.0, 1.2, "eager"), (1.5, None, "eager"),
    (math.inf, math.inf, "eager"), (math.nan, math.nan, "eager"), (1.02, 0.6, "loop"),
])
def test_decide_compiles_only_below_the_ratio(step, loop, path):
    got, reason = decide(_timing(step, loop), loop_available=loop is not None)
    assert got == path
    assert "eager 100 us" in reason and "best of 5" in reason


def test_decide_zero_eager_time_and_failures_and_overrides():
    assert decide(Timing(eager_s=0.0, step_s=1e-6, loop_s=1e-6, rounds=3), True)[0] == "eager"
    path, reason = decide(_timing(0.1, 0.1), True, compile_failed=True)
    assert path == "eager" and "failed" in reason
    assert decide(_timing(5.0), True, force="compiled") == (
        "loop", "neurodyn.compile.policy.FORCE == 'compiled' (not measured)")
    assert decide(None, False, force="compiled")[0] == "step"
    assert decide(_timing(0.1, 0.1), True, force="eager")[0] == "eager"
    assert decide(None, True)[0] == "loop"  # under vmap nothing is measured: compiled as before
    with pytest.raises(ValueError, match="FORCE must be"):
        decide(_timing(0.1), True, force="always")


# ---------------------------------------------------------------------------------------------- in solve
def test_eager_fallback_is_exactly_the_eager_solve(monkeypatch):
    """Timings saying compiling does not pay -> the eager stepper: bit-identical outputs, same steps and nfe."""
    monkeypatch.setattr(compile_policy, "calibrate", _calibrated(1.3, 1.1))
    f = Linear()
    for dense in (False, True):
        with torch.no_grad():
            eager = neurodyn.solve(f, Y0, T, method="dopri5", rtol=1e-8, atol=1e-10, dense=dense)
            comp = neurodyn.solve(f, Y0, T, method="dopri5", rtol=1e-8, atol=1e-10, dense=dense, compile=True)
        assert comp.stats["compiled"] == "eager"
        assert "does not pay" in comp.stats["compile_reason"] and "1.30x" in comp.stats["compile_reason"]
        assert torch.equal(comp.ys, eager.ys)
        for key in ("nfe", "steps", "rejected", "initial_step", "last_step"):
            assert comp.stats[key] == eager.stats[key], key
        assert "compiled" not in eager.stats and "compile_reason" not in eager.stats
        assert torch.allclose(comp.ys, exact(T), rtol=1e-6, atol=1e-7)


def test_eager_fallback_with_gradients_equals_eager_gradients(monkeypatch):
    monkeypatch.setattr(compile_policy, "calibrate", _calibrated(2.0))
    w = torch.tensor([[0.3, -1.0], [1.2, 0.1]], dtype=F64, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ w)

    y0 = Y0.clone().requires_grad_(True)
    grads = []
    for compile in (False, True):
        sol = neurodyn.solve(f, y0, T, method="tsit5", rtol=1e-8, atol=1e-10, compile=compile)
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), [y0, w]))
        if compile:
            assert sol.stats["compiled"] == "eager"
    for ge, gc in zip(*grads):
        assert torch.equal(ge, gc)
    # the y0-gradient against central finite differences of the eager solve
    eps = 1e-6
    with torch.no_grad():
        fd = [(neurodyn.solve(f, Y0 + eps * e, T, method="tsit5", rtol=1e-11, atol=1e-13).ys[-1].sum()
               - neurodyn.solve(f, Y0 - eps * e, T, method="tsit5", rtol=1e-11, atol=1e-13).ys[-1].sum()) / (2 * eps)
              for e in torch.eye(2, dtype=F64).view(2, 1, 2)]
    assert torch.allclose(grads[0][0].view(-1), torch.stack(fd), rtol=1e-5, atol=1e-7)


def test_paying_timings_run_the_loop_or_the_steps(monkeypatch):
    """Timings saying compiling pays -> the whole loop where it applies (no_grad), compiled steps where it does not
    (dense output); both agree with the exact solution."""
    monkeypatch.setattr(compile_policy, "calibrate", _calibrated(0.4, 0.2))
    f = Linear()
    with torch.no_grad():
        loop = neurodyn.solve(f, Y0, T, method="dopri5", rtol=1e-9, atol=1e-11, compile=True)
        step = neurodyn.solve(f, Y0, T, method="dopri5", rtol=1e-9, atol=1e-11, compile=True, dense=True)
    assert loop.stats["compiled"] == "loop" and "whole loop" in loop.stats["compile_reason"]
    assert step.stats["compiled"] == "step" and "whole loop" not in step.stats["compile_reason"]
    for sol in (loop, step):
        assert torch.allclose(sol.ys, exact(T), rtol=1e-7, atol=1e-8)


def test_force_eager_skips_measuring(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("measured although FORCE is set")

    monkeypatch.setattr(compile_policy, "calibrate", boom)
    monkeypatch.setattr(compile_policy, "FORCE", "eager")
    f = Linear()
    with torch.no_grad():
        eager = neurodyn.solve(f, Y0, T, method="dopri5")
        comp = neurodyn.solve(f, Y0, T, method="dopri5", compile=True)
    assert comp.stats["compiled"] == "eager" and torch.equal(comp.ys, eager.ys)


def test_measuring_leaves_the_solve_alone_and_is_cached(monkeypatch):
    """The real measurement (a compiled step is built): it runs once per field and problem, its evaluations are
    not counted in nfe, and whatever it picks, the solution is the exact one; a new shape is measured anew."""
    calls = []
    real = compile_policy.calibrate

    def counting(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(compile_policy, "calibrate", counting)
    f = Linear()
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-10, dense=True)  # dense: compiled steps or eager, no loop
    with torch.no_grad():
        eager = neurodyn.solve(f, Y0, T, **kw)
        first = neurodyn.solve(f, Y0, T, compile=True, **kw)
        second = neurodyn.solve(f, Y0, T, compile=True, **kw)
    assert len(calls) == 1
    tm, failed = calls[0]
    assert not failed and tm.loop_s is None
    assert tm.rounds >= compile_policy.MIN_ROUNDS
    assert 0 < tm.eager_s < math.inf and 0 < tm.step_s < math.inf
    expected = "step" if tm.step_s <= compile_policy.MAX_RATIO * tm.eager_s else "eager"
    for sol in (first, second):
        assert sol.stats["compiled"] == expected
        assert sol.stats["compile_reason"] == first.stats["compile_reason"]
        for key in ("nfe", "steps", "rejected"):
            assert sol.stats[key] == eager.stats[key], key
        assert torch.allclose(sol.ys, eager.ys, rtol=1e-12, atol=1e-13)
        assert torch.allclose(sol.ys, exact(T), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        neurodyn.solve(f, Y0.expand(3, 2).contiguous(), T, compile=True, **kw)
    assert len(calls) == 2


def test_measuring_the_whole_loop_leaves_the_solve_alone(monkeypatch):
    """Where the whole loop applies it is measured (capped attempts, from y0): the solve afterwards is complete and
    exact, with the eager solve's steps and nfe whatever path was chosen."""
    seen = []
    real = compile_policy.calibrate
    monkeypatch.setattr(compile_policy, "calibrate", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    f = Linear()
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        eager = neurodyn.solve(f, Y0, T, **kw)
        comp = neurodyn.solve(f, Y0, T, compile=True, **kw)
    (tm, failed), = seen
    assert not failed and 0 < tm.loop_s < math.inf and tm.rounds >= compile_policy.MIN_ROUNDS
    assert comp.stats["compiled"] in ("loop", "step", "eager")
    assert comp.status == "success" and comp.stats["steps"] == eager.stats["steps"]
    assert comp.stats["nfe"] == eager.stats["nfe"]
    assert torch.allclose(comp.ys, exact(T), rtol=1e-6, atol=1e-7)


def test_calibration_counts_cpu_time_not_waiting(monkeypatch):
    """On the CPU the calibration times each variant on the thread's CPU clock: a variant that only waits (5 ms of
    sleep per call, as a run interrupted by another process would) is charged its own CPU time (the call, tens of
    microseconds), not the 5 ms the wall clock would charge it."""
    import time as time_module

    seen = []
    real = compile_policy.measure

    def with_sleeper(term, solver, y0, k0, times, cfg, compiled):
        out = real(term, solver, y0, k0, times, cfg, {**compiled, "sleep": lambda: time_module.sleep(0.005) or 1})
        seen.append(out)
        return out

    monkeypatch.setattr(compile_policy, "measure", with_sleeper)
    with torch.no_grad():
        sol = neurodyn.solve(Linear(), Y0, T, method="dopri5", rtol=1e-8, atol=1e-10, compile=True)
    assert torch.allclose(sol.ys, exact(T), rtol=1e-6, atol=1e-7)
    eager_s, best, rounds = seen[0]
    assert rounds >= compile_policy.MIN_ROUNDS
    assert best["sleep"] < 1e-3 and eager_s < 1e-2  # waited 5 ms per call: not counted (the call itself ~20 us)
