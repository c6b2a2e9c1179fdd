"""Whether ``solve(..., compile=True)`` compiles a problem, or runs it eagerly because compiling does not pay.

Compiling removes Python's per-operation cost, which dominates small problems (a 2-d state, a 64-wide MLP):
there the compiled step is 2-3x faster than the eager one and the compiled whole loop 5x faster than the eager
solve. For larger states the arithmetic dominates, and Inductor's CPU code is not always as fast as ATen's
eager kernels. Measured on the float64 MLP fields of benchmarks/bench_core.py (one core): the matrix products
go to the same MKL ``addmm`` in both, but ``tanh`` (and ``exp``) in float64 become Sleef's vectorised ``u10``
functions, 2-4x slower per element than the MKL VML kernels eager ATen calls (``cpp.use_decompose_tanh``,
``2 / (1 + exp(-2x)) - 1``, is still ~2x slower, and less accurate near 0). The batched, medium and large
protocol cases spend most of a step in ``tanh``: compiled, they were 1.2-1.8x slower than eager.

No static rule captures that (it depends on which functions the field calls, on the state size, on the CPU and
on the torch build), so the first ``compile=True`` solve of a vector field *measures* it (:func:`calibrate`): it
times eager steps from the initial state against the compiled whole loop (capped at a few attempts) where that
applies, and against compiled steps where it does not or does not pay, interleaved, best of several rounds; then
:func:`decide` -- the one place the choice is made -- picks the compiled whole loop, compiled steps or the eager
stepper. (The step alone does not predict the loop: for a tiny field the compiled step's call costs as much as the
eager step, while the loop, with no call per step, is 5x faster.) The measurement is cached per vector field,
method, state shape, dtype, device, fixed/adaptive stepping, grad mode and number of output times, so later solves
neither measure nor compile again; the choice is reported as ``sol.stats["compiled"]`` (``"loop"``, ``"step"`` or
``"eager"``) with the measured times in ``sol.stats["compile_reason"]``.

The calibration costs a few steps' time once, plus compiling what it measures (which ``compile=True`` did anyway;
where the loop does not pay, the step is compiled too).
Its steps are evaluated on the side: the solve's result, steps and ``nfe`` are those of the chosen path, and a
solve that falls back to eager returns exactly what ``compile=False`` returns.

:data:`FORCE` overrides the decision (benchmarks and tests): ``"compiled"`` (the rule without measuring:
loop where it applies, else steps) or ``"eager"``.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.control import make_error_ratio
from ..core.tensors import fixed_bad, vmapped

# Compiling pays where the compiled whole loop (or, where it does not apply or does not pay, the compiled step) costs
# at most this fraction of an eager step per attempted step. The integrate loop's own Python (outputs, control) is
# left out of the eager cost, so the rule leans to eager near 1; the margin keeps timing noise from choosing a path
# that is not clearly faster. Forced paths, whole solve vs eager (one core, float64 MLPs dim x hidden x batch,
# dopri5; loop / steps): 2x64x1 0.18x / 0.53x; 2x64x16 0.51x / 0.91x; 2x64x64 0.83x / 0.88x; 2x64x256 1.8x / 1.5x;
# 16x128x1024 1.4x / 1.3x; 64x256x512 1.35x / 1.2x.
MAX_RATIO = 0.9
# Calibration: interleaved rounds (one eager, one compiled step each) until both budgets below are met, on the CPU
# timed with the thread's CPU clock (see measure).
MIN_ROUNDS = 5
MAX_ROUNDS = 50
MIN_SECONDS = 0.05
# Attempts of the whole loop per timed run (the run starts from y0 and stops there, status max_steps).
LOOP_ATTEMPTS = 16

# None: measure and decide; "compiled": compile without measuring (loop where it applies, else steps); "eager".
FORCE: str | None = None

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Timing:
    """Best-of-rounds cost (seconds) of one attempted step: eager, compiled step, compiled whole loop (None where not
    measured), over ``rounds`` interleaved rounds."""

    eager_s: float
    step_s: float | None
    loop_s: float | None
    rounds: int


def decide(timing: Timing | None, loop_available: bool, compile_failed: bool = False,
           force: str | None = None) -> tuple[str, str]:
    """The compile policy: which path a ``compile=True`` solve runs, and why.

    Parameters
    ----------
    timing : Timing or None
        Measured costs per attempted step (:func:`measure`); None where nothing was measured.
    loop_available : bool
        Whether the compiled whole loop covers this solve (no graph, events, dense output, jumps; the state-size
        rule of :func:`neurodyn.compile.loop.worthwhile`); used where nothing was measured.
    compile_failed : bool
        No compiled path could be built or run (a warning has been issued).
    force : ``"compiled"``, ``"eager"`` or None
        Override (see :data:`FORCE`).

    Returns
    -------
    (path, reason) : ``path`` is ``"loop"``, ``"step"`` or ``"eager"``; ``reason`` a sentence for
    ``sol.stats["compile_reason"]``.

    Examples
    --------
    >>> decide(Timing(eager_s=3e-4, step_s=None, loop_s=1e-4, rounds=10), loop_available=True)[0]
    'loop'
    >>> decide(Timing(eager_s=3e-4, step_s=2e-4, loop_s=None, rounds=10), loop_available=False)[0]
    'step'
    >>> decide(Timing(eager_s=1e-3, step_s=1.5e-3, loop_s=1.6e-3, rounds=5), loop_available=True)[0]
    'eager'
    """
    if force not in (None, "compiled", "eager"):
        raise ValueError(f"neurodyn.compile.policy.FORCE must be None, 'compiled' or 'eager', got {force!r}.")
    if compile_failed:
        return "eager", "torch.compile failed for this vector field: eager steps"
    if force == "eager":
        return "eager", "neurodyn.compile.policy.FORCE == 'eager'"
    if force == "compiled":
        return ("loop" if loop_available else "step"), "neurodyn.compile.policy.FORCE == 'compiled' (not measured)"
    if timing is None:
        return ("loop" if loop_available else "step"), "not measured (torch.func.vmap): compiled"
    e = timing.eager_s
    parts, ratios = [], {}
    for name, v in (("whole loop", timing.loop_s), ("compiled step", timing.step_s)):
        if v is not None:
            ratios[name] = v / e if e > 0 else math.inf
            parts.append(f"{name} {v * 1e6:.4g} us ({ratios[name]:.2f}x)")
    times = f"per attempted step: eager {e * 1e6:.4g} us, " + ", ".join(parts) + f" (best of {timing.rounds})"
    if ratios.get("whole loop", math.nan) <= MAX_RATIO:  # NaN (a failed timing) counts as not paying
        return "loop", f"{times}: the whole loop compiled"
    if ratios.get("compiled step", math.nan) <= MAX_RATIO:
        return "step", f"{times}: compiled steps"
    return "eager", f"{times}: compiling does not pay (needs <= {MAX_RATIO:g}x), eager steps"


def measure(term: Any, solver: Any, y0: Tensor, k0: Tensor, times: list[float], cfg: Any,
            compiled: dict[str, Callable[[], int]]) -> tuple[float, dict[str, float], int]:
    """Time eager steps (``solver.step`` and the error norm, as the eager loop runs them) from ``(times[0], y0)``
    against each of ``compiled`` (name -> a call returning the number of steps it attempted), interleaved; the
    state, ``term.nfe`` and ``k0`` are left as they were. ``y0`` has shape ``(1, n)``. Returns the best eager time
    per step, the best time per attempted step of each compiled variant, and the number of rounds. The first call
    of each variant (compilation) is not timed; what it raises propagates."""
    t0 = times[0]
    h = _calibration_step(times, cfg)
    co = solver.coefficients(y0.dtype, y0.device)
    buf = solver.make_buffers(y0, k0) if not torch.is_grad_enabled() and not cfg.record else None
    ratio_fn = make_error_ratio(cfg.rtol, cfg.atol, y0.shape[1]) if cfg.adaptive else None
    nfe = term.nfe

    def eager() -> int:
        y1, _, err = solver.step(term, t0, y0, h, k0, co, None, buf)
        if ratio_fn is not None:
            ratio_fn(err, y0, y1, h)
        else:
            fixed_bad(y1)
        return 1

    variants = {"eager": eager, **compiled}
    best = dict.fromkeys(variants, math.inf)
    rounds = 0
    try:
        for fn in variants.values():
            fn()  # compiles
        # On the CPU the thread's own CPU time: on a machine shared with other processes, wall time charges a run
        # the time slices others took during it, and the minimum over rounds then favours the shorter variant (a
        # whole loop of ~10 ms is always interrupted, one eager step of ~0.7 ms seldom; the batched protocol case
        # measured the loop at 1.6x eager this way, 0.8x on CPU time, its true whole-solve ratio 0.7x). Elsewhere wall
        # time, which includes waiting for the device.
        clock = time.thread_time if y0.device.type == "cpu" else time.perf_counter
        names = list(variants)
        start = clock()
        while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or clock() - start < MIN_SECONDS):
            for name in names[rounds % len(names):] + names[: rounds % len(names)]:
                s = clock()
                n = variants[name]()
                best[name] = min(best[name], (clock() - s) / max(n, 1))
            rounds += 1
    finally:
        term.nfe = nfe
    eager_s = best.pop("eager")
    return eager_s, best, rounds


def choose(term: Any, solver: Any, y0: Tensor, k0: Tensor, times: list[float], stops: list[float], cfg: Any,
           loop_available: bool) -> tuple[str, str]:
    """The path of this ``compile=True`` solve (``"loop"``, ``"step"`` or ``"eager"``) and why: the cached
    decision for this field and problem, else :func:`measure` then :func:`decide` (internal; the loop calls it
    through :meth:`neurodyn.compile.step.CompiledStep.choose`).
    The whole loop is measured first where it applies (its attempts capped at :data:`LOOP_ATTEMPTS`); the compiled
    step only where the loop does not apply or does not pay."""
    if FORCE is not None:
        return decide(None, loop_available, force=FORCE)
    if vmapped(y0, k0):  # batched tensors: no timing the values' path, and no per-shape cache
        return decide(None, loop_available)
    decision = cached(term, solver, y0, times, stops, cfg, loop_available)
    if decision[0] is not None:
        return decision
    try:
        per_func = _CACHE.setdefault(term.func, {})
    except TypeError:  # not weak-referenceable: measured every solve
        per_func = {}
    # Measured once; the decision (a function of the measurement) is kept with it.
    timing, failed = calibrate(term, solver, y0, k0, times, stops, cfg, loop_available)
    decision = per_func[_key(term, solver, y0, times, stops, cfg, loop_available)] = \
        decide(timing, loop_available, compile_failed=failed)
    return decision


def cached(term: Any, solver: Any, y0: Tensor, times: list[float], stops: list[float], cfg: Any,
           loop_available: bool) -> tuple[str, str] | tuple[None, None]:
    """What :func:`choose` returns for this solve where that needs no measurement (the decision made before for this
    field and problem, or :data:`FORCE`'s), else ``(None, None)``: for a solve that has not evaluated dy/dt at the
    initial time, which a measurement needs."""
    if FORCE is not None:
        return decide(None, loop_available, force=FORCE)
    if vmapped(y0):
        return None, None
    try:
        per_func = _CACHE.get(term.func)
    except TypeError:
        per_func = None
    decision = per_func.get(_key(term, solver, y0, times, stops, cfg, loop_available)) if per_func else None
    return decision if decision is not None else (None, None)


def _key(term: Any, solver: Any, y0: Tensor, times: list[float], stops: list[float], cfg: Any,
         loop_available: bool) -> tuple:
    """What a decision depends on besides the field (the cache key of :func:`choose`)."""
    return (getattr(solver, "name", type(solver).__name__), tuple(term.shape), y0.dtype, y0.device, cfg.adaptive,
            torch.is_grad_enabled(), bool(cfg.record), loop_available, len(times), len(stops))


def calibrate(term: Any, solver: Any, y0: Tensor, k0: Tensor, times: list[float], stops: list[float], cfg: Any,
              loop_available: bool) -> tuple[Timing | None, bool]:
    """Measure what :func:`decide` needs for this solve: ``(timing, compile_failed)`` (``timing`` None where compiling
    failed). The whole loop first where it applies; compiled steps where it does not, fails or does not pay."""
    eager_s, best, rounds = math.inf, {}, 0
    if loop_available:
        first = cfg.first_step if cfg.adaptive else cfg.step_size

        def loop() -> int:
            o = cfg.loop(times, stops, y0, k0, first, cfg.rtol, cfg.atol, cfg.min_step, cfg.max_step,
                         min(LOOP_ATTEMPTS, cfg.max_steps))
            if o is None:
                raise _LoopFailed
            return o.attempts

        try:
            eager_s, best, rounds = measure(term, solver, y0, k0, times, cfg, {"loop": loop})
        except _LoopFailed:  # warned by the loop: compiled steps are measured instead
            best = {}
    if "loop" not in best or not best["loop"] <= MAX_RATIO * eager_s:

        def step() -> int:
            if cfg.advance(times[0], y0, _calibration_step(times, cfg), k0) is None:
                raise _StepFailed
            return 1

        try:
            eager_s, step_best, rounds = measure(term, solver, y0, k0, times, cfg, {"step": step})
        except _StepFailed:  # warned by the compiled step
            return None, True
        best["step"] = step_best["step"]
    return Timing(eager_s=eager_s, step_s=best.get("step"), loop_s=best.get("loop"), rounds=rounds), False


def _calibration_step(times: list[float], cfg: Any) -> float:
    span = times[-1] - times[0]
    direction = 1.0 if span > 0 else -1.0
    return direction * min(cfg.step_size or cfg.first_step or abs(span) * 1e-3, abs(span))


class _LoopFailed(Exception):
    """The compiled whole loop could not be built (it warned): measure compiled steps instead."""


class _StepFailed(Exception):
    """The compiled step could not be built (it warned): eager steps."""
