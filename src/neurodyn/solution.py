"""The result of a solve: outputs, dense solution, statistics and status."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, MaxStepsReached, NonFiniteError, SolveFailure, StepSizeUnderflow, ZenoError

# The one status table. A status is a string everywhere a user sees it; inside tensors (per-sample rows, the
# compiled loop) it is its index in STATUSES. FAILURE_STATUSES map to the exception raised for them.
SUCCESS = "success"
MAX_STEPS_REACHED = "max_steps_reached"
STEP_SIZE_UNDERFLOW = "step_size_underflow"
NON_FINITE = "non_finite"
EVENT = "event"
ZENO = "zeno"  # events accumulating: more than max_events, or two closer than min_event_gap in time
STATUSES = (SUCCESS, MAX_STEPS_REACHED, STEP_SIZE_UNDERFLOW, NON_FINITE, EVENT, ZENO)
CODE = {s: i for i, s in enumerate(STATUSES)}
FAILURE_STATUSES = (MAX_STEPS_REACHED, STEP_SIZE_UNDERFLOW, NON_FINITE, ZENO)
_ERRORS: dict[str, type[SolveFailure]] = {MAX_STEPS_REACHED: MaxStepsReached, STEP_SIZE_UNDERFLOW: StepSizeUnderflow,
                                          NON_FINITE: NonFiniteError, ZENO: ZenoError}


def failure(status: str, message: str, t: float, solution: Solution) -> SolveFailure:
    """The exception of a failed ``status`` (one of ``FAILURE_STATUSES``), holding the partial ``solution``."""
    return _ERRORS[status](message + " (pass on_failure='return' to get the partial solution)", status=status, t=t,
                           solution=solution)


def check_differentiable(sol: Solution) -> None:
    """Raise :class:`SolveFailure` when a backward pass is asked of a failed solve."""
    if sol.status in FAILURE_STATUSES:
        raise SolveFailure(f"cannot differentiate a failed solve (status {sol.status}, stopped at t={sol.t_final:.6g}:"
                           f" {sol.message}): fix the forward solve first.", status=sol.status, t=sol.t_final,
                           solution=sol)


@dataclass
class Events:
    """The event occurrences of a solve, in time order (``sol.events``).

    Attributes
    ----------
    t : Tensor, shape ``(E,)``
        The event times (differentiable: implicit function theorem).
    y : Tensor, shape ``(E, *y0.shape)``
        The states at the events, before any jump (differentiable).
    index : Tensor, shape ``(E,)``, long
        Which event (its position in ``events=[...]``) occurred.
    sample : Tensor, shape ``(E,)``, long, or None
        With ``per_sample_steps=True``: the sample (row of ``y0``) each occurrence belongs to (``y`` then holds
        that row's state, shape ``(E, *y0.shape[1:])``).

    Examples
    --------
    >>> import torch, neurodyn
    >>> osc = lambda t, y: torch.stack([y[1], -y[0]])
    >>> sol = neurodyn.solve(osc, torch.tensor([0.0, 1.0], dtype=torch.float64),
    ...                      torch.tensor([0.0, 7.0], dtype=torch.float64),
    ...                      events=[neurodyn.Event(lambda t, y: y[0], terminal=False)], rtol=1e-10, atol=1e-12)
    >>> [round(v, 6) for v in sol.events.t.tolist()], sol.events.index.tolist()   # sin t = 0: pi, 2 pi
    ([3.141593, 6.283185], [0, 0])
    """

    t: Tensor
    y: Tensor
    index: Tensor
    sample: Tensor | None = None

    def __len__(self) -> int:
        return int(self.t.shape[0])


def _detached(value: Any, memo: dict) -> Any:
    """``copy.deepcopy`` of ``value`` with every tensor in it (in dicts, lists, tuples, dataclasses) detached."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v, memo) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_detached(v, memo) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _detached(getattr(value, f.name), memo)
                                             for f in dataclasses.fields(value) if f.init})
    return copy.deepcopy(value, memo)


@dataclass
class Solution:
    """What :func:`neurodyn.solve` returns.

    Attributes
    ----------
    ts : Tensor, shape ``(T,)``
        The requested output times.
    ys : Tensor, shape ``(T, *y0.shape)``
        The solution at ``ts``. After a failure (``on_failure="return"``) or an event, rows past
        ``t_final`` are NaN; ``n_valid`` rows are filled.
    stats : dict
        ``nfe`` (vector-field calls), ``steps`` (accepted), ``rejected``, ``initial_step``, ``last_step``
        and, for adaptive methods, nothing else you need to know.
    status : str
        ``"success"``, ``"event"`` (a terminal event or an ``event_fn`` root stopped the solve),
        ``"max_steps_reached"``, ``"step_size_underflow"``, ``"non_finite"`` or ``"zeno"`` (events accumulated:
        more than ``max_events``, or two closer than ``min_event_gap``; ``t_final`` is the refused event's time).
    message : str
        A human-readable account of the status.
    t_final : float
        The time reached: the final time on success, the event time, or the last accepted time.
    y_final : Tensor, shape ``y0.shape``
        The state at ``t_final``.
    event_t : Tensor or None
        The event time (0-dim, differentiable) when a terminal event or ``event_fn`` stopped the solve.
    events : Events or None
        With ``events=[...]``: every occurrence (:class:`Events`: ``.t``, ``.y``, ``.index``).
    sample_status, t_final_per_sample :
        With ``per_sample_steps=True``: each sample's status and time reached (``status`` is then the
        first failure, or ``"success"``).

    Examples
    --------
    >>> import torch, neurodyn
    >>> sol = neurodyn.solve(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3), dense=True)
    >>> sol.ys.shape, sol.status
    (torch.Size([3, 2]), 'success')
    >>> sol.evaluate(torch.tensor([0.25])).shape
    torch.Size([1, 2])
    """

    ts: Tensor
    ys: Tensor
    stats: dict[str, Any]
    status: str = SUCCESS
    message: str = ""
    t_final: float = float("nan")
    y_final: Tensor | None = None
    n_valid: int = 0
    event_t: Tensor | None = None
    events: Events | None = None
    sample_status: list[str] | None = None
    t_final_per_sample: Tensor | None = None
    _dense: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    _dense_span: tuple[float, float] | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict) -> Solution:
        """A copy whose tensors are detached copies (torch cannot deep-copy a tensor inside an autograd graph), so
        that ``copy.deepcopy`` of a model that keeps its last solution (``NeuralODE.last_solution``) works after a
        forward pass with gradients. The dense solution is shared, not copied."""
        kept = {"_dense", "_dense_span"}
        return dataclasses.replace(self, **{f.name: _detached(getattr(self, f.name), memo)
                                            for f in dataclasses.fields(self) if f.name not in kept})

    @property
    def success(self) -> bool:
        """True when the solve reached the final time (or stopped at a requested event)."""
        return self.status in (SUCCESS, EVENT)

    def evaluate(self, t: Tensor | float) -> Tensor:
        """The dense solution at arbitrary times inside the solved span.

        Parameters
        ----------
        t : Tensor of any shape, or float
            Times within ``[ts[0], t_final]`` (either order of integration).

        Returns
        -------
        Tensor, shape ``(*t.shape, *y0.shape)``
            Each method's own continuous extension (4th order for dopri5/tsit5, 7th for dopri8,
            cubic Hermite otherwise).

        Raises
        ------
        InputError
            If the solve was not run with ``dense=True`` or a time lies outside the solved span.
        """
        if self._dense is None:
            raise InputError(
                "Solution.evaluate needs the dense solution: call solve(..., dense=True)."
            )
        tt = torch.as_tensor(t, dtype=self.ts.dtype, device=self.ts.device)
        lo, hi = self._dense_span
        lo, hi = min(lo, hi), max(lo, hi)
        if tt.numel() and not bool(((tt >= lo) & (tt <= hi)).all()):
            raise InputError(
                f"Solution.evaluate: times must lie in the solved span [{lo}, {hi}]; "
                f"got values in [{float(tt.min())}, {float(tt.max())}]."
            )
        return self._dense(tt)
