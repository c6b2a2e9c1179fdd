"""Dense output shared by every method: cubic Hermite and linear interpolation on one step.

Each formula is written once here; steppers without a continuous extension of their own, the per-sample
loop and the compiled loop all call these (the compiled loop inside its traced graph: the functions use
only tensor arithmetic, so they trace).
"""

from __future__ import annotations

from torch import Tensor


def hermite(th: Tensor, y0: Tensor, y1: Tensor, f0: Tensor, f1: Tensor, h: float | Tensor = 1.0) -> Tensor:
    """Cubic Hermite interpolant on ``(y0, f0)`` at the step start and ``(y1, f1)`` at its end.

    Parameters
    ----------
    th : Tensor, shape ``(m, 1)`` (or broadcastable against the state)
        Fractions of the step, in the state's dtype.
    y0, y1 : Tensor, shape ``(1, n)`` or ``(B, n)``
        The states at the step ends.
    f0, f1 : Tensor, broadcastable to ``y0``
        dy/dt at the step ends (multiplied by ``h`` already when ``h`` is left at 1).
    h : float or Tensor
        The step (scales the derivative weights).

    Returns
    -------
    Tensor, shape ``(m, n)`` (broadcast of ``th`` and ``y0``)

    Examples
    --------
    >>> import torch
    >>> y0, y1 = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    >>> f = torch.ones(1, 1, dtype=torch.float64)   # y = t on [0, 1]: reproduced exactly
    >>> hermite(torch.tensor([[0.25]], dtype=torch.float64), y0, y1, f, f).item()
    0.25
    """
    th2 = th * th
    th3 = th2 * th
    return ((2 * th3 - 3 * th2 + 1) * y0 + (3 * th2 - 2 * th3) * y1
            + ((th3 - 2 * th2 + th) * h) * f0 + ((th3 - th2) * h) * f1)


def linear(th: Tensor, y0: Tensor, y1: Tensor) -> Tensor:
    """Linear interpolation ``y0 + th (y1 - y0)``; shapes as :func:`hermite`."""
    return y0 + th * (y1 - y0)


def step_interpolant(interp: str, th: Tensor, y0: Tensor, y1: Tensor, f0: Tensor, f1_fn, h: float) -> Tensor:
    """``"linear"`` or cubic Hermite on one step; ``f1_fn()`` gives dy/dt at the step end (evaluated only for
    Hermite). What every stepper without its own continuous extension uses."""
    if interp == "linear":
        return linear(th, y0, y1)
    return hermite(th, y0, y1, f0, f1_fn(), h)
