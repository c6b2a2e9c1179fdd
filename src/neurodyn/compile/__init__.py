"""``compile=True``: the compiled step and the compiled whole loop, plug-ins the engine's loop receives."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from ..core.control import PIDController
from ..core.stepper import Stepper
from ..core.tensors import real_dtype
from .loop import compiled_loop, worthwhile
from .rows import CompiledRows, supports
from .step import compiled_advance
from .train import trainable


def plug_in(solver: Stepper, func: Callable, y0: Tensor, n_times: int, per_sample_steps: bool, *,
            rtol: float | Tensor, atol: float | Tensor, adaptive: bool, interp: str, controller: PIDController,
            first_step: float | None, norm: Callable | None) -> tuple[Callable | None, Callable | None]:
    """The compiled plug-ins a ``compile=True`` solve can use, ``(advance, loop)`` for
    :class:`~neurodyn.core.config.LoopConfig`: ``advance`` (a compiled step) and ``loop`` (the whole loop compiled,
    where it pays: :func:`neurodyn.compile.loop.worthwhile`); the keyword arguments are the solve's settings (as
    ``LoopConfig`` holds them). Whether a given solve runs them (no graph, events, dense output, jumps, ...) is decided
    when it starts (:func:`neurodyn.core.loop.integrate`). Returns ``(None, None)`` for per-sample steps (their
    plug-in is :func:`plug_in_rows`); warns and returns ``(None, None)`` where nothing is compiled: a custom
    ``norm``, a method without a compilable tableau."""
    why = None
    if per_sample_steps:
        return None, None
    if norm is not None:
        why = "a custom norm is evaluated in Python"
    elif not solver.compilable:
        return None, None  # implicit, multistep and symplectic methods run eagerly (documented in solve())
    if why is not None:
        # plug_in <- solve.prepare <- solve <- the caller
        warnings.warn(f"compile=True has no effect here: {why}; the solve runs eagerly.", RuntimeWarning, stacklevel=4)
        return None, None
    advance = compiled_advance(solver, func, tuple(y0.shape), y0.dtype, y0.device, rtol, atol, None, adaptive,
                               real_dtype(y0.dtype))
    loop = None
    if worthwhile(y0, n_times):
        loop = compiled_loop(solver, func, tuple(y0.shape), y0.dtype, y0.device, adaptive, interp, controller,
                             first_step is None)
        if loop is not None:  # also where a graph is recorded (compiled training steps)
            loop = trainable(loop, solver, func, tuple(y0.shape), interp, y0.device)
    return advance, loop


def plug_in_rows(solver: Stepper, func: Callable, y0: Tensor) -> CompiledRows | None:
    """The compiled per-sample attempt a ``compile=True, per_sample_steps=True`` solve can use
    (``LoopConfig.row_step``; :mod:`neurodyn.compile.rows`), or None with a warning where the method or the state's
    dtype is not supported (the solve then runs eager row steps)."""
    if not supports(solver, y0.dtype):
        warnings.warn(f"compile=True has no effect here: the per-sample row step of {solver.name!r} on a {y0.dtype} "
                      f"state is not compiled (explicit Runge-Kutta methods without extra dense-output stages, real "
                      f"float32/float64 states); the solve runs eager row steps.", RuntimeWarning, stacklevel=4)
        return None
    return CompiledRows(func, tuple(y0.shape))
