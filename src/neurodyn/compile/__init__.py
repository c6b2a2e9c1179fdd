"""``compile=True``: the compiled step and the compiled whole loop, plug-ins the engine's loop receives."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

from torch import Tensor, is_grad_enabled

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
        if solver.driven and not adaptive:  # fixed steps driven by host-queried inputs (SDE methods)
            from .driven import plug_in as driven_plug_in
            return driven_plug_in(solver, func, y0)
        return None, None  # implicit, multistep and symplectic methods run eagerly (documented in solve())
    if why is not None:
        # plug_in <- solve.prepare <- solve <- the caller
        warnings.warn(f"compile=True has no effect here: {why}; the solve runs eagerly.", RuntimeWarning, stacklevel=4)
        return None, None
    key = _plug_in_key(solver, y0, n_times, rtol, atol, adaptive, interp, controller, first_step)
    per_func = None
    if key is not None:
        try:
            per_func = _PLUGGED.get(func)
        except TypeError:  # not weak-referenceable: built every solve
            key = None
    if per_func is not None:
        hit = per_func.get(key)
        if hit is not None and hit[0] is solver and hit[1] is not None and hit[1].usable:
            return hit[1], hit[2]
    advance = compiled_advance(solver, func, tuple(y0.shape), y0.dtype, y0.device, rtol, atol, None, adaptive,
                               real_dtype(y0.dtype))
    loop = None
    if worthwhile(y0, n_times):
        loop = compiled_loop(solver, func, tuple(y0.shape), y0.dtype, y0.device, adaptive, interp, controller,
                             first_step is None)
        if loop is not None:  # also where a graph is recorded (compiled training steps)
            loop = trainable(loop, solver, func, tuple(y0.shape), interp, y0.device)
    if key is not None and advance is not None:
        if per_func is None:
            per_func = _PLUGGED.setdefault(func, {})
        if len(per_func) >= _PLUGGED_MAX:
            per_func.clear()
        per_func[key] = (solver, advance, loop)
    return advance, loop


# The plug-ins of recent solves per vector field (weakly keyed): building them again (closures, cache look-ups,
# tolerance tensors) costs a few microseconds a solve, a share of a small compiled solve. Reused only for the same
# stepper, layout, number of output times, float tolerances and controller settings, and while the compiled step has
# not failed (the compiled loop checks its own failures at every call).
_PLUGGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLUGGED_MAX = 32


def _plug_in_key(solver: Stepper, y0: Tensor, n_times: int, rtol: float | Tensor, atol: float | Tensor,
                 adaptive: bool, interp: str, controller: PIDController, first_step: float | None) -> tuple | None:
    """What :func:`plug_in`'s result depends on besides the field, or None where it is not reused (tensor
    tolerances, a controller other than a plain :class:`PIDController`)."""
    if isinstance(rtol, Tensor) or isinstance(atol, Tensor) or type(controller) is not PIDController:
        return None
    c = controller
    return (id(solver), tuple(y0.shape), y0.dtype, y0.device, n_times, is_grad_enabled(), float(rtol), float(atol),
            adaptive, interp, first_step is None, c.pcoeff, c.icoeff, c.dcoeff, c.safety, c.ifactor, c.dfactor,
            c.accept_dfactor)


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
