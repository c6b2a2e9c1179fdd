"""``compile=True``: the compiled step and the compiled whole loop, plug-ins the engine's loop receives."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

from torch import Tensor

from ..core.config import LoopConfig
from ..core.stepper import Stepper
from ..core.tensors import real_dtype


def plug_in(cfg: LoopConfig, solver: Stepper, func: Callable, y0: Tensor, n_times: int,
            per_sample_steps: bool) -> LoopConfig:
    """``cfg`` with the compiled plug-ins a ``compile=True`` solve can use: ``advance`` (a compiled step) and
    ``loop`` (the whole loop compiled, where it pays: :func:`neurodyn.compile.loop.worthwhile`). Whether a given
    solve runs them (no graph, events, dense output, jumps, ...) is decided when it starts
    (:func:`neurodyn.core.loop.integrate`). Warns and returns ``cfg`` unchanged where nothing is compiled:
    per-sample steps, a custom ``norm``, a method without a compilable tableau."""
    why = None
    if per_sample_steps:
        why = "per_sample_steps=True steps every row in Python (its row step is not compiled)"
    elif cfg.norm is not None:
        why = "a custom norm is evaluated in Python"
    elif not solver.compilable:
        return cfg  # implicit, multistep and symplectic methods run eagerly (documented in solve())
    if why is not None:
        # plug_in <- solve.prepare <- solve <- the caller
        warnings.warn(f"compile=True has no effect here: {why}; the solve runs eagerly.", RuntimeWarning, stacklevel=4)
        return cfg
    from .loop import compiled_loop, worthwhile
    from .step import compiled_advance

    advance = compiled_advance(solver, func, tuple(y0.shape), y0.dtype, y0.device, cfg.rtol, cfg.atol, None,
                               cfg.adaptive, real_dtype(y0.dtype))
    loop = None
    if worthwhile(y0, n_times):
        loop = compiled_loop(solver, func, tuple(y0.shape), y0.dtype, y0.device, cfg.adaptive, cfg.interp,
                             cfg.controller, cfg.first_step is None)
    return replace(cfg, advance=advance, loop=loop)
