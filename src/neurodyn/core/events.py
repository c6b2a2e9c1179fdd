"""Events (:class:`Event`): locating the zero crossings of event functions along the accepted steps, counting
them, stopping, jumping, and the differentiable event times and states.

How a root is found
-------------------
1. Every event function is evaluated at ``(t0, y0)`` (and its return type checked) before the first step.
2. After every accepted step, the functions are evaluated at the step end (the value at the step start is the
   previous step's end value, kept). At the step ends alone (``Event(samples=0)``, as scipy's ``solve_ivp``), a
   component that crosses zero an even number of times inside one step (a tangency, a double root, or two roots
   closer together than a step) would not be seen. So every :class:`Event` is also checked at ``samples``
   (default 3) evenly spaced interior points of every step, on the step's dense output where that needs no field
   evaluation (``dopri5``, ``tsit5``, ``bdf``, ``adams``, collocation methods), else on its cubic Hermite
   interpolant (whose end derivative is the next step's first stage); two roots further apart than
   ``1 / (samples + 1)`` of a step are then both seen. An event function that takes a leading dimension of points
   (``Event(vectorized=...)``) is evaluated at all of a step's points in one call. A step where a sign
   changes at an interior point is checked again on the dense output the solve uses (``interp``: the method's own
   by default).
3. In every sub-interval where a component leaves its sign (in its event's ``direction``), the root is bracketed
   and shrunk on the dense output to :data:`ROOT_RTOL` relative in time (or the resolution of ``t``, if coarser):
   inverse polynomial interpolation through the latest values (superlinear on a smooth ``g``), kept inside the
   bracket and a quarter of the resolution off its ends (so that a converged estimate closes the bracket), with a
   bisection whenever the bracket fails to halve in two evaluations (so it reaches the resolution whatever ``g``
   is). The occurrences are handled in time order: each is recorded; the one that makes its event terminal (its
   ``n``-th), has a jump, or breaks a Zeno limit (``max_events``, ``min_event_gap``) ends the step there.
4. Occurrences that change nothing in the solve (no jump, not terminal, no Zeno limit reached, no
   ``min_event_gap``), of event functions that take stacked points, found where no graph is recorded, are counted
   in the loop and located after it, all together (:meth:`EventWatch.finish`): each round of probes
   (:func:`_rounds`: around the zero of the polynomial through the step's sample values, then of the inverse
   interpolant through the probes around the bracket; two rounds on a smooth ``g``) is one dense-output evaluation
   across the steps and one call of the event function, to the same :data:`ROOT_RTOL` brackets.
5. Where every occurrence of a solve can only need recording (no event with a jump or a terminal count, no
   ``min_event_gap``; stacked event functions, no graph, such a stepper and state), the sign checks of step 2 wait
   too: the loop keeps each accepted step's start and stages (:meth:`EventWatch._keep`, one copy) and the kept
   steps are checked together (:meth:`EventWatch._detect_kept`: the dense output at every step's sample fractions
   in one product, each event function in one call over all the points), at the end of the solve, when
   :data:`_KEEP_STEPS` steps or :data:`_KEEP_NUMEL` elements are kept, and before a step whose crossings could
   reach ``max_events``. Their crossings then go to step 4 in step order, as if found in the loop.

The reported point is the end of the final bracket on the far side of the crossing (or an exact zero): it is a
true sign change of ``g``, so a continuous ``g`` is ~0 there, and a discontinuous ``g`` (a jump, a sign-type
function, a pole) gets its crossing time.

A component that is exactly zero at ``t0`` is watched from its first nonzero value on (``solve`` does not stop
at its initial time; :func:`neurodyn.odeint_event` does, as torchdiffeq). After a jump, the component that fired,
if the jump left it at the surface it crossed, is watched from its value a moment (``sqrt(eps) |h|``) later along
the new trajectory: a bouncing ball leaving the floor is not a new crossing.

Gradients
---------
With ``g(t*, y(t*)) = 0`` the event time's gradient is ``dt*/dtheta = -(dg/dtheta) / (dg/dt)`` (implicit function
theorem, :func:`implicit_event`); the state after a jump, ``jump(t*, y(t*))``, continues from a moving time
(:func:`jump_state`), which gives the saltation matrix's gradient. Both are built in the autograd graph of the
step they fall in, so ``gradient="direct"`` and the replays of ``"checkpoint"`` differentiate them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .config import LoopConfig
from .stepper import Step, Stepper
from .tensors import ordinary_tensors
from .term import ODETerm

# Up to this many event components, the per-step sign logic runs on Python floats (fewer small tensor ops).
_FEW = 8
# Roots are located to this relative accuracy in time (the bracket's width), or to the resolution of t if coarser.
ROOT_RTOL = 1e-12
# Bracket iterations are bounded by the bisections needed to reach the resolution of t (about 2 x 53).
_MAX_ITERATIONS = 400
# A round of stacked probes (:func:`_rounds`): _FINE evenly spaced points on each side of the estimate, and
# _COARSE evenly spaced points of the bracket after a round that did not shrink it enough.
_FINE = 4
_COARSE = 5
_FINE_STEPS = tuple(range(-_FINE, _FINE + 1))
_COARSE_FRACTIONS = tuple((k + 1) / (_COARSE + 1) for k in range(_COARSE))
# Whether a root located in the loop (a terminal event's, one with a jump, or any where a graph is recorded) of an
# event function that takes many points at once is found by rounds of stacked probes (:func:`_crossing_many`, two
# calls on a smooth function) rather than one point per call (:func:`_crossing`, about five). None: on accelerators
# only, where every call on one point costs a host synchronisation; on the CPU the one-point calls measured faster
# (benchmarks/README.md, event handling cost). (Roots that only need recording are located after the solve, all
# together: EventWatch.finish.)
STACKED_ROOTS: bool | None = None
# Roots that only need recording are located after the solve, all together (EventWatch.finish), for states of at
# most this many elements; beyond it every root's probes carry large dense-output states and locating them in the
# loop one point per call measured faster (benchmarks/README.md, event handling cost: 16k elements).
_DEFER_NUMEL = 4096
# Steps whose sign checks wait (EventWatch._keep) are checked together once this many are kept, or once their
# starts and stages hold this many elements.
_KEEP_STEPS = 4096
_KEEP_NUMEL = 1 << 21
# The sample fractions as tensors, one per (fractions, device) for all solves (EventWatch._fractions).
_FRACTIONS: dict[tuple, Tensor] = {}
# Up to this many values (kept steps x points x components), their signs are compared on the host.
_HOST_SCAN = 4096
# Buffers of kept steps (EventWatch._keep) given back at the end of a solve for the next one with the same layout
# (stages + 1, state size, dtype, device, inference mode), with their rows; up to this many elements each, and
# (cleared beyond) 16 layouts.
_KEPT_POOL: dict[tuple, tuple[Tensor, tuple[Tensor, ...]]] = {}
_KEPT_POOL_NUMEL = 1 << 16


def event_values(event_fn: Callable, t: Tensor, y: Tensor, n: int | None = None, check_nan: bool = True) -> Tensor:
    """``event_fn(t, y)`` checked and flattened: a real tensor of ``n`` finite-or-infinite values, shape ``(n,)``.

    Parameters
    ----------
    event_fn : callable ``(t, y) -> Tensor``
    t : Tensor, 0-dim
        The time.
    y : Tensor
        The state in the user's shape.
    n : int, optional
        The number of event components seen at the initial time (None: this is the initial evaluation).
    check_nan : bool
        Raise on NaN values (one host synchronisation; a caller checking many values at once passes False).

    Returns
    -------
    Tensor, shape ``(n,)`` (the components, in the graph if ``event_fn`` built one)

    Raises
    ------
    InputError
        ``event_fn`` returned something other than a real tensor (a Python number, None, a bool or complex
        tensor), an empty tensor, a different number of components than at the initial time, or NaN.

    Examples
    --------
    >>> import torch
    >>> event_values(lambda t, y: y[0] - 0.5, torch.tensor(0.0), torch.tensor([1.0, 2.0]))
    tensor([0.5000])
    """
    v = event_fn(t, y)
    if not isinstance(v, Tensor):
        raise InputError(f"event_fn must return a tensor (one value per event component), got "
                         f"{type(v).__name__} at {_at(t)}: return a tensor built from y, e.g. `y[0] - 1.0`, not a "
                         f"Python number or None (a number carries no gradient for the event time).")
    if v.dtype == torch.bool or v.is_complex() or not (v.is_floating_point() or v.dtype.is_signed):
        raise InputError(f"event_fn must return a real tensor whose sign changes at the event, got dtype {v.dtype} "
                         f"at {_at(t)}: return e.g. `y[0] - 1.0` rather than a comparison.")
    if v.numel() == 0:
        raise InputError(f"event_fn returned an empty tensor at {_at(t)}: return at least one event value.")
    if n is not None and v.numel() != n:
        raise InputError(f"event_fn returned {v.numel()} values at {_at(t)} but {n} at the initial time: it must "
                         f"return the same number of event components at every time.")
    flat = v.reshape(-1)
    if check_nan and bool(torch.isnan(flat.detach()).any()):
        _nan_error(t, flat, initial=n is None)
    return flat


def _at(t: Tensor | float) -> str:
    return f"t={float(t):.6g}"


def _nan_error(t: Tensor | float, values: Tensor, initial: bool = False) -> None:
    where = "at the initial time " if initial else ""
    raise InputError(f"event_fn returned NaN {where}at {_at(t)} (values {values.detach().tolist()[:4]}): an event "
                     f"function must be a number everywhere along the solution; check it (e.g. a sqrt or log of a "
                     f"negative, 0/0).")


class Event:
    """An event: a function whose zero crossings along the solution are located, counted and acted on.

    Parameters
    ----------
    fn : callable ``(t, y) -> Tensor``
        ``t`` a 0-dim tensor, ``y`` the state in ``y0``'s shape. Returns a real tensor (any shape, the same number
        of components at every time; one component is the usual case); a sign change of any component is an
        occurrence of this event.
    direction : ``0``, ``+1`` or ``-1``
        Which crossings count, along the direction of integration: ``+1`` from negative to positive, ``-1`` from
        positive to negative, ``0`` both.
    terminal : bool or int
        ``True``: the solve stops at the first occurrence (status ``"event"``); ``False``: never; an int ``n >= 1``:
        at the ``n``-th occurrence.
    jump : callable ``(t, y) -> Tensor``, optional
        A jump map applied at every occurrence that does not stop the solve: the state ``y`` (``y0``'s shape) just
        before the event becomes ``jump(t, y)`` (same shape and dtype); the solve continues from there with the
        derivative evaluated afresh (no first-same-as-last reuse, multistep history restarted). The time and
        the state at the event enter ``jump`` with their gradients (implicit function theorem), so post-jump
        states are differentiable with respect to ``y0``, the field's parameters and ``jump``'s own tensors.
    samples : int
        Interior points of every step where ``fn`` is checked besides the step end (evenly spaced; default 3): two
        roots further apart than ``1 / (samples + 1)`` of a step are both seen, at the cost of ``samples`` more
        calls of every event's function per step (no field evaluation). ``samples=0`` checks the step ends only,
        as scipy's ``solve_ivp``: the cheapest, but a component that crosses zero twice inside one step (a
        tangency or double root, two roots closer together than a step) is then missed. (A ``max_step`` on the
        solve is the other way to see close roots.)
    vectorized : bool or None
        Whether ``fn`` takes a leading dimension of points: ``fn(t, y)`` with ``t`` of shape ``(m,)`` and ``y`` of
        shape ``(m, *y0.shape)`` returning ``(m, ...)`` (row ``i`` the value at ``(t[i], y[i])``), so that a step's
        sample points cost one call, the roots that only need recording are located after the solve, all together
        (see :class:`EventWatch`), and, on an accelerator, each round of a root's probes is one call (see
        ``neurodyn.core.events.STACKED_ROOTS``). ``None`` (default): found out on the first step with
        several points (one stacked call compared with the calls point by point; any error, a different shape or
        different values mean no), once per state shape and dtype (the event remembers it); ``True``: assumed;
        ``False``: never (one call per point).

    Raises
    ------
    InputError
        ``fn`` or ``jump`` not callable, ``direction`` not one of 0, 1, -1, ``terminal`` not a bool or an int >= 1,
        ``samples`` not an int >= 0, ``vectorized`` not None or a bool.

    Examples
    --------
    A ball dropped from height 1 (``y = (height, velocity)``, gravity 9.81) bouncing with restitution 0.9:

    >>> import torch, neurodyn
    >>> f = lambda t, y: torch.stack([y[1], torch.full_like(y[1], -9.81)])
    >>> bounce = neurodyn.Event(lambda t, y: y[0], direction=-1, terminal=False,
    ...                         jump=lambda t, y: torch.stack([y[0], -0.9 * y[1]]))
    >>> sol = neurodyn.solve(f, torch.tensor([1.0, 0.0], dtype=torch.float64),
    ...                      torch.tensor([0.0, 1.5], dtype=torch.float64), events=[bounce], rtol=1e-10, atol=1e-12)
    >>> sol.events.t.shape, round(float(sol.events.t[0]), 6)   # t_1 = sqrt(2 / 9.81)
    (torch.Size([2]), 0.451524)
    """

    __slots__ = ("fn", "direction", "terminal", "jump", "samples", "vectorized", "found")

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], direction: int = 0, terminal: bool | int = True,
                 jump: Callable[[Tensor, Tensor], Tensor] | None = None, samples: int = 3,
                 vectorized: bool | None = None):
        if not callable(fn):
            raise InputError(f"Event: fn must be callable as fn(t, y) returning a tensor, got {type(fn).__name__}.")
        if isinstance(direction, bool) or direction not in (0, 1, -1):
            raise InputError(f"Event: direction must be 0 (both), +1 (negative to positive) or -1 (positive to "
                             f"negative), got {direction!r}.")
        if not (isinstance(terminal, bool) or (isinstance(terminal, int) and terminal >= 1)):
            raise InputError(f"Event: terminal must be True, False or an int n >= 1 (stop at the n-th occurrence), "
                             f"got {terminal!r}.")
        if jump is not None and not callable(jump):
            raise InputError(f"Event: jump must be callable as jump(t, y) returning the new state, got "
                             f"{type(jump).__name__}.")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise InputError(f"Event: samples must be an int >= 0 (interior points checked per step besides the step "
                             f"end), got {samples!r}.")
        self.fn, self.direction, self.terminal, self.jump = fn, int(direction), terminal, jump
        if vectorized is not None and not isinstance(vectorized, bool):
            raise InputError(f"Event: vectorized must be None (find out), True or False, got {vectorized!r}.")
        self.samples = samples
        self.vectorized = vectorized
        # vectorized=None: what the solves found out, by (state shape, dtype, device type)
        self.found: dict[tuple, bool] = {}

    @property
    def stop_after(self) -> int | None:
        """The occurrence that stops the solve (None: none does)."""
        if self.terminal is True:
            return 1
        if self.terminal is False:
            return None
        return int(self.terminal)

    def __repr__(self) -> str:
        return (f"Event(fn={getattr(self.fn, '__name__', type(self.fn).__name__)}, direction={self.direction}, "
                f"terminal={self.terminal}, jump={None if self.jump is None else 'set'}, samples={self.samples}, "
                f"vectorized={self.vectorized})")


def sample_fractions(events: tuple[Event, ...]) -> tuple[float, ...]:
    """The interior fractions of each step where the events are checked besides the step end: ``k`` evenly spaced
    ones, ``k`` the largest ``samples`` of ``events`` (3 by default).

    >>> sample_fractions((Event(lambda t, y: y[0], samples=3),))
    (0.25, 0.5, 0.75)
    """
    k = max((e.samples for e in events), default=0)
    return tuple((i + 1) / (k + 1) for i in range(k))


def as_events(events: Any) -> tuple[Event, ...]:
    """``events`` checked: an :class:`Event` or a sequence of them, as a tuple.

    >>> as_events(Event(lambda t, y: y[0]))[0].terminal
    True
    """
    if isinstance(events, Event):
        return (events,)
    if isinstance(events, (list, tuple)):
        for i, e in enumerate(events):
            if not isinstance(e, Event):
                raise InputError(f"events[{i}] is a {type(e).__name__}, not a neurodyn.Event: wrap the function as "
                                 f"neurodyn.Event(fn, direction=..., terminal=..., jump=...).")
        return tuple(events)
    raise InputError(f"events must be a neurodyn.Event or a list of them, got {type(events).__name__}.")


class EventRecords(Sequence):
    """The occurrences of a solve that :meth:`EventWatch.finish` located all together, in order: a sequence of
    ``(t_e, y_e, event)`` read from their times ``t`` ``(E,)``, states ``y`` ``(E, *shape)`` and event indices
    (the form of the loop's records, without a tensor per record); ``stacked`` is ``(t, y)``."""

    __slots__ = ("t", "y", "index")

    def __init__(self, t: Tensor, y: Tensor, index: list[int]):
        self.t, self.y, self.index = t, y, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.t[i], self.y[i], self.index[i]

    @property
    def stacked(self) -> tuple[Tensor, Tensor]:
        return self.t, self.y


@dataclass
class Hit:
    """The occurrences :meth:`EventWatch.check` found in one step, in time order: ``occ`` lists
    ``(theta, component)`` (``theta`` the fraction of the step); ``stop`` says what the last one does:
    None (nothing: all are recorded), ``"terminal"``, ``"jump"`` or ``"zeno"`` (the last one is refused)."""

    occ: list[tuple[float, int]]
    stop: str | None = None

    @property
    def theta(self) -> float:
        return self.occ[-1][0]


class EventWatch:
    """The signs of the events' functions along the accepted steps of one solve (see the module docstring).

    ``EventWatch(term, cfg, t0, y0)`` evaluates and checks every event function at ``(t0, y0)``; :meth:`check` after
    each accepted step returns the occurrences in it (a :class:`Hit`) or None; :meth:`occurrence` builds the
    differentiable time and state of one; :meth:`restart` applies a jump.
    """

    def __init__(self, term: ODETerm, cfg: LoopConfig, t0: float, y0: Tensor):
        self.events: tuple[Event, ...] = cfg.events
        self.term = term
        self.interp = cfg.interp
        # Interior fractions checked per step (Event(samples=k), 3 by default; samples=0: step ends only).
        self.fracs = sample_fractions(self.events)
        # The dense output the interior checks use: ``interp``, until the method's own ("auto") turns out to
        # evaluate the field (DOP853's three extra stages); then cubic Hermite, which costs none (its end derivative
        # is the next step's first stage). A flagged step is confirmed on ``interp``.
        self.detect = cfg.interp
        tt = self._time(t0)
        with torch.no_grad():
            parts = [event_values(e.fn, tt, y0.detach().view(term.shape), check_nan=False).detach()
                     for e in self.events]
        self.sizes = [p.numel() for p in parts]
        self.owner = [i for i, k in enumerate(self.sizes) for _ in range(k)]  # component -> event
        self.offset = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.dirs = [self.events[i].direction for i in self.owner]
        self.n = len(self.owner)
        self.g = parts[0] if len(parts) == 1 else torch.cat(parts)
        start = self.g.tolist()  # (one read: the NaN check, and the first step's start values on the host)
        if any(v != v for v in start):
            _nan_error(t0, self.g, initial=True)
        self.counts = [0] * len(self.events)
        self.total = 0
        self.max_events, self.min_gap = cfg.max_events, cfg.min_event_gap
        self.last_t: float | None = None
        self.hits: list[tuple[int, Hit]] = []  # (accepted steps so far, hit): what a replay repeats
        self.probes: dict[int, float] = {}  # component -> the time its start value was taken (after a jump)
        self._seen: dict[float, tuple[Tensor, int | None]] = {}  # fraction -> (states, row or None)
        self._fr: Tensor | None = None  # self.fracs as a tensor on the state's device
        self._fr_end: Tensor | None = None  # the same and 1.0 (the kept steps' checks, _detect_kept)
        # Per event: does fn take a leading dimension of points (Event.vectorized; None: not known yet)?
        self._key = (tuple(term.shape), y0.dtype, y0.device.type)
        self.vec: list[bool | None] = [e.vectorized if e.vectorized is not None else e.found.get(self._key)
                                       for e in self.events]
        self._dirs_t: Tensor | None = None  # self.dirs on the device (sign checks of many components)
        self._g_row: tuple[Tensor, list[float]] | None = (self.g, start)  # (self.g, its values on the host)
        # Occurrences that only need recording, located together at the end of the solve (:meth:`finish`):
        # (hit, the step's y0 and stages, t0, h, event, component, a, fa, b, fb, res, known points).
        self.pending: list[tuple] = []
        self._batchable: bool | None = None  # whether the stepper's dense output can be evaluated across steps
        # Steps whose sign checks are deferred too (:meth:`_keep`, :meth:`_detect_kept`): per step its start and
        # stages ``(s + 1, n)`` (one copy), t0, h, t1 and index; the last one's end state. ``_lazy``: whether every
        # step of this solve may be kept (None: not known yet).
        self._lazy: bool | None = None
        self._kept: Tensor | None = None  # (rows, s + 1, n), grown as needed up to _cap rows
        self._nk = 0  # steps kept
        self._room = 0  # steps check() may keep without _keep's tests (free rows, below _cap and max_events)
        self._kept_rows: tuple[Tensor, ...] = ()  # self._kept's rows
        self._layout: tuple | None = None  # the kept buffer's key in _KEPT_POOL
        self._kept_t: list[tuple[float, float, float, int]] = []
        self._kept_y1: Tensor | None = None
        self._cap = 0  # steps kept at most before their checks run (memory)
        self._most = 0  # crossings one step can show at most (its sub-intervals x components)
        # Roots of stacked event functions located by rounds of stacked probes (see STACKED_ROOTS).
        self.stacked = STACKED_ROOTS if STACKED_ROOTS is not None else y0.device.type != "cpu"

    def _time(self, t: float) -> Tensor:
        return torch.scalar_tensor(t, dtype=self.term.t_dtype, device=self.term.device)

    def values(self, t: Tensor, y: Tensor, check_nan: bool = True) -> Tensor:
        """Every event's components at ``(t, y)`` (``y`` in the user's shape), concatenated: shape ``(n,)``."""
        if len(self.events) == 1:
            if not check_nan:  # the common case checked in one line; anything else gets event_values' errors
                v = self.events[0].fn(t, y)
                if type(v) is Tensor and v.numel() == self.sizes[0] and v.dtype.is_floating_point \
                        and not v.is_complex():
                    return v.reshape(-1)
            return event_values(self.events[0].fn, t, y, self.sizes[0], check_nan)
        return torch.cat([event_values(e.fn, t, y, k, check_nan) for e, k in zip(self.events, self.sizes)])

    def component(self, c: int, t: Tensor, y: Tensor) -> Tensor:
        """Component ``c`` at ``(t, y)`` (only its event's function is evaluated)."""
        e = self.owner[c]
        return event_values(self.events[e].fn, t, y, self.sizes[e], False)[c - self.offset[e]]

    def check(self, solver: Stepper, st: Step, co, t1: float, step_index: int = 0) -> Hit | None:
        """The occurrences in the accepted step ``st`` (ending at ``t1``): located, counted, the Zeno limits
        applied; None when no component crossed, or when every crossing only needs recording and is deferred
        (:meth:`finish` locates those), or when the step's check itself is deferred (:meth:`_keep`)."""
        nk = self._nk
        if nk < self._room and not torch.is_grad_enabled():  # kept (as _keep: a free row, no limit near)
            torch.cat((st.y0, st.k), out=self._kept_rows[nk])
            self._nk = nk + 1
            self._kept_t.append((st.t0, st.h, t1, step_index))
            self._kept_y1 = st.y1
            return None
        graph = torch.is_grad_enabled()
        lazy = self._lazy
        if lazy is None:
            lazy = self._lazy_ok(solver, co)
        if lazy and not graph and self._keep(solver, st, co, t1, step_index):
            return None
        if self._nk:  # steps kept before this one are checked first (records and hits in step order)
            self._detect_kept(solver, co)
        with torch.no_grad():
            nfe = self.term.nfe
            G, times = self._table(solver, st, co, t1, self.detect)
            if self.detect == "auto" and self.term.nfe > nfe:
                self.detect = "hermite"
            if self.n > _FEW and not self._flagged(torch.cat([self.g.view(1, -1), G])):
                # many components: one host read when nothing crossed
                self.probes = {}
                self.g = G[-1]
                return None
            rows = self._rows(G, times)
            cands = self._changes(rows)
            if cands and self.fracs and self.detect != self.interp:
                # Confirmed on the dense output the root is located on (the sub-point values again).
                G, times = self._table(solver, st, co, t1, self.interp)
                rows = self._rows(G, times)
                cands = self._changes(rows)
            probes, self.probes = self.probes, {}
            if not cands:
                self._end(G, rows)
                return None
            thetas = (0.0, *self.fracs, 1.0)
            res = _resolution(st.t0, st.h)
            if not graph and self._deferrable(solver, co, cands):
                self.hits.append((step_index, self._defer(st, cands, rows, thetas, probes, res)))
                self._end(G, rows)
                return None
            self._seen = {}  # dense-output states the root finding computed, by fraction
            shape, t_dtype, device = self.term.shape, self.term.t_dtype, self.term.device
            found = []
            for j, c in cands:
                e = self.owner[c]
                fn, local, one = self.events[e].fn, c - self.offset[e], self.sizes[e] == 1
                a, fa, b, fb = thetas[j], rows[j][c], thetas[j + 1], rows[j + 1][c]
                if j == 0 and c in probes:  # the start value was taken a moment after a jump
                    a = min(max((probes[c] - st.t0) / st.h, 0.0), 0.5 * b)
                # The table's other points seed the inverse interpolation.
                known = [(th, r[c]) for th, r in zip(thetas, rows) if th != thetas[j]]
                if self.vec[e] and self.stacked:
                    # One call of fn per round of probes.
                    found.append((_crossing_many(self._probe_fn(solver, st, co, e, local), a, fa, b, fb, res,
                                                 known), c))
                    continue

                def g_at(th: float, fn: Callable = fn, local: int = local, one: bool = one) -> float:
                    # (the function's output was checked at the step end: no checks per iteration but NaN)
                    y = solver.interpolate_floats(self.term, st, [th], co, self.interp).view(shape)
                    self._seen[th] = (y, None)
                    out = fn(torch.scalar_tensor(st.t0 + th * st.h, dtype=t_dtype, device=device), y)
                    v = out.item() if one else float(out.reshape(-1)[local])
                    if v != v:
                        _nan_error(st.t0 + th * st.h, torch.tensor([v]))
                    return v

                found.append((_crossing(g_at, a, fa, b, fb, res), c))
            found.sort()
            hit = Hit([])
            for th, c in found:
                t_occ = st.t0 + th * st.h
                hit.occ.append((th, c))
                if self.total >= self.max_events or (self.last_t is not None and abs(t_occ - self.last_t)
                                                     < self.min_gap):
                    hit.stop = "zeno"
                    break
                e = self.owner[c]
                self.total += 1
                self.counts[e] += 1
                self.last_t = t_occ
                ev = self.events[e]
                stop = ev.stop_after
                if stop is not None and self.counts[e] >= stop:
                    hit.stop = "terminal"
                    break
                if ev.jump is not None:
                    hit.stop = "jump"
                    break
            if hit.stop is None:
                self._end(G, rows)
        self.hits.append((step_index, hit))
        return hit

    def _deferrable(self, solver: Stepper, co, cands: list[tuple[int, int]]) -> bool:
        """Whether the crossings ``cands`` of a step only need recording (no jump, no stop, no Zeno limit reached,
        no minimum gap to check) and can be located after the solve: their events take stacked points, the
        stepper's dense output is a polynomial in the fraction over its stages (evaluated across steps at once)
        and the state has at most :data:`_DEFER_NUMEL` elements."""
        if self.min_gap > 0 or self.total + len(cands) > self.max_events:
            return False
        if self._batchable is None:
            self._batchable = bool(getattr(solver, "rows", False)) and self.interp == "auto" and \
                getattr(co, "dense_t", None) is not None and not getattr(co, "extra_a", ()) and \
                math.prod(self.term.shape) <= _DEFER_NUMEL
        if not self._batchable:
            return False
        new = [0] * len(self.events)
        for _, c in cands:
            new[self.owner[c]] += 1
        for e, k in enumerate(new):
            if k:
                ev = self.events[e]
                stop = ev.stop_after
                if not self.vec[e] or ev.jump is not None or (stop is not None and self.counts[e] + k >= stop):
                    return False
        return True

    def _defer(self, st: Step, cands: list[tuple[int, int]], rows: list[list[float]], thetas: tuple[float, ...],
               probes: dict[int, float], res: float) -> Hit:
        """Count the crossings ``cands`` of the step ``st`` and keep what locating them needs (:meth:`finish`)."""
        saved = torch.cat([st.y0, st.k])  # the step's start and stages (stage buffers are reused)
        return self._pend((saved.unsqueeze(0), 0), st.t0, st.h, cands, rows, thetas, probes, res)

    def _pend(self, saved: tuple[Tensor, int], t0: float, h: float, cands: list[tuple[int, int]],
              rows: list[list[float]], thetas: tuple[float, ...], probes: dict[int, float], res: float) -> Hit:
        """:meth:`_defer` for a step given by its start and stages ``saved`` (a tensor ``(R, s + 1, n)`` and the
        step's row in it), ``t0`` and ``h``."""
        hit = Hit([])
        for j, c in cands:
            e = self.owner[c]
            a, fa, b, fb = thetas[j], rows[j][c], thetas[j + 1], rows[j + 1][c]
            nodes = None
            if j == 0 and c in probes:  # the start value was taken a moment after a jump
                a = min(max((probes[c] - t0) / h, 0.0), 0.5 * b)
            else:  # the first estimate's nodes (as _nodes picks them from the sample points), where all are finite
                nodes = [(thetas[q], rows[q][c]) for q in _sample_nodes(thetas, j)]
                if not all(map(math.isfinite, (v for _, v in nodes))):
                    nodes = None
            known = [(th, r[c]) for th, r in zip(thetas, rows) if th != thetas[j]] if nodes is None else ()
            self.pending.append((hit, saved, t0, h, e, c - self.offset[e], a, fa, b, fb, res, known, c, nodes))
            self.total += 1
            self.counts[e] += 1
            self.last_t = t0 + b * h
        return hit

    def _lazy_ok(self, solver: Stepper, co) -> bool | None:
        """Whether every step's sign checks may wait (:meth:`_keep`): every crossing of this solve would only need
        recording (no jump, no terminal event, no minimum gap; the ``max_events`` limit is kept by flushing, see
        :meth:`_keep`), every event function takes stacked points, the stepper's dense output is a polynomial
        over its stages (``interpolate_steps``) and the state small (as :meth:`_deferrable`). None while some
        event's ``vectorized`` is not known yet (it is found out on the first step's sample points)."""
        if any(v is None for v in self.vec):
            return None
        ok = self.min_gap == 0 and all(self.vec) and self.detect == self.interp == "auto" and \
            all(e.jump is None and e.stop_after is None for e in self.events) and \
            bool(getattr(solver, "rows", False)) and hasattr(solver, "interpolate_steps") and \
            getattr(co, "dense_t", None) is not None and \
            not getattr(co, "extra_a", ()) and math.prod(self.term.shape) <= _DEFER_NUMEL
        if ok:
            n = math.prod(self.term.shape)
            self._cap = max(1, min(_KEEP_STEPS, _KEEP_NUMEL // ((solver.stages + 1) * max(n, 1))))
            self._most = (len(self.fracs) + 1) * self.n
        self._lazy = ok
        return ok

    def _keep(self, solver: Stepper, st: Step, co, t1: float, step_index: int) -> bool:
        """Keep the accepted step ``st`` (its start and stages, one copy) for its sign checks after it
        (:meth:`_detect_kept`, in one batch with the other kept steps); False where it cannot wait: its crossings
        might reach ``max_events`` (the kept steps are checked first). The kept steps are checked when
        :data:`_KEEP_NUMEL` elements are kept, before a step whose crossings could reach ``max_events``, and at
        the end of the solve."""
        nk = self._nk
        if nk >= self._cap or self.total + (nk + 1) * self._most > self.max_events:
            if nk:
                self._detect_kept(solver, co)
                nk = 0
            if self.total + self._most > self.max_events:
                return False
        rows = self._kept_rows
        if nk == len(rows):  # grown by doubling, up to _cap rows
            kept = self._kept
            size = min(max(2 * nk, 32), self._cap)
            layout = (st.k.shape[0] + 1, st.y0.shape[1], st.y0.dtype, st.y0.device, torch.is_inference_mode_enabled())
            spare = _KEPT_POOL.pop(layout, None) if not nk else None
            if spare is not None and len(spare[1]) >= size:  # a buffer an earlier solve gave back, with its rows
                self._kept, rows = spare
                self._kept_rows = rows
            else:
                new = st.y0.new_empty((size, *layout[:2]))
                if nk:
                    new[:nk] = kept[:nk]
                self._kept = new
                rows = self._kept_rows = new.unbind(0)
            self._layout = layout
        torch.cat((st.y0, st.k), out=rows[nk])  # the stage buffers are reused: one copy
        self._nk = nk + 1
        self._room = min(len(rows), self._cap, (self.max_events - self.total) // self._most)
        self._kept_t.append((st.t0, st.h, t1, step_index))
        self._kept_y1 = st.y1  # (a new tensor every step: the next kept step's start, or the solve's end)
        return True

    def _detect_kept(self, solver: Stepper, co, final: bool = False) -> None:
        """The sign checks of the kept steps (:meth:`_keep`), all together: the dense output at every step's
        sample fractions in one :meth:`interpolate_rows` evaluation, the event functions at every step's sample
        points and end in one stacked call each, the sign changes compared on the device (one host read, two where
        a step crossed); the crossings of each step counted and kept for :meth:`finish` as :meth:`check` does,
        in step order. The values are those :meth:`check` computes, up to the rounding of the dense output (the
        same polynomial, evaluated across steps)."""
        m, info, y_end = self._nk, self._kept_t, self._kept_y1
        self._nk, self._kept_t, self._kept_y1, self._room = 0, [], None, 0
        fr = self.fracs
        shape, t_dtype, device = self.term.shape, self.term.t_dtype, self.term.device
        with torch.no_grad():
            z = self._kept[:m]  # (m, s + 1, n): the steps' starts and stages
            y0s = z[:, 0]
            if fr:
                # the sample points and the step end on the dense output, in one product: (m, f + 1, n) (the step
                # end is y1 up to rounding; the next step's start value is this one)
                hs = torch.tensor([h for _, h, _, _ in info], dtype=z.dtype, device=z.device)
                states = solver.interpolate_steps(y0s, z[:, 1:], hs, self._fractions(z.device, True), co)
            else:
                ends = torch.cat([y0s[1:], y_end.reshape(1, -1)]) if m > 1 else y_end.reshape(1, -1)
                states = ends.unsqueeze(1)
            p = len(fr) + 1
            times = [x for t0, h, t1, _ in info for x in (*(t0 + q * h for q in fr), t1)]
            G = self.values_many(torch.tensor(times, dtype=t_dtype, device=device),
                                 states.reshape(m * p, *shape)).view(m, p, self.n)
            if m * p * self.n <= _HOST_SCAN:  # few values: compared on the host (one read, no small tensor ops)
                g = self.g
                prev = self._g_row[1] if self._g_row is not None and self._g_row[0] is g else g.tolist()
                if self.n == 1:  # one component: its values in one list
                    vals = G.view(-1).tolist()  # every step's points in time order
                    pv, d = prev[0], self.dirs[0]
                    flagged = []
                    last = -1
                    for q_i, qv in enumerate(vals):
                        # the value leaves its sign in its direction (as _changes), or is NaN
                        if qv != qv or (pv != 0 and ((qv > 0) != (pv > 0) or qv == 0)
                                        and (d == 0 or (d > 0) == (pv < 0))):
                            i, r = divmod(q_i, p)
                            if qv != qv:
                                _nan_error(info[i][0] + fr[r] * info[i][1] if r < len(fr) else info[i][2], G[i, r])
                            if i != last:
                                rows = [[vals[i * p - 1] if i else prev[0]], *([v] for v in vals[i * p:(i + 1) * p])]
                                flagged.append((i, rows, [(r, 0)], False))
                                last = i
                            else:
                                flagged[-1][2].append((r, 0))
                        pv = qv
                else:
                    seq = G.reshape(m * p, self.n).tolist()  # every step's points in time order
                    first = prev
                    marked: list[int] = []  # steps where a component leaves its sign (as _changes), or is NaN
                    for q_i, row in enumerate(seq):
                        for pv, qv, d in zip(prev, row, self.dirs):
                            if qv != qv or (pv != 0 and ((qv > 0) != (pv > 0) or qv == 0)
                                            and (d == 0 or (d > 0) == (pv < 0))):
                                step = q_i // p
                                if not marked or marked[-1] != step:
                                    marked.append(step)
                                break
                        prev = row
                    flagged = []
                    for i in marked:
                        rows = [seq[i * p - 1] if i else first, *seq[i * p:(i + 1) * p]]
                        nan = any(v != v for row in rows[1:] for v in row)
                        flagged.append((i, rows, self._changes(rows), nan))
            else:  # compared on the device: one read, two where a step crossed
                start = torch.cat([self.g.view(1, 1, -1).to(G.dtype), G[:-1, -1:]])
                full = torch.cat([start, G], 1)  # (m, p + 1, K): every step's start, sample points and end
                if self._dirs_t is None:
                    self._dirs_t = torch.tensor(self.dirs, dtype=G.dtype, device=G.device)
                a, b, d = full[:, :-1], full[:, 1:], self._dirs_t
                changed = (a != 0) & (((b > 0) != (a > 0)) | (b == 0)) & ((d == 0) | ((d > 0) == (a < 0)))
                idx = torch.nonzero((changed.any(2) | torch.isnan(b).any(2)).any(1)).view(-1).tolist()
                flagged = [(i, rows, None, True) for i, rows in zip(idx, full[idx].tolist())] if idx else []
            self.g = G[-1, -1]
            self.probes = {}
            if not flagged:
                return
            # the crossing steps' starts and stages, for finish (the buffer is reused unless the solve has ended)
            saved = z if final else z[[f[0] for f in flagged]]
            thetas = (0.0, *fr, 1.0)
            for r_i, (i, rows, cands, nan) in enumerate(flagged):
                t0, h, t1, j = info[i]
                if nan:
                    for r, row in enumerate(rows[1:]):
                        if any(v != v for v in row):
                            _nan_error(t0 + fr[r] * h if r < len(fr) else t1, G[i, r])
                if cands is None:
                    cands = self._changes(rows)
                if cands:
                    hit = self._pend((saved, i if final else r_i), t0, h, cands, rows, thetas, {},
                                     _resolution(t0, h))
                    self.hits.append((j, hit))

    def finish(self, solver: Stepper, co, records: list) -> list:
        """Locate the deferred occurrences (:meth:`check`) and return ``records`` (the occurrences the loop
        recorded, ``(t_e, y_e, event)``) with theirs, in the order of the steps; their hits get their fractions.

        All deferred roots are located together: each round of :func:`_rounds` evaluates every pending root's
        probes in one dense-output evaluation across the steps (the stepper's ``interpolate_rows`` at several
        fractions per step) and one call of each event's function."""
        if self._nk:
            self._detect_kept(solver, co, final=True)
        kept, self._kept, self._room = self._kept, None, 0
        if kept is not None and kept.numel() <= _KEPT_POOL_NUMEL:
            # the buffer goes back for the next solve once the roots it holds are located (nothing returned keeps it)
            give_back = (self._layout, (kept, self._kept_rows))
        else:
            give_back = None
        self._kept_rows = ()
        out = self._finish(solver, co, records)
        if give_back is not None:
            if len(_KEPT_POOL) >= 16 and give_back[0] not in _KEPT_POOL:
                _KEPT_POOL.clear()
            _KEPT_POOL[give_back[0]] = give_back[1]
        return out

    def _finish(self, solver: Stepper, co, records: list) -> list | EventRecords:
        """:meth:`finish` once the kept steps are checked."""
        pend, self.pending = self.pending, []
        if not pend:
            return records
        with torch.no_grad():
            # (P, s + 1, n): the steps' starts and stages (the kept steps' buffer itself where it holds them all)
            base = pend[0][1][0]
            if all(p[1][0] is base and p[1][1] == i for i, p in enumerate(pend)) and len(pend) == base.shape[0]:
                z = base
            else:
                z = torch.stack([p[1][0][p[1][1]] for p in pend])
            # the steps' starts and sizes (P, 2, 1), float64 (the probes' times are t0 + theta h)
            t0h = torch.tensor([(p[2], p[3]) for p in pend], dtype=torch.float64, device=z.device).unsqueeze(2)
            real = z.real.dtype if z.is_complex() else z.dtype
            hs = t0h[:, 1, 0] if real == torch.float64 else t0h[:, 1, 0].to(real)
            y0s = z[:, 0]
            kh = z.new_empty((z.shape[1] - 1, z.shape[0], z.shape[2]))  # (s, P, n): the stages times h
            torch.mul(z[:, 1:].transpose(0, 1), hs.view(1, -1, 1), out=kh)
            thetas, pieces = self._locate_pending(solver, co, pend, y0s, kh, t0h)
            have = {i for ids, _ in pieces for i in ids}
            rest = [i for i in range(len(pend)) if i not in have]  # roots not among the last round's probes
            if rest:
                idx = torch.tensor(rest, device=z.device)
                th = torch.tensor([thetas[i] for i in rest], dtype=torch.float64, device=z.device)
                y0r = y0s.index_select(0, idx)
                pieces.append((rest, solver.interpolate_rows(y0r, y0r, kh.index_select(1, idx), None, th, co)))
            if len(pieces) == 1 and pieces[0][0] == list(range(len(pend))):
                ys = pieces[0][1]
            else:
                ys = y0s.new_empty(y0s.shape)
                for ids, y in pieces:
                    ys[ids] = y
            t_all = torch.tensor([p[2] + x * p[3] for p, x in zip(pend, thetas)], dtype=self.term.t_dtype,
                                 device=self.term.device)
        found: dict[int, list] = {}
        for i, (p, x) in enumerate(zip(pend, thetas)):
            found.setdefault(id(p[0]), []).append((x, p[12], i))
        plan: list[tuple[list[int] | None, int]] = []  # per hit: its pending roots in order, or its loop records
        for _, hit in self.hits:
            mine = found.get(id(hit))
            if mine is None:  # located in the loop: its records are next in `records`
                plan.append((None, len(hit.occ) - (1 if hit.stop == "zeno" else 0)))
                continue
            if len(mine) > 1:
                mine.sort(key=lambda r: r[0])
            hit.occ[:] = [(x, c) for x, c, _ in mine]
            plan.append(([i for _, _, i in mine], 0))
        owner = self.owner
        if not records:  # every record is a pending root's: read from their stacked times and states
            order = [i for ids, _ in plan if ids is not None for i in ids]
            if order != list(range(len(pend))):
                idx = torch.tensor(order, device=ys.device)
                t_all, ys = t_all.index_select(0, idx.to(t_all.device)), ys.index_select(0, idx)
            return EventRecords(t_all, ys.view(len(pend), *self.term.shape), [owner[pend[i][12]] for i in order])
        ts, states = t_all.unbind(0), ys.view(len(pend), *self.term.shape).unbind(0)
        out, rest = [], iter(records)
        for ids, k in plan:
            if ids is None:
                out.extend(itertools.islice(rest, k))
            else:
                out.extend((ts[i], states[i], owner[pend[i][12]]) for i in ids)
        out.extend(rest)
        return out

    def _locate_pending(self, solver: Stepper, co, pend: list[tuple], y0s: Tensor, kh: Tensor,
                        t0h: Tensor) -> tuple[list[float], list[tuple[list[int], Tensor]]]:
        """The fractions of the pending roots (steps' starts ``y0s`` ``(P, n)``, ``h``-scaled stages ``kh``
        ``(s, P, n)``, starts and sizes ``t0h`` ``(P, 2, 1)`` float64), located in rounds across the steps (see
        :meth:`finish`), and the states there where the last round evaluated them: a list of (root indices, their
        states ``(len, n)``)."""
        shape, t_dtype, device = self.term.shape, self.term.t_dtype, self.term.device
        gens, xs, out = [], [None] * len(pend), [None] * len(pend)
        pieces: list[tuple[list[int], Tensor]] = []
        for i, p in enumerate(pend):
            gens.append(_rounds(*p[6:12], nodes=p[13]))
            try:
                xs[i] = next(gens[i])
            except StopIteration as done:
                out[i] = done.value
        while True:
            live = [i for i in range(len(pend)) if out[i] is None]
            if not live:
                return out, pieces
            for e in sorted({pend[i][4] for i in live}):
                ids = [i for i in live if pend[i][4] == e]
                w = max(len(xs[i]) for i in ids)  # probes per step, padded with the last one
                flat = []
                for i in ids:
                    x_i = xs[i]
                    flat += x_i + x_i[-1:] * (w - len(x_i)) if len(x_i) < w else x_i
                m = len(flat)
                th = torch.tensor(flat, dtype=torch.float64, device=y0s.device).view(len(ids), w)
                y0r, khr, t0hr = y0s, kh, t0h
                if len(ids) < len(pend):
                    idx = torch.tensor(ids, device=y0s.device)
                    y0r, khr, t0hr = y0s.index_select(0, idx), kh.index_select(1, idx), t0h.index_select(0, idx)
                ys = solver.interpolate_rows(y0r, y0r, khr, None, th, co)  # (len(ids), w, n)
                k = self.sizes[e]
                times = torch.addcmul(t0hr[:, 0], th, t0hr[:, 1]).view(m)
                v = self.events[e].fn(times if times.dtype == t_dtype and times.device == device else
                                      times.to(device=device, dtype=t_dtype), ys.view(m, *shape))
                if not isinstance(v, Tensor) or v.numel() != m * k or v.shape[0] != m:
                    got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                    raise InputError(f"Event(vectorized=True): fn(t, y) with t of shape ({m},) must return a real "
                                     f"tensor of shape ({m}, ...) with {k} value(s) per point, got {got}.")
                vals = v.reshape(-1).tolist()
                done_ids, at = [], []
                for r, i in enumerate(ids):
                    n_i, local = len(xs[i]), pend[i][5]
                    base = r * w * k + local
                    vi = vals[base:base + n_i * k:k]
                    total = sum(vi)
                    if total != total and any(u != u for u in vi):
                        bad = xs[i][next(q for q, u in enumerate(vi) if u != u)]
                        _nan_error(pend[i][2] + bad * pend[i][3], torch.tensor([math.nan]))
                    try:
                        xs_i = xs[i]
                        xs[i] = gens[i].send(vi)
                    except StopIteration as done:
                        out[i] = done.value
                        if done.value in xs_i:
                            done_ids.append(i)
                            at.append(r * w + xs_i.index(done.value))
                if done_ids:  # the states at the roots the round evaluated, in one gather
                    pieces.append((done_ids, ys.view(m, -1)[at]))

    def _table(self, solver: Stepper, st: Step, co, t1: float, interp: str) -> tuple[Tensor, list[float]]:
        """The event components at the interior fractions ``self.fracs`` on the ``interp`` dense output and the step
        end: shape ``(len(self.fracs) + 1, n)``, and the times of the rows."""
        fr = self.fracs
        if not fr:  # the step end only: no dense output
            tt = torch.scalar_tensor(t1, dtype=self.term.t_dtype, device=self.term.device)
            return self.values(tt, st.y1.detach().view(self.term.shape), False).view(1, -1), [t1]
        ys = solver.interpolate(self.term, st, self._fractions(st.y0.device), co, interp)
        # The interior points and the step end stacked: (len(fr) + 1, *shape).
        states = torch.cat([ys, st.y1.detach()]).view(len(fr) + 1, *self.term.shape)
        times = [st.t0 + th * st.h for th in fr] + [t1]
        tts = torch.tensor(times, dtype=self.term.t_dtype, device=self.term.device)
        return self.values_many(tts, states), times

    def _fractions(self, device: torch.device, end: bool = False) -> Tensor:
        """``self.fracs`` (``end``: and 1.0, the step end) as a float64 tensor on ``device``: one tensor per fractions
        and device for all solves (a stepper keeps the dense-output weights of the last fractions tensor it saw)."""
        mine = self._fr_end if end else self._fr
        if mine is None:
            fracs = (*self.fracs, 1.0) if end else self.fracs
            key = (fracs, device)
            mine = _FRACTIONS.get(key)
            if mine is None:
                with ordinary_tensors():  # shared by later solves, with or without autograd
                    mine = torch.tensor(fracs, dtype=torch.float64).to(device)
                if len(_FRACTIONS) >= 16:
                    _FRACTIONS.clear()
                _FRACTIONS[key] = mine
            if end:
                self._fr_end = mine
            else:
                self._fr = mine
        return mine

    def values_many(self, ts: Tensor, states: Tensor) -> Tensor:
        """Every event's components at the points ``(ts[i], states[i])`` (``ts``: ``(m,)``, ``states``:
        ``(m, *shape)``): shape ``(m, n)``; one call per event whose function takes a leading dimension of points
        (:attr:`Event.vectorized`, found out here on the first use with several points), else one per point."""
        m = ts.shape[0]
        parts = []
        for i, (e, k) in enumerate(zip(self.events, self.sizes)):
            v = None
            if m > 1 and self.vec[i] is None:
                self.vec[i] = e.found[self._key] = self._takes_points(i, ts, states)
            if m > 1 and self.vec[i]:
                v = e.fn(ts, states)
                if not isinstance(v, Tensor) or v.numel() != m * k or v.shape[0] != m or not v.is_floating_point():
                    got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                    raise InputError(f"Event(vectorized=True): fn(t, y) with t of shape ({m},) and y of shape "
                                     f"{tuple(states.shape)} must return a real tensor of shape ({m}, ...) with {k} "
                                     f"value(s) per point, got {got}; pass vectorized=False if it takes one point.")
                v = v.reshape(m, k)
            else:
                v = torch.stack([event_values(e.fn, tt, yy, k, False) for tt, yy in zip(ts.unbind(0),
                                                                                       states.unbind(0))])
            parts.append(v)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _takes_points(self, i: int, ts: Tensor, states: Tensor) -> bool:
        """Whether event ``i``'s function evaluates a leading dimension of points: one stacked call against the
        calls point by point, on a number of points equal to no dimension of the state or the output (so that a
        function indexing the state's first dimension cannot pass for one)."""
        fn = self.events[i].fn
        out_shape = tuple(fn(ts[0], states[0]).shape)  # one point's output (checked by event_values already)
        dims = set(self.term.shape) | set(out_shape) | {math.prod(self.term.shape)}
        m = 2
        while m in dims:
            m += 1
        idx = torch.arange(m, device=states.device) % ts.shape[0]
        tm, ym = ts[idx], states[idx]
        try:
            v = fn(tm, ym)
        except Exception:  # a function of one point (e.g. float(t), Python branches on a value)
            return False
        if not isinstance(v, Tensor) or tuple(v.shape) != (m, *out_shape) or v.dtype.is_complex \
                or not v.is_floating_point():
            return False
        ref = torch.stack([fn(tt, yy).reshape(out_shape) for tt, yy in zip(tm.unbind(0), ym.unbind(0))])
        v, ref = v.detach(), ref.detach().to(v.dtype)
        tol = 64 * torch.finfo(v.dtype).eps
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return bool(torch.allclose(v, ref, rtol=tol, atol=tol * scale, equal_nan=True))

    def _probe_fn(self, solver: Stepper, st: Step, co, e: int, local: int) -> Callable[[list[float]], list[float]]:
        """Component ``local`` of event ``e`` at fractions of the step ``st`` (a list), on the dense output, in one
        call of its function; the states are kept (``self._seen``) for :meth:`occurrence`."""
        shape, t_dtype, device = self.term.shape, self.term.t_dtype, self.term.device
        fn, k = self.events[e].fn, self.sizes[e]

        def g_many(ths: list[float]) -> list[float]:
            m = len(ths)
            th = torch.tensor(ths, dtype=torch.float64, device=device)
            ys = solver.interpolate(self.term, st, th, co, self.interp).view(m, *shape)
            v = fn(torch.tensor([st.t0 + x * st.h for x in ths], dtype=t_dtype, device=device), ys)
            vals = v.reshape(-1).tolist() if k == 1 else v.reshape(m, k)[:, local].tolist()
            if any(v != v for v in vals):
                x = ths[next(i for i, v in enumerate(vals) if v != v)]
                _nan_error(st.t0 + x * st.h, torch.tensor([math.nan]))
            self._seen.update(zip(ths, zip(itertools.repeat(ys), range(len(ths)))))
            return vals

        return g_many

    def _flagged(self, G: Tensor) -> bool:
        """Whether any component of ``G`` (rows: the step's points) leaves its sign in its direction or is NaN,
        compared on the device with one host read."""
        if self._dirs_t is None:
            self._dirs_t = torch.tensor(self.dirs, dtype=G.dtype, device=G.device)
        p, q = G[:-1], G[1:]
        d = self._dirs_t
        changed = (p != 0) & (((q > 0) != (p > 0)) | (q == 0)) & ((d == 0) | ((d > 0) == (p < 0)))
        return bool(changed.any() | torch.isnan(q).any())

    def _rows(self, G: Tensor, times: list[float]) -> list[list[float]]:
        """The values at the step start (kept on the host from the step before) and ``G`` (the rows of
        :meth:`_table`) on the host (one synchronisation), NaN rows refused."""
        g = self.g
        start = self._g_row[1] if self._g_row is not None and self._g_row[0] is g else g.tolist()
        rows = G.tolist()
        for i, r in enumerate(rows):
            if any(v != v for v in r):
                _nan_error(times[i], G[i])
        return [start, *rows]

    def _end(self, G: Tensor, rows: list[list[float]]) -> None:
        """The step end's values (the last row of ``G``, on the host as ``rows[-1]``) become the next step's start."""
        self.g = G[-1]
        self._g_row = (self.g, rows[-1])

    def _changes(self, rows: list[list[float]]) -> list[tuple[int, int]]:
        """``(j, c)``: component ``c`` leaves its nonzero sign between rows ``j`` and ``j + 1`` in its direction."""
        out = []
        dirs = self.dirs
        for j in range(len(rows) - 1):
            for c, (p, q) in enumerate(zip(rows[j], rows[j + 1])):
                if p != 0 and ((q > 0) != (p > 0) or q == 0):
                    d = dirs[c]
                    if d == 0 or (d > 0) == (p < 0):
                        out.append((j, c))
        return out

    def occurrence(self, solver: Stepper, st: Step, co, theta: float, comp: int) -> tuple[Tensor, Tensor]:
        """The time (0-dim) and state (the user's shape) of the occurrence of component ``comp`` at the fraction
        ``theta`` of ``st``, differentiable (implicit function theorem) where a graph is recorded."""
        seen = self._seen.get(theta)
        if seen is not None and not torch.is_grad_enabled():  # the root finding's own evaluation
            y = seen[0] if seen[1] is None else seen[0][seen[1]]
            return torch.scalar_tensor(st.t0 + theta * st.h, dtype=self.term.t_dtype, device=self.term.device), y
        return occurrence(self.term, solver, st, co, self.interp, self.events[self.owner[comp]],
                          comp - self.offset[self.owner[comp]], theta)

    def restart(self, t_e: Tensor, y_e: Tensor, comp: int, h: float) -> tuple[Tensor, Tensor | None, bool]:
        """Apply the jump of component ``comp``'s event at ``(t_e, y_e)`` (see :func:`jump_state`) and watch from
        there. Returns the new state ``(1, n)``, where no graph is recorded ``dy/dt`` there (else None: the loop
        evaluates it), and whether the events accumulate (Zeno): the jump sends the component back toward the side
        its event fires from, yet it is past the surface again ``sqrt(eps) |h|`` later."""
        ev = self.events[self.owner[comp]]
        y_start, f_plus = jump_state(self.term, ev, t_e, y_e)
        td = float(t_e.detach())
        tt = self._time(td)
        with torch.no_grad():
            y_new = y_start.detach().view(self.term.shape)
            g = self.values(tt, y_new).clone()
            g_pre = float(self.component(comp, tt, y_e.detach()))
            # The fired component still at the surface it crossed (the jump left it ~0): watch it from its value a
            # moment later along the new trajectory, so the crossing just handled is not seen again.
            zeno = False
            if abs(float(g[comp])) <= 4.0 * abs(g_pre):
                dt = math.copysign(math.sqrt(torch.finfo(y_new.real.dtype).eps) * abs(h), h)
                g[comp] = self.component(comp, self._time(td + dt), y_new + dt * f_plus.view(self.term.shape))
                self.probes[comp] = td + dt
                d = self.dirs[comp] * (1 if h > 0 else -1)  # the direction as a sign of dg/dt in time
                if d != 0 and not (float(g[comp]) * d < 0):
                    # Moving back to the side the event fires from, yet past the surface again a moment later:
                    # the next occurrence follows within dt (events accumulating, e.g. a ball coming to rest).
                    zeno = _rate(ev.fn, comp - self.offset[self.owner[comp]], tt, y_new, f_plus) * d < 0
            self.g = g
        k1 = f_plus.view(self.term.shape) if not y_start.requires_grad else None
        return y_start.reshape(1, -1), k1, zeno


def _rate(fn: Callable, local: int, t: Tensor, y: Tensor, f: Tensor) -> float:
    """``dg/dt = g_t + g_y . f`` of component ``local`` of ``fn`` at ``(t, y)`` by autograd (0 where ``fn`` is not
    differentiable)."""
    with torch.enable_grad():
        tg = t.detach().clone().requires_grad_(True)
        yg = y.detach().clone().requires_grad_(True)
        gd = fn(tg, yg).reshape(-1)[local]
        if not gd.requires_grad:
            return 0.0
        gt, gy = torch.autograd.grad(gd, (tg, yg), allow_unused=True)
    rate = (float(gt) if gt is not None else 0.0) + (float((gy * f.view(gy.shape)).sum()) if gy is not None else 0.0)
    return rate


def occurrence(term: ODETerm, solver: Stepper, st: Step, co, interp: str, event: Event, local: int,
               theta: float) -> tuple[Tensor, Tensor]:
    """Time (0-dim) and state (the user's shape) where component ``local`` of ``event`` crosses zero at the
    fraction ``theta`` of the step ``st``; with the implicit function theorem's gradients where a graph is
    recorded (:func:`implicit_event`; one field evaluation then)."""
    t_star = st.t0 + theta * st.h
    y_star = solver.interpolate_floats(term, st, [theta], co, interp).view(term.shape)
    tt = torch.scalar_tensor(t_star, dtype=term.t_dtype, device=term.device)
    if not torch.is_grad_enabled():
        return tt, y_star
    return implicit_event(event.fn, tt, y_star, lambda: term(t_star, y_star.detach()), local)


def jump_state(term: ODETerm, event: Event, t_e: Tensor, y_e: Tensor) -> tuple[Tensor, Tensor]:
    """The state the solve continues from after ``event``'s jump at ``(t_e, y_e)``, and ``dy/dt`` there (detached).

    ``y+ = jump(t_e, y_e)``; where ``t_e`` carries a gradient the trajectory after the event starts at a moving
    time, so the state is ``y+ - f(t_e, y+) (t_e - t_e.detach())`` (the value of ``y+``; with ``y_e`` moving along
    ``f(t_e, y-)`` this gives the saltation matrix's gradient ``J_y + (J_y f- + J_t - f+) dt_e/dy``).
    """
    y_new = event.jump(t_e, y_e)
    shape = term.shape
    if not isinstance(y_new, Tensor) or tuple(y_new.shape) != tuple(shape) or y_new.dtype != y_e.dtype:
        got = f"shape {tuple(y_new.shape)}, dtype {y_new.dtype}" if isinstance(y_new, Tensor) else \
            type(y_new).__name__
        raise InputError(f"an Event's jump(t, y) must return the new state, a tensor of the state's shape "
                         f"{tuple(shape)} and dtype {y_e.dtype}; got {got} at t={float(t_e.detach()):.6g}.")
    td = float(t_e.detach())
    with torch.no_grad():
        f_plus = term(td, y_new.detach())
    if t_e.requires_grad:
        y_new = y_new - f_plus.view(shape) * (t_e - t_e.detach()).to(f_plus.dtype)
    return y_new, f_plus

def _resolution(t0: float, h: float) -> float:
    """The fraction of the step ``[t0, t0 + h]`` a root is located to: :data:`ROOT_RTOL` of its times (or of ``h``
    near ``t = 0``), and at least two ulps of its times."""
    scale = max(abs(t0), abs(t0 + h))
    return max(2.0 * math.ulp(max(scale, 1e-300)), ROOT_RTOL * max(scale, abs(h))) / abs(h)


def _crossing(g: Callable[[float], float], a: float, fa: float, b: float, fb: float, res: float) -> float:
    """A sign change of ``g`` in ``[a, b]`` (``fa = g(a) != 0``, ``fb = g(b)``, opposite signs or ``fb = 0``),
    located to a bracket of width ``res``.

    Each iteration evaluates ``g`` once, at the zero of the polynomial through the latest (up to four) values as a
    function of ``g`` (inverse interpolation: superlinear on a smooth ``g``; the secant of the bracket while fewer
    values are known or where that zero leaves the bracket), moved at least ``res / 4`` off the bracket's ends, so
    that an estimate within ``res / 4`` of the root lands on its other side and closes the bracket. Where two
    iterations fail to halve the bracket the next one bisects it, so it reaches ``res`` whatever ``g`` is
    (continuous, jumping, or with a pole). Returns an exact zero if one is hit, else the bracket end past the
    crossing.
    """
    if fb == 0:
        return b
    pts = [(a, fa), (b, fb)]
    widths = [math.inf, math.inf]  # the bracket's width before each evaluation
    moves = [math.inf]  # the distance of each evaluated point from the one before
    d = 0.25 * res
    for _ in range(_MAX_ITERATIONS):
        width = b - a
        if width <= res:
            break
        x = _inverse_root(pts)
        if not (a < x < b):  # nan / inf, or outside: the secant of the bracket
            x = a + width * (fa / (fa - fb))
            if not (a < x < b):
                x = 0.5 * (a + b)
        x = min(max(x, a + d), b - d)
        # Not halved over two evaluations and the estimates not converging superlinearly: bisect.
        if widths[-2] < 2.0 * width and abs(x - pts[-1][0]) > 0.25 * moves[-1]:
            x = 0.5 * (a + b)
        if not (a < x < b):  # no float between the ends
            break
        fx = g(x)
        if fx == 0:
            return x
        moves.append(abs(x - pts[-1][0]))
        if (fx > 0) == (fb > 0):
            b, fb = x, fx
        else:
            a, fa = x, fx
        pts.append((x, fx))
        widths.append(width)
    return b


def _crossing_many(g: Callable[[list[float]], list[float]], a: float, fa: float, b: float, fb: float, res: float,
                   known: list[tuple[float, float]] = ()) -> float:
    """:func:`_crossing` for a ``g`` that evaluates a list of points in one call (the same result contract: a sign
    change of ``g`` in ``[a, b]`` located to a bracket of width ``res``; an exact zero if one is hit, else the
    bracket end past the crossing); the rounds of :func:`_rounds`, one call each."""
    rounds = _rounds(a, fa, b, fb, res, known)
    try:
        xs = next(rounds)
        while True:
            xs = rounds.send(g(xs))
    except StopIteration as done:
        return done.value


def _rounds(a: float, fa: float, b: float, fb: float, res: float, known: list[tuple[float, float]] = (),
            nodes: list[tuple[float, float]] | None = None):
    """The rounds of probes that locate a sign change of ``g`` in ``[a, b]`` (``fa = g(a) != 0``, ``fb = g(b)``,
    opposite signs or ``fb = 0``) to a bracket of width ``res``: a generator that yields each round's points (a
    sorted list of fractions), is sent ``g`` at them, and returns an exact zero if one is hit, else the bracket end
    past the crossing.

    Each round evaluates, around the estimate ``x`` with the error estimate ``e``, ``x`` itself, ``x -/+ res / 2``,
    :data:`_FINE` evenly spaced points on each side within ``r = 8 e`` (at most half the bracket) and two at a
    quarter of their spacing (where ``8 e <= res``, after a round that shrank the bracket enough: only ``x`` and
    ``x -/+ res / 2``); after a round that shrank the bracket less than ``_COARSE + 1`` times, also
    :data:`_COARSE` evenly spaced points of the bracket. The first estimate is the zero of the polynomial through
    the bracket's ends and up to four nearby known points (:func:`_nodes`, :func:`_poly_root`: a step's sample
    values need not be monotone, so not inverse interpolation), ``e`` the change of that zero by its last node; the
    later ones the zero of the inverse interpolant through the bracket's ends and nearby probes, ``e`` its change by
    one node less. The bracket becomes the first sub-interval, from ``a``, where the sign changes (it keeps the
    crossing nearest ``a``, in the bracket's direction). It closes to ``res`` once ``x`` is within ``res / 2`` of
    the root: two rounds on a smooth ``g`` from a step's sample points (the first round's points lie within
    ``r / (4 _FINE)`` of the root, so the next estimate is that close); every other round at least shrinks the
    bracket ``_COARSE + 1`` times whatever ``g`` is.
    """
    if fb == 0:
        return b
    # The first estimate: the polynomial through the known points (a step's sample points need not be monotone in
    # g, so not inverse interpolation); then inverse interpolation through the points around each new bracket.
    if nodes is None:
        nodes = _nodes([(p, v) for p, v in known if math.isfinite(v)], a, fa, b, fb)
    x, err = _poly_root(nodes, a, fa, b, fb, 0.01 * res)
    coarse = False  # (the bracket spread with probes only after a round that did not shrink it enough)
    for _ in range(_MAX_ITERATIONS):
        width = b - a
        if width <= res:
            break
        a0, fa0, b0, fb0 = a, fa, b, fb
        if not (a < x < b):
            x = a + width * (fa / (fa - fb))
            if not (a < x < b):
                x = 0.5 * (a + b)
            err = width
        elif not math.isfinite(err):
            err = width
        half = 0.5 * res
        if 8.0 * err <= res and not coarse:
            # The estimate within res / 8 of the root: x -/+ res / 2 close the bracket (else the next round does).
            xs = [x - half, x, x + half]
            if not (a < xs[0] and xs[2] < b):
                xs = [p for p in xs if a < p < b]
        else:
            step = min(max(8.0 * err, res), 0.5 * width) / _FINE
            xs = [x + step * k for k in _FINE_STEPS]
            xs += [x - half, x + half, x - 0.25 * step, x + 0.25 * step]
            if coarse:
                xs += [a + width * q for q in _COARSE_FRACTIONS]
            xs = sorted({p for p in xs if a < p < b})
        if not xs:  # no float between the ends
            break
        vs = yield xs
        # the first probe past the crossing (an exact zero: the root); the bracket ends there
        pos = fa > 0
        i = len(xs)
        for q, v in enumerate(vs):
            if v == 0:
                return xs[q]
            if (v > 0) != pos:
                i = q
                break
        a, fa = (xs[i - 1], vs[i - 1]) if i else (a, fa)
        if i < len(xs):
            b, fb = xs[i], vs[i]
        if b - a <= res:
            break
        pts = [(a0, fa0), *zip(xs, vs), (b0, fb0)]
        i += 1  # (the bracket's far end in pts)
        coarse = (b - a) * (_COARSE + 1) > width  # the next round spreads points over the bracket too
        # the bracket's ends and nearby points (:func:`_nodes`), the farthest first
        x, lower = _inverse_root(_nodes(pts[max(i - 5, 0):i - 1] + pts[i + 1:i + 5], a, fa, b, fb)[::-1], 6,
                                 lower=True)
        err = abs(x - lower)
    return b


_SAMPLE_NODES: dict[tuple[tuple[float, ...], int], tuple[int, ...]] = {}


def _sample_nodes(thetas: tuple[float, ...], j: int) -> tuple[int, ...]:
    """The indices of the sample points :func:`_nodes` takes for a root in the sample interval ``j`` (the
    interval's ends, then up to four of the others, nearest first; evenly spaced samples are a whole interval apart,
    so none is refused for being close to another), cached per ``(thetas, j)``."""
    key = (thetas, j)
    got = _SAMPLE_NODES.get(key)
    if got is None:
        a, b = thetas[j], thetas[j + 1]
        others = sorted((a - x if x < a else x - b, x, q) for q, x in enumerate(thetas) if q not in (j, j + 1))
        got = _SAMPLE_NODES[key] = (j, j + 1, *(q for _, _, q in others[:4]))
    return got


def _nodes(pts: list[tuple[float, float]], a: float, fa: float, b: float, fb: float) -> list[tuple[float, float]]:
    """Interpolation nodes for a root in the bracket ``[a, b]``: its ends, then up to four of ``pts`` nearest it
    outside it, none within a quarter of the bracket's width of one taken (clustered nodes amplify the rounding
    of ``g``)."""
    gap = 0.25 * (b - a)
    lo, hi = a - gap, b + gap
    # (distance to the bracket, x, g), nearest first (ties: the smaller x first, as the points come)
    out = sorted([(a - x if x < a else x - b, x, v) for x, v in pts if x <= lo or x >= hi])
    near = [(a, fa), (b, fb)]
    taken: list[float] = []
    for _, x, v in out:
        for q in taken:
            if abs(x - q) < gap:
                break
        else:
            near.append((x, v))
            taken.append(x)
            if len(near) == 6:
                break
    return near


def _poly_root(pts: list[tuple[float, float]], a: float, fa: float, b: float, fb: float,
               tol: float) -> tuple[float, float]:
    """A zero in ``(a, b)`` of the polynomial through the points ``(x, g)`` (nearest the bracket first; ``(a, fa)``
    and ``(b, fb)`` among them, of opposite signs), by Newton's method safeguarded by bisection, and an estimate of
    its error: the change of that zero from the polynomial without the last point (its last Newton term over the
    slope). Newton's method stops at a step of ``tol``, or of a hundredth of that error estimate if coarser (the
    zero of the polynomial is no more accurate than the polynomial). Returns ``(x, err)``; ``err`` is inf where the
    slope vanishes."""
    xs = [p[0] for p in pts]
    c = [p[1] for p in pts]
    m = len(xs)
    for j in range(1, m):  # Newton's divided differences
        for i in range(m - 1, j - 1, -1):
            c[i] = (c[i] - c[i - 1]) / (xs[i] - xs[i - j])
    lo, flo, hi = a, fa, b
    x = a + (b - a) * (fa / (fa - fb))
    if not (a < x < b):
        x = 0.5 * (a + b)
    dp = 0.0
    top = c[-1]
    for _ in range(60):
        p, dp, w = top, 0.0, top
        for i in range(m - 2, -1, -1):  # Horner on the Newton form: the value and the slope at x
            d = x - xs[i]
            dp = dp * d + p
            p = p * d + c[i]
            w *= d  # (the last Newton term: the change by the last point, as the error estimate below)
        if p == 0.0:
            break
        if (p > 0) == (flo > 0):
            lo, flo = x, p
        else:
            hi = x
        xn = x - p / dp if dp != 0.0 else math.nan
        if not (lo < xn < hi):
            xn = 0.5 * (lo + hi)
        # converged: to tol, or (with three points or more) to a hundredth of the error estimate
        if abs(xn - x) <= (tol if m < 3 or dp == 0.0 else max(tol, 0.01 * abs(w / dp))) or hi - lo <= tol:
            x = xn
            break
        x = xn
    if dp == 0.0 or m < 3:
        return x, math.inf
    w = c[-1]
    for xi in xs[:-1]:
        w *= x - xi
    return x, abs(w / dp)


def _inverse_root(pts: list[tuple[float, float]], count: int = 4, lower: bool = False) -> Any:
    """The value at ``g = 0`` of the polynomial through the latest (up to ``count``) points ``(x, g)`` with distinct
    finite ``g``, as ``x`` of ``g`` (Neville's scheme); NaN where fewer than two such points exist. ``lower``: the
    pair (that value, the value of the polynomial through all but the earliest of those points; NaN with two)."""
    xs: list[float] = []
    gs: list[float] = []
    for x, v in reversed(pts):
        if math.isfinite(v) and v not in gs:
            xs.append(x)
            gs.append(v)
            if len(xs) == count:
                break
    m = len(xs)
    if m < 2:
        return (math.nan, math.nan) if lower else math.nan
    p = xs
    below = math.nan
    for lev in range(1, m):
        if lev == m - 1:
            below = p[0]
        for i in range(m - lev):
            p[i] = (gs[i] * p[i + 1] - gs[i + lev] * p[i]) / (gs[i] - gs[i + lev])
    if not lower:
        return p[0]
    return p[0], (below if m > 2 else math.nan)


def implicit_event(event_fn: Callable, t: Tensor, y: Tensor, f: Tensor | Callable[[], Tensor],
                   comp: int) -> tuple[Tensor, Tensor]:
    """The event time and state at a root ``(t, y)`` of component ``comp`` of ``event_fn``, with the gradients of
    the implicit function theorem.

    With ``g(t*, y(t*)) = 0``, ``t_e = t* - (g - g.detach()) / (dg/dt)`` has the value ``t*`` and the gradient
    ``-dg/dtheta / (dg/dt)`` (``dg/dt = g_t + g_y . f``); the state is moved along ``f``. When ``t`` itself
    carries a gradient (a trajectory that starts at ``t``), ``g`` sees the state carried back along ``f``.

    Parameters
    ----------
    event_fn : callable ``(t, y) -> Tensor``
    t : Tensor, 0-dim
        The root's time (may be in the graph).
    y : Tensor
        The state there, in the user's shape, in the graph.
    f : Tensor, or a callable returning it
        ``dy/dt`` at ``(t, y)`` (same number of elements as ``y``; used detached). A callable is called only when a
        gradient is needed.
    comp : int
        The component of ``event_fn`` that crossed zero.

    Returns
    -------
    (Tensor, Tensor)
        ``t_e`` (0-dim) and ``y_e`` (``y``'s shape), equal to ``(t, y)`` in value.

    Examples
    --------
    >>> import torch
    >>> c = torch.tensor(0.5, requires_grad=True)
    >>> y = torch.tensor([0.5])                     # y' = -y reaches c at t = log(1/c): here t = 0
    >>> t_e, _ = implicit_event(lambda t, y: y[0] - c, torch.tensor(0.0), y, -y, 0)
    >>> torch.autograd.grad(t_e, c)[0]              # d log(1/c) / dc = -1/c
    tensor(-2.)
    """
    td = t.detach()
    if not t.requires_grad:
        g = event_values(event_fn, td, y)[comp]
        if not g.requires_grad:  # nothing to differentiate: no derivative needed
            return td, y
    f = (f() if callable(f) else f).detach().reshape(y.shape)
    y_at = y - f * (t - td).to(f.dtype) if t.requires_grad else y
    if t.requires_grad:
        g = event_values(event_fn, td, y_at)[comp]
    with torch.enable_grad():
        tg = td.clone().requires_grad_(True)
        yg = y.detach().clone().requires_grad_(True)
        gd = event_fn(tg, yg).reshape(-1)[comp]
        if gd.requires_grad:
            gt, gy = torch.autograd.grad(gd, (tg, yg), allow_unused=True)
        else:
            gt, gy = None, None
    dgdt = (gt if gt is not None else 0.0) + ((gy * f).sum() if gy is not None else 0.0)
    dgdt = torch.as_tensor(dgdt, dtype=td.dtype, device=td.device).detach()
    if float(dgdt.abs()) == 0.0 or not g.requires_grad:
        t_e = td if not t.requires_grad else t
    else:
        t_e = td - (g - g.detach()).to(td.dtype) / dgdt
    y_e = y_at + f * (t_e - td).to(f.dtype)
    return t_e, y_e


# ----------------------------------------------------------------------------------------------
# Per-sample events (core/rows.py)
# ----------------------------------------------------------------------------------------------
class RowEventWatch:
    """Events of a per-sample solve (:func:`neurodyn.core.rows.integrate_rows`): every row its own occurrences.

    An event function receives the rows' times ``t`` (``(B,)``) and states ``y`` (``(B, *shape)``, the user's
    shape) and returns one value per row (``(B,)``) or ``k`` per row (``(B, k)``). After every attempted step the
    accepted rows' values at their step ends (and at the interior fractions of ``Event(samples=k)``, on their dense
    output) are checked for sign changes (in each event's direction); a row's first root is located by Illinois
    regula falsi on its dense output, vectorised over the rows, to :data:`ROOT_RTOL`. That occurrence ends the row's
    step: the row continues from the event (its state there, or the jumped state, with its derivative evaluated
    afresh), so
    several occurrences in one step are found one step at a time. Terminal occurrences and Zeno limits end the row
    (status ``"event"`` / ``"zeno"``); the others go on.
    """

    def __init__(self, events: tuple[Event, ...], term: Callable[[Tensor, Tensor], Tensor], solver: Stepper,
                 shape: torch.Size, t0: Tensor, y0: Tensor, cfg: LoopConfig):
        self.events, self.term, self.solver, self.shape = events, term, solver, tuple(shape)
        self.b = y0.shape[0]
        self.co = solver.coefficients(y0.dtype, y0.device)
        self.fracs = sample_fractions(events)
        with torch.no_grad():
            g0 = [self._one(e, t0, y0, None) for e in events]
        self.sizes = [g.shape[1] for g in g0]
        owner = [i for i, k in enumerate(self.sizes) for _ in range(k)]
        dev = y0.device
        self.owner = torch.tensor(owner, dtype=torch.long, device=dev)
        self.dirs = torch.tensor([events[i].direction for i in owner], dtype=torch.float64, device=dev)
        self.stop_after = torch.tensor([math.inf if e.stop_after is None else e.stop_after for e in events],
                                       dtype=torch.float64, device=dev)
        self.has_jump = [e.jump is not None for e in events]
        self.g = torch.cat(g0, 1)
        self.counts = torch.zeros(self.b, len(events), dtype=torch.float64, device=dev)
        self.total = torch.zeros(self.b, dtype=torch.float64, device=dev)
        self.last_t = torch.full((self.b,), math.nan, dtype=torch.float64, device=dev)
        self.max_events, self.min_gap = cfg.max_events, cfg.min_event_gap
        self.records: list[tuple[int, Tensor, Tensor, int]] = []  # (row, t_e, y_e, event)
        self.probe_t = torch.full((self.b,), math.nan, dtype=torch.float64, device=dev)  # see EventWatch.probes
        self.nfe = 0

    def _one(self, e: Event, t: Tensor, y: Tensor, k: int | None) -> Tensor:
        """Event ``e`` at the rows' ``(t, y)``, checked: ``(B, k)`` float64."""
        v = e.fn(t.to(y.real.dtype if y.is_complex() else y.dtype), y.view(self.b, *self.shape[1:]))
        if not isinstance(v, Tensor) or v.dtype == torch.bool or v.is_complex() or v.dim() not in (1, 2) \
                or v.shape[0] != self.b or (k is not None and (v.shape[1] if v.dim() == 2 else 1) != k):
            got = f"shape {tuple(v.shape)}, dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"with per_sample_steps an Event's fn(t, y) gets the rows' times (B,) and states "
                             f"{(self.b, *self.shape[1:])} and must return one real value per row, shape ({self.b},) "
                             f"or ({self.b}, k) with the same k at every time; got {got}.")
        v = v.reshape(self.b, -1).to(torch.float64)
        if bool(torch.isnan(v.detach()).any()):
            raise InputError("an Event's fn returned NaN along the per-sample solve: an event function must be a "
                             "number everywhere along the solution.")
        return v

    def values(self, t: Tensor, y: Tensor) -> Tensor:
        """Every event's components at the rows' ``(t, y)``: ``(B, K)`` float64."""
        parts = [self._one(e, t, y, k) for e, k in zip(self.events, self.sizes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def after_step(self, t_prev: Tensor, y_prev: Tensor, h: Tensor, hc: Tensor, y1: Tensor, kh: Tensor,
                   f_last: Tensor, accept: Tensor, t_cur: Tensor, y: Tensor, k1: Tensor, t_stop: Tensor,
                   status: Tensor, codes: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Find, locate and act on the rows' first occurrences in the step just attempted. Returns the updated
        ``(t_cur, y, k1, t_stop, status)``."""
        solver, co = self.solver, self.co
        fh1 = f_last * hc if co.dense_t is None else None
        with torch.no_grad():
            yp, yn, fh = y_prev.detach(), y1.detach(), None if fh1 is None else fh1.detach()
            kf = None  # the rows' dense output: only where interior points are checked or a root is located
            if self.fracs:
                kf = solver.dense_stages_rows(self.term, t_prev, h, hc, yp, kh.detach(), co)
                self.nfe += len(co.extra_a)
            rows = [self.g]
            for fr in self.fracs:
                th = torch.full_like(t_prev, fr)
                rows.append(self.values(t_prev + fr * h, solver.interpolate_rows(yp, yn, kf, fh, th, co)))
            g_end = self.values(t_prev + h, yn)
            rows.append(g_end)
            G = torch.stack(rows)  # (5, B, K)
            p, q = G[:-1], G[1:]
            dirs = self.dirs.view(1, 1, -1)
            changed = (p != 0) & ((q > 0) != (p > 0) | (q == 0)) & ((dirs == 0) | ((dirs > 0) == (p < 0)))
            changed &= accept.view(1, -1, 1)
            any_row = changed.any(2)  # (4, B)
            occ = any_row.any(0)
            if not bool(occ.any()):
                self.g = torch.where(accept.view(-1, 1), g_end, self.g)
                self.probe_t = torch.where(accept, math.nan, self.probe_t)
                return t_cur, y, k1, t_stop, status
            if kf is None:
                kf = solver.dense_stages_rows(self.term, t_prev, h, hc, yp, kh.detach(), co)
                self.nfe += len(co.extra_a)
            j = torch.argmax(any_row.to(torch.int8), 0)  # first interval per row
            fracs = torch.tensor((0.0, *self.fracs, 1.0), dtype=torch.float64, device=h.device)
            ar = torch.arange(self.b, device=h.device)
            t_scale = torch.maximum(t_prev.abs(), (t_prev + h).abs())
            res = torch.maximum(2 * torch.finfo(torch.float64).eps * t_scale,
                                ROOT_RTOL * torch.maximum(t_scale, h.abs())) / h.abs().clamp(min=1e-300)
            theta = torch.full((self.b,), math.inf, dtype=torch.float64, device=h.device)
            comp = torch.zeros(self.b, dtype=torch.long, device=h.device)
            # rows whose start value was taken a moment after a jump: their first bracket starts there
            a0 = torch.where((j == 0) & torch.isfinite(self.probe_t),
                             ((self.probe_t - t_prev) / h).clamp(0.0, 0.5 * float(fracs[1])), fracs[j])
            for c in range(G.shape[2]):
                m = occ & changed[j, ar, c]
                if not bool(m.any()):
                    continue
                th = self._locate(c, m, a0, G[j, ar, c], fracs[j + 1], G[j + 1, ar, c], res, t_prev, h, yp,
                                  yn, kf, fh)
                better = m & (th < theta)
                theta = torch.where(better, th, theta)
                comp = torch.where(better, c, comp)
            theta = torch.where(occ, theta, 1.0)
            ev = self.owner[comp]
            t_occ = t_prev + theta * h
            zeno = occ & ((self.total >= self.max_events) | ((t_occ - self.last_t).abs() < self.min_gap))
            counted = occ & ~zeno
            self.counts[ar, ev] += counted.to(torch.float64)
            self.total += counted.to(torch.float64)
            self.last_t = torch.where(counted, t_occ, self.last_t)
            terminal = counted & (self.counts[ar, ev] >= self.stop_after[ev])
            jump_rows = counted & ~terminal & torch.tensor(self.has_jump, device=h.device)[ev]
        # The occurrences' times and states, in the graph where one is recorded (implicit function theorem).
        kf_g = solver.dense_stages_rows(self.term, t_prev, h, hc, y_prev, kh, co) if torch.is_grad_enabled() else kf
        y_star = solver.interpolate_rows(y_prev, y1, kf_g, fh1, theta, co)
        t_e, y_e = self._implicit(t_occ, y_star, comp, occ)
        for r in torch.nonzero(counted).view(-1).tolist():
            self.records.append((r, t_e[r], y_e[r], int(ev[r])))
        # The rows' steps end at their occurrences.
        cut = occ.view(-1, 1)
        y_new = y_e
        if any(self.has_jump) and bool(jump_rows.any()):
            y_new = self._jump(t_e, y_e, ev, jump_rows)
        if t_e.requires_grad:
            # The row goes on from a moving time (as jump_state): the state moved back along f there.
            with torch.no_grad():
                f_plus = self.term(t_occ, y_new.detach())
            self.nfe += 1
            y_new = y_new - f_plus * (t_e - t_e.detach()).to(f_plus.dtype).view(-1, 1)
        y = torch.where(cut, y_new, y)
        t_cur = torch.where(occ, t_occ, t_cur)
        stopped = terminal | zeno
        status = torch.where(terminal, codes[0], torch.where(zeno, codes[1], status))
        t_stop = torch.where(stopped, t_occ, t_stop)
        k1 = torch.where(cut, self.term(t_cur, y), k1)
        self.nfe += 1
        with torch.no_grad():
            g_post = self.values(t_cur, y.detach())
            # the component that fired, watched from its value a moment later along the row's new trajectory
            dt = math.sqrt(torch.finfo(y.dtype).eps) * h
            probe = self.values(t_cur + dt, y.detach() + dt.to(y.dtype).view(-1, 1) * k1.detach())
            fired = torch.zeros_like(g_post, dtype=torch.bool)
            fired[ar, comp] = True
            g_post = torch.where(fired, probe, g_post)
            self.g = torch.where(occ.view(-1, 1), g_post, torch.where(accept.view(-1, 1), g_end, self.g))
            self.probe_t = torch.where(occ, t_cur + dt, torch.where(accept, math.nan, self.probe_t))
            # A jump that sends the fired component back toward the side its event fires from, yet it is past the
            # surface again dt later: the next occurrence follows within dt (Zeno; as the eager loop).
            d = self.dirs[comp] * torch.sign(h)
            back = jump_rows & (d != 0) & (probe[ar, comp] * d >= 0)
        if bool(back.any()):
            with torch.enable_grad():
                tg = t_cur.detach().clone().requires_grad_(True)
                yg = y.detach().clone().requires_grad_(True)
                gd = self.values(tg, yg)[ar, comp]
                grads = torch.autograd.grad(gd.sum(), (tg, yg), allow_unused=True) if gd.requires_grad else \
                    (None, None)
            rate = torch.zeros_like(t_cur)
            if grads[0] is not None:
                rate = rate + grads[0]
            if grads[1] is not None:
                rate = rate + (grads[1] * k1.detach()).sum(1).to(torch.float64)
            zeno2 = back & (rate * d < 0)
            status = torch.where(zeno2, codes[1], status)
            t_stop = torch.where(zeno2, t_cur.detach(), t_stop)
        return t_cur, y, k1, t_stop, status

    def _locate(self, c: int, m: Tensor, a: Tensor, fa: Tensor, b: Tensor, fb: Tensor, res: Tensor,
                t_prev: Tensor, h: Tensor, yp: Tensor, yn: Tensor, kf: Tensor, fh: Tensor | None) -> Tensor:
        """Illinois regula falsi (with bisections where a bracket fails to halve), vectorised over the rows in
        ``m``; the far end of each final bracket (the crossing's far side)."""
        solver, co = self.solver, self.co
        side = torch.zeros_like(a)
        bis = torch.zeros_like(m)
        done = ~m | (fb == 0) | (b - a <= res)
        for _ in range(_MAX_ITERATIONS):
            if bool(done.all()):
                break
            x = a + (b - a) * (fa / (fa - fb))
            x = torch.where(bis | ~((a < x) & (x < b)), 0.5 * (a + b), x)
            done = done | ~((a < x) & (x < b))
            xs = torch.where(done, b, x)
            fx = self.values(t_prev + xs * h, solver.interpolate_rows(yp, yn, kf, fh, xs, co))[:, c]
            width = b - a
            live = ~done
            to_b = live & ((fx > 0) == (fb > 0))
            to_a = live & ~to_b
            zero = live & (fx == 0)
            fa = torch.where(to_b & (side == -1), 0.5 * fa, fa)
            fb = torch.where(to_a & (side == 1), 0.5 * fb, fb)
            b, fb = torch.where(to_b | zero, xs, b), torch.where(to_b | zero, fx, fb)
            a, fa = torch.where(to_a & ~zero, xs, a), torch.where(to_a & ~zero, fx, fa)
            side = torch.where(to_b, -1.0, torch.where(to_a, 1.0, side))
            bis = (b - a) > 0.5 * width
            done = done | zero | (b - a <= res)
        return b

    def _implicit(self, t_star: Tensor, y_star: Tensor, comp: Tensor, occ: Tensor) -> tuple[Tensor, Tensor]:
        """Event times ``(B,)`` and states ``(B, n)`` with the implicit function theorem's gradients (rows in
        ``occ``; one field evaluation on the batch where a graph is recorded)."""
        if not torch.is_grad_enabled():
            return t_star, y_star
        ar = torch.arange(self.b, device=t_star.device)
        g = self.values(t_star, y_star)[ar, comp]
        if not g.requires_grad:
            return t_star, y_star
        with torch.enable_grad():
            tg = t_star.detach().clone().requires_grad_(True)
            yg = y_star.detach().clone().requires_grad_(True)
            gd = self.values(tg, yg)[ar, comp]
            gt, gy = torch.autograd.grad(gd.sum(), (tg, yg), allow_unused=True)
        f = self.term(t_star, y_star.detach()).detach()
        self.nfe += 1
        dgdt = (gt if gt is not None else 0.0) + ((gy * f).sum(1).to(torch.float64) if gy is not None else 0.0)
        dgdt = torch.as_tensor(dgdt, dtype=torch.float64, device=t_star.device)
        ok = occ & (dgdt != 0)
        t_e = torch.where(ok, t_star - (g - g.detach()) / torch.where(ok, dgdt, 1.0), t_star)
        y_e = y_star + f * (t_e - t_star.detach()).to(f.dtype).view(-1, 1)
        return t_e, y_e

    def _jump(self, t_e: Tensor, y_e: Tensor, ev: Tensor, rows: Tensor) -> Tensor:
        """The rows' states after their events' jumps (each event's ``jump`` sees all rows; the rows whose event it
        is take its result), moved for a time with a gradient as :func:`jump_state` does."""
        y_new = y_e
        for i, e in enumerate(self.events):
            mine = rows & (ev == i)
            if e.jump is None or not bool(mine.any()):
                continue
            out = e.jump(t_e.to(y_e.dtype), y_e.view(self.b, *self.shape[1:]))
            if not isinstance(out, Tensor) or tuple(out.shape) != (self.b, *self.shape[1:]) or out.dtype != y_e.dtype:
                got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, Tensor) else \
                    type(out).__name__
                raise InputError(f"with per_sample_steps an Event's jump(t, y) gets the rows' times (B,) and states "
                                 f"{(self.b, *self.shape[1:])} and must return the new states, that shape and dtype "
                                 f"{y_e.dtype}; got {got}.")
            y_new = torch.where(mine.view(-1, 1), out.reshape(self.b, -1), y_new)
        return y_new
