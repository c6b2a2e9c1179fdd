"""The native entry point :func:`solve`: validation, then a gradient method over the integrate loop."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .core.config import LoopConfig
from .core.control import PIDController
from .core.events import Event, as_events
from .core.stepper import nextafter
from .core.tensors import VMAP_ADAPTIVE, fixed_bad, no_transform, real_dtype, vmapped
from .core.term import Term, as_field, check_accepts, diffusion_probe
from .errors import InputError, InputTypeError, SolveFailure
from .fields import autocast_dtype, autocast_field
from .gradients import GRADIENTS, GradientOptions, check_hidden_tensors, find_params
from .options import (
    INTERPOLATIONS,
    as_time_list,
    check_choice,
    check_hooks,
    check_int,
    check_nonnegative,
    check_norm,
    check_steps,
    check_tol,
    clamp_rtol,
    validate_problem,
    zero_tolerance,
)
from .progress import as_meter
from .solution import Solution
from .solvers import TABLEAUS, get_solver, methods_accepting


# ----------------------------------------------------------------------------------------------
# solve
# ----------------------------------------------------------------------------------------------
def solve(
    func: Callable[[Tensor, Tensor], Tensor] | Term,
    y0: Tensor,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Tensor = 1e-7,
    atol: float | Tensor = 1e-9,
    gradient: str = "direct",
    step_size: float | None = None,
    first_step: float | None = None,
    min_step: float = 0.0,
    max_step: float = math.inf,
    max_steps: int = 100_000,
    step_t: Sequence[float] | Tensor | None = None,
    jump_t: Sequence[float] | Tensor | None = None,
    controller: PIDController | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
    dense: bool = False,
    on_failure: str = "raise",
    event_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    events: Event | Sequence[Event] | None = None,
    max_events: int = 10_000,
    min_event_gap: float = 0.0,
    interp: str = "auto",
    perturb: bool = False,
    params: Sequence[Tensor] | None = None,
    adjoint_method: str | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_adaptive: bool | None = None,
    seminorm: bool = True,
    checkpoints: int = 16,
    compile: bool = False,
    per_sample_steps: bool = False,
    solver_options: dict | None = None,
    accept_min_step: bool = False,
    step_callbacks: dict[str, Callable[[float, Tensor, float], None]] | None = None,
    progress: bool | Any = False,
    callback: Callable[[float, Tensor, float, bool], Any] | None = None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return the solution at the times ``t``.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``, or a term
        ``t`` is a 0-dim tensor of ``y``'s real dtype; ``y`` and the result have ``y0``'s shape and dtype.
        An ``nn.Module`` or a plain function. Or a term (:class:`neurodyn.ODETerm`, :class:`neurodyn.ControlTerm`,
        :class:`neurodyn.MultiTerm`, :class:`neurodyn.SplitTerm`): its ODE form is integrated, its ``knots``
        (a path's observation times) join ``jump_t`` (``step_t`` for a smooth path: a cubic spline), and the
        gradient methods see its tensors (vector fields' parameters, a path's data or coefficients); the method
        must accept its kind (``stepper.accepts``). An SDE term (:func:`neurodyn.sde_term`, or
        ``MultiTerm(ODETerm(f), ControlTerm(g, bm, noise=..., sde_type=...))``) is integrated by the SDE methods
        (below); its drift is what the loop evaluates at every step start.
    y0 : Tensor, any shape
        Initial state; float32, float64 or complex, on any device (half precision, float16/bfloat16, is refused:
        too few bits for a solve's increments).
    t : Tensor, shape ``(T,)``, ``T >= 2``
        Output times, strictly increasing or strictly decreasing (integrates backward); ``t[0]`` is the
        initial time. Same device as ``y0`` and ``y0``'s real precision.
    method : str
        ``"dopri5"`` (default), ``"tsit5"``, ``"dopri8"``, ``"bosh3"``, ``"fehlberg2"``,
        ``"adaptive_heun"`` (adaptive), or ``"euler"``, ``"midpoint"``, ``"heun2"``, ``"heun3"``,
        ``"ralston"``, ``"rk4"`` (fixed step); stiff: ``"radau"``, ``"kvaerno3/4/5"``, ``"trbdf2"``, ``"bdf"``,
        or ``"auto"`` (``tsit5``, switching to an implicit method where it detects stiffness and back;
        ``sol.stats["switches"]``); ``neurodyn.solvers.available_methods()`` lists them all. On an SDE term:
        ``"euler"`` (Euler--Maruyama), ``"milstein"``, ``"srk"`` (Ito), ``"heun"``, ``"midpoint"``,
        ``"euler_heun"``, ``"log_ode"``, ``"reversible_heun"`` (Stratonovich; ``milstein`` both), fixed with
        ``step_size`` or adaptive (step doubling or an embedded estimate, see :mod:`neurodyn.solvers.sde`);
        gradients ``"direct"`` and ``"checkpoint"``.
    rtol, atol : float or Tensor broadcastable to ``y0``
        Relative and absolute tolerances for the error norm
        ``RMS(err / (atol + rtol * max(|y_n|, |y_{n+1}|)))``. No component may have both 0. ``rtol`` is raised to
        two machine epsilons of the state's dtype (float32: 2.4e-7, float64: 4.4e-16) with a
        :class:`~neurodyn.errors.PrecisionWarning` where it is below (an ``rtol`` of 0 too, silently unless ``atol``
        is below the resolution of ``y0``): below that the result is no more accurate (rounding) and implicit
        methods' error estimates are rounding noise (many more steps). The same for ``adjoint_rtol``.
    gradient : str
        How gradients reach ``y0``, ``t`` and the parameters: ``"direct"`` (autograd through the solver
        steps; memory grows with the steps), ``"adjoint"`` (continuous adjoint solved backward with a
        backward reconstruction of ``y``; O(1) memory in the steps), ``"checkpoint"`` (exact gradient of
        the discrete solve, replayed from ``checkpoints`` states per level; bounded memory; every method,
        multistep ones with their history kept at the checkpoints, implicit ones with the stage equations
        solved afresh on the replay, so equal to ``"direct"`` to the forward's Newton tolerance) or
        ``"interpolated"`` (adjoint against the forward dense solution; memory O(accepted steps)). The
        continuous adjoints' accuracy on stiff problems: see ``neurodyn.gradients.adjoint``.
    step_size : float, optional
        Constant step size: required by... nothing: a fixed-step method without it steps on the grid
        ``t``. Given for an adaptive method, it disables error control (constant steps).
    first_step, min_step, max_step : float
        Initial step (else Hairer's selection), bounds on the step size magnitude.
    max_steps : int
        Budget of attempted steps (accepted + rejected). A step is never smaller than what the state's dtype
        resolves: below the resolution of ``t`` in that dtype, or after a rejected step whose changes a smaller
        step could not resolve, the solve stops with ``StepSizeUnderflow``.
    step_t : sequence of times, optional
        Times the solver must step onto exactly.
    jump_t : sequence of times, optional
        Discontinuities of ``func``: stepped onto exactly, and ``func`` is re-evaluated just after.
    controller : PIDController, optional
        Step-size controller (default: PI control; ``"bdf"`` proposes its own steps with its orders).
    norm : callable, optional
        Norm of the scaled error (a tensor of ``y0``'s shape) returning a real scalar tensor; default RMS. Checked
        once on a tensor of ones before the solve.
    dense : bool
        Keep the dense solution for :meth:`Solution.evaluate` (memory grows with the steps). Not with
        ``per_sample_steps``.
    on_failure : ``"raise"`` or ``"return"``
        On a failed solve raise a :class:`SolveFailure` subclass (default) or return the partial
        :class:`Solution` with its status.
    event_fn : callable ``(t, y) -> Tensor``, optional
        Stop at the first root of any component of ``event_fn`` (status ``"event"``, ``sol.event_t``).
        The event time is differentiable (implicit function theorem). The same as
        ``events=[neurodyn.Event(event_fn, terminal=True)]``.
    events : Event or sequence of Event, optional
        Events (:class:`neurodyn.Event`: a function, a crossing ``direction``, ``terminal`` after ``n`` occurrences,
        an optional ``jump`` map of the state). Every occurrence is in ``sol.events`` (``.t``, ``.y`` before any
        jump, ``.index``); a terminal one stops the solve (status ``"event"``, ``sol.event_t``, ``sol.y_final``).
        Signs are checked at the step ends and at ``Event(samples=3)`` interior points of every step (on the dense
        output, no field evaluation); ``samples=0`` checks the step ends only, as scipy's ``solve_ivp`` (cheaper;
        two crossings inside one step are then missed unless ``max_step`` is below their distance).
        Event times and post-jump states are differentiable with ``gradient="direct"`` and ``"checkpoint"``;
        ``"adjoint"`` and ``"interpolated"`` take events without jumps or terminal stops (the gradient of ``sol.ys``
        is exact; differentiating ``sol.events`` raises). With ``per_sample_steps=True`` an event function gets the
        rows' times ``(B,)`` and states ``(B, ...)`` and returns ``(B,)`` (or ``(B, k)``) values, a jump returns the
        rows' new states; each row's occurrences are its own (``sol.events.sample``), an occurrence ends the row's
        step, terminal and Zeno rows stop (``sol.sample_status``); ``gradient="direct"`` only. Not with
        ``compile=True``'s whole compiled loop (compiled steps are used).
    max_events, min_event_gap :
        Zeno protection: the solve stops with status ``"zeno"`` (:class:`~neurodyn.errors.ZenoError`, holding the
        partial solution) at an occurrence beyond ``max_events`` (default 10000) or closer in time than
        ``min_event_gap`` (default 0: off) to the previous one.
    interp : ``"auto"``, ``"hermite"`` or ``"linear"``
        Output interpolation: the method's own dense output (``"auto"``), cubic Hermite, or linear.
    perturb : bool
        Evaluate ``func`` just after the start and just before the end of every step (one-sided limits
        at grid points, as torchdiffeq's ``perturb``); disables FSAL reuse.
    params : sequence of Tensor, optional
        Tensors the vector field uses that need gradients, for ``"adjoint"``, ``"checkpoint"`` and
        ``"interpolated"``. Found automatically when ``func`` is an ``nn.Module`` (or its bound method);
        a closure over tensors requiring grad must pass them (else an InputError says so).
    adjoint_method, adjoint_rtol, adjoint_atol :
        Method and tolerances of the backward solve (``"adjoint"``/``"interpolated"``); default: the
        forward ones. SDEs (the stochastic adjoint): ``"midpoint"``, ``"heun"`` or ``"euler_heun"`` (default: the
        forward method when it is one of these, else ``"midpoint"``); ``"reversible_heun"`` forward: its exact
        algebraic adjoint (see ``neurodyn.gradients.reversible``).
    adjoint_adaptive : bool or None
        Whether the backward solve steps adaptively (default: as the forward; True after a fixed-step forward
        adapts from its step size).
    seminorm : bool
        Leave the parameter-gradient channels out of the backward error control (default True; on stiff
        problems these channels can need it: see ``neurodyn.gradients.adjoint``).
    checkpoints : int
        ``"checkpoint"``: states kept per level (default 16).
    per_sample_steps : bool
        Treat the leading dimension of ``y0`` as independent problems, each with its own step size,
        accept/reject decisions, status and stats (``sol.sample_status``, ``stats["steps_per_sample"]``);
        ``t`` may then be ``(B, T)``: per-sample output times. ``func`` receives ``t`` as a ``(B,)`` tensor.
        Adaptive explicit Runge--Kutta methods; every gradient method (the adjoint's backward solve steps per
        sample too, its parameter channels always left out of the error control); no gradients for ``t``.
    solver_options : dict, optional
        Options of the implicit methods (``radau``, ``kvaerno3/4/5``, ``trbdf2``, ``bdf``, ...): ``jac``
        (``"full"``, ``"batched"`` for a block-diagonal Jacobian over independent batch rows, ``"fd"`` or a
        callable ``jac(t, y)``), ``newton_tol``, ``max_newton_iter``; the Runge--Kutta ones also ``jac_rate``,
        ``refactor_ratio``; ``bdf`` also ``max_order`` (1..5) and ``ndf`` (see :class:`neurodyn.solvers.BDF`);
        ``"auto"`` also ``stiff`` (``"kvaerno5"``, ``"radau"``, ...), ``nonstiff`` and its switching thresholds
        (see :class:`neurodyn.solvers.AutoSwitch`).
    accept_min_step : bool
        torchdiffeq's ``min_step``: steps are never proposed below ``min_step`` and a step of at most ``min_step``
        is accepted whatever its error (default False: a step that must shrink below ``min_step`` is a
        :class:`StepSizeUnderflow`). Applies to the adjoint's backward solve too.
    step_callbacks : dict, optional
        ``{"step": cb, "accept": cb, "reject": cb}`` (any subset), each called as ``cb(t, y, h_abs)`` with the
        step's start time (float), start state (a ``(1, n)`` view of the flat state) and step size magnitude:
        ``"step"`` before every attempted step, then ``"accept"`` or ``"reject"`` (fixed-step methods accept every
        step). The forward solve only (not an adjoint's backward solve). Not with ``per_sample_steps``.
    progress : bool or meter
        ``True``: show a :class:`neurodyn.progress.SolveProgress` on ``sys.stderr`` (``tqdm.auto`` when tqdm is
        installed, else text lines): the fraction of ``[t[0], t[-1]]`` covered, ``t``, accepted and rejected steps,
        NFE, elapsed time and ETA; drawn only once the solve has run 0.5 s, then at most every 0.1 s (2 s for text
        written to a file). Or a configured ``SolveProgress``, or any object with ``start(t0, t1)``,
        ``update(t, h, accepted, nfe)`` (called after every attempted step) and ``close(status)`` (``status``:
        ``sol.status``, or ``"error"`` when the solve raised). The forward solve only. Not with
        ``per_sample_steps``. About 1% of a small solve (docs/progress.md).
    callback : callable ``callback(t, y, h, accepted)``, optional
        Called after every attempted step, once the step is accepted or rejected and before its outputs and events
        are processed: ``t`` (float) and ``y`` (``y0``'s shape) are the step's end ``t + h`` and its result when
        accepted, the unchanged start when rejected; ``h`` (float) is the signed step attempted. ``y`` may share
        memory with the solver's working buffers: clone it to keep it. The return value is ignored. It may read
        anything and record anything; it must not modify ``y`` in place. An exception raised in it propagates
        out of ``solve`` unchanged and abandons the solve (as one raised in ``func`` does); to stop early and keep
        the partial solution, step the solve yourself with :func:`neurodyn.init` / :func:`neurodyn.step`. A
        fixed-step method's step that ends the solve with non-finite values (status ``"non_finite"``) is not
        reported. With ``compile=True`` the solve runs compiled steps (not the whole compiled loop). The forward
        solve only (not an adjoint's backward solve or a checkpoint replay). Not with ``per_sample_steps``.
    compile : bool
        Compile with ``torch.compile`` (after a one-off compilation of seconds to tens of seconds on CPU, cached
        per vector field, method, shape and dtype). Where no autograd graph is recorded (under
        ``torch.no_grad()``, or nothing requires grad: inference, the adjoint's forward pass) and the method is
        FSAL or fixed-step (``dopri5``, ``tsit5``, ``bosh3``, every fixed-step method), the whole loop is compiled
        into one program, stepping, error control, outputs and statuses included (``stats["compiled"] ==
        "loop"``; no events, ``dense``, ``jump_t``, ``perturb`` or per-sample steps; on the CPU for states with
        ``y0.numel() * len(t) <= 32768``, where per-step Python costs more than the loop's fixed-shape output
        writes); otherwise each step is (``"step"``). Where a graph is recorded (training with
        ``gradient="direct"`` or ``"checkpoint"``) the whole loop also runs, for an ``nn.Module`` field whose tensors
        needing gradients are its own parameters and that draws no random numbers: the forward keeps its accepted
        steps and a compiled backward pass pulls the gradient back through them (the same discrete gradient, to
        rounding; not differentiable twice: ``compile=False`` for second derivatives; see
        ``neurodyn.compile.train``). Compiling does not always pay (for larger states Inductor's
        float64 ``tanh``/``exp`` are 2-4x slower than eager ATen's): the first solve of a field times a few eager
        and compiled steps from ``y0`` and runs eager steps unless the compiled step takes <= 0.9x the eager one
        (``stats["compiled"] == "eager"``); the choice is cached per field, method, shape, dtype, device and grad
        mode, and ``stats["compile_reason"]`` gives it with the measured times (see ``neurodyn.compile.policy``).
        Python side effects in ``func`` (counters, prints) run when it is traced, not per evaluation, and a few
        times more on the first solve (the timing). Falls back to Python stepping with a warning where compilation
        fails. Not used with a custom ``norm``. SDE methods with a fixed ``step_size`` and no graph recorded: each
        step's Brownian increments (and Levy areas) are queried on the host first, then the steps between output
        times run as one compiled loop (``neurodyn.compile.driven``; same sample path, results to rounding;
        ``stats["compiled"] == "loop"`` where the timing says it pays); where a graph is recorded
        (``gradient="direct"``) the steps run as compiled blocks of steps whose compiled backward keeps the forward's
        activations (the eager solve's gradients to rounding; timed forward and backward against eager steps);
        with ``gradient="adjoint"`` the forward solve (no graph) may run as that compiled loop, reversible Heun's
        exact adjoint included; adaptive SDE solves run eagerly. On the CPU the backward solves of
        ``gradient="adjoint"`` and ``"interpolated"`` (ODEs, and the stochastic adjoint of a Stratonovich SDE or
        additive noise) step eagerly but evaluate the field's value and vector-Jacobian products as compiled
        programs where the field (drift, diffusion) is a module or a module's method holding exactly ``params``
        (``neurodyn.compile.adjoint``; eager otherwise, and where compiling fails, with a warning). On x86 CPUs
        other than Intel's, float32 matrix products in compiled code call oneDNN's kernel
        (``neurodyn.compile.patches.ONEDNN_FLOAT32``).
        With ``per_sample_steps=True`` (explicit Runge--Kutta methods without extra dense-output stages, float32/float64
        states, no graph recorded, no events, every row in one direction of time) the per-sample loop is compiled
        (``neurodyn.compile.rows``): as a whole where ``y0.numel() * len(t) <= 32768`` on the CPU (``stats["compiled"]
        == "row-loop"``), else one compiled attempt per step (``"row-step"``); not timed against eager. Elsewhere the
        eager per-sample loop runs.

    Returns
    -------
    Solution
        ``sol.ys`` of shape ``(T, *y0.shape)``, ``sol.stats``, ``sol.status``, ``sol.evaluate``.

    Raises
    ------
    InputError
        Bad input, before any work.
    MaxStepsReached, StepSizeUnderflow, NonFiniteError
        A failed solve with ``on_failure="raise"``; ``err.solution`` holds the partial result.

    Examples
    --------
    >>> import torch, neurodyn
    >>> A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    >>> f = lambda t, y: y @ A.T
    >>> t = torch.linspace(0, 10, 11, dtype=torch.float64)
    >>> sol = neurodyn.solve(f, torch.tensor([2.0, 0.0], dtype=torch.float64), t, method="tsit5", rtol=1e-8)
    >>> sol.ys.shape
    torch.Size([11, 2])
    >>> exact = torch.linalg.matrix_exp(A * 10) @ torch.tensor([2.0, 0.0], dtype=torch.float64)
    >>> bool(torch.allclose(sol.ys[-1], exact, atol=1e-6))
    True
    """
    meter = as_meter(progress)  # bad input: an InputTypeError before any work
    if callback is not None and not callable(callback):
        raise InputTypeError(f"callback must be callable as callback(t, y, h, accepted), got "
                             f"{type(callback).__name__}.")
    if per_sample_steps and (meter is not None or callback is not None):
        raise InputError("progress and callback follow one solve's steps; with per_sample_steps=True every sample "
                         "steps on its own: solve without them (progress=False, callback=None).")
    plan = prepare(func, y0, t, method=method, rtol=rtol, atol=atol, gradient=gradient, step_size=step_size,
                   first_step=first_step, min_step=min_step, max_step=max_step, max_steps=max_steps, step_t=step_t,
                   jump_t=jump_t, controller=controller, norm=norm, dense=dense, on_failure=on_failure,
                   event_fn=event_fn, events=events, max_events=max_events, min_event_gap=min_event_gap,
                   interp=interp, perturb=perturb, params=params, adjoint_method=adjoint_method,
                   adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_adaptive=adjoint_adaptive,
                   seminorm=seminorm, checkpoints=checkpoints, compile=compile, per_sample_steps=per_sample_steps,
                   solver_options=solver_options, accept_min_step=accept_min_step, step_callbacks=step_callbacks,
                   on_attempt=None if meter is None and callback is None else _attempt_hook(meter, callback, y0))
    if meter is None:
        return plan.run()
    return _run_metered(plan, meter)


_NO_CONTEXT = contextlib.nullcontext()  # (reusable: enters and leaves nothing)


@dataclass
class Plan:
    """A validated solve ready to run: what :func:`prepare` returns (internal to ``solve`` and
    :mod:`neurodyn.stepping`)."""

    func: Callable
    y0: Tensor
    t: Tensor
    solver: Any
    cfg: LoopConfig
    on_failure: str
    gopts: GradientOptions
    gradient: str
    per_sample_steps: bool
    amp: torch.dtype | None = None  # inside torch.autocast: the field's dtype (func runs in it; the solve does not)
    grad_enabled: bool = True  # the grad mode the arguments were checked in

    def context(self) -> contextlib.AbstractContextManager:
        """Where the solve's own arithmetic runs: autocast off when the caller's autocast is on (the field keeps
        it, ``fields.autocast_field``)."""
        return torch.autocast(self.y0.device.type, enabled=False) if self.amp is not None else _NO_CONTEXT

    def run(self) -> Solution:
        """Run the solve: the gradient method over the integrate loop (or the per-sample rows)."""
        return self._run_from(self.y0)

    def _run_from(self, y0: Tensor) -> Solution:
        with self.context():
            if self.per_sample_steps:
                from .gradients.per_sample import solve_per_sample_gradient

                return solve_per_sample_gradient(self.func, y0, self.t, self.solver, self.cfg, self.on_failure,
                                                 self.gopts, self.gradient)
            return _dispatch(self.func, y0, self.t, self.solver, self.cfg, self.on_failure, self.gopts,
                             self.gradient)

    def rerun(self, y0: Tensor) -> Solution:
        """Run the prepared solve again from another initial state: the same function, times and options, without
        checking them again (what :func:`prepare` costs is paid once for a series of solves that differ only in
        ``y0``, e.g. one per interval of an ODE-RNN whose field reads its interval from an attribute).

        ``y0`` must have the prepared state's shape, dtype and device, and hold no NaN/inf, and the grad mode, autocast
        state and ``torch.func`` transforms must be those the plan was prepared under: otherwise an
        :class:`InputError` before any work (prepare again).

        >>> import torch
        >>> plan = prepare(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4", step_size=0.1)
        >>> sol = plan.rerun(torch.full((2,), 2.0))
        >>> bool(torch.allclose(sol.ys[-1], 2 * torch.exp(torch.tensor(-1.0)), atol=1e-6))
        True
        """
        ref = self.y0
        if not isinstance(y0, Tensor) or y0.shape != ref.shape or y0.dtype != ref.dtype or y0.device != ref.device:
            got = f"{tuple(y0.shape)} {y0.dtype} on {y0.device}" if isinstance(y0, Tensor) else type(y0).__name__
            raise InputError(f"Plan.rerun: y0 must match the prepared state ({tuple(ref.shape)} {ref.dtype} on "
                             f"{ref.device}), got {got}: prepare a plan for it.")
        if torch.is_grad_enabled() != self.grad_enabled or autocast_dtype(y0.device.type) != self.amp \
                or vmapped(y0):
            raise InputError("Plan.rerun: the grad mode, autocast state or torch.func transform differs from the one "
                             "the plan was prepared under: prepare a plan for it.")
        if fixed_bad(y0):  # (screened by the sum)
            raise InputError("y0 contains NaN or inf.")
        return self._run_from(y0)


def prepare(
    func: Callable[[Tensor, Tensor], Tensor] | Term,
    y0: Tensor,
    t: Tensor,
    *,
    method: str = "dopri5",
    rtol: float | Tensor = 1e-7,
    atol: float | Tensor = 1e-9,
    gradient: str = "direct",
    step_size: float | None = None,
    first_step: float | None = None,
    min_step: float = 0.0,
    max_step: float = math.inf,
    max_steps: int = 100_000,
    step_t: Sequence[float] | Tensor | None = None,
    jump_t: Sequence[float] | Tensor | None = None,
    controller: PIDController | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
    dense: bool = False,
    on_failure: str = "raise",
    event_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    events: Event | Sequence[Event] | None = None,
    max_events: int = 10_000,
    min_event_gap: float = 0.0,
    interp: str = "auto",
    perturb: bool = False,
    params: Sequence[Tensor] | None = None,
    adjoint_method: str | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_adaptive: bool | None = None,
    seminorm: bool = True,
    checkpoints: int = 16,
    compile: bool = False,
    per_sample_steps: bool = False,
    solver_options: dict | None = None,
    accept_min_step: bool = False,
    step_callbacks: dict[str, Callable[[float, Tensor, float], None]] | None = None,
    on_attempt: Callable[[float, Tensor, float, bool, int], None] | None = None,
) -> Plan:
    """Check :func:`solve`'s arguments (an :class:`InputError` before any work) and build the loop's settings;
    the same arguments and defaults as :func:`solve` (without ``progress`` and ``callback``; ``on_attempt``: the
    loop's per-attempt hook, ``LoopConfig.on_attempt``)."""
    func, term = as_field(func)  # a term: its ODE form, the knots landed on, its tensors seen by the gradients
    if not callable(func):
        raise InputError(f"func must be callable as func(t, y) or be a neurodyn term, got {type(func).__name__}.")
    # A repeat of a plain solve (see _PREPARED): the settings derived from the options are looked up, y0 and t are
    # checked as below.
    key = None
    if term is None and gradient == "direct" and controller is None and norm is None and step_t is None \
            and jump_t is None and event_fn is None and events is None and params is None and not per_sample_steps \
            and solver_options is None and step_callbacks is None and on_attempt is None \
            and isinstance(y0, Tensor) and isinstance(t, Tensor) and no_transform() \
            and not torch.compiler.is_compiling():  # (under Dynamo: traced, and its guards do the memo's work)
        opts = (method, rtol, atol, step_size, first_step, min_step, max_step, max_steps, dense, on_failure,
                max_events, min_event_gap, interp, perturb, adjoint_method, adjoint_rtol, adjoint_atol,
                adjoint_adaptive, seminorm, checkpoints, compile, accept_min_step)
        kinds = tuple(map(type, opts))
        if _SCALARS.issuperset(kinds):
            key = (opts, kinds, tuple(math.copysign(1.0, v) for v in opts if v == 0 and type(v) is float),
                   y0.shape, y0.dtype, y0.device, t.shape, torch.is_grad_enabled())
            plan = _prepared(func, key, y0, t)
            if plan is not None:
                return plan
    y0, t = validate_problem(y0, t, per_sample_steps)
    amp = autocast_dtype(y0.device.type)
    if amp is not None:  # inside torch.autocast: the field in its dtype, this solve's own arithmetic in the state's
        func = autocast_field(func, y0.device.type, amp)
    solver = get_solver(method, term.kinds if term is not None else None)
    if vmapped(y0) and solver.adaptive and step_size is None:
        raise InputError(VMAP_ADAPTIVE)
    check_choice("gradient method", gradient, sorted(GRADIENTS))
    check_choice("on_failure", on_failure, ("raise", "return"))
    check_choice("interp", interp, INTERPOLATIONS)
    rtol_v = check_tol("rtol", rtol, y0)
    atol_v = check_tol("atol", atol, y0)
    adaptive = solver.adaptive and step_size is None
    if adaptive:
        n_zero = zero_tolerance(rtol_v, atol_v)
        if n_zero:
            where = "" if isinstance(rtol_v, float) and isinstance(atol_v, float) else \
                f" for {n_zero} of {y0.numel()} state components"
            raise InputError(f"rtol and atol are both 0{where}: an adaptive method needs a positive tolerance for "
                             f"every component (e.g. atol=1e-9).")
        rtol_v = clamp_rtol("rtol", rtol_v, y0.dtype, atol_v, y0)
    if solver.bind_tolerances and (isinstance(method, str) or solver_options):
        # Newton's convergence test is measured in the solve's own tolerances; solver_options (jac="batched",
        # newton_tol, ...) configure a per-solve copy of the stepper.
        opts = {"rtol": rtol_v, "atol": atol_v}
        opts.update(solver_options or {})
        solver = solver.bind(**opts)
    elif solver_options:
        raise InputError(f"solver_options are for the implicit methods; {method!r} takes none.")
    if solver.gradients is not None and gradient not in solver.gradients:
        what = "SDE methods" if "sde" in solver.accepts else f"method {solver.name!r}"
        raise InputError(f"gradient={gradient!r} is not implemented yet for {what}: use gradient="
                         f"{' or '.join(map(repr, solver.gradients))} (exact gradients of the discrete solve).")
    if interp not in solver.interpolations:
        kinds = ", ".join(map(repr, solver.interpolations))
        raise InputError(f"interp={interp!r}: method {solver.name!r} implements {kinds} dense output between steps.")
    if t.requires_grad and torch.is_grad_enabled() and not solver.time_gradients:
        raise InputError(f"method {solver.name!r} gives no gradients with respect to the output times t (its term has "
                         f"no ODE form dy/dt to move them along): pass t.detach().")
    if term is not None:
        check_accepts(solver, term, method, methods_accepting)
        if per_sample_steps and term.kinds != {"ode"}:
            raise InputError(f"per_sample_steps integrates ODE terms; a {type(term).__name__} needs "
                             f"per_sample_steps=False.")
    step_size, first_step, min_step, max_step = check_steps(step_size, first_step, min_step, max_step, max_steps)
    if solver.optional_error and not adaptive:
        solver = solver.fixed_step()  # its error estimate (SDE step doubling) would go unused
    # The stepper's own checks of the term (an SDE's type, noise, Brownian path), before any work.
    solver.check_term(term, y0, t.detach()[..., 0], adaptive)
    check_hooks(controller, step_callbacks, event_fn)
    event_list = _event_options(event_fn, events, max_events, min_event_gap)
    if norm is not None:
        check_norm(norm, y0, probe=adaptive)
    # Method families with constraints of their own (flags carried by the steppers).
    if solver.symplectic and gradient in ("adjoint", "interpolated") and adjoint_method is None:
        adjoint_method = "rk4"  # the adjoint state is not a (q, p) pair: integrate it with a general method
    if per_sample_steps and not solver.rows:
        raise InputError(f"per_sample_steps supports the explicit Runge-Kutta methods, not {method!r}.")
    if per_sample_steps and step_callbacks:
        raise InputError("step_callbacks follow one solve's steps; with per_sample_steps=True every sample steps "
                         "on its own: pass step_callbacks=None (sol.stats['steps_per_sample'] counts each sample's "
                         "steps).")
    if per_sample_steps and dense:
        raise InputError("dense=True is not available with per_sample_steps=True (each sample steps on its own grid): "
                         "pass the times you need in t (per-sample times: t of shape (B, T)), or solve without "
                         "per_sample_steps for a dense solution.")
    if compile and not (solver.compilable or (solver.driven and not adaptive)):
        # explicit Runge-Kutta steps, and fixed steps of driven (SDE) methods, are compiled; other families run eagerly
        compile = False
    if adjoint_method is not None:
        if term is not None and "sde" in term.kinds and gradient == "adjoint":
            from .gradients.adjoint import sde_adjoint_method
            from .gradients.reversible import exact_reversible

            if not exact_reversible(solver, adjoint_method):
                sde_adjoint_method(solver, adjoint_method)
        else:
            get_solver(adjoint_method)
    if adjoint_adaptive is not None and not isinstance(adjoint_adaptive, bool):
        raise InputError(f"adjoint_adaptive must be True, False or None, got {adjoint_adaptive!r}.")
    check_nonnegative(adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol)
    if adjoint_rtol is not None:
        adjoint_rtol = clamp_rtol("adjoint_rtol", float(adjoint_rtol), y0.dtype)
    if gradient in ("adjoint", "interpolated") and (adjoint_rtol is not None or adjoint_atol is not None) \
            and zero_tolerance(rtol_v if adjoint_rtol is None else adjoint_rtol,
                               atol_v if adjoint_atol is None else float(adjoint_atol)):
        raise InputError("the backward solve's tolerances (adjoint_rtol, adjoint_atol, else the forward's rtol, atol) "
                         "are both 0: give it a positive tolerance.")
    check_int("checkpoints", checkpoints, 2)
    step_list = as_time_list("step_t", step_t, y0.device)
    jump_list = as_time_list("jump_t", jump_t, y0.device)
    if term is not None and term.knots:
        jump_list = sorted(set(jump_list) | set(term.knots))
    if term is not None and term.step_knots:
        step_list = sorted(set(step_list) | set(term.step_knots))

    if not solver.adaptive and step_size is None:
        # Fixed-step method without a step size: step on the output grid (torchdiffeq's behaviour).
        step_list = step_list + t.detach().cpu().tolist()
    controller = controller or _default_controller(solver)
    if not controller.land_on_end and (compile or per_sample_steps):
        raise InputError("PIDController(land_on_end=False) runs in the eager loop only: drop compile=True and "
                         "per_sample_steps=True, or keep land_on_end=True.")
    if not controller.land_on_end and event_list:
        controller = replace(controller, land_on_end=True)  # a crossing past the final time is not the solve's
    advance = loop = row_step = None
    if compile and per_sample_steps:
        from .compile import plug_in_rows

        row_step = plug_in_rows(solver, func, y0)
    elif compile:
        from .compile import plug_in

        advance, loop = plug_in(solver, func, y0, t.shape[-1], per_sample_steps, rtol=rtol_v, atol=atol_v,
                                adaptive=adaptive, interp=interp, controller=controller, first_step=first_step,
                                norm=norm)
    cfg = LoopConfig(
        rtol=rtol_v, atol=atol_v, adaptive=adaptive, step_size=step_size,
        first_step=first_step, min_step=min_step, max_step=max_step, max_steps=max_steps,
        step_t=step_list, jump_t=jump_list, controller=controller, norm=norm,
        unflatten=(lambda x: x.view(y0.shape)) if norm is not None else None, record=dense,
        interp=interp, perturb=bool(perturb), events=event_list, max_events=int(max_events),
        min_event_gap=float(min_event_gap), accept_min_step=bool(accept_min_step),
        step_callbacks=dict(step_callbacks) if step_callbacks else None, on_attempt=on_attempt, advance=advance,
        loop=loop, row_step=row_step,
    )
    gopts = GradientOptions(params=[], adjoint_method=adjoint_method,
                            adjoint_rtol=None if adjoint_rtol is None else float(adjoint_rtol),
                            adjoint_atol=None if adjoint_atol is None else float(adjoint_atol),
                            seminorm=bool(seminorm), checkpoints=checkpoints, adjoint_adaptive=adjoint_adaptive)
    if compile and gradient in ("adjoint", "interpolated") and not per_sample_steps:
        from .compile.adjoint import adjoint_fields

        gopts.adjoint_fields = adjoint_fields
    if gradient != "direct":
        gopts.params = find_params(func, params)
        if torch.is_grad_enabled():
            if per_sample_steps:  # func sees one time per sample
                t0 = t.detach()[..., 0].expand(y0.shape[0]).contiguous()
            else:
                td0, rdt = float(t.detach()[0]), real_dtype(y0.dtype)
                if perturb:  # the field is never evaluated on a grid point (nor in this check)
                    td0 = nextafter(td0, float(t.detach()[-1]) - td0, rdt)
                t0 = torch.scalar_tensor(td0, dtype=rdt, device=y0.device)
            if gradient == "checkpoint" and _check_left_to_checkpoint(func, term, params, loop, event_list, dense,
                                                                      per_sample_steps):
                gopts.hidden_t0 = t0  # checked in solve_checkpoint where the compiled training step does not run
            else:
                check_hidden_tensors(func, t0, y0, gopts.params, gradient)
            if term is not None and "sde" in term.kinds and not per_sample_steps:
                # The diffusion too (the drift is func): its tensors need gradients as the drift's do.
                check_hidden_tensors(diffusion_probe(term), t0, y0, gopts.params, gradient)
    if per_sample_steps:
        if t.requires_grad and torch.is_grad_enabled():
            raise InputError("per_sample_steps gives gradients with respect to y0 and parameters, not the times t "
                             "(pass t.detach()).")
    if key is not None and amp is None and method in TABLEAUS and not solver.bind_tolerances \
            and not solver.own_controller and not solver.optional_error and (adaptive or step_size is not None) \
            and rtol_v == float(rtol) and (adjoint_rtol is None or gopts.adjoint_rtol == float(adjoint_rtol)) \
            and (advance is None or advance.usable):
        # (a shared stepper; no step list from t's values; rtol not raised, so no warning is skipped on a repeat)
        _remember(func, key, (weakref.ref(func), solver, cfg, on_failure, gopts.adjoint_method, gopts.adjoint_rtol,
                              gopts.adjoint_atol, gopts.seminorm, gopts.checkpoints, gopts.adjoint_adaptive))
    return Plan(func, y0, t, solver, cfg, on_failure, gopts, gradient, bool(per_sample_steps), amp,
                torch.is_grad_enabled())


# Repeats of a plain solve (gradient="direct"; no events, hooks, step or jump times, norm, controller, params, solver
# options or per-sample steps; a method of the explicit Runge-Kutta tableaus, adaptive or with a step size): what
# `prepare` derives from the options (the checked settings, the stepper, the LoopConfig with its compiled plug-ins) is
# kept per vector field (weakly keyed, the entry holding a weak reference to the field: compared by identity, and the
# memo does not keep it alive), keyed on every option it derives from -- their values, their types (1, 1.0 and True
# are told apart) and the signs of zeros --, on y0's shape, dtype and device, t's shape and the grad mode. Every
# check of y0 and t runs at every call (validate_problem: their types, shapes, dtypes, devices, finiteness,
# monotonicity), and a repeat is taken only where the autocast state, torch.func transforms and the compiled step's
# usability are those of a fresh preparation. Stored only where the preparation warned of nothing it would warn of
# again (rtol not raised to the dtype's floor).
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREPARED_MAX = 32
_SCALARS = frozenset({float, int, bool, str, type(None)})


def _remember(func: Callable, key: tuple, entry: tuple) -> None:
    """Keep ``entry`` (see :data:`_PREPARED`) for ``func`` under ``key`` (nothing where ``func`` cannot be weakly
    referenced or hashed)."""
    try:
        per_func = _PREPARED.get(func)
        if per_func is None:
            per_func = _PREPARED[func] = {}
    except TypeError:
        return
    if len(per_func) >= _PREPARED_MAX:
        per_func.clear()
    per_func[key] = entry


def _prepared(func: Callable, key: tuple, y0: Tensor, t: Tensor) -> Plan | None:
    """The :class:`Plan` of a repeated plain solve (see :data:`_PREPARED`), with ``y0`` and ``t`` checked as
    :func:`prepare` checks them; None where nothing is kept for ``func`` and ``key`` or the kept settings do not apply
    (then ``prepare`` runs in full)."""
    try:
        per_func = _PREPARED.get(func)
    except TypeError:
        return None
    entry = per_func.get(key) if per_func is not None else None
    if entry is None or entry[0]() is not func:
        return None
    _, solver, cfg, on_failure, *gkw = entry
    advance = cfg.advance
    if advance is not None and not advance.usable:
        return None
    y0, t = validate_problem(y0, t, False)
    if autocast_dtype(y0.device.type) is not None:
        return None
    grad = torch.is_grad_enabled()
    if t.requires_grad and grad and not solver.time_gradients:
        return None  # (the full preparation raises)
    gopts = GradientOptions(params=[], adjoint_method=gkw[0], adjoint_rtol=gkw[1], adjoint_atol=gkw[2],
                            seminorm=gkw[3], checkpoints=gkw[4], adjoint_adaptive=gkw[5])
    return Plan(func, y0, t, solver, cfg, on_failure, gopts, "direct", False, None, grad)


def _check_left_to_checkpoint(func: Any, term: Any, params: Any, loop: Any, event_list: tuple, dense: bool,
                              per_sample_steps: bool) -> bool:
    """Whether ``gradient="checkpoint"``'s hidden-tensor check at ``t0`` is left to
    :func:`~neurodyn.gradients.checkpoint.solve_checkpoint`: where the compiled training step may run (an ``nn.Module``
    field with its parameters found automatically, a compiled whole loop that records a graph, no events or dense
    output). That step runs only where the field's tensors requiring grad are its own (checked on the graph of
    ``dy/dt`` at ``t0`` for every compiled variant of its program, :mod:`neurodyn.compile.train`), and where it does
    not run the solve makes this check before stepping in Python: the same error either way, and a cached training
    step makes no eager evaluation of the field."""
    return (isinstance(func, torch.nn.Module) and term is None and params is None and not event_list and not dense
            and not per_sample_steps and getattr(loop, "differentiable", False))


def _attempt_hook(meter: Any, callback: Callable | None, y0: Any) -> Callable[[float, Tensor, float, bool, int], None]:
    """``cfg.on_attempt`` calling ``meter.update`` and ``callback`` (with ``y`` in ``y0``'s shape)."""
    shape = y0.shape if isinstance(y0, Tensor) else None
    same = shape is not None and len(shape) == 2 and shape[0] == 1  # the loop's (1, n) is y0's shape
    update = meter.update if meter is not None else None
    if callback is None:
        def hook(t: float, y: Tensor, h: float, accepted: bool, nfe: int) -> None:
            update(t, h, accepted, nfe)
    elif update is None and same:
        def hook(t: float, y: Tensor, h: float, accepted: bool, nfe: int) -> None:
            callback(t, y, h, accepted)
    elif update is None:
        def hook(t: float, y: Tensor, h: float, accepted: bool, nfe: int) -> None:
            callback(t, y.view(shape), h, accepted)
    else:
        def hook(t: float, y: Tensor, h: float, accepted: bool, nfe: int) -> None:
            update(t, h, accepted, nfe)
            callback(t, y if same else y.view(shape), h, accepted)
    return hook


def _run_metered(plan: Plan, meter: Any) -> Solution:
    """Run ``plan`` between ``meter.start`` and ``meter.close`` (with the solve's status, or ``"error"``)."""
    t0, t1 = plan.t.detach()[[0, -1]].tolist()
    meter.start(t0, t1)
    try:
        sol = plan.run()
    except SolveFailure as err:
        meter.close(err.status)
        raise
    except BaseException:
        meter.close("error")
        raise
    meter.close(sol.status)
    return sol


def _event_options(event_fn: Any, events: Any, max_events: Any, min_event_gap: Any) -> tuple[Event, ...]:
    """``event_fn`` / ``events`` as one tuple of :class:`Event`, and the Zeno limits checked."""
    if event_fn is not None and events is not None:
        raise InputError("pass event_fn or events, not both (event_fn=f is events=[neurodyn.Event(f)]).")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
        raise InputError(f"max_events must be an int >= 0, got {max_events!r}.")
    if isinstance(min_event_gap, bool) or not isinstance(min_event_gap, (int, float)) \
            or not math.isfinite(min_event_gap) or min_event_gap < 0:
        raise InputError(f"min_event_gap must be a finite number >= 0 (a time), got {min_event_gap!r}.")
    if event_fn is not None:
        return (Event(event_fn, terminal=True),)
    return as_events(events) if events is not None else ()


def _dispatch(func, y0, t, solver, cfg, on_failure, gopts, gradient) -> Solution:
    if not (t.requires_grad and torch.is_grad_enabled()):
        return GRADIENTS[gradient](func, y0, t, solver, cfg, on_failure, gopts)
    return _with_time_gradients(func, y0, t, solver, cfg, on_failure, gopts, gradient)


def _default_controller(solver: Any) -> PIDController:
    """PI control, or the stepper's own controller where it has one (``bdf`` sizes its steps with its order)."""
    return solver.default_controller() if solver.own_controller else _PI_DEFAULT


# The default controller, shared by the solves that take it (its settings are only read: each solve's loop keeps its
# own memory in ``PIDController.start``'s state); one less validated construction per solve.
_PI_DEFAULT = PIDController()


def _with_time_gradients(func, y0, t, solver, cfg, on_failure, gopts, gradient) -> Solution:
    """Gradients with respect to the output times, the same way for every gradient method.

    An output time moves only its own output, along the vector field: dL/dt_i = <dL/dy_i, f(t_i, y_i)>
    (i >= 1). Moving t_0 shifts the whole trajectory: y(t; t_0 + dt) = y(t; t_0) - dt * Phi f(t_0, y0),
    so the solve starts from y0 - (t_0 - t_0.detach()) f(t_0, y0) (same value, the right gradient).
    """
    td = t.detach()
    with torch.no_grad():
        f0 = func(td[0], y0.detach())
    y0_shifted = y0 - (t[0] - td[0]).to(y0.dtype) * f0
    sol = GRADIENTS[gradient](func, y0_shifted, td, solver, cfg, on_failure, gopts)
    k = sol.n_valid
    with torch.no_grad():
        fs = torch.stack([func(td[i], sol.ys[i].detach()) for i in range(1, k)]) if k > 1 else None
    rows = [y0.unsqueeze(0)]
    if fs is not None:
        dt = (t[1:k] - td[1:k]).to(y0.dtype).view(-1, *([1] * y0.dim()))
        rows.append(sol.ys[1:k] + dt * fs)
    if k < t.shape[0]:
        rows.append(sol.ys[k:])
    sol.ys = torch.cat(rows, 0)
    sol.ts = t
    return sol


