"""Step-size control: PID controllers, Hairer's initial step, error norms."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .tensors import real_dtype


@dataclass
class PIDController:
    """A PID step-size controller (I, PI and PID control as settings).

    With the error ratio ``r_n = ||err_n / scale||`` of step ``n`` (accept when ``r_n <= 1``) and
    ``k = error_order + 1``, the next step is

        h_{n+1} = h_n * safety * r_n^(-(p + i + d) / k) * r_{n-1}^((p + 2 d) / k) * r_{n-2}^(-d / k)

    clipped to ``[dfactor, ifactor] * h_n`` (``[accept_dfactor, ifactor] * h_n`` after an accepted step, when
    set; never grown right after a rejection).
    ``pcoeff = dcoeff = 0, icoeff = 1`` is the classic I controller (torchdiffeq's); the default
    ``pcoeff=0.1, icoeff=0.7`` is a light PI controller (Gustafsson; Hairer--Wanner). On work-precision
    (``benchmarks/controller_study.py``: an MLP field, Kepler e=0.6, Van der Pol) no setting dominates:
    I, this PI and stronger PI settings are within about 10% of each other, this one never the worst. At equal
    error against diffrax's I controller (``benchmarks/controller_wp.py``) it needs 0.98-1.04x diffrax's NFE on
    the MLP protocol cases, 0.83x on a Van der Pol batch and 0.92x (geometric mean) on the DETEST problems.

    Parameters
    ----------
    pcoeff, icoeff, dcoeff : float
        Proportional, integral and derivative coefficients.
    safety : float
        Safety factor in ``(0, 1]``.
    ifactor, dfactor : float
        Largest growth and smallest shrink factor per step.
    accept_dfactor : float or None
        Smallest factor right after an accepted step, in ``[dfactor, 1]``; None: ``dfactor``. ``1.0`` never
        shrinks the step after an accepted one (torchdiffeq's and diffrax's rule).
    first_step_rule : str
        Hairer's starting step ``min(100 h0, (0.01 / max(d1, d2))^(1 / (q + 1)))`` when no ``first_step`` is
        given: ``"hairer"`` (``q`` the method's order, norms RMS) or ``"torchdiffeq"`` (as torchdiffeq's
        ``_select_initial_step``: ``q`` the error estimate's order, ``d0``, ``d1``, ``d2`` measured with the
        solve's ``norm`` when one is given, and ``max_step`` capping the step taken, not the trial step ``h0``).
    land_on_end : bool
        True: the last step is shortened to end on the final time. False: steps keep their proposed sizes and the
        last one runs past the final time; the outputs up to it (the final one included) are read off the
        method's dense output (torchdiffeq's rule). Eager loop only (not with ``per_sample_steps`` or
        ``compile``); a solve with events lands on the final time all the same (a crossing past it is not the
        solve's).

    Examples
    --------
    >>> import torch, neurodyn
    >>> ctrl = neurodyn.PIDController(pcoeff=0.0, icoeff=1.0)  # plain I control
    >>> sol = neurodyn.solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), controller=ctrl)
    """

    pcoeff: float = 0.1
    icoeff: float = 0.7
    dcoeff: float = 0.0
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    accept_dfactor: float | None = None
    first_step_rule: str = "hairer"
    land_on_end: bool = True

    def __post_init__(self) -> None:
        if self.first_step_rule not in ("hairer", "torchdiffeq"):
            raise InputError(f"PIDController: first_step_rule must be 'hairer' or 'torchdiffeq', got "
                             f"{self.first_step_rule!r}.")
        for name in ("pcoeff", "icoeff", "dcoeff"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise InputError(f"PIDController: {name} must be a finite number >= 0, got {v}.")
        if self.icoeff + self.pcoeff + self.dcoeff <= 0:
            raise InputError("PIDController: pcoeff + icoeff + dcoeff must be > 0.")
        if not 0 < self.safety <= 1:
            raise InputError(f"PIDController: safety must be in (0, 1], got {self.safety}.")
        if not self.ifactor >= 1:
            raise InputError(f"PIDController: ifactor must be >= 1, got {self.ifactor}.")
        if not 0 < self.dfactor <= 1:
            raise InputError(f"PIDController: dfactor must be in (0, 1], got {self.dfactor}.")
        if self.accept_dfactor is not None and not self.dfactor <= self.accept_dfactor <= 1:
            raise InputError(f"PIDController: accept_dfactor must be None or in [dfactor, 1] = [{self.dfactor}, 1], "
                             f"got {self.accept_dfactor}.")

    def start(self, error_order: int) -> ControllerState:
        """The per-solve state for a method whose error estimate has order ``error_order``."""
        return ControllerState(self, error_order + 1)


# The landing rule (landing_reach): a step lands on the next stop when the distance to it is within this factor of the
# step (no sliver steps from accumulated rounding) plus LANDING_TIME_EPS machine epsilons of the times' dtype times the
# span's scale |t0| + |t_end|. Times given in float32 are rounded by up to half an ulp of that scale, so steps of the
# given size (accumulated in float64 from one of them) can miss the next by a sliver no float32 time resolves: [0, 0.3]
# in float32 with step_size=0.1 took a fourth step of 1.2e-8, and [2.9, 0] a thirtieth of 9.5e-8. That allowance is
# capped at LANDING_TIME_CAP steps: where float32 times cannot resolve the step (t ~ 1e6, step 0.01) no step grows
# by more than that. Every loop (eager, per-sample rows, compiled) uses it.
LANDING_SLACK = 1.0 + 1e-7
LANDING_TIME_EPS = 2.0
LANDING_TIME_CAP = 1e-3


def landing_reach(h_abs: Any, scale: Any, eps: float) -> Any:
    """How far away a stop may be for a step of size ``h_abs`` to land on it: ``h_abs`` by ``LANDING_SLACK`` plus
    ``LANDING_TIME_EPS * eps * scale``, at most ``LANDING_TIME_CAP * h_abs``; ``scale`` is ``|t0| + |t_end|`` of the
    solve (a per-sample row's: its time and end time), ``eps`` the machine epsilon of the times' dtype
    (:func:`time_eps`). Floats, or tensors with ``scale`` a tensor.

    >>> 0.30000001192 - 0.2 <= landing_reach(0.1, 0.3, 2.0 ** -23)  # [0, 0.3] in float32, two steps of 0.1 taken
    True
    >>> landing_reach(0.01, 2e6, 2.0 ** -23) < 0.01 * 1.0011  # float32 times near 1e6: capped at 1e-3 steps
    True
    """
    allowance = LANDING_TIME_EPS * eps * scale
    cap = LANDING_TIME_CAP * h_abs
    allowance = torch.clamp(allowance, max=cap) if isinstance(allowance, Tensor) else min(allowance, cap)
    return h_abs * LANDING_SLACK + allowance


def even_step(remaining: float, h_abs: float) -> float:
    """The length of a step toward a stop ``remaining`` away (> 0) for a step size ``h_abs`` (the controller's
    proposal, or the fixed step's :func:`landing_reach`): ``remaining`` split into ``ceil(remaining / h_abs)`` equal
    steps, so the steps up to the stop are equal and no larger than ``h_abs``, instead of steps of ``h_abs`` and then
    a short sliver step landing on the stop (and, adaptive, the step after the stop proposed from that sliver). The
    eager loop (:func:`neurodyn.core.loop.iterate`) and :func:`step_grid` step so toward a jump time (``jump_t``),
    where the next step starts afresh anyway; toward the final time and ordinary stops they step ``h_abs`` (the
    landing rule takes the last one). Each step is recomputed from the distance left and the latest ``h_abs``.

    >>> even_step(1.0, 0.4)  # three steps of 1/3, not 0.4, 0.4 and a sliver of 0.2
    0.3333333333333333
    >>> even_step(1.0, 0.5), even_step(0.3, 0.5)  # the proposal divides the distance; within one step: the distance
    (0.5, 0.3)
    """
    q = remaining / h_abs
    if not q < 2.0 ** 53:  # (huge, inf or NaN: the split would change nothing a float resolves)
        return h_abs
    return remaining / max(1, math.ceil(q))


def fixed_even_step(remaining: float, step_size: float, reach: float) -> float:
    """The length of a fixed step toward a jump time ``remaining`` away (> ``reach``, :func:`landing_reach` of
    ``step_size``): ``step_size`` itself where a whole number of steps reaches the jump (within the landing rule's
    slack, so the grid is ``t + k h`` as without a jump), else :func:`even_step`'s equal split.

    >>> fixed_even_step(0.2, 0.05, 0.05 * (1 + 1e-7)), fixed_even_step(0.0204, 0.02, 0.02 * (1 + 1e-7))
    (0.05, 0.0102)
    """
    q = remaining / step_size
    if not q < 2.0 ** 53 or abs(remaining - round(q) * step_size) <= reach - step_size:
        return step_size
    return even_step(remaining, reach)


# Relative tolerances are raised to this many machine epsilons of the state's real dtype (float32: 2.4e-7; float64:
# 4.4e-16; neurodyn.options.clamp_rtol warns), and methods that tighten their tolerances internally (trbdf2) stop there
# too. Measured in float32 (docs/results.md, "float32 tolerances below the floor"): lowering the floor from 8 to 2
# epsilons, dopri5, tsit5 and bosh3 asked for rtol 1e-7 on DETEST problems, torchdiffeq's ode_demo spiral and MLP fields
# came out more accurate (error x0.55 geometric mean, NFE x1.3) with no failed solve; below 2 epsilons their errors stop
# falling (rounding), and an implicit method's error estimate becomes rounding noise (kvaerno3: 12 times the steps for
# a 5 times larger error at 1 epsilon).
RTOL_FLOOR_EPS = 2.0


def time_eps(t_dtype: torch.dtype | None) -> float:
    """The machine epsilon of the times' dtype (``None``: torch's default dtype), the unit of the landing rule."""
    return torch.finfo(t_dtype or torch.get_default_dtype()).eps


def step_grid(times: list[float], stops: list[float], step_size: float, eps: float,
              jumps: frozenset[float] | set[float] = frozenset()) -> tuple[list[float], list[float]]:
    """The step starts ``t_0 .. t_N`` (the last is the end time) and signed sizes ``h_0 .. h_{N-1}`` of a fixed-step
    solve over ``times`` landing on ``stops`` (ascending in the direction of travel, the end time last), as the eager
    loop (:func:`neurodyn.core.loop.iterate`) steps: ``t + h`` until a stop is within :func:`landing_reach` (``eps``:
    :func:`time_eps` of the times' dtype); toward a stop among ``jumps``, :func:`fixed_even_step`.

    >>> step_grid([0.0, 1.0], [1.0], 0.5, 2.0 ** -52)
    ([0.0, 0.5, 1.0], [0.5, 0.5])
    >>> step_grid([0.0, 1.0], [0.75, 1.0], 0.5, 2.0 ** -52, {0.75})[0]  # two steps of 0.375 to the jump at 0.75
    [0.0, 0.375, 0.75, 1.0]
    """
    t = times[0]
    direction = 1.0 if times[-1] > t else -1.0
    scale = abs(times[0]) + abs(times[-1])
    reach = landing_reach(step_size, scale, eps)
    ts, hs = [t], []
    for stop in stops:
        while True:
            remaining = (stop - t) * direction
            landing = remaining <= reach
            h = (stop - t) if landing else direction * (fixed_even_step(remaining, step_size, reach) if stop in jumps
                                                        else step_size)
            t = stop if landing else t + h
            ts.append(t)
            hs.append(h)
            if landing:
                break
    return ts, hs


def rtol_floor(dtype: torch.dtype) -> float:
    """The smallest relative tolerance a solve runs at for a state of ``dtype``: ``RTOL_FLOOR_EPS`` machine epsilons
    of its real dtype."""
    return RTOL_FLOOR_EPS * torch.finfo(real_dtype(dtype)).eps


# The step-size underflow rule, judged against the precision of the state (its real dtype's machine epsilon
# ``eps``), the same in every loop (eager, per-sample rows, compiled) in a scalar and a tensor form side by side
# (tests/test_precision.py holds them equal). A proposed step ``h`` from time ``t`` is too small when
#   1. it is not a positive finite number;
#   2. it is below the resolution of time in the state's dtype, ``h < eps |t|`` (``t + h`` rounds to ``t`` or its
#      neighbour there: the vector field, which receives ``t`` in that dtype, could not tell the step's ends apart);
#   3. or the attempt just rejected could not have been improved by a smaller step: every component's change over
#      it, scaled down to the proposed step, ``|y1 - y0| h / h_tried``, is within the state's resolution
#      ``eps |y0|``. An error estimate that rejects changes that small is rounding (a tolerance below what the dtype
#      resolves, e.g. an implicit method's tightened internal tolerance), and a smaller step cannot reduce it:
#      steps that small leave the state unchanged, so a solve would advance in time with a frozen state.
def step_underflow(t: float, h_new: float, eps: float, frozen: bool = False) -> bool:
    """The underflow rule on Python floats (the eager loop); ``frozen`` from :func:`frozen_attempt` (False after an
    accepted step)."""
    return not (0.0 < h_new < math.inf) or h_new < eps * abs(t) or frozen


def step_underflow_tensor(t: Tensor, h_new: Tensor, eps: float, frozen: Tensor | None = None, *,
                          blend: bool = False) -> Tensor:
    """:func:`step_underflow` elementwise on tensors of one shape (e.g. ``(B,)``; per-sample rows, compiled loop);
    ``frozen`` None: rules 1 and 2 only (the caller ors in rule 3 where an attempt was rejected). ``blend``: NaN and
    +inf replaced by a comparison and a select instead of ``nan_to_num`` (the same values; for compiled code, where
    Inductor's CPU vectors test NaN one element at a time)."""
    # Not above the floor eps |t|, or not finite. NaN and +inf map to 0, which no floor admits (-inf stays below):
    # one comparison (the loops run this every attempt).
    if blend:  # (h < inf: False for NaN and +inf only)
        h_new = torch.where(h_new < math.inf, h_new, 0.0)
    else:
        h_new = torch.nan_to_num(h_new, nan=0.0, posinf=0.0)
    under = torch.le(h_new, t.abs().mul_(eps))
    return under if frozen is None else under.logical_or_(frozen)


def frozen_attempt(y0: Tensor, y1: Tensor, shrink: float | Tensor, eps: float) -> Tensor:
    """Rule 3 of the underflow rule for rows ``y0``, ``y1`` of shape ``(B, n)`` (the start and the end of a rejected
    attempt), ``shrink`` the proposed step over the tried one (a float or ``(B, 1)``): ``(B,)``, True where every
    component's scaled change ``|y1 - y0| shrink`` is at most ``eps |y0|``. NaN/inf changes are never frozen."""
    y0 = y0.detach()
    return (y1.detach() - y0).abs().mul_(shrink).le_(y0.abs().mul_(eps)).all(dim=-1)


# Components read by not_frozen: any component clearly outside rule 3's bound proves the attempt not frozen.
NOT_FROZEN_PROBE = 8


def not_frozen(y0: Tensor, y1: Tensor, shrink: float, eps: float) -> bool:
    """A host-side screen before :func:`frozen_attempt` on one row (``y0``, ``y1`` of shape ``(1, n)``, the eager
    loop): True when one of the first :data:`NOT_FROZEN_PROBE` components changed by clearly more than rule 3 allows,
    ``|y1 - y0| shrink > 2 eps |y0|`` and above ``1e-30`` (computed in float64: far from the rounding and underflow of
    any real dtype's own arithmetic, so :func:`frozen_attempt` would find the row not frozen too). False: undecided,
    :func:`frozen_attempt` decides. One small transfer instead of the tensor form's eight operations per rejection.

    >>> not_frozen(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.5, 2.0]]), 0.5, 1e-7)
    True
    >>> not_frozen(torch.tensor([[1.0]]), torch.tensor([[1.0]]), 0.5, 1e-7)  # unchanged: undecided
    False
    """
    if y0.is_complex():
        return False
    k = NOT_FROZEN_PROBE
    a = (y0 if y0.shape[1] <= k else y0[:, :k]).tolist()[0]
    b = (y1 if y1.shape[1] <= k else y1[:, :k]).tolist()[0]
    for ai, bi in zip(a, b):
        d = abs(bi - ai) * shrink
        if d > 1e-30 and d > 2.0 * eps * abs(ai):  # False for NaN
            return True
    return False


class ControllerState:
    """Per-solve memory of a controller (previous error ratios) and its proposal formula, in two forms side by
    side: :meth:`propose` on Python floats (the eager loop: one step, host-side) and :meth:`propose_tensor` on
    tensors (per-sample rows and the compiled loop: one value per row, no host read). tests/test_adaptive.py
    holds them equal."""

    __slots__ = ("b1", "b2", "b3", "safety", "ifactor", "dfactor", "adfactor", "prev", "prev2", "inv_k", "plain_i",
                 "one_pow")

    def __init__(self, c: PIDController, k: int):
        self.b1 = (c.pcoeff + c.icoeff + c.dcoeff) / k
        self.b2 = (c.pcoeff + 2 * c.dcoeff) / k
        self.b3 = c.dcoeff / k
        self.inv_k = 1.0 / k
        self.safety, self.ifactor, self.dfactor = c.safety, c.ifactor, c.dfactor
        self.adfactor = c.dfactor if c.accept_dfactor is None else c.accept_dfactor
        self.prev = 1.0
        self.prev2 = 1.0
        # I control: accepted and rejected steps share one exponent and no memory is needed.
        self.plain_i = self.b2 == 0 and self.b3 == 0 and self.b1 == self.inv_k
        # propose_tensor: r ** -b1 (accepted) and r ** -inv_k (rejected) as one pow with a per-element exponent,
        # except where an exponent is one that pow kernels special-case (sqrt, reciprocal, products: other rounding).
        self.one_pow = all(e != round(e) and abs(e) != 0.5 for e in (self.b1, self.inv_k))

    def propose(self, h_abs: float, ratio: float, accepted: bool) -> float:
        """The next step size magnitude after a step of size ``h_abs`` with error ratio ``ratio``."""
        if not math.isfinite(ratio):
            return h_abs * self.dfactor
        r = max(ratio, 1e-10)
        if accepted:
            factor = self.safety * r ** (-self.b1)
            if self.b2:
                factor *= self.prev ** self.b2
            if self.b3:
                factor *= self.prev2 ** (-self.b3)
            self.prev2, self.prev = self.prev, r
            return h_abs * min(self.ifactor, max(self.adfactor, factor))
        # Rejected: plain I control, never grow.
        factor = self.safety * r ** (-self.inv_k)
        return h_abs * min(1.0, max(self.dfactor, factor))

    def propose_tensor(self, h_abs: Tensor, ratio: Tensor, accept: Tensor, prev: Tensor, prev2: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`propose` elementwise: ``h_abs``, ``ratio``, ``accept`` and the previous accepted ratios ``prev``,
        ``prev2`` (all of one shape, e.g. ``(B,)``) -> ``(h_new, prev, prev2)``. NaN/inf ratios shrink by ``dfactor``.
        """
        r = ratio.clamp_min(1e-10)  # NaN stays NaN
        if self.plain_i:
            fac = r.pow(-self.b1)
        else:
            if self.one_pow:  # one pow of r per element, its exponent chosen by accept: the same values as two
                rej = r.pow(torch.full_like(r, -self.inv_k).masked_fill_(accept, -self.b1))
                fac = rej
            else:
                fac, rej = r.pow(-self.b1), None
            if self.b2:
                fac = fac * prev.pow(self.b2)
            if self.b3:
                fac = fac * prev2.pow(-self.b3)
                prev2 = torch.where(accept, prev, prev2)
            prev = torch.where(accept, r, prev)
            fac = torch.where(accept, fac, r.pow(-self.inv_k) if rej is None else rej)
        return h_abs * self._bounded(fac * self.safety, accept), prev, prev2

    def _bounded(self, fac: Tensor, accept: Tensor, blend: bool = False) -> Tensor:
        """The step factors (safety included) of :meth:`propose_tensor` within ``[dfactor, ifactor]``, accepted ones
        at least ``adfactor``; NaN factors -> ``dfactor``. ``blend``: the lower bound and NaN as one comparison and a
        select instead of ``nan_to_num`` and ``clamp`` (the same values; for compiled code, see
        :func:`step_underflow_tensor`)."""
        # A rejected step has r > 1, so its factor is below safety <= 1: the ifactor cap only bites accepted ones.
        if blend:  # (fac >= dfactor: False for NaN)
            fac = torch.where(fac >= self.dfactor, fac, self.dfactor).clamp_max(self.ifactor)
        else:
            fac = torch.nan_to_num(fac, nan=self.dfactor).clamp_(self.dfactor, self.ifactor)
        if self.adfactor > self.dfactor:  # (NaN ratios never accept: they keep dfactor)
            fac = torch.where(accept, fac.clamp_min(self.adfactor), fac)
        return fac

    def propose_tensor_log(self, h_abs: Tensor, ratio: Tensor, accept: Tensor, prev: Tensor, prev2: Tensor,
                           log_prev: Tensor, log_prev2: Tensor, blend: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`propose_tensor` with the factor's powers as one ``exp`` of a sum of logarithms: ``r^-b1 prev^b2
        prev2^-b3 = exp(-b1 log r + b2 log prev - b3 log prev2)``, the logarithms of the previous ratios carried
        beside them (``log_prev``, ``log_prev2``; ``log(1) = 0`` at the start). One ``log`` and one ``exp`` per
        element instead of two or three ``pow`` (the compiled per-sample loop: Sleef's ``pow`` ~13 % of the Van der
        Pol row loop). The factor differs from :meth:`propose_tensor`'s by rounding only (a few ulp; the exponent's
        argument is at most ~4 in magnitude), so a borderline accept/reject can differ. NaN/inf ratios shrink by
        ``dfactor`` as there (``blend``: see :meth:`_bounded`). Returns ``(h_new, prev, prev2, log_prev,
        log_prev2)``."""
        r = ratio.clamp_min(1e-10)  # NaN stays NaN
        lr = r.log()
        e = lr * -self.b1
        if not self.plain_i:
            if self.b2:
                e = e + log_prev * self.b2
            if self.b3:
                e = e - log_prev2 * self.b3
                prev2 = torch.where(accept, prev, prev2)
                log_prev2 = torch.where(accept, log_prev, log_prev2)
            e = torch.where(accept, e, lr * -self.inv_k)
            prev = torch.where(accept, r, prev)
            log_prev = torch.where(accept, lr, log_prev)
        return h_abs * self._bounded(e.exp() * self.safety, accept, blend), prev, prev2, log_prev, log_prev2


class StepperController(PIDController):
    """The step sizes a stepper proposes itself, for methods that choose their order and step together (``bdf``).

    After every attempt the loop asks the stepper (``stepper.propose_step(h_abs, ratio, accepted)``); where it
    has no proposal (a step it did not take, e.g. an adjoint solved with another method) PI control with this
    controller's settings applies. Methods that have one return it from ``default_controller()``, which
    :func:`neurodyn.solve` uses unless a ``controller`` is given.

    Parameters
    ----------
    stepper : object
        With ``begin_control()`` (an integration starts) and ``propose_step(h_abs, ratio, accepted) -> float |
        None``.
    **pid :
        :class:`PIDController` settings of the fallback.
    """

    def __init__(self, stepper, **pid) -> None:
        super().__init__(**pid)
        self.stepper = stepper

    def start(self, error_order: int) -> ControllerState:
        self.stepper.begin_control()
        return _StepperControlState(self, error_order + 1)


class _StepperControlState(ControllerState):
    __slots__ = ("stepper",)

    def __init__(self, c: StepperController, k: int):
        super().__init__(c, k)
        self.stepper = c.stepper

    def propose(self, h_abs: float, ratio: float, accepted: bool) -> float:
        h = self.stepper.propose_step(h_abs, ratio, accepted)
        return super().propose(h_abs, ratio, accepted) if h is None else h


ErrorRatio = Callable[[Tensor, Tensor, Tensor, float], float]


def make_error_ratio(rtol: float | Tensor, atol: float | Tensor, n: int,
                     norm: Callable[[Tensor], Tensor] | None = None,
                     unflatten: Callable[[Tensor], object] | None = None) -> ErrorRatio:
    """Build ``ratio(err, y0, y1, h) = norm(|h| err / (atol + rtol * max(|y0|, |y1|)))`` as a float.

    ``err`` is the error estimate divided by the step ``h``; it is overwritten.

    The default norm is the RMS over all elements. ``norm`` (torchdiffeq's option) receives the scaled
    error in the state's own shape (``unflatten`` restores it) and returns a scalar tensor.
    """
    inv_sqrt_n = 1.0 / math.sqrt(max(n, 1))
    # |y| of the last two states seen: an accepted step's y1 is the next step's y0 (the same tensor), so its
    # magnitude is computed once. Tolerances given as floats become 0-dim tensors of the state's real dtype
    # on first use (cheaper per op than Python scalars, same arithmetic).
    seen: list = [None, None, None, None]  # y_a, |y_a|, y_b, |y_b|
    tols: list = [None, None]

    def scale_of(y0: Tensor, y1: Tensor) -> Tensor:
        c = seen
        if y0 is c[2]:
            a0 = c[3]
        elif y0 is c[0]:
            a0 = c[1]
        else:
            a0 = (y0.detach() if y0.requires_grad else y0).abs()
        a1 = (y1.detach() if y1.requires_grad else y1).abs()
        c[0], c[1], c[2], c[3] = y0, a0, y1, a1
        r, a = tols
        if r is None:
            r = rtol if isinstance(rtol, Tensor) else torch.scalar_tensor(rtol, dtype=a1.dtype, device=a1.device)
            a = atol if isinstance(atol, Tensor) else torch.scalar_tensor(atol, dtype=a1.dtype, device=a1.device)
            tols[0], tols[1] = r, a
        return torch.maximum(a0, a1).mul_(r).add_(a)

    if norm is None:
        def ratio(err: Tensor, y0: Tensor, y1: Tensor, h: float) -> float:
            scaled = err.div_(scale_of(y0, y1))
            if err.shape[0] == 1:
                return float(torch.linalg.vector_norm(scaled)) * (inv_sqrt_n * abs(h))
            return combined_ratio(scaled, h, inv_sqrt_n)
    else:
        def ratio(err: Tensor, y0: Tensor, y1: Tensor, h: float) -> float:
            scaled = err[:1].mul_(abs(h)).div_(scale_of(y0, y1))  # the highest-order estimate only
            return float(norm(unflatten(scaled) if unflatten is not None else scaled))
    return ratio


def rms_ratio(err: Tensor, y0: Tensor, y1: Tensor, rtol: Tensor, atol: Tensor) -> Tensor:
    """The error ratio in tensor form: ``RMS(err / (atol + rtol max(|y0|, |y1|)))`` over the last dimension, or
    DOP853's combination of two estimates (:func:`combined_ratio`); what :func:`make_error_ratio` computes on the host,
    for loops that keep it on the device (per-sample rows, compiled steps and the compiled loop).

    Parameters
    ----------
    err : Tensor, shape ``(r, ..., n)``
        ``r = 1`` error estimate, or ``r = 2`` (the higher- and lower-order estimates), already multiplied by ``h``.
    y0, y1 : Tensor, shape ``(..., n)``
        The states at the step ends.
    rtol, atol : Tensor broadcastable to ``(..., n)``
        The tolerances **multiplied by** ``sqrt(n)`` (so that a plain 2-norm is the RMS: computed once per solve).

    Returns
    -------
    Tensor, shape ``(...)``
    """
    q = err / torch.addcmul(atol, torch.maximum(y0.abs(), y1.abs()), rtol)
    if q.shape[0] == 1:
        return torch.linalg.vector_norm(q[0], dim=-1)
    sq = q.abs().square().sum(-1)
    hi, deno = sq[0], sq[0] + 0.01 * sq[1]
    return torch.where(deno == 0, torch.zeros_like(hi), hi / deno.sqrt())


def combined_ratio(q: Tensor, h: float, inv_sqrt_n: float) -> float:
    """Hairer's DOP853 combination of two scaled estimates (rows of ``q``, divided by ``h``):
    ``|h| E^2 / sqrt(n (E^2 + 0.01 E_low^2))`` with ``E^2`` the sums of squares."""
    sq = (q.abs() ** 2).sum(dim=1)
    e_hi, e_lo = float(sq[0]), float(sq[1])
    deno = e_hi + 0.01 * e_lo
    if deno <= 0.0:
        return 0.0 if math.isfinite(deno) else math.nan
    return abs(h) * e_hi / math.sqrt(deno) * inv_sqrt_n


def initial_step(term: Callable[[float, Tensor], Tensor], t0: float, y0: Tensor, f0: Tensor,
                 direction: float, order: int, rtol: float | Tensor, atol: float | Tensor,
                 ratio_norm: Callable[[Tensor], float], max_step: float) -> float:
    """Hairer, Norsett & Wanner's starting step size (Solving ODEs I, II.4), one extra f evaluation.

    ``ratio_norm`` maps a tensor (already divided by the scale) to its norm as a float.
    """
    with torch.no_grad():
        scale = y0.abs().mul(rtol).add(atol)
        d0 = ratio_norm(y0 / scale)
        d1 = ratio_norm(f0 / scale)
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        h0 = min(h0, max_step)
        y1 = y0 + (direction * h0) * f0
        f1 = term(t0 + direction * h0, y1).reshape(1, -1)
        d2 = ratio_norm((f1 - f0) / scale) / h0
        if not math.isfinite(d2):
            return h0 * 1e-3 if math.isfinite(h0) else 1e-6
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1, max_step)


def initial_step_tensor(f_at: Callable[[Tensor, Tensor], Tensor], t0: Tensor, y0: Tensor, f0: Tensor,
                        direction: float | Tensor, order: int, rtol: Tensor, atol: Tensor,
                        max_step: float | Tensor) -> Tensor:
    """:func:`initial_step` per row, in tensor form (per-sample rows and the compiled loop; no host read).

    ``y0``, ``f0``: ``(B, n)``; ``t0``: ``(B,)`` or 0-dim; ``rtol``/``atol`` multiplied by ``sqrt(n)`` (as for
    :func:`rms_ratio`); ``f_at(t, y)`` evaluates the field at ``(B,)`` times (one extra evaluation). Returns the
    step magnitudes, ``(B,)`` float64.
    """
    scale = torch.addcmul(atol, y0.abs(), rtol)
    d0 = torch.linalg.vector_norm(y0 / scale, dim=-1).to(torch.float64)
    d1 = torch.linalg.vector_norm(f0 / scale, dim=-1).to(torch.float64)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    cap = torch.as_tensor(max_step, dtype=torch.float64, device=h0.device)
    h0 = torch.minimum(h0, cap)
    step = (direction * h0).to(scale.dtype).view(-1, 1)
    f1 = f_at(t0 + direction * h0, y0 + step * f0)
    d2 = torch.linalg.vector_norm((f1 - f0) / scale, dim=-1).to(torch.float64) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / big.clamp_min(1e-300)) ** (1.0 / (order + 1)))
    h = torch.minimum(torch.minimum(100 * h0, h1), cap)
    fallback = torch.where(torch.isfinite(h0), h0 * 1e-3, torch.full_like(h0, 1e-6))
    return torch.where(torch.isfinite(d2), h, fallback)

