"""SDE steppers: ``dy = f(t, y) dt + g(t, y) dW`` on the one engine.

An SDE is a term with a Brownian part: ``MultiTerm(ODETerm(f), ControlTerm(g, bm, noise=..., sde_type=...))``
(or :func:`neurodyn.core.term.sde_term`, which also takes torchsde's fused forms). The loop evaluates the drift
``f`` at every step start (the term's ``rate``; the stepper's ``k1``); a stepper here finds the drift, the diffusion,
the Brownian path and the fused forms from the term and advances one step. Each stepper declares what it integrates
(``sde_type``, ``noise_types``, the Levy area it needs) and :meth:`SDEStepper.check_term` rejects other SDEs before
any work, naming the methods that do.

======================  =============  ==========================  ==============================  ===============
method                  SDE type       noise                       needs                           strong order
======================  =============  ==========================  ==============================  ===============
``euler``               Ito            all                         increments                      0.5 (1.0 add.)
``milstein``            Ito or Strat.  diagonal, scalar, additive  ``g`` (derivative-free option)  1.0
``srk``                 Ito            diagonal, scalar, additive  space-time Levy area ``H``      1.5 (diag. 1.0+)
``heun``, ``midpoint``  Stratonovich   all                         increments                      1.0 (gen. 0.5)
``euler_heun``          Stratonovich   all                         increments                      1.0 (gen. 0.5)
``log_ode``             Stratonovich   all                         Levy area ``A`` (davie/foster)  1.0 (gen. 0.5)
``reversible_heun``     Stratonovich   all                         increments                      0.5 (1.0 add.)
======================  =============  ==========================  ==============================  ===============

Orders: "gen." general non-commutative noise, "add." additive noise (see the tests for the measured slopes).

Step sizes: with ``step_size=dt`` every step is ``dt`` from ``t[0]`` (outputs between step ends by the dense
output below; the last step lands on ``t[-1]``, as torchsde); without it the steps are
adaptive (``reversible_heun``: on the output grid). The error estimate (``solver_options={"error_estimate": ...}``):

* ``"embedded"`` (the default of ``srk``; ``"auto"`` picks it there): the difference between the step and a
  lower-order solution built from the same evaluations and the same Brownian increment. ``srk``: the step minus a
  derivative-free Milstein step from its first two diffusion stages (diagonal, scalar noise), or minus
  Euler--Maruyama (additive noise, where that has order 1.0), at no extra evaluation; ``heun``, ``midpoint``,
  ``euler_heun``, ``log_ode``: the step minus the Euler--Maruyama predictor ``y + f h + g dW``, at no extra
  evaluation; ``milstein``: its derivative term (Milstein minus Euler--Maruyama) plus the drift's trapezoidal
  correction ``(f(t + h, y1) - f(t, y)) h / 2``, whose drift evaluation the next step starts from (FSAL). The step
  itself is the accepted solution; the PID controller's exponent is ``1 / (p + 1/2)``, ``p`` the strong order of
  the lower-order solution (its local error is ``O(h^(p + 1/2))``).
* ``"doubling"`` (the default of the other methods; the only estimate of ``euler``, and of additive noise in the
  Milstein and Stratonovich methods): one step of ``h`` against two of ``h / 2`` over the same Brownian path, the
  two half steps the accepted solution (three steps' diffusion evaluations per attempt, two drift evaluations per
  accepted step); exponent ``1 / (order + 1/2)``. On the latent SDE of ``benchmarks/bench_sde.py`` it needs fewer
  evaluations than the embedded estimate for ``milstein`` at equal strong error (the derivative term over-states
  Milstein's own error), the embedded estimate fewer for ``srk``.

Either way a rejected step and its retry see one sample path: the increments of any interval come from the same
path (with a :class:`neurodyn.paths.BrownianInterval` any step is consistent).

Dense output between steps is linear interpolation of the step ends (``interp="auto"`` or ``"linear"``), what a
sample path allows without the Brownian bridge.

Gradients: ``"direct"`` and ``"checkpoint"`` (the replay queries the same Brownian increments: exact discrete
gradients); ``"adjoint"``: the stochastic adjoint (:class:`neurodyn.core.term.SDEAdjointTerm`, solved backward on
the same Brownian path by ``midpoint``/``heun``/``euler_heun``), and for ``reversible_heun`` its exact algebraic
adjoint (:mod:`neurodyn.gradients.reversible`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.interpolation import linear
from ..core.stepper import Step, StepperBase
from ..core.term import MultiTerm, ODETerm, SDETerm, Term, term_of
from ..errors import InputError

#: SDE methods by SDE type, for the messages.
ITO_METHODS = ("euler", "milstein", "srk")
STRATONOVICH_METHODS = ("heun", "midpoint", "euler_heun", "milstein", "log_ode", "reversible_heun")
#: Levy-area settings of a Brownian path that provide ``H`` / ``A`` (neurodyn.paths.BrownianInterval's names).
LEVY_H = ("space-time", "space-time-time", "davie", "foster")
LEVY_A = ("davie", "foster")


class SDEParts:
    """The pieces of an SDE term a stepper uses, evaluated the way the engine evaluates the drift.

    ``f(t, y)`` goes through the engine's bound term (counted in ``nfe``; checkpoint replays watch it); ``g``,
    ``g_prod`` and the fused forms through the user's term (counted in ``stepper.stats["nfe_diffusion"]``).
    States ``y`` are in the user's shape; times are floats. A stage at the step's end ``end`` (a step landing on a
    jump time) evaluates the drift and diffusion at ``end_left``, the time one ulp before it (the fields' left
    limit there, as the ODE steppers' stages with ``c = 1``); the Brownian path is queried at the times as given.
    """

    __slots__ = ("bound", "drift", "diffusion", "fused", "noise", "sde_type", "t_dtype", "device", "counts", "bm",
                 "guard", "end", "end_left")

    def __init__(self, bound: ODETerm, user: Term, counts: dict):
        self.bound = bound
        self.drift, self.diffusion = split_sde(user)
        self.fused = user if isinstance(user, SDETerm) else None
        self.noise = self.diffusion.noise
        self.sde_type = self.diffusion.sde_type
        self.bm = self.diffusion.path
        self.t_dtype, self.device = bound.t_dtype, bound.device
        self.counts = counts
        # A checkpoint replay watches every evaluation for captured tensors outside its params (the drift through
        # the bound term; the diffusion here).
        self.guard = getattr(bound.func, "guard", None)
        self.end: float | None = None
        self.end_left: float | None = None

    def at(self, t: float) -> float:
        """The time a field is evaluated at for a stage at ``t``: ``end_left`` at the step's end, else ``t``."""
        return self.end_left if (self.end_left is not None and t == self.end) else t

    def watch(self, out: Any, t: Tensor, y: Tensor) -> Any:
        guard = self.guard
        if guard is not None and torch.is_grad_enabled():
            roots = [x for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, Tensor)]
            if any(x.grad_fn is not None for x in roots):
                guard.watch(roots, [t, y])
        return out

    def time(self, t: float) -> Tensor:
        return torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)

    def f(self, t: float, y: Tensor) -> Tensor:
        return self.bound(self.at(t), y)

    def g(self, t: float, y: Tensor) -> Tensor:
        self.counts["nfe_diffusion"] += 1
        tt = self.time(self.at(t))
        return self.watch(self.diffusion.vector_field(tt, y), tt, y)

    def g_prod(self, t: float, y: Tensor, v: Tensor) -> Tensor:
        self.counts["nfe_diffusion"] += 1
        tt = self.time(self.at(t))
        return self.watch(self.diffusion.vf_prod(tt, y, v), tt, y)

    def prod(self, g: Tensor, v: Tensor) -> Tensor:
        return self.diffusion.prod(g, v)

    def f_and_g(self, t: float, y: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.fused
        if fused is not None and fused.f_and_g is not None:
            self.bound.nfe += 1
            self.counts["nfe_diffusion"] += 1
            tt = self.time(self.at(t))
            return self.watch(fused.f_and_g(tt, y), tt, y)
        return self.f(t, y), self.g(t, y)

    def f_and_g_prod(self, t: float, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.fused
        if fused is not None and fused.f_and_g_prod is not None:
            self.bound.nfe += 1
            self.counts["nfe_diffusion"] += 1
            tt = self.time(self.at(t))
            return self.watch(fused.f_and_g_prod(tt, y, v), tt, y)
        return self.f(t, y), self.g_prod(t, y, v)

    def dW(self, t0: float, t1: float) -> Tensor:
        return self.bm.increment(t0, t1)

    def levy(self, t0: float, t1: float) -> Any:
        return self.bm.levy(t0, t1)

    def vec(self, g: Tensor) -> Tensor:
        """``g`` as a state-shaped tensor: diagonal noise as it is, scalar noise without its channel."""
        return g.squeeze(-1) if self.noise == "scalar" else g

    def g_and_diag_vjp(self, t: float, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``g(t, y)`` and ``(dg_i/dy_i) g_i c_i`` (diagonal noise): :func:`_g_and_diag_vjp`."""
        return _g_and_diag_vjp(self, t, y, c)


# The SDEParts a compiled graph's GraphParts copies from the host's (not the host's last step end: see GraphParts).
_GRAPH_SLOTS = tuple(name for name in SDEParts.__slots__ if name not in ("end", "end_left"))


class GraphParts(SDEParts):
    """:class:`SDEParts` inside a compiled graph (:meth:`SDEStepper.driven_step`): times and step sizes are 0-dim
    float64 tensors, the Brownian quantities of the step are given (``inputs``, what :meth:`SDEStepper.step_inputs`
    returned for it), evaluations are not counted (the plan counts them once on the host) and the diagonal
    derivative term uses ``torch.func.vjp`` (no ``torch.autograd.grad`` in a compiled graph)."""

    __slots__ = ("inputs", "area")

    def __init__(self, sde: SDEParts, inputs: tuple[Tensor, ...], area: str | None = None,
                 counts: dict | None = None):
        for name in _GRAPH_SLOTS:
            setattr(self, name, getattr(sde, name))
        # No step of a compiled graph lands on a jump (no left-limit stages). The host's step end is not read: a float
        # that changes with every eager step, it would be a value the graph is guarded on (compiled anew when changed).
        self.end = self.end_left = None
        # Drift and diffusion evaluations, counted here (a dict of this object's own inside a graph; the driven loop
        # counts one step's on the host, :meth:`SDEStepper.driven_step` with ``counts``).
        self.counts = {"nfe": 0, "nfe_diffusion": 0} if counts is None else counts
        self.guard = None
        self.inputs = inputs
        self.area = area

    def time(self, t: Tensor) -> Tensor:
        return t.to(self.t_dtype)

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        self.counts["nfe"] += 1
        return self.bound.func(self.time(t), y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        self.counts["nfe_diffusion"] += 1
        return self.diffusion.vector_field(self.time(t), y)

    def g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        self.counts["nfe_diffusion"] += 1
        return self.diffusion.vf_prod(self.time(t), y, v)

    def f_and_g(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.fused
        if fused is not None and fused.f_and_g is not None:
            self.counts["nfe"] += 1
            self.counts["nfe_diffusion"] += 1
            return fused.f_and_g(self.time(t), y)
        return self.f(t, y), self.g(t, y)

    def f_and_g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.fused
        if fused is not None and fused.f_and_g_prod is not None:
            self.counts["nfe"] += 1
            self.counts["nfe_diffusion"] += 1
            return fused.f_and_g_prod(self.time(t), y, v)
        return self.f(t, y), self.g_prod(t, y, v)

    def dW(self, t0: Any, t1: Any) -> Tensor:
        return self.inputs[0]

    def levy(self, t0: Any, t1: Any) -> Any:
        return _Levy(self.inputs[0], self.inputs[1], self.area)

    def g_and_diag_vjp(self, t: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        self.counts["nfe_diffusion"] += 2  # g and its reverse pass, as the eager form counts them
        tt = self.time(t)
        g, pull = torch.func.vjp(lambda z: self.diffusion.vector_field(tt, z), y)
        return g, pull(g * c)[0]


class _Levy:
    """The Brownian increment ``W`` and its Levy area (``H`` or ``A``) of a step, as a path's ``levy`` returns them."""

    __slots__ = ("W", "H", "A")

    def __init__(self, W: Tensor, area: Tensor, kind: str | None):
        self.W = W
        self.H = area if kind == "H" else None
        self.A = area if kind == "A" else None


def _sqrt(h: Any) -> Any:
    """``sqrt(h)`` of a float step size (``math.sqrt``) or of a 0-dim tensor (inside a compiled graph)."""
    return h.sqrt() if isinstance(h, Tensor) else math.sqrt(h)


def split_sde(term: Term) -> tuple[Term | None, Any]:
    """``(drift, diffusion)`` of an SDE term: the ``dt`` part (None: no drift) and the Brownian ControlTerm.

    Raises an InputError when ``term`` is not one drift plus one Brownian ControlTerm."""
    from ..core.term import ControlTerm

    parts = term.terms if isinstance(term, MultiTerm) else (term,)
    noisy = [p for p in parts if "sde" in p.kinds]
    rest = [p for p in parts if "sde" not in p.kinds]
    if len(noisy) != 1 or len(rest) > 1 or not isinstance(noisy[0], ControlTerm):
        raise InputError(f"an SDE term is MultiTerm(ODETerm(drift), ControlTerm(diffusion, bm, noise=...)) (or "
                         f"neurodyn.sde_term(drift, diffusion, bm)); got {len(noisy)} Brownian term(s) and "
                         f"{len(rest)} other term(s).")
    return (rest[0] if rest else None), noisy[0]


class SDEStepper(StepperBase):
    """Base of the SDE steppers: the checks, step doubling, linear dense output (see the module docstring).

    A subclass defines ``name``, ``order`` (strong order it is built for), ``sde_types``, ``noise_types``, ``levy``
    (``None``, ``"H"`` or ``"A"``: the Levy area it needs) and ``base(sde, t, y, h, f0) -> y1`` (one step in the
    user's shape, ``f0`` the drift at ``(t, y)``).
    """

    accepts: ClassVar[tuple[str, ...]] = ("ode", "sde")
    sde_types: ClassVar[tuple[str, ...]] = ("ito", "stratonovich")
    noise_types: ClassVar[tuple[str, ...]] = ("general", "diagonal", "scalar", "additive")
    levy: ClassVar[str | None] = None
    needs_g: ClassVar[bool] = False  # uses g itself, not only the product g dW
    #: Noise types with an embedded error estimate (:meth:`base_est`); the others use step doubling.
    embedded_noise: ClassVar[tuple[str, ...]] = ()
    #: Strong order of the embedded lower-order solution (sets the controller's exponent).
    embedded_order: ClassVar[float] = 0.5
    #: The embedded estimate evaluates the drift at the step's end (the next step's first drift: FSAL).
    embedded_fsal: ClassVar[bool] = False
    #: ``error_estimate="auto"`` uses the embedded estimate (where it was measured to need fewer evaluations than
    #: step doubling at equal error: benchmarks/bench_sde.py, adaptive section).
    embedded_default: ClassVar[bool] = False
    fsal = False
    has_own_dense = True
    error_order = None
    stages = 1
    # Engine capability flags (core.stepper): what solve() lets through.
    driven: ClassVar[bool] = True
    gradients: ClassVar[tuple[str, ...] | None] = ("direct", "checkpoint", "adjoint")
    time_gradients: ClassVar[bool] = False
    interpolations: ClassVar[tuple[str, ...]] = ("auto", "linear")
    bind_tolerances: ClassVar[bool] = True
    optional_error: ClassVar[bool] = True

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.adaptive = True
        self.controller_order = self.order - 0.5
        self.stats = {"nfe_diffusion": 0}
        self.options: dict[str, Any] = {}
        self.embedded = False  # this solve's error estimate is the embedded one (set by check_term)
        self._f1: Tensor | None = None  # embedded_fsal: the drift at the last attempted step's end
        self._t_end = 0.0  # the time of that drift
        self._parts: tuple[Any, Any, SDEParts] | None = None

    # -- configuration ----------------------------------------------------------------------------------------
    def bind(self, rtol: Any = None, atol: Any = None, **options: Any) -> SDEStepper:
        """This stepper with ``solver_options`` (``grad_free`` for ``milstein``); tolerances are the loop's."""
        allowed = self.option_names()
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise InputError(f"method {self.name!r} takes no solver option(s) {', '.join(map(repr, bad))}"
                             + (f"; its options: {', '.join(allowed)}." if allowed else "."))
        est = options.get("error_estimate", "auto")
        if est not in ("auto", "embedded", "doubling"):
            raise InputError(f"solver_options error_estimate must be 'auto', 'embedded' or 'doubling', got {est!r}.")
        if est == "embedded" and not self.embedded_noise:
            raise InputError(f"method {self.name!r} has no embedded error estimate: use error_estimate='doubling' "
                             f"(or 'auto'), or a method with one (milstein, srk, heun, midpoint, euler_heun, log_ode).")
        self.options.update(options)
        return self

    def option_names(self) -> tuple[str, ...]:
        return ("error_estimate",)

    def fixed_step(self) -> SDEStepper:
        """The stepper for a fixed-step solve: no step doubling (its error estimate would go unused)."""
        self.adaptive = False
        return self

    # -- checks before any work -------------------------------------------------------------------------------
    def check_term(self, term: Term, y0: Tensor, t0: Tensor, adaptive: bool) -> None:
        """Raise an InputError, before any work, when this method does not integrate the SDE ``term``."""
        if not isinstance(term, Term):
            raise InputError(f"method {self.name!r} integrates SDE terms (neurodyn.sde_term(drift, diffusion, bm) or "
                             f"MultiTerm(ODETerm(f), ControlTerm(g, bm, noise=...))), not a plain vector field.")
        _, diff = split_sde(term)
        noise, sde_type = diff.noise, diff.sde_type
        if sde_type not in self.sde_types:
            others = ITO_METHODS if sde_type == "ito" else STRATONOVICH_METHODS
            raise InputError(f"method {self.name!r} integrates {' and '.join(self.sde_types)} SDEs, but this SDE is "
                             f"{sde_type} (sde_type={sde_type!r}): use one of {', '.join(others)}, or convert the "
                             f"drift to the other interpretation.")
        if noise not in self.noise_types:
            works = [m for m in (ITO_METHODS if sde_type == "ito" else STRATONOVICH_METHODS)
                     if noise in SDE_STEPPERS[m].noise_types]
            raise InputError(f"method {self.name!r} supports noise types {', '.join(self.noise_types)}, not "
                             f"{noise!r}: for {noise} noise ({sde_type}) use one of {', '.join(works)}.")
        if self.levy is not None:
            have = getattr(diff.path, "levy_area", None)
            need = LEVY_H if self.levy == "H" else LEVY_A
            if not callable(getattr(diff.path, "levy", None)) or have not in need:
                raise InputError(f"method {self.name!r} needs the Brownian path's "
                                 f"{'space-time Levy area H' if self.levy == 'H' else 'Levy area A'}, but the path "
                                 f"was built with levy_area={have!r}: build it with levy_area="
                                 f"{need[0] if self.levy == 'H' else 'davie'!r} (or one of {', '.join(need)}), e.g. "
                                 f"neurodyn.paths.BrownianInterval(t0, t1, shape=..., levy_area={need[0]!r}).")
        if self.needs_g and diff.vector_field is None:
            raise InputError(f"method {self.name!r} needs the diffusion g(t, y) itself; this SDE gives only g_prod.")
        mode = self.options.get("error_estimate", "auto")
        self.embedded = adaptive and noise in self.embedded_noise and (
            mode == "embedded" or (mode == "auto" and self.embedded_default))
        if mode == "embedded" and adaptive and not self.embedded:
            raise InputError(f"method {self.name!r} has an embedded error estimate for "
                             f"{', '.join(self.embedded_noise)} noise, not {noise!r}: use error_estimate='doubling' "
                             f"(or 'auto').")
        self.controller_order = (self.embedded_order if self.embedded else self.order) - 0.5
        if self.embedded_fsal:
            self.fsal = self.embedded
        if adaptive and self.name == "euler" and noise != "additive":
            warnings.warn("adaptive Euler-Maruyama with non-additive noise: the numerical solution is not guaranteed "
                          "to converge to the SDE's solution (the step sizes depend on the noise). Pass step_size=dt, "
                          "or use method='milstein' or 'srk' for adaptive steps.", stacklevel=3)
        self._check_shapes(diff, y0, t0)

    def _check_shapes(self, diff: Any, y0: Tensor, t0: Tensor) -> None:
        t0f = float(t0)
        dW = diff.path.increment(t0f, t0f)
        if not isinstance(dW, Tensor) or dW.dtype != y0.dtype or dW.device != y0.device:
            raise InputError(f"the Brownian path's increments are {getattr(dW, 'dtype', type(dW))} on "
                             f"{getattr(dW, 'device', '?')}, the state is {y0.dtype} on {y0.device}: build the path "
                             f"with the state's dtype and device.")
        if diff.vector_field is None:
            return
        with torch.no_grad(), torch.random.fork_rng(devices=[y0.device] if y0.device.type == "cuda" else []):
            g = diff.vector_field(t0, y0)
        if not isinstance(g, Tensor):
            raise InputError(f"the diffusion g(t, y) returned {type(g).__name__}, not a tensor.")
        noise = diff.noise
        want = {"diagonal": "the state's shape", "scalar": "(*y.shape, 1)", "general": "(*y.shape, m)"}
        ok = {"diagonal": g.shape == y0.shape,
              "scalar": g.shape == (*y0.shape, 1),
              "general": g.dim() == y0.dim() + 1 and g.shape[:-1] == y0.shape,
              "additive": g.shape == y0.shape or (g.dim() == y0.dim() + 1 and g.shape[:-1] == y0.shape)}[noise]
        if not ok:
            raise InputError(f"the diffusion g(t, y) returned shape {tuple(g.shape)} for a state of shape "
                             f"{tuple(y0.shape)}; with noise={noise!r} it must be "
                             f"{want.get(noise, 'the state shape or (*y.shape, m)')}.")
        try:
            out = diff.prod(g, dW)
        except RuntimeError:
            out = None
        if out is None or out.shape != y0.shape:
            want_bm = tuple(y0.shape) if noise == "diagonal" else "(*batch, m)"
            raise InputError(f"the diffusion of shape {tuple(g.shape)} times the Brownian increment of shape "
                             f"{tuple(dW.shape)} does not give the state's shape {tuple(y0.shape)} (noise={noise!r}): "
                             f"build the Brownian path with shape {want_bm} (m = g's last dimension"
                             f"{', 1 for scalar noise' if noise == 'scalar' else ''}).")

    # -- the step ---------------------------------------------------------------------------------------------
    def parts(self, term: ODETerm) -> SDEParts:
        """The SDE pieces of the engine's bound ``term`` (cached per bound term)."""
        cached = self._parts
        if cached is not None and cached[0] is term:
            return cached[2]
        user = term_of(term.func)
        if user is None:
            raise InputError(f"method {self.name!r} integrates SDE terms (neurodyn.sde_term or MultiTerm(ODETerm, "
                             f"ControlTerm(g, bm, noise=...))), not a plain vector field.")
        sde = SDEParts(term, user, self.stats)
        self._parts = (term, user, sde)
        return sde

    def coefficients(self, dtype: Any, device: Any) -> None:
        return None

    def step(self, term: ODETerm, t: float, y: Tensor, h: float, k1: Tensor, co: Any = None,
             t_end_nudge: float | None = None, buf: Any = None) -> tuple[Tensor, Tensor, Tensor | None]:
        sde = self.parts(term)
        # Stages at the step's end evaluate the fields just before it where the step lands on a jump (t_end_nudge).
        sde.end, sde.end_left = t + h, t_end_nudge
        shape = term.shape
        ys = y.view(shape)
        f0 = k1.view(shape)
        if not self.adaptive:
            y1 = self.base(sde, t, ys, h, f0)
            return y1.reshape(1, -1), f0.reshape(1, -1), None
        if self.embedded:
            self._t_end = t_end_nudge if t_end_nudge is not None else t + h  # before a jump: its left limit
            y1, est = self.base_est(sde, t, ys, h, f0)
            k = self._f1.reshape(1, -1) if self.fsal else f0.reshape(1, -1)  # FSAL: the drift at (t + h, y1)
            return y1.reshape(1, -1), k, est.detach().reshape(1, -1) / h
        half = 0.5 * h
        t_mid = t + half
        coarse = self.base(sde, t, ys, h, f0)
        mid = self.base(sde, t, ys, half, f0)
        # the second half ends where the coarse step does (t_mid + (t + h - t_mid) == t + h: Sterbenz)
        fine = self.base(sde, t_mid, mid, (t + h) - t_mid, sde.f(t_mid, mid))
        err = (fine - coarse).detach().reshape(1, -1) / h  # the controller reads it; no graph through it
        return fine.reshape(1, -1), f0.reshape(1, -1), err

    def base(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor) -> Tensor:
        """One step from ``(t, y)`` of size ``h`` (``f0``: the drift at ``(t, y)``)."""
        return self._step(sde, t, y, h, f0, False)[0]

    def base_est(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor) -> tuple[Tensor, Tensor]:
        """One step and its embedded error estimate ``(y1, y1 - y_low)`` (methods with ``embedded_noise``)."""
        return self._step(sde, t, y, h, f0, True)

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        """``(y1, y1 - y_low)`` with ``est``, else ``(y1, None)``: a method defines this, or ``base`` alone."""
        raise NotImplementedError

    # -- the compiled driven loop (neurodyn.compile.driven; fixed steps) ---------------------------------------------
    def step_inputs(self, term: ODETerm, t0: float, t1: float) -> tuple[Tensor, ...]:
        """What a step over ``[t0, t1]`` reads from the Brownian path, queried on the host before a compiled solve:
        ``(dW,)``, or ``(W, H)`` / ``(W, A)`` for a method that needs the Levy area (the values :meth:`step` would
        query for that step: the same sample path)."""
        sde = self.parts(term)
        if self.levy is None:
            return (sde.dW(t0, t1),)
        inc = sde.levy(t0, t1)
        return (inc.W, inc.H if self.levy == "H" else inc.A)

    def driven_key(self, user: Term) -> tuple[Any, tuple]:
        """``(anchor, key)`` of the user's SDE term for the compiled code's cache: ``key`` names the functions a step
        evaluates (a bound method by its object and function: a term built anew for every solve from the same
        module's methods has the same key), the noise and SDE types; ``anchor`` is a weak-referenceable object the
        cache entry lives as long as (the drift's or the diffusion's owner)."""
        drift, diff = split_sde(user)
        fns = (drift.func if isinstance(drift, ODETerm) else drift, diff.vector_field, diff.g_prod,
               getattr(user, "f_and_g", None), getattr(user, "f_and_g_prod", None))
        keys = tuple((id(fn.__self__), fn.__func__) if getattr(fn, "__func__", None) is not None else fn for fn in fns)
        first = next(fn for fn in fns if fn is not None)
        return getattr(first, "__self__", first), (*keys, diff.noise, diff.sde_type, type(drift))

    def driven_start(self, term: ODETerm, t: float, y: Tensor, k1: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(k1, carried)`` at the start of a compiled fixed-step solve from ``(t, y)`` (``k1``: the drift there,
        ``(1, n)``); a one-step method carries nothing."""
        return k1, ()

    def driven_step(self, term: ODETerm, t: Tensor, y: Tensor, h: Tensor, k1: Tensor, carried: tuple[Tensor, ...],
                    inputs: tuple[Tensor, ...], counts: dict | None = None
                    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        """One fixed step as tensor code a compiled graph runs: ``t``, ``h`` 0-dim float64 tensors, ``y`` and ``k1``
        (the drift at ``(t, y)``) rows ``(1, n)``, ``inputs`` what :meth:`step_inputs` gave for the step. Returns
        ``(y1, k, carried)``: ``k`` the drift at the step's end for an FSAL method, else None. The step is
        :meth:`base`, the eager step's formula. ``counts`` (a dict with ``nfe`` and ``nfe_diffusion``): where the
        evaluations are counted (host calls)."""
        sde = GraphParts(self.parts(term), inputs, self.levy, counts)
        shape = term.shape
        y1 = self.base(sde, t, y.view(shape), h, k1.view(shape))
        return y1.reshape(1, -1), None, ()

    def driven_finish(self, term: ODETerm, t: float, y: Tensor, k: Tensor, carried: tuple[Tensor, ...]) -> None:
        """After a compiled solve that ended at ``(t, y)`` (``k`` the drift there for an FSAL method): nothing to keep
        for a one-step method."""

    # -- dense output -----------------------------------------------------------------------------------------
    def interpolate(self, term: Any, st: Step, thetas: Tensor, co: Any = None, interp: str = "auto") -> Tensor:
        """Linear interpolation between the step ends at fractions ``thetas`` (``(m,)``) -> ``(m, n)``."""
        return linear(thetas.reshape(-1, 1).to(st.y0.dtype), st.y0, st.y1)

    def interpolate_floats(self, term: Any, st: Step, thetas: list[float], co: Any = None,
                           interp: str = "auto") -> Tensor:
        th = torch.tensor(thetas, dtype=st.y0.dtype, device=st.y0.device)
        return self.interpolate(term, st, th, co, interp)


# ----------------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------------
class EulerMaruyama(SDEStepper):
    """Euler--Maruyama, ``y1 = y + f h + g dW`` (Ito; strong order 0.5, 1.0 for additive noise)."""

    name = "euler"
    order = 0.5
    sde_types = ("ito",)

    def check_term(self, term: Term, y0: Tensor, t0: Tensor, adaptive: bool) -> None:
        super().check_term(term, y0, t0, adaptive)
        _, diff = split_sde(term)
        if diff.noise == "additive":  # strong order 1 for additive noise: the controller's exponent follows
            self.controller_order = 0.5

    def base(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor) -> Tensor:
        return y + f0 * h + sde.g_prod(t, y, sde.dW(t, t + h))


def _jvp(fn: Any, y: Tensor, v: Tensor) -> Tensor:
    """``J_fn(y) v`` (differentiable with respect to ``y`` and the parameters ``fn`` uses)."""
    return torch.func.jvp(fn, (y,), (v,))[1]


def _g_and_diag_vjp(sde: SDEParts, t: float, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``g(t, y)`` and ``(dg_i/dy_i) g_i c_i`` (diagonal noise) from one evaluation of ``g`` and one reverse pass
    (a quarter of ``torch.func.jvp``'s cost on an MLP). Differentiable (a graph is built when grad mode is on) with
    respect to ``y`` and the parameters ``g`` uses."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        # The point g is differentiated at: a tensor of its own (a clone when y carries a graph, which the gradient
        # flows through), so that g is evaluated at it and not taken from a value some other view of y gave.
        z = y.clone() if (create and y.requires_grad) else y.detach().requires_grad_(True)
        g = sde.g(t, z)
        sde.counts["nfe_diffusion"] += 1  # the reverse pass
        if not g.requires_grad:  # g built without z (a constant): no derivative term
            return g, torch.zeros_like(y)
        (res,) = torch.autograd.grad(g, z, (g if create else g.detach()) * c, create_graph=create)
    return (g if create else g.detach()), res


class Milstein(SDEStepper):
    """Milstein's method, Ito or Stratonovich by the SDE's ``sde_type`` (strong order 1.0; diagonal, scalar and
    additive noise): ``y1 = y + f h + g dW + 1/2 (g . dg/dy) (dW^2 - h)`` (Stratonovich: ``dW^2``). The derivative
    term by a Jacobian-vector product (diagonal noise, whose ``g_i`` depends on ``y_i`` alone: one vector-Jacobian
    product; scalar noise: ``torch.func.jvp``), or derivative-free with ``solver_options={"grad_free":
    True}``: ``(g(y + f h + g sqrt(h)) - g(y)) / sqrt(h)`` in its place (Stratonovich: without ``f h``)."""

    name = "milstein"
    order = 1.0
    noise_types = ("diagonal", "scalar", "additive")
    needs_g = True
    # The estimate: the derivative term (Milstein minus Euler--Maruyama: the noise's part) plus the trapezoidal
    # correction of the drift, (f(t + h, y1) - f(t, y)) h / 2, whose drift evaluation the next step starts from.
    embedded_noise = ("diagonal", "scalar")
    embedded_fsal = True

    def option_names(self) -> tuple[str, ...]:
        return ("error_estimate", "grad_free")

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        dW = sde.dW(t, t + h)
        if sde.noise == "additive":
            y1 = y + f0 * h + sde.g_prod(t, y, dW)
            return y1, (torch.zeros_like(y1) if est else None)
        v = dW * dW - h if sde.sde_type == "ito" else dW * dW
        if sde.noise == "diagonal" and not self.options.get("grad_free", False):
            # Diagonal noise (g_i depends on y_i alone): (dg_i/dy_i) g_i is the vector-Jacobian product with g, one
            # reverse pass through the same evaluation of g (no second forward pass).
            g, gdg = sde.g_and_diag_vjp(t, y, 0.5 * v)
            y1 = y + f0 * h + sde.prod(g, dW) + gdg
            return y1, (self._drift_est(sde, t, y1, h, f0, gdg) if est else None)
        g = sde.g(t, y)
        if self.options.get("grad_free", False):
            sq = _sqrt(h)
            y_p = y + sde.vec(g) * sq
            if sde.sde_type == "ito":
                y_p = y_p + f0 * h
            gdg = sde.prod(sde.g(t, y_p) - g, v) / (2.0 * sq)
        else:
            tt = sde.time(t)
            sde.counts["nfe_diffusion"] += 1
            jg = _jvp(lambda z: sde.diffusion.vector_field(tt, z), y, sde.vec(g))
            gdg = sde.prod(jg, 0.5 * v)
        y1 = y + f0 * h + sde.prod(g, dW) + gdg
        return y1, (self._drift_est(sde, t, y1, h, f0, gdg) if est else None)

    def _drift_est(self, sde: SDEParts, t: float, y1: Tensor, h: float, f0: Tensor, gdg: Tensor) -> Tensor:
        f1 = self._f1 = sde.f(self._t_end, y1)
        return gdg + (f1 - f0) * (0.5 * h)


# Rossler (2010) SRI2-type tableau for diagonal/scalar noise and SRA1 for additive noise (Ito): stage times c0 (drift)
# and c1 (diffusion), stage matrices a0, a1, b0, b1, weights alpha, beta1..beta4.
_SRID = {
    "c0": (0.0, 1.0, 0.5, 0.0), "c1": (0.0, 0.25, 1.0, 0.25),
    "a0": ((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0)),
    "a1": ((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25)),
    "b0": ((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0)),
    "b1": ((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5)),
    "alpha": (1 / 6, 1 / 6, 2 / 3, 0.0),
    "beta1": (-1.0, 4 / 3, 2 / 3, 0.0), "beta2": (1.0, -4 / 3, 1 / 3, 0.0),
    "beta3": (2.0, -4 / 3, -2 / 3, 0.0), "beta4": (-2.0, 5 / 3, -2 / 3, 1.0),
}
_SRA = {"c0": (0.0, 0.75), "c1": (1.0, 0.0), "a0": ((), (0.75,)), "b0": ((), (1.5,)),
        "alpha": (1 / 3, 2 / 3), "beta1": (1.0, 0.0), "beta2": (-1.0, 1.0)}


class SRK(SDEStepper):
    """Stochastic Runge--Kutta for Ito SDEs with diagonal, scalar or additive noise (Rossler 2010: an SRI-type
    method for diagonal/scalar noise, SRA1 for additive noise; strong order 1.5 for additive and scalar-per-component
    noise). Uses the space-time Levy area ``H`` (``U = int (W_r - W_s) dr = h (H + dW / 2)``)."""

    name = "srk"
    order = 1.5
    sde_types = ("ito",)
    noise_types = ("diagonal", "scalar", "additive")
    levy = "H"
    needs_g = True
    embedded_noise = ("diagonal", "scalar", "additive")
    embedded_order = 1.0
    embedded_default = True

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        """The step and, with ``est``, its difference from an order-1.0 solution on the same evaluations: a
        derivative-free Milstein step ``y + f h + g0 dW + (g1 - g0) I_kk / b1 sqrt(h)`` (``g1`` the second diffusion
        stage, at ``y + a1 h f + b1 sqrt(h) g0``), or Euler--Maruyama for additive noise."""
        inc = sde.levy(t, t + h)
        dW, H = inc.W, inc.H
        u_h = H + 0.5 * dW  # U / h
        if sde.noise == "additive":
            return self._additive(sde, t, y, h, f0, dW, u_h, est)
        sq = _sqrt(h)
        i_kk = (dW * dW - h) * 0.5
        i_kkk = (dW * dW * dW - 3.0 * h * dW) / 6.0
        T = _SRID
        y1 = y + (T["alpha"][0] * h) * f0
        H0: list[Tensor] = [y]
        H1: list[Tensor] = [y]
        fs: list[Tensor] = [f0]
        gs: list[Tensor] = []
        for s in range(4):
            if s > 0:
                h0, h1 = y, y
                for j in range(s):
                    a0, a1, b0, b1 = T["a0"][s][j], T["a1"][s][j], T["b0"][s][j], T["b1"][s][j]
                    if a0:
                        h0 = h0 + (a0 * h) * fs[j]
                    if a1:
                        h1 = h1 + (a1 * h) * fs[j]
                    if b0:
                        h0 = h0 + b0 * sde.vec(gs[j]) * u_h
                    if b1:
                        h1 = h1 + (b1 * sq) * sde.vec(gs[j])
                H0.append(h0)
                H1.append(h1)
                if T["alpha"][s] or any(T["a0"][r][s] or T["a1"][r][s] for r in range(s + 1, 4)):
                    fs.append(sde.f(t + T["c0"][s] * h, h0))
                    if T["alpha"][s]:
                        y1 = y1 + (T["alpha"][s] * h) * fs[s]
                else:
                    fs.append(f0)  # unused
            g = sde.g(t + T["c1"][s] * h, H1[s])
            gs.append(g)
            w = T["beta1"][s] * dW + (T["beta2"][s] / sq) * i_kk + T["beta3"][s] * u_h + (T["beta4"][s] / h) * i_kkk
            y1 = y1 + sde.prod(g, w)
        if not est:
            return y1, None
        # (g(y + a1 h f + b1 sqrt(h) g0) - g0) / (b1 sqrt(h)) = g' g0 + O(sqrt(h)): Milstein's derivative term
        low = y + f0 * h + sde.prod(gs[0], dW) + sde.prod(gs[1] - gs[0], i_kk * (1.0 / (T["b1"][1][0] * sq)))
        return y1, y1 - low

    def _additive(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, dW: Tensor, u_h: Tensor,
                  est: bool) -> tuple[Tensor, Any]:
        T = _SRA
        # Additive noise: g depends on t only; the stages evaluate it at y.
        g0 = sde.g(t + T["c1"][0] * h, y)
        g1 = g0 if T["c1"][1] == T["c1"][0] else sde.g(t + T["c1"][1] * h, y)
        h1 = y + (T["a0"][1][0] * h) * f0 + sde.prod(g0, T["b0"][1][0] * u_h)
        f1 = sde.f(t + T["c0"][1] * h, h1)
        y1 = (y + (T["alpha"][0] * h) * f0 + (T["alpha"][1] * h) * f1
              + sde.prod(g0, T["beta1"][0] * dW + T["beta2"][0] * u_h)
              + sde.prod(g1, T["beta1"][1] * dW + T["beta2"][1] * u_h))
        if not est:
            return y1, None
        g_t = g1 if T["c1"][1] == 0.0 else sde.g(t, y)  # Euler--Maruyama's g(t) (SRA1: the second stage)
        return y1, y1 - (y + f0 * h + sde.prod(g_t, dW))


class StratHeun(SDEStepper):
    """Heun's method for Stratonovich SDEs: predictor ``y' = y + f h + g dW``, then the trapezoidal average
    (strong order 1.0 for commutative noise, 0.5 general)."""

    name = "heun"
    order = 1.0
    sde_types = ("stratonovich",)
    embedded_noise = ("diagonal", "scalar", "general")  # the step minus its Euler--Maruyama predictor

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        dW = sde.dW(t, t + h)
        gp = sde.g_prod(t, y, dW)
        y_p = y + f0 * h + gp
        f1, gp1 = sde.f_and_g_prod(t + h, y_p, dW)
        y1 = y + ((f0 + f1) * h + gp + gp1) * 0.5
        return y1, (y1 - y_p if est else None)


class StratMidpoint(SDEStepper):
    """The midpoint method for Stratonovich SDEs (strong order 1.0 for commutative noise, 0.5 general)."""

    name = "midpoint"
    order = 1.0
    sde_types = ("stratonovich",)
    embedded_noise = ("diagonal", "scalar", "general")  # the step minus Euler--Maruyama y + f h + g dW

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        dW = sde.dW(t, t + h)
        gp = sde.g_prod(t, y, dW)
        y_m = y + f0 * (0.5 * h) + 0.5 * gp
        f_m, gp_m = sde.f_and_g_prod(t + 0.5 * h, y_m, dW)
        y1 = y + f_m * h + gp_m
        return y1, ((f_m - f0) * h + (gp_m - gp) if est else None)


class EulerHeun(SDEStepper):
    """Euler--Heun (Stratonovich): Euler in the drift, Heun in the diffusion (strong order 1.0 commutative, 0.5
    general); one drift evaluation per step."""

    name = "euler_heun"
    order = 1.0
    sde_types = ("stratonovich",)
    embedded_noise = ("diagonal", "scalar", "general")  # the step minus Euler--Maruyama y + f h + g dW

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        dW = sde.dW(t, t + h)
        gp = sde.g_prod(t, y, dW)
        gp1 = sde.g_prod(t + h, y + gp, dW)
        return y + f0 * h + (gp + gp1) * 0.5, ((gp1 - gp) * 0.5 if est else None)


class LogODE(SDEStepper):
    """The log-ODE method (Stratonovich, any noise): one midpoint step of the ODE driven by the step's log-signature
    ``f h + g dW + sum_jk [g_j, g_k] A_jk / 2`` (Lie brackets of the diffusion's columns against the Levy area
    ``A``; they vanish for diagonal, scalar and additive noise). Strong order 1.0 where the noise commutes, 0.5
    otherwise with an approximate ``A`` (davie / foster)."""

    name = "log_ode"
    order = 1.0
    sde_types = ("stratonovich",)
    levy = "A"
    embedded_noise = ("diagonal", "scalar", "general")  # the step minus Euler--Maruyama y + f h + g dW

    def _step(self, sde: SDEParts, t: float, y: Tensor, h: float, f0: Tensor, est: bool) -> tuple[Tensor, Any]:
        inc = sde.levy(t, t + h)
        dW, A = inc.W, inc.A
        gp = sde.g_prod(t, y, dW)
        y_m = y + f0 * (0.5 * h) + 0.5 * gp
        tm = t + 0.5 * h
        if sde.noise != "general":
            f_m, gp_m = sde.f_and_g_prod(tm, y_m, dW)
            y1 = y + f_m * h + gp_m
            return y1, (y1 - (y + f0 * h + gp) if est else None)
        f_m, g_m = sde.f_and_g(tm, y_m)
        tt = sde.time(tm)
        m = g_m.shape[-1]
        area = torch.zeros_like(y)
        # sum_j (J g)(y_m) g_j . A[j, :]: J g_k g_j for every k by one jvp per column j.
        for j in range(m):
            sde.counts["nfe_diffusion"] += 1
            jg = _jvp(lambda z: sde.diffusion.vector_field(tt, z), y_m, g_m[..., j])
            area = area + torch.matmul(jg, A[..., j, :].unsqueeze(-1)).squeeze(-1)
        y1 = y + f_m * h + sde.prod(g_m, dW) + area
        return y1, (y1 - (y + f0 * h + gp) if est else None)


class ReversibleHeun(SDEStepper):
    """Reversible Heun (Kidger et al. 2021; Stratonovich, any noise; strong order 0.5, 1.0 additive): with the
    carried state ``(z, f(z), g(z))``, ``z1 = 2 y - z + f(z) h + g(z) dW``, ``y1 = y + (f(z) + f(z1)) h / 2 +
    (g(z) + g(z1)) dW / 2``. Algebraically reversible: ``z = 2 y - z1 - f(z1) h - g(z1) dW`` and ``y`` from ``y1``
    by the same averages, exactly in exact arithmetic. One drift and one diffusion evaluation per step. Fixed steps
    (``step_size`` or the output grid).

    ``solver_options={"initial_state": (f(z0), g(z0), z0)}`` starts from a carried state (continuing an earlier
    solve, whose :meth:`final_state` it is) instead of ``z0 = y0``.

    Solver state: ``f(z)`` travels as the loop's ``k1`` (FSAL: the first step's ``k1 = f(y0) = f(z0)``), ``z`` and
    ``g(z)`` in the stepper (:attr:`carried`, exposed to checkpoint replays by ``replay_record`` /
    ``replay_prepare``)."""

    name = "reversible_heun"
    order = 0.5
    sde_types = ("stratonovich",)
    needs_g = True
    fsal = True
    multistep = True
    replay = True
    optional_error = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.adaptive = False
        self.carried: tuple[float, Tensor, Tensor, Tensor] | None = None  # (t, y, z, g(z)) the next step continues
        self._pending: tuple[float, Tensor, Tensor, Tensor] | None = None

    def check_term(self, term: Term, y0: Tensor, t0: Tensor, adaptive: bool) -> None:
        super().check_term(term, y0, t0, adaptive)
        if split_sde(term)[1].noise == "additive":
            self.controller_order = 0.5

    def reset(self) -> None:
        self.carried = None
        self._pending = None

    def step(self, term: ODETerm, t: float, y: Tensor, h: float, k1: Tensor, co: Any = None,
             t_end_nudge: float | None = None, buf: Any = None) -> tuple[Tensor, Tensor, Tensor | None]:
        sde = self.parts(term)
        shape = term.shape
        ys = y.view(shape)
        f_z = k1.view(shape)
        pend = self._pending
        if pend is not None and pend[0] == t and pend[1] is y:  # the previous step was accepted
            self.carried = pend
        c = self.carried
        start = self.options.pop("initial_state", None)
        if start is not None:  # a solve continuing another (solver_options={"initial_state": (f(z), g(z), z)})
            f_z, g_z, z = (x.view(shape) if i != 1 else x for i, x in enumerate(start))
        elif c is not None and c[0] == t and c[1] is y:
            z, g_z = c[2], c[3]
        else:  # a new solve (or a replay without a carried state): z0 = y0
            z, g_z = ys, sde.g(t, ys)
        y1, z1, f1, g1 = _reversible_heun(sde, t, h, ys, z, f_z, g_z)
        y1f = y1.reshape(1, -1)
        self._pending = (t + h, y1f, z1, g1, f1)
        return y1f, f1.reshape(1, -1), None

    def driven_start(self, term: ODETerm, t: float, y: Tensor, k1: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(f(z0), (z0, g(z0)))``: ``z0 = y0``, or the ``initial_state`` option's (as :meth:`step` starts)."""
        sde = self.parts(term)
        shape = term.shape
        start = self.options.pop("initial_state", None)
        if start is not None:
            f_z, g_z, z = start
            return f_z.reshape(1, -1), (z.view(shape), g_z)
        ys = y.view(shape)
        return k1, (ys, sde.g(t, ys))

    def driven_step(self, term: ODETerm, t: Tensor, y: Tensor, h: Tensor, k1: Tensor, carried: tuple[Tensor, ...],
                    inputs: tuple[Tensor, ...], counts: dict | None = None
                    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        sde = GraphParts(self.parts(term), inputs, None, counts)
        shape = term.shape
        y1, z1, f1, g1 = _reversible_heun(sde, t, h, y.view(shape), carried[0], k1.view(shape), carried[1])
        return y1.reshape(1, -1), f1.reshape(1, -1), (z1, g1)

    def driven_finish(self, term: ODETerm, t: float, y: Tensor, k: Tensor, carried: tuple[Tensor, ...]) -> None:
        """Keeps the carried state for :meth:`final_state` (as after an eager solve)."""
        self._pending = (t, y, carried[0], carried[1], k.view(term.shape))

    def option_names(self) -> tuple[str, ...]:
        return ("initial_state",)

    def final_state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(f(z), g(z), z)`` after the last step (user's shapes; torchsde's extra solver state order), to continue
        with ``solver_options={"initial_state": ...}``; None before any step."""
        p = self._pending
        return None if p is None else (p[4], p[3], p[2])

    def replay_record(self) -> tuple[Any, tuple[Tensor, ...], Any]:
        """After an accepted step: the carried ``(z, g(z))`` and its time (``f(z)`` is the FSAL ``k1``)."""
        p = self._pending
        return None, (p[2], p[3]), p[0]

    def replay_prepare(self, t: float, y: Tensor, info: Any, carry: tuple | None = None) -> None:
        """Before a replayed step from ``(t, y)``: continue from the carried state ``carry`` when given."""
        if carry is not None:
            (z, g_z), t_c = carry
            self.carried = (t, y, z, g_z)
            self._pending = None


def _reversible_heun(sde: SDEParts, t: Any, h: Any, y: Tensor, z: Tensor, f_z: Tensor, g_z: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One reversible Heun step from ``y`` with the carried ``(z, f(z), g(z))``: ``(y1, z1, f(z1), g(z1))``."""
    dW = sde.dW(t, t + h)
    z1 = 2.0 * y - z + f_z * h + sde.prod(g_z, dW)
    f1, g1 = sde.f_and_g(t + h, z1)
    y1 = y + (f_z + f1) * (0.5 * h) + sde.prod(g_z + g1, 0.5 * dW)
    return y1, z1, f1, g1


SDE_STEPPERS: dict[str, type[SDEStepper]] = {
    "euler": EulerMaruyama,
    "milstein": Milstein,
    "srk": SRK,
    "heun": StratHeun,
    "midpoint": StratMidpoint,
    "euler_heun": EulerHeun,
    "log_ode": LogODE,
    "reversible_heun": ReversibleHeun,
}


def make_sde(name: str) -> SDEStepper:
    """A fresh SDE stepper for ``method=name`` (they keep per-solve options, counters and solver state)."""
    return SDE_STEPPERS[name](name)
