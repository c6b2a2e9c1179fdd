"""The compiled fast path (``solve(..., compile=True)``): one RK step, with the vector field, the stage
combinations and the error norm, compiled by ``torch.compile`` into one graph.

Python per-operation overhead dominates small problems (a 2-d state, a 64-wide MLP: each torch call
costs about as much as the arithmetic). Compiling the whole step removes it: the integrate loop then
makes one call per step and reads one number (the error ratio) to accept or reject. Compiled steps
are cached per vector field, method, shape, dtype and device, so a training loop compiles once.
If compilation fails the solve falls back to the eager stepper with a warning; results agree with
the eager path to rounding.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.control import rms_ratio
from ..core.tensors import ordinary_tensors
from ..solvers.explicit_rk import ExplicitRungeKutta
from . import policy
from .patches import (
    LOWERING_MARKS,
    library_tanh,
)

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ACTIVE = [0]  # > 0 while compiled_context() holds the compiler settings below
_SAVED: list = []


class compiled_context:
    """Holds the compiler settings of compiled steps for the duration of a solve, so that each step
    need not enter them (internal; re-entrant): integer attributes of modules (NFE counters, say) do not
    become guards, up to 64 compiled variants per step function, and a step compiled meanwhile on the CPU calls
    ATen's ``tanh`` on large tensors, or a fused formula (:class:`~neurodyn.compile.patches.library_tanh`)."""

    def __enter__(self) -> None:
        if not _ACTIVE[0]:  # set directly (a config.patch context costs ~8 us per entry)
            cfg = torch._dynamo.config
            tanh = library_tanh()
            tanh.__enter__()
            _SAVED[:] = [cfg.allow_unspec_int_on_nn_module, cfg.recompile_limit, tanh]
            cfg.allow_unspec_int_on_nn_module = True
            cfg.recompile_limit = max(64, _SAVED[1])
        _ACTIVE[0] += 1

    def __exit__(self, *exc) -> None:
        _ACTIVE[0] -= 1
        if not _ACTIVE[0]:
            cfg = torch._dynamo.config
            cfg.allow_unspec_int_on_nn_module, cfg.recompile_limit, tanh = _SAVED
            tanh.__exit__(*exc)


_FALLBACK = object()
# On the CPU the compiled graph's wrapper (which launches its kernels and library calls) is generated as C++ rather
# than Python: a small problem's step costs ~40% less per call this way. The step is compiled inside compiled_context,
# so large tanh call ATen's kernel (library_tanh: the medium protocol case's compiled step ~16% faster, the large
# case's ~14%; float32 and float64 ones as a fused formula where TANH_FORMULA_FLOAT32 / TANH_FORMULA_FLOAT64); the
# entries of LOWERING_MARKS name those changes in Inductor's cache key.
STEP_CPU_OPTIONS = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": dict(LOWERING_MARKS)}}


def nonzero(row) -> list[tuple[int, float]]:
    """A tableau row as ``(index, coefficient)`` pairs, zeros left out (for :func:`stage_sum`)."""
    return [(j, float(v)) for j, v in enumerate(row) if float(v) != 0.0]


def stage_sum(ks: list[Tensor], row: list[tuple[int, float]]) -> Tensor:
    """``sum_j c_j ks[j]`` over a :func:`nonzero` row, written as float-coefficient products that the compiler
    fuses into its own loops (no library matrix product per stage, as the eager stepper's ``addmm``)."""
    acc = ks[row[0][0]] * row[0][1]
    for j, v in row[1:]:
        acc = acc + ks[j] * v
    return acc


def _build(solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device, error_dims: int | None, adaptive: bool) -> Callable:
    tb = solver.tableau
    s = solver.stages
    c = [float(x) for x in tb.c]
    a_rows = [nonzero(row) for row in tb.a]
    b_row = nonzero(tb.b)
    e_rows = [] if tb.b_err is None else [nonzero(r) for r in
                                          [tb.b_err] + ([tb.b_err_low] if tb.b_err_low is not None else [])]
    last_is_y1 = solver.last_stage_is_y1
    n_shape = tuple(shape)
    combo = stage_sum

    def step(t: Tensor, y: Tensor, h: Tensor, k1: Tensor, rtol: Tensor, atol: Tensor):
        hy = h.to(y.dtype)
        ks = [k1.reshape(1, -1)]
        yi = y
        for i in range(1, s):
            yi = y + hy * combo(ks, a_rows[i]) if a_rows[i] else y
            ks.append(func(t + c[i] * h, yi.view(n_shape)).reshape(1, -1))
        k = torch.cat(ks)
        y1 = yi if last_is_y1 else y + hy * combo(ks, b_row)
        if not adaptive:
            return y1, k, torch.zeros((), dtype=rtol.dtype, device=rtol.device)
        err = torch.cat([combo(ks, r) for r in e_rows]) * hy
        m = error_dims or err.shape[1]
        root_m = math.sqrt(m)
        ratio = rms_ratio(err[:, None, :m], y[:, :m], y1[:, :m], rtol * root_m, atol * root_m).reshape(())
        return y1, k, ratio

    options = STEP_CPU_OPTIONS if device.type == "cpu" else None
    return torch.compile(own_code(step), options=options)


_BUILDS = [0]


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its compiled entries per code object: steps built
    from the same source for different methods or fields would share one list of entries, and every call
    would first check (and fail) the guards of the others."""
    _BUILDS[0] += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_BUILDS[0]}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compiled_advance(solver: ExplicitRungeKutta, func: Callable, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device, rtol, atol, error_dims: int | None, adaptive: bool,
                     t_dtype: torch.dtype) -> Callable | None:
    """A function ``advance(t, y, h, k1) -> (y1, k, ratio: float)`` running a compiled step, or None.

    ``rtol``/``atol`` may be floats or ``(1, n)`` tensors.
    """
    try:
        per_func = _CACHE.setdefault(func, {})
    except TypeError:  # not weak-referenceable: cache on nothing (compiles per solve)
        per_func = {}
    key = (solver.name, tuple(shape), dtype, device, error_dims, adaptive)
    fn = per_func.get(key)
    if fn is _FALLBACK:
        return None
    if fn is None:
        fn = per_func[key] = _build(solver, func, shape, dtype, device, error_dims, adaptive)
    rdt = t_dtype
    if isinstance(rtol, Tensor) or isinstance(atol, Tensor):
        rt = rtol if isinstance(rtol, Tensor) else torch.tensor(float(rtol), dtype=rdt, device=device)
        at = atol if isinstance(atol, Tensor) else torch.tensor(float(atol), dtype=rdt, device=device)
    else:  # float tolerances: their tensors cached with the compiled step (made once, not per solve)
        tol_key = ("tol", float(rtol), float(atol), rdt, device)
        pair = per_func.get(tol_key)
        if pair is None:
            with ordinary_tensors():  # kept for later solves, with or without autograd
                pair = per_func[tol_key] = (torch.tensor(float(rtol), dtype=rdt, device=device),
                                            torch.tensor(float(atol), dtype=rdt, device=device))
        rt, at = pair
    if isinstance(rt, Tensor) and rt.dim() == 2 and error_dims:
        rt = rt[:, :error_dims]
    if isinstance(at, Tensor) and at.dim() == 2 and error_dims:
        at = at[:, :error_dims]

    def advance(t: float, y: Tensor, h: float, k1: Tensor):
        tt = torch.scalar_tensor(t, dtype=t_dtype, device=device)
        hh = torch.scalar_tensor(h, dtype=t_dtype, device=device)
        # Integer attributes of modules (NFE counters, say) must not become guards: they change every call.
        if _ACTIVE[0]:
            y1, k, ratio = fn(tt, y, hh, k1, rt, at)
        else:
            with compiled_context():
                y1, k, ratio = fn(tt, y, hh, k1, rt, at)
        return y1, k, float(ratio.detach())

    return CompiledStep(advance, per_func, key)


class CompiledStep:
    """The plug-in the loop receives as ``LoopConfig.advance``: ``step(t, y, h, k1) -> (y1, k, ratio)``, or None
    once compilation has failed (after one warning; the loop then uses the stepper). ``context()`` holds the
    compiler settings for a whole solve."""

    __slots__ = ("_advance", "_per_func", "_key")
    context = compiled_context

    def __init__(self, advance: Callable, per_func: dict, key: tuple):
        self._advance, self._per_func, self._key = advance, per_func, key

    @property
    def usable(self) -> bool:
        """False once compilation has failed for its field (what :func:`compiled_advance` would then return None
        for)."""
        return self._per_func.get(self._key) is not _FALLBACK

    def choose(self, term, solver, y0: Tensor, k0: Tensor, times: list[float], stops: list[float], cfg,
               loop_available: bool) -> tuple[str, str]:
        """Which path this solve runs (``"loop"``, ``"step"`` or ``"eager"``) and why:
        :func:`neurodyn.compile.policy.choose` (measured once per field and problem)."""
        return policy.choose(term, solver, y0, k0, times, stops, cfg, loop_available)

    def cached_choice(self, term, solver, y0: Tensor, times: list[float], stops: list[float], cfg,
                      loop_available: bool) -> tuple[str, str] | tuple[None, None]:
        """:meth:`choose`'s answer where it needs no measurement, else ``(None, None)``
        (:func:`neurodyn.compile.policy.cached`)."""
        return policy.cached(term, solver, y0, times, stops, cfg, loop_available)

    def __call__(self, t: float, y: Tensor, h: float, k1: Tensor):
        try:
            return self._advance(t, y, h, k1)
        except Exception as exc:  # compilation failed: eager from now on, for this field
            self._per_func[self._key] = _FALLBACK
            warnings.warn(f"compile=True: torch.compile failed for this vector field ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); falling back to the eager stepper.",
                          RuntimeWarning, stacklevel=3)
            return None
