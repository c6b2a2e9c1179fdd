"""gradient="direct": autograd through every solver step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..core.config import LoopConfig
from ..core.loop import defers_start, integrate
from ..core.output import LoopResult, assemble
from ..core.stepper import Stepper, nextafter
from ..core.tensors import real_dtype
from ..core.term import ODETerm
from ..fields import check_derivative
from ..solution import Solution


def solve_direct(func: Callable, y0: Tensor, t: Tensor, solver: Stepper, cfg: LoopConfig,
                 on_failure: str, gopts: object = None) -> Solution:
    """gradient="direct": run the loop under autograd (memory grows with the steps)."""
    term, y0_flat, f0, times = start_direct(func, y0, t, cfg)
    res = integrate(term, solver, y0_flat, f0, times, cfg)
    return finish_direct(res, term, solver, cfg, y0, t, on_failure)


def start_direct(func: Callable, y0: Tensor, t: Tensor,
                 cfg: LoopConfig) -> tuple[ODETerm, Tensor, Tensor | Callable[[], Tensor], list[float]]:
    """The loop's inputs for a direct solve: the term (its NFE count at 1), ``y0`` as ``(1, n)``, dy/dt at the
    initial time (checked) and the output times as floats. Where the compiled whole loop may evaluate dy/dt at the
    initial time itself (:func:`neurodyn.core.loop.defers_start`), a function evaluating and checking it instead,
    which :func:`~neurodyn.core.loop.integrate` calls only if that loop does not run."""
    term = ODETerm(func, y0.shape, real_dtype(y0.dtype), y0.device)
    times = t.detach().tolist()  # (from any device)
    t0 = times[0]
    term.nfe = 1

    def first_derivative() -> Tensor:
        t0_tensor = torch.scalar_tensor(t0 if not cfg.perturb else nextafter(t0, times[-1] - t0, term.t_dtype),
                                        dtype=term.t_dtype, device=term.device)
        return check_derivative(func(t0_tensor, y0), y0)

    f0 = first_derivative if cfg.loop is not None and defers_start(cfg, y0) else first_derivative()
    return term, y0.reshape(1, -1), f0, times


def finish_direct(res: LoopResult, term: ODETerm, solver: Stepper, cfg: LoopConfig, y0: Tensor, t: Tensor,
                  on_failure: str) -> Solution:
    """The loop's result as the direct solve's :class:`Solution` (raising on failure if asked)."""
    sol = assemble(res, term, solver, cfg, y0, t, on_failure)
    sol.stats["gradient"] = "direct"
    return sol
