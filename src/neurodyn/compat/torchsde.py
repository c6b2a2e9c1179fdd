"""torchsde drop-in: ``import neurodyn.compat.torchsde as torchsde``.

``sdeint`` and ``sdeint_adjoint`` take torchsde's arguments, defaults, SDE objects (modules with ``noise_type``,
``sde_type`` and ``f``/``g``/``h``/``f_and_g``/``g_prod``/``f_and_g_prod`` methods, or subclasses of
:class:`BaseSDE`, :class:`SDEIto`, :class:`SDEStratonovich`), method names and Brownian motions (neurodyn's
:class:`~neurodyn.paths.BrownianInterval`, :class:`~neurodyn.paths.BrownianPath`, :class:`~neurodyn.paths.BrownianTree`,
:class:`~neurodyn.paths.ReverseBrownian`, re-exported here, or torchsde's own objects), and raise torchsde's
``ValueError`` messages for the same bad input. They integrate with :func:`neurodyn.solve` and its SDE methods
(:mod:`neurodyn.solvers.sde`).

Differences from torchsde (where its behaviour loses accuracy or work):

* Fixed steps are those of torchsde: ``dt`` from ``ts[0]``, outputs between step ends linearly interpolated (the
  last step lands on ``ts[-1]``). Results agree with torchsde's to rounding on the same Brownian path when the
  step times are computed alike (e.g. ``dt`` a power of two).
* Adaptive steps use neurodyn's PID controller on the step-doubling error; steps below ``dt_min`` are accepted with
  a status in ``stats`` as torchsde accepts them (``accept_min_step=True``).
* ``sdeint_adjoint``: the stochastic adjoint is solved as a Stratonovich SDE (an Ito SDE's drift is converted,
  ``f - 1/2 sum_j (dg_j/dy) g_j``) with ``midpoint``, ``heun`` or ``euler_heun``; torchsde's Ito adjoint method
  names (``euler``, ``milstein``, ``srk``) and ``log_ode``/``reversible_heun`` select ``midpoint`` (same limit as
  ``dt -> 0``). ``method="reversible_heun"`` with ``adjoint_method="adjoint_reversible_heun"`` (the default) is
  the exact algebraic adjoint (:mod:`neurodyn.gradients.reversible`): the gradient of the discrete solve.
* ``milstein`` with scalar noise uses ``(dg/dy) g`` (the Milstein term); torchsde 0.2.6 uses ``(dg/dy)^T g`` (a
  vector-Jacobian product), equal only where ``dg/dy`` is symmetric (e.g. ``g_i`` depending on ``y_i`` alone).
* Tensors requiring grad that the SDE uses but ``adjoint_params`` lacks raise an error (torchsde gives them no
  gradient silently).

Examples
--------
torchsde's README example, unchanged but for the import:

>>> import torch
>>> import neurodyn.compat.torchsde as torchsde
>>> class SDE(torch.nn.Module):
...     noise_type = "general"
...     sde_type = "ito"
...     def __init__(self):
...         super().__init__()
...         self.mu = torch.nn.Linear(3, 3)
...         self.sigma = torch.nn.Linear(3, 3 * 2)
...     def f(self, t, y):            # (batch, state) -> (batch, state)
...         return self.mu(y)
...     def g(self, t, y):            # (batch, state) -> (batch, state, brownian)
...         return self.sigma(y).view(4, 3, 2)
>>> torch.manual_seed(0) and None
>>> ys = torchsde.sdeint(SDE(), torch.full((4, 3), 0.1), torch.linspace(0, 1, 5), dt=0.05)
>>> ys.shape                      # (len(ts), batch, state)
torch.Size([5, 4, 3])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..core.term import sde_term
from ..paths import BrownianIncrement, BrownianInterval, BrownianPath, BrownianTree, ReverseBrownian
from ..solve import solve
from ..solvers.sde import SDE_STEPPERS, SDEStepper, make_sde

__all__ = ["BaseSDE", "BrownianInterval", "BrownianPath", "BrownianTree", "ReverseBrownian", "SDEIto",
           "SDEStratonovich", "sdeint", "sdeint_adjoint", "settings"]


class _Names(type):
    """torchsde's setting containers: ``METHODS.euler == "euler"``, ``"euler" in METHODS``, ``METHODS.all()``."""

    def all(cls) -> list[str]:
        return sorted(v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, str))

    def __contains__(cls, item: Any) -> bool:
        return item in cls.all()

    def __iter__(cls):
        return iter(cls.all())

    def __str__(cls) -> str:
        return str(cls.all())


class METHODS(metaclass=_Names):
    euler = "euler"
    milstein = "milstein"
    srk = "srk"
    midpoint = "midpoint"
    reversible_heun = "reversible_heun"
    adjoint_reversible_heun = "adjoint_reversible_heun"
    heun = "heun"
    log_ode_midpoint = "log_ode"
    euler_heun = "euler_heun"


class NOISE_TYPES(metaclass=_Names):  # noqa: N801
    general = "general"
    diagonal = "diagonal"
    scalar = "scalar"
    additive = "additive"


class SDE_TYPES(metaclass=_Names):  # noqa: N801
    ito = "ito"
    stratonovich = "stratonovich"


class LEVY_AREA_APPROXIMATIONS(metaclass=_Names):  # noqa: N801
    none = "none"
    space_time = "space-time"
    davie = "davie"
    foster = "foster"


class METHOD_OPTIONS(metaclass=_Names):  # noqa: N801
    grad_free = "grad_free"


#: torchsde's ``settings`` module.
settings = SimpleNamespace(METHODS=METHODS, NOISE_TYPES=NOISE_TYPES, SDE_TYPES=SDE_TYPES,
                           LEVY_AREA_APPROXIMATIONS=LEVY_AREA_APPROXIMATIONS, METHOD_OPTIONS=METHOD_OPTIONS)
"""torchsde's ``settings``: the names of its methods, noise types, SDE types and Levy-area approximations."""


class BaseSDE(nn.Module):
    """Base of SDE modules: checks and stores ``noise_type`` and ``sde_type`` (torchsde's names; ValueError
    otherwise). Subclasses define ``f(t, y)`` and ``g(t, y)`` (and optionally ``h``, ``f_and_g``, ``g_prod``,
    ``f_and_g_prod``), ``y`` of shape ``(batch, d)``.

    Examples
    --------
    >>> sde = BaseSDE(noise_type="diagonal", sde_type="ito")
    >>> sde.noise_type, sde.sde_type
    ('diagonal', 'ito')
    """

    def __init__(self, noise_type: str, sde_type: str):
        super().__init__()
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"Expected noise type in {NOISE_TYPES}, but found {noise_type}")
        if sde_type not in SDE_TYPES:
            raise ValueError(f"Expected sde type in {SDE_TYPES}, but found {sde_type}")
        self.noise_type = noise_type
        self.sde_type = sde_type


class SDEIto(BaseSDE):
    """:class:`BaseSDE` with ``sde_type="ito"``."""

    def __init__(self, noise_type: str):
        super().__init__(noise_type=noise_type, sde_type="ito")


class SDEStratonovich(BaseSDE):
    """:class:`BaseSDE` with ``sde_type="stratonovich"``."""

    def __init__(self, noise_type: str):
        super().__init__(noise_type=noise_type, sde_type="stratonovich")


_FUNCS = ("f", "g", "h", "g_prod", "f_and_g", "f_and_g_prod")
_NAME_KEYS = {"drift": "f", "diffusion": "g", "prior_drift": "h", "diffusion_prod": "g_prod",
              "drift_and_diffusion": "f_and_g", "drift_and_diffusion_prod": "f_and_g_prod"}


class _Functions:
    """The SDE's callables by torchsde's names after ``names=`` renaming (missing ones are None)."""

    def __init__(self, sde: Any, names: dict | None):
        rename = {v: v for v in _FUNCS}
        for key, value in (names or {}).items():
            if key in _NAME_KEYS:
                rename[_NAME_KEYS[key]] = value
        for name in _FUNCS:
            setattr(self, name, getattr(sde, rename[name], None))
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type


def _stable_division(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    b = torch.where(b.abs().detach() > eps, b, torch.full_like(b, eps) * b.sign())
    return a / b


def _logqp(fns: _Functions) -> _Functions:
    """The SDE on ``[y, L]`` with ``dL = |u|^2 / 2 dt``, ``u = (f - h) / g`` (general noise: ``pinv(g) (f - h)``),
    no noise on ``L`` (torchsde's ``logqp=True``)."""
    if fns.f is None or fns.g is None or fns.h is None:
        raise AttributeError("If using logqp then drift, diffusion and prior drift must all be specified.")
    f, g, h = fns.f, fns.g, fns.h
    diagonal = fns.noise_type == "diagonal"

    def f_and_g(t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y[:, :-1]
        fx, gx, hx = f(t, x), g(t, x), h(t, x)
        if diagonal:
            u = _stable_division(fx - hx, gx)
            g_aug = torch.cat([gx, x.new_zeros(x.size(0), 1)], dim=1)
        else:
            u = torch.matmul(gx.pinverse(), (fx - hx).unsqueeze(-1)).squeeze(-1)
            g_aug = torch.cat([gx, gx.new_zeros(gx.size(0), 1, gx.size(-1))], dim=1)
        return torch.cat([fx, 0.5 * (u ** 2).sum(dim=1, keepdim=True)], dim=1), g_aug

    out = _Functions(SimpleNamespace(noise_type=fns.noise_type, sde_type=fns.sde_type), None)
    out.f = lambda t, y: f_and_g(t, y)[0]
    out.g = lambda t, y: f_and_g(t, y)[1]
    out.f_and_g = f_and_g
    return out


class _ForeignBrownian:
    """A Brownian motion with torchsde's call form only (``bm(ta, tb, return_U, return_A)``, e.g. torchsde's own)
    seen through neurodyn's path interface (``increment``, ``levy``)."""

    knots: tuple[float, ...] = ()

    def __init__(self, bm: Any):
        self.bm = bm
        self.levy_area = getattr(bm, "levy_area_approximation", "none")
        self.shape = tuple(bm.shape)

    def _zeros(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.bm.dtype, device=self.bm.device)

    def increment(self, s: Any, t: Any) -> Tensor:
        s, t = float(s), float(t)
        if s == t:
            return self._zeros()
        return self.bm(s, t) if s < t else -self.bm(t, s)

    def evaluate(self, t: Any) -> Tensor:
        return self.bm(float(t))

    def levy(self, s: Any, t: Any) -> BrownianIncrement:
        s, t = float(s), float(t)
        a, b, sign = (s, t, 1.0) if s <= t else (t, s, -1.0)
        h = b - a
        if self.levy_area in ("davie", "foster"):
            w, u, area = self.bm(a, b, return_U=True, return_A=True)
        else:
            w, u = self.bm(a, b, return_U=True)
            area = None
        H = u / h - 0.5 * w
        return BrownianIncrement(sign * w, H, None, None if area is None else sign * area)

    def grad_tensors(self) -> list[Tensor]:
        return []


def _warn_unused(unused: dict, msg: str) -> None:
    if unused:
        warnings.warn(f"{msg}: Unexpected arguments {unused}", stacklevel=3)


def _check(sde: Any, y0: Any, ts: Any, bm: Any, method: str | None, adaptive: bool, options: dict | None,
           names: dict | None, logqp: bool) -> tuple:
    """torchsde's argument contract: the same ValueErrors; returns the callables, the (augmented) y0, ts, the path,
    the method name and the options."""
    for attr in ("noise_type", "sde_type"):
        if not hasattr(sde, attr):
            raise ValueError(f"sde does not have the attribute {attr}.")
    if sde.noise_type not in NOISE_TYPES:
        raise ValueError(f"Expected noise type in {NOISE_TYPES}, but found {sde.noise_type}.")
    if sde.sde_type not in SDE_TYPES:
        raise ValueError(f"Expected sde type in {SDE_TYPES}, but found {sde.sde_type}.")
    if not torch.is_tensor(y0):
        raise ValueError("`y0` must be a torch.Tensor.")
    if y0.dim() != 2:
        raise ValueError("`y0` must be a 2-dimensional tensor of shape (batch, channels).")
    fns = _Functions(sde, names)
    if logqp:
        fns = _logqp(fns)
        y0 = torch.cat((y0, y0.new_zeros(size=(y0.size(0), 1))), dim=1)
    noise, kind = fns.noise_type, fns.sde_type
    if method is None:
        method = ({"general": "euler"}.get(noise, "srk")) if kind == "ito" else "midpoint"
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, but found {method}.")
    if not torch.is_tensor(ts):
        if not isinstance(ts, (tuple, list)) or not all(isinstance(t, (float, int)) for t in ts):
            raise ValueError("Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
        ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
    if not all(a < b for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True)):
        raise ValueError("Evaluation times `ts` must be strictly increasing.")

    batch, state, noise_sizes = [y0.size(0)], [y0.size(1)], []
    if bm is not None:
        if len(bm.shape) != 2:
            raise ValueError("`bm` must be of shape (batch, noise_channels).")
        batch.append(bm.shape[0])
        noise_sizes.append(bm.shape[1])

    def two(name: str, shape: Sequence[int]) -> None:
        if len(shape) != 2:
            raise ValueError(f"{name} must be of shape (batch, state_channels), but got {tuple(shape)}.")
        batch.append(shape[0])
        state.append(shape[1])

    def two_or_three(name: str, shape: Sequence[int]) -> None:
        if noise == "diagonal":
            two(name, shape)
            noise_sizes.append(shape[1])
        else:
            if len(shape) != 3:
                raise ValueError(f"{name} must be of shape (batch, state_channels, noise_channels), but got "
                                 f"{tuple(shape)}.")
            batch.append(shape[0])
            state.append(shape[1])
            noise_sizes.append(shape[2])

    t0 = ts[0]
    with torch.no_grad():
        if fns.f is not None:
            two("Drift", fns.f(t0, y0).size())
        if fns.g is not None:
            two_or_three("Diffusion", fns.g(t0, y0).size())
        if fns.f_and_g is not None:
            f_, g_ = fns.f_and_g(t0, y0)
            two("Drift", f_.size())
            two_or_three("Diffusion", g_.size())
        for name in ("g_prod", "f_and_g_prod"):
            fn = getattr(fns, name)
            if fn is None:
                continue
            if not noise_sizes:
                raise ValueError("Cannot infer noise size (i.e. number of Brownian motion channels). Either pass "
                                 "`bm` explicitly, or specify one of the `g`, `f_and_g` functions.`")
            v = torch.randn(batch[0], noise_sizes[0], dtype=y0.dtype, device=y0.device)
            out = fn(t0, y0, v)
            if name == "f_and_g_prod":
                two("Drift", out[0].size())
                out = out[1]
            two("Diffusion-vector product", out.size())
    if fns.f is None and fns.f_and_g is None and fns.f_and_g_prod is None:
        raise ValueError("sde must define at least one of `f`, `f_and_g`, or `f_and_g_prod`. (Or possibly more "
                         "depending on the method chosen.)")
    if fns.g is None and fns.f_and_g is None and fns.g_prod is None and fns.f_and_g_prod is None:
        raise ValueError("sde must define at least one of `g`, `f_and_g`, `g_prod` or `f_and_g_prod`. (Or possibly "
                         "more depending on the method chosen.)")
    for what, sizes in (("Batch", batch), ("State", state), ("Noise", noise_sizes)):
        if any(s != sizes[0] for s in sizes[1:]):
            raise ValueError(f"{what} sizes not consistent.")
    if noise == "scalar" and noise_sizes[0] != 1:
        raise ValueError(f"Scalar noise must have only one channel; the diffusion has {noise_sizes[0]} noise "
                         f"channels.")
    if bm is None:
        levy = {"srk": "space-time", "log_ode": "foster"}.get(method, "none")
        bm = BrownianInterval(t0=float(ts[0]), t1=float(ts[-1]), size=(batch[0], noise_sizes[0]), dtype=y0.dtype,
                              device=y0.device, levy_area_approximation=levy)
    elif not callable(getattr(bm, "increment", None)):
        bm = _ForeignBrownian(bm)
    options = {} if options is None else dict(options)
    if method != "adjoint_reversible_heun":
        _check_method(method, noise, kind, bm)
    return fns, y0, ts, bm, method, options


def _check_method(method: str, noise: str, kind: str, bm: Any) -> None:
    """torchsde's solver checks (SDE type, noise type, Levy area), its ValueError messages."""
    cls: type[SDEStepper] = SDE_STEPPERS[method]
    if kind not in cls.sde_types:
        raise ValueError(f"SDE is of type {kind} but solver is for type {cls.sde_types[0]}")
    if noise not in cls.noise_types:
        raise ValueError(f"SDE has noise type {noise} but solver only supports noise types {list(cls.noise_types)}")
    need = {"H": ["space-time", "davie", "foster"], "A": ["davie", "foster"]}.get(cls.levy)
    if need is not None and getattr(bm, "levy_area", getattr(bm, "levy_area_approximation", "none")) not in need:
        raise ValueError(f"SDE solver requires one of {need} set as the `levy_area_approximation` on the Brownian "
                         f"motion.")
    if noise == "scalar" and torch.Size(tuple(bm.shape)[1:]).numel() != 1:
        raise ValueError("The Brownian motion for scalar SDEs must of dimension 1.")


def _solve(fns: _Functions, y0: Tensor, ts: Tensor, bm: Any, method: str, dt: float, adaptive: bool, rtol: float,
           atol: float, dt_min: float, options: dict, logqp: bool, extra: bool, extra_solver_state: Any,
           **grad: Any) -> Any:
    for name, x in (("ts", ts), ("dt", dt), ("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
        if torch.is_tensor(x) and x.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    term = sde_term(fns.f, fns.g, bm, noise=fns.noise_type, sde_type=fns.sde_type, f_and_g=fns.f_and_g,
                    g_prod=fns.g_prod, f_and_g_prod=fns.f_and_g_prod)
    stepper = make_sde(method)
    if not stepper.adaptive:  # reversible Heun steps dt (adaptive=True is ignored: its steps are fixed here)
        adaptive = False
    solver_options: dict[str, Any] = {}
    if method == "milstein" and options.get("grad_free"):
        solver_options["grad_free"] = True
    if extra_solver_state is not None and len(extra_solver_state):
        if method != "reversible_heun":
            raise ValueError(f"method {method!r} keeps no extra solver state; extra_solver_state is for "
                             f"'reversible_heun' (f, g, z).")
        solver_options["initial_state"] = tuple(extra_solver_state)
    # As many steps as torchsde can take: span / dt fixed, span / dt_min adaptive (its smallest step).
    span = float(ts[-1] - ts[0])
    max_steps = math.ceil(span / float(dt_min if adaptive else dt)) + len(ts) + 10
    sol = solve(term, y0, ts, method=stepper, step_size=None if adaptive else float(dt),
                first_step=float(dt) if adaptive else None, min_step=float(dt_min) if adaptive else 0.0,
                max_steps=max_steps,
                accept_min_step=adaptive, rtol=float(rtol), atol=float(atol), solver_options=solver_options or None,
                compile=bool(options.get("compile", False)), **grad)
    ys = sol.ys
    state = stepper.final_state() if method == "reversible_heun" else None
    extra_state = tuple(state) if state is not None else ()
    if logqp:
        ys, log_ratio = ys[..., :-1], ys[..., -1]
        increments = log_ratio[1:] - log_ratio[:-1]
        return (ys, increments, extra_state) if extra else (ys, increments)
    return (ys, extra_state) if extra else ys


def sdeint(sde: Any, y0: Tensor, ts: Any, bm: Any = None, method: str | None = None, dt: float = 1e-3,
           adaptive: bool = False, rtol: float = 1e-5, atol: float = 1e-4, dt_min: float = 1e-5,
           options: dict | None = None, names: dict | None = None, logqp: bool = False, extra: bool = False,
           extra_solver_state: Any = None, **unused_kwargs: Any) -> Any:
    """Solve an SDE as ``torchsde.sdeint`` does (gradients by backpropagation through the steps).

    Parameters
    ----------
    sde : object with ``noise_type``, ``sde_type`` and ``f(t, y)``, ``g(t, y)`` (or the fused forms)
        ``y`` of shape ``(batch, d)``; ``g`` of shape ``(batch, d)`` (diagonal noise) or ``(batch, d, m)``.
    y0 : Tensor ``(batch, d)``
    ts : Tensor ``(T,)`` or list of floats, strictly increasing
    bm : Brownian motion of shape ``(batch, m)``, optional
        Default: a :class:`~neurodyn.paths.BrownianInterval` over ``[ts[0], ts[-1]]`` seeded from torch's
        generator, with the Levy area the method needs (``srk``: space-time, ``log_ode``: foster).
    method : torchsde's names; default ``srk`` (Ito, ``euler`` for general noise), ``midpoint`` (Stratonovich)
    dt, adaptive, rtol, atol, dt_min : step size (first step when adaptive), tolerances, smallest step
    options : ``{"grad_free": True}`` for derivative-free Milstein; ``{"compile": True}``: ``solve(...,
        compile=True)`` (fixed ``dt``: the compiled driven loop where it pays, :mod:`neurodyn.compile.driven`;
        under autograd, compiled blocks of steps with a compiled backward)
    names : renames of ``drift``, ``diffusion``, ``prior_drift``, ``diffusion_prod``, ``drift_and_diffusion``,
        ``drift_and_diffusion_prod``
    logqp : also return the KL increments ``int |(f - h)/g|^2 / 2 dt`` between output times, ``(T - 1, batch)``
    extra, extra_solver_state : return / start from the solver state (reversible Heun: ``(f, g, z)``; else ``()``)

    Returns
    -------
    ``ys`` of shape ``(T, batch, d)``; ``(ys, log_ratio)`` with ``logqp``; the solver state appended with
    ``extra``.

    Examples
    --------
    >>> import torch
    >>> import neurodyn.compat.torchsde as torchsde
    >>> class OU(torch.nn.Module):
    ...     noise_type, sde_type = "diagonal", "ito"
    ...     def f(self, t, y): return -y
    ...     def g(self, t, y): return 0.3 * torch.ones_like(y)
    >>> bm = torchsde.BrownianInterval(0.0, 1.0, size=(2, 1), dtype=torch.float64, entropy=0)
    >>> ys = torchsde.sdeint(OU(), torch.ones(2, 1, dtype=torch.float64), [0.0, 0.5, 1.0], bm=bm, method="euler",
    ...                      dt=0.01)
    >>> ys.shape
    torch.Size([3, 2, 1])
    """
    _warn_unused(unused_kwargs, "`sdeint`")
    fns, y0, ts, bm, method, options = _check(sde, y0, ts, bm, method, adaptive, options, names, logqp)
    if method == "adjoint_reversible_heun":
        raise ValueError("adjoint_reversible_heun can only be used for adjoint_method.")
    return _solve(fns, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, logqp, extra,
                  extra_solver_state, gradient="direct")


def sdeint_adjoint(sde: nn.Module, y0: Tensor, ts: Any, bm: Any = None, method: str | None = None,
                   adjoint_method: str | None = None, dt: float = 1e-3, adaptive: bool = False,
                   adjoint_adaptive: bool = False, rtol: float = 1e-5, adjoint_rtol: float = 1e-5,
                   atol: float = 1e-4, adjoint_atol: float = 1e-4, dt_min: float = 1e-5,
                   options: dict | None = None, adjoint_options: dict | None = None, adjoint_params: Any = None,
                   names: dict | None = None, logqp: bool = False, extra: bool = False,
                   extra_solver_state: Any = None, **unused_kwargs: Any) -> Any:
    """:func:`sdeint` with gradients by the stochastic adjoint (``torchsde.sdeint_adjoint``'s arguments).

    The backward solve integrates the adjoint SDE with ``adjoint_method`` on the forward's Brownian path (see the
    module docstring for the method names; ``reversible_heun`` forward: the exact algebraic adjoint by default),
    ``adjoint_adaptive``/``adjoint_rtol``/``adjoint_atol`` its stepping (an adaptive forward's backward solve adapts
    too; a fixed one steps ``dt``). ``adjoint_params``: the tensors to
    differentiate (default: ``sde.parameters()`` requiring grad; ``sde`` must then be an ``nn.Module``).
    ``adjoint_options`` are accepted and unused (the backward methods take no options). Shapes as :func:`sdeint`.

    Examples
    --------
    >>> import torch
    >>> import neurodyn.compat.torchsde as torchsde
    >>> class SDE(torch.nn.Module):
    ...     noise_type, sde_type = "diagonal", "stratonovich"
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    ...     def f(self, t, y): return -self.a * y
    ...     def g(self, t, y): return 0.2 * y
    >>> y0 = torch.ones(3, 1, dtype=torch.float64)
    >>> bm = torchsde.BrownianInterval(0.0, 1.0, size=(3, 1), dtype=torch.float64, entropy=1)
    >>> ys = torchsde.sdeint_adjoint(SDE(), y0, [0.0, 1.0], bm=bm, dt=0.01)
    >>> ys[-1].sum().backward()
    """
    _warn_unused(unused_kwargs, "`sdeint_adjoint`")
    if adjoint_params is None and not isinstance(sde, nn.Module):
        raise ValueError("`sde` must be an instance of nn.Module to specify the adjoint parameters; alternatively "
                         "they can be specified explicitly via the `adjoint_params` argument. If there are no "
                         "parameters then it is allowable to set `adjoint_params=()`.")
    fns, y0, ts, bm, method, options = _check(sde, y0, ts, bm, method, adaptive, options, names, logqp)
    if method == "adjoint_reversible_heun":
        raise ValueError("adjoint_reversible_heun can only be used for adjoint_method.")
    for name, x in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if torch.is_tensor(x) and x.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    params = list(sde.parameters()) if adjoint_params is None else list(adjoint_params)
    params = [p for p in params if p.requires_grad]
    if method == "reversible_heun":
        if adjoint_method not in (None, "adjoint_reversible_heun"):
            warnings.warn(f"method={method!r}, but adjoint_method!='adjoint_reversible_heun'.", stacklevel=2)
        chosen = "adjoint_reversible_heun" if adjoint_method in (None, "adjoint_reversible_heun") else "midpoint"
    elif adjoint_method == "adjoint_reversible_heun":
        raise ValueError("adjoint_method='adjoint_reversible_heun' is the exact adjoint of method='reversible_heun'; "
                         f"method={method!r} needs another adjoint_method (midpoint, heun, euler_heun).")
    else:
        chosen = adjoint_method if adjoint_method in ("midpoint", "heun", "euler_heun") else "midpoint"
    if adjoint_method is not None and adjoint_method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, but found {adjoint_method}.")
    return _solve(fns, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, logqp, extra,
                  extra_solver_state, gradient="adjoint", params=params, adjoint_method=chosen,
                  adjoint_adaptive=bool(adjoint_adaptive or adaptive), adjoint_rtol=float(adjoint_rtol),
                  adjoint_atol=float(adjoint_atol))
