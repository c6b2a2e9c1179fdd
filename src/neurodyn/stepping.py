"""Manual stepping: :func:`init` a solve, then :func:`step` it one attempted step at a time.

The state drives the same loop as :func:`neurodyn.solve` (``core.loop.iterate``, paused after every attempted step):
the same stepper, error control, step-size controller, outputs and events, so stepping to the end gives bitwise the
solution ``solve`` returns with the same arguments.

    state = neurodyn.init(func, y0, t, method="tsit5", rtol=1e-6)
    while not state.done:
        state = neurodyn.step(state)
        print(state.t, state.h, state.accepted)
    sol = state.solution
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import solution as _sol
from .core.loop import iterate
from .core.stepper import Step
from .errors import InputError, InputTypeError
from .gradients.direct import finish_direct, start_direct
from .solution import Solution
from .solve import prepare

__all__ = ["SolveState", "init", "step"]

RUNNING = "running"
# solve's options that init does not take: the state is the loop itself (direct gradients, no observers).
_REFUSED = {
    "gradient": ("'direct'", "autograd through the steps you take; the other gradient methods need solve()"),
    "per_sample_steps": ("False", "each sample steps on its own grid there: use solve(..., per_sample_steps=True)"),
    "compile": ("False", "manual stepping runs eager steps: use solve(..., compile=True)"),
    "progress": ("False", "you drive the loop: report progress from your own loop"),
    "callback": ("None", "step() returns after every attempted step: act there"),
}


class SolveState:
    """A solve in progress, advanced by :func:`step` (or :meth:`step`); made by :func:`init`.

    Attributes
    ----------
    t : float
        Where the solve stands: the end of the last accepted step (after an event's jump, the event time), the
        initial time before any step; after the solve ends, ``solution.t_final``.
    y : Tensor, ``y0``'s shape
        The state at ``t``.
    h : float
        The last attempted step, signed (0.0 before the first).
    accepted : bool or None
        Whether the last attempt was accepted (None before the first).
    h_next : float or None
        The step size the controller proposes for the next attempt (None before the first step, for fixed-step
        methods the step size).
    steps, rejected : int
        Accepted and rejected attempts so far.
    nfe : int
        Vector-field evaluations so far (the initial derivative included).
    status : str
        ``"running"`` until the solve ends, then ``solution.status`` (``"success"``, ``"event"``, or a failure).
    done : bool
        Whether the solve has ended.
    solution : Solution or None
        Once done: the :class:`~neurodyn.Solution` that ``solve`` returns for the same arguments.
    """

    def __init__(self, plan: Any, cfg: Any):
        self._plan = plan
        self._cfg = cfg
        self._grad = torch.is_grad_enabled()
        with plan.context():
            self._term, y0_flat, f0, self._times = start_direct(plan.func, plan.y0, plan.t, cfg)
        self._run = iterate(self._term, plan.solver, y0_flat, f0, self._times, cfg)
        self._shape = plan.y0.shape
        self._y = y0_flat
        self._last: Step | None = None
        self._co = None
        self.t = float(self._times[0])
        self.h = 0.0
        self.accepted: bool | None = None
        self._h_next: float | None = None
        self.steps = 0
        self.rejected = 0
        self.status = RUNNING
        self.solution: Solution | None = None

    # ------------------------------------------------------------------ state
    @property
    def y(self) -> Tensor:
        """The state at :attr:`t`, in ``y0``'s shape."""
        return self._y.view(self._shape)

    @property
    def nfe(self) -> int:
        """Vector-field evaluations so far."""
        return self._term.nfe

    @property
    def done(self) -> bool:
        """Whether the solve has ended (:attr:`solution` is then set)."""
        return self.status != RUNNING

    @property
    def h_next(self) -> float | None:
        """The controller's proposal for the next attempt (see the class docstring)."""
        return self._h_next

    def __repr__(self) -> str:
        return (f"SolveState(t={self.t:.6g}, h={self.h:.3g}, steps={self.steps}, rejected={self.rejected}, "
                f"nfe={self.nfe}, status={self.status!r})")

    # ------------------------------------------------------------------ stepping
    def step(self) -> SolveState:
        """Make one attempt (accepted or rejected) and return this state, updated in place.

        The attempt that ends the solve (the final time reached, a terminal event, a failure) also makes
        :attr:`solution`; with ``on_failure="raise"`` (the default) a failure raises the exception ``solve``
        raises (``err.solution`` holds the partial solution; the state is done).

        Raises
        ------
        InputError
            When the solve has already ended.
        """
        if self.done:
            raise InputError(f"the solve has ended (status {self.status!r} at t={self.t:.6g}): state.solution holds "
                             f"the result; init() a new state to solve again.")
        with torch.set_grad_enabled(self._grad), self._plan.context():
            try:
                attempt = next(self._run)  # (t, y, h, accepted) of this attempt
                self.h, self.accepted = attempt[2], attempt[3]
                if self.accepted:
                    self.steps += 1
                else:
                    self.rejected += 1
                # after its outputs, events and step-size control
                self.t, self._y, self._last, h_abs = next(self._run)
                self._h_next = h_abs if 0 < h_abs < math.inf else None
            except StopIteration as end:
                self._finish(end.value)
        return self

    def __iter__(self) -> Iterator[SolveState]:
        """Step to the end, yielding this state after every attempt: ``for s in neurodyn.init(...): ...``."""
        while not self.done:
            yield self.step()

    def evaluate(self, t: float | Tensor) -> Tensor:
        """The method's dense output inside the last accepted step, between its start and :attr:`t`.

        Parameters
        ----------
        t : float or Tensor of shape ``(k,)``
            Times in the last accepted step.

        Returns
        -------
        Tensor, shape ``y0.shape`` for a float, ``(k, *y0.shape)`` for a tensor.

        Raises
        ------
        InputError
            Before any accepted step, after the solve ended (use ``solution``, with ``dense=True`` for
            :meth:`Solution.evaluate`), or for a time outside the last step.
        """
        st = self._last
        if st is None or self.done:
            when = "after the solve ended (use state.solution)" if self.done else "before an accepted step"
            raise InputError(f"SolveState.evaluate interpolates inside the last accepted step: not available {when}.")
        scalar = not isinstance(t, Tensor)
        ts = [float(t)] if scalar else t.detach().reshape(-1).cpu().tolist()
        lo, hi = sorted((st.t0, self.t))
        if any(not lo <= x <= hi for x in ts):
            raise InputError(f"SolveState.evaluate: times must lie in the last accepted step [{lo:.6g}, {hi:.6g}]; got "
                             f"{ts if len(ts) < 6 else (min(ts), max(ts))}.")
        solver = self._plan.solver
        if self._co is None:
            self._co = solver.coefficients(self._y.dtype, self._y.device)
        with torch.set_grad_enabled(self._grad), self._plan.context():
            rows = solver.interpolate_floats(self._term, st, [(x - st.t0) / st.h for x in ts], self._co,
                                             self._cfg.interp)
        return rows.view(self._shape) if scalar else rows.view(len(ts), *self._shape)

    # ------------------------------------------------------------------ internals
    def _finish(self, res: Any) -> None:
        plan = self._plan
        sol = finish_direct(res, self._term, plan.solver, self._cfg, plan.y0, plan.t, "return")
        self.solution = sol
        self.status = sol.status
        self.t = sol.t_final
        if sol.y_final is not None:
            self._y = sol.y_final.reshape(1, -1)
        self._last = None
        if sol.status in _sol.FAILURE_STATUSES and plan.on_failure == "raise":
            raise _sol.failure(sol.status, sol.message, sol.t_final, sol)


_OPTIONS = [p for p in inspect.signature(prepare).parameters if p not in ("func", "y0", "t", "on_attempt")]


def init(func: Callable[[Tensor, Tensor], Tensor] | Any, y0: Tensor, t: Tensor, **options: Any) -> SolveState:
    """Start a solve to step by hand: the arguments of :func:`neurodyn.solve`, checked as it checks them.

    Parameters
    ----------
    func, y0, t :
        As for :func:`neurodyn.solve` (``t``: the output times, ``(T,)`` with ``T >= 2``; the solve runs from
        ``t[0]`` to ``t[-1]``; ``state.solution.ys`` holds the outputs at ``t``).
    **options :
        ``solve``'s keyword options (``method``, ``rtol``, ``atol``, ``step_size``, ``first_step``, ``max_steps``,
        ``events``, ``dense``, ``on_failure``, ``solver_options``, ...), except ``gradient`` (always ``"direct"``:
        autograd through the steps taken, when grad mode is on at ``init``), ``per_sample_steps``, ``compile``,
        ``progress`` and ``callback``.

    Returns
    -------
    SolveState
        At ``t[0]``, no step taken; advance it with :func:`step`. Each step runs in the grad mode of the call to
        ``init``. States are independent of each other, but a stepper instance passed as ``method`` is shared.

    Raises
    ------
    InputError
        Bad input, before any work (:class:`~neurodyn.errors.InputTypeError` for an unknown option).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = lambda t, y: -y
    >>> y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> state = neurodyn.init(f, y0, t, method="tsit5", rtol=1e-8, atol=1e-10)
    >>> while not state.done:
    ...     state = neurodyn.step(state)
    >>> sol = neurodyn.solve(f, y0, t, method="tsit5", rtol=1e-8, atol=1e-10)
    >>> bool(torch.equal(state.y, sol.ys[-1])), state.steps == sol.stats["steps"], state.status
    (True, True, 'success')
    """
    unknown = sorted(set(options) - set(_OPTIONS) - set(_REFUSED))
    if unknown:
        raise InputTypeError(f"init() got unknown option(s) {', '.join(unknown)}; it takes neurodyn.solve's options: "
                             f"{', '.join(_OPTIONS)}.")
    for name, (allowed, why) in _REFUSED.items():
        if name in options and options[name] not in (None, False) and repr(options[name]) != allowed:
            raise InputError(f"init(): {name}={options[name]!r} is not available with manual stepping ({name} "
                             f"must be {allowed}): {why}.")
        options.pop(name, None)
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise InputError("init(): manual stepping gives gradients with respect to y0 and parameters, not the output "
                         "times t: pass t.detach() (solve() differentiates the times).")
    plan = prepare(func, y0, t, **options)
    return SolveState(plan, replace(plan.cfg, pause=True))


def step(state: SolveState) -> SolveState:
    """Make one attempted step (accepted or rejected) of ``state`` and return it (updated in place).

    Parameters
    ----------
    state : SolveState
        From :func:`init`.

    Returns
    -------
    SolveState
        The same object: ``t``, ``y`` where the solve stands, ``h`` the step tried, ``accepted``, ``status``
        (``"running"`` until the solve ends; then ``state.solution``).

    Raises
    ------
    InputError
        When ``state`` has ended; an :class:`~neurodyn.errors.InputTypeError` when it is not a state.
    SolveFailure
        The attempt ended the solve with a failure and ``on_failure="raise"`` (``err.solution``).

    Examples
    --------
    >>> import torch, neurodyn
    >>> state = neurodyn.init(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk4",
    ...                       step_size=0.25)
    >>> [round(neurodyn.step(state).t, 2) for _ in range(4)], state.status
    ([0.25, 0.5, 0.75, 1.0], 'success')
    """
    if not isinstance(state, SolveState):
        raise InputTypeError(f"step() takes the SolveState that neurodyn.init() returns, got {type(state).__name__}.")
    return state.step()
