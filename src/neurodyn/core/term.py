"""Terms: what the loop integrates, and how it calls the user's vector field.

A term describes the right-hand side of ``dy = vf(t, y) . dcontrol``, in diffrax's three pieces:

``vf(t, y)``
    the vector field; ``contr(t0, t1)`` the control's increment over a step; ``prod(vf, control)`` their product,
    the state's increment (``vf_prod(t, y, control)`` fuses the two, by default ``prod(vf(t, y), control)``).

Every term here also has an **ODE form** ``ode(t, y) = dy/dt`` (``t`` a 0-dim tensor, ``y`` and the result in the
state's shape), which is what the ODE steppers integrate: any ODE method integrates any of these terms.

=====================  =========  ============================================================================
term                   kind       ``vf`` / ``contr`` / ``prod``; ODE form
=====================  =========  ============================================================================
:class:`ODETerm`       ``ode``    ``f(t, y)`` / ``t1 - t0`` / scalar multiply; ``f(t, y)``
:class:`ControlTerm`   control    ``f(t, y)`` of shape ``(*y.shape, channels)`` / ``X(t1) - X(t0)`` /
                                  matrix-vector product; ``f(t, y) @ dX/dt(t)``
:class:`MultiTerm`     its parts  tuples of the parts' / sum of the parts' products; sum of the ODE forms
:class:`SplitTerm`     split      a separable Hamiltonian's halves ``dq/dt(t, p)``, ``dp/dt(t, q)`` on the state
                                  ``[q, p]``; symplectic steppers evaluate each half only where needed
:class:`AdjointTerm`   ``ode``    the continuous adjoint's augmented field of any term (gradient="adjoint")
=====================  =========  ============================================================================

:class:`SDEAdjointTerm` (kind ``sde``) is the stochastic adjoint's augmented Stratonovich SDE of an SDE term.

A stepper declares the kinds it integrates (``accepts``, :mod:`neurodyn.core.stepper`); :func:`check_accepts`
rejects other combinations before any work. :func:`neurodyn.solve` takes a term wherever it takes ``func``: it
integrates the term's ODE form (:func:`as_field`), lands on the term's ``knots`` (they join ``jump_t``), and the
gradient methods see the tensors of :meth:`Term.grad_tensors` (the vector fields' parameters, a path's data).

The engine wraps the field it integrates in a *bound* :class:`ODETerm` (``ODETerm(field, shape, t_dtype,
device)``): the steppers call it as ``term(t, y_flat)`` with a float time and a ``(1, n)`` state, and it counts
the evaluations in ``nfe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InputError
from .paths import Path
from .tensors import flat_cat, vjp

#: The term kinds with an ODE form: every stepper that integrates ``dy/dt`` accepts them.
ODE_FORM_KINDS: tuple[str, ...] = ("ode", "control", "split")
#: Layouts of an SDE's diffusion ``g(t, y)`` against the Brownian increment ``dW`` (torchsde's names):
#: ``general`` ``(*y.shape, m) @ (..., m)``; ``diagonal`` elementwise, ``g`` and ``dW`` of the state's shape;
#: ``scalar`` ``(*y.shape, 1) @ (..., 1)``; ``additive`` ``g`` independent of ``y`` in either layout.
NOISE_TYPES: tuple[str, ...] = ("general", "diagonal", "scalar", "additive")
#: Interpretations of the stochastic integral.
SDE_TYPES: tuple[str, ...] = ("ito", "stratonovich")


def field_params(func: Any) -> list[Tensor]:
    """The parameters requiring grad of an ``nn.Module`` vector field, or of the module a bound method belongs
    to; ``[]`` for other callables (a closure's tensors must be passed as ``params=``). Wrappers with
    ``__wrapped__`` (e.g. the autocast wrapper of :func:`neurodyn.solve`) are looked through."""
    while not isinstance(func, nn.Module) and getattr(func, "__self__", None) is None \
            and getattr(func, "__wrapped__", None) is not None:
        func = func.__wrapped__
    owner = func if isinstance(func, nn.Module) else getattr(func, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def _unique(tensors: Sequence[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for x in tensors:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


class Term:
    """Base of the terms: ``dy = prod(vf(t, y), contr(t0, t1))`` (see the module docstring).

    Subclasses define ``kinds`` (the stepper capabilities they need), ``vf``, ``contr``, ``prod`` and, where the
    term has one, the ODE form ``ode``; ``knots`` (times the solve must land on) and ``grad_tensors`` default to
    none.
    """

    __slots__ = ()
    kinds: ClassVar[frozenset[str]] = frozenset()

    def vf(self, t: Tensor, y: Tensor) -> Any:
        """The vector field at ``(t, y)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no vf(t, y)")

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> Any:
        """The control's increment over ``[t0, t1]``."""
        raise NotImplementedError(f"{type(self).__name__} defines no contr(t0, t1)")

    def prod(self, vf: Any, control: Any) -> Tensor:
        """The state increment from a vector field value and a control increment (state's shape)."""
        raise NotImplementedError(f"{type(self).__name__} defines no prod(vf, control)")

    def vf_prod(self, t: Tensor, y: Tensor, control: Any) -> Tensor:
        """``prod(vf(t, y), control)``: the state increment of a step with control ``control``."""
        return self.prod(self.vf(t, y), control)

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        """The ODE form ``dy/dt`` at ``(t, y)`` (state's shape)."""
        raise InputError(f"{type(self).__name__} has no ODE form dy/dt: an ODE method cannot integrate it.")

    def rate(self, t: Tensor, y: Tensor) -> Tensor:
        """What the loop evaluates at every step start (its ``k1``): the ODE form where the term has one; for a
        term with Brownian parts (kind ``"sde"``) the sum of its ``dt`` parts, the drift."""
        return self.ode(t, y)

    @property
    def knots(self) -> tuple[float, ...]:
        """Times where the term's ODE form jumps in ``t``: the solve steps exactly onto them and re-evaluates just
        past them (they join ``jump_t``)."""
        return ()

    @property
    def step_knots(self) -> tuple[float, ...]:
        """Times where the ODE form is continuous but a higher derivative in ``t`` jumps (the knots of a cubic
        spline control): the solve steps exactly onto them (they join ``step_t``), keeping the method's order,
        and keeps its last evaluation (continuous there)."""
        return ()

    def grad_tensors(self) -> list[Tensor]:
        """The tensors the term uses that need gradients (parameters, a path's data)."""
        return []

    def on_grid(self, times: Sequence[float], t_dtype: torch.dtype, device: Any) -> tuple[dict, Callable] | None:
        """The part of the ODE form that depends on ``t`` alone, at every time of ``times`` at once (one vectorised
        evaluation instead of one per call), for a solve that knows its evaluation times before its first step
        (fixed steps, :meth:`neurodyn.core.stepper.StepperBase.stage_times`): ``(values, ode_at)`` with ``values``
        ``{time: value}`` (``time`` a float of ``times``; evaluated at ``time`` as a ``t_dtype`` tensor on
        ``device``, as the field receives it) and ``ode_at(t, y, value)`` equal to ``ode(t, y)`` to rounding. The
        values keep their autograd graph (built under the caller's grad mode). None (the default): no such part."""
        return None


class ODETerm(Term):
    """``dy = f(t, y) dt``: an ordinary differential equation.

    ``ODETerm(f)`` is the public term (``vf = f``, ``contr(t0, t1) = t1 - t0``, ``prod`` = scalar multiply, ODE
    form ``f(t, y)``); ``solve(ODETerm(f), ...)`` is ``solve(f, ...)``.

    The engine *binds* it to a state layout, ``ODETerm(field, shape, t_dtype, device)``: calling the bound term
    as ``term(t, y)`` with a float ``t`` and a flat ``(1, n)`` state evaluates ``field`` with ``t`` as a 0-dim
    tensor of the state's real dtype on its device and ``y`` in the user's ``shape``, and counts evaluations in
    ``nfe``. ``inline``: steppers may call ``func`` themselves the way :meth:`__call__` does (same time tensor,
    same state view, ``nfe`` counted), saving a frame per stage.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``y`` and the result of one shape.
    shape, t_dtype, device :
        The bound layout (engine use).

    Examples
    --------
    >>> import torch, neurodyn
    >>> t = torch.linspace(0, 1, 3, dtype=torch.float64)
    >>> sol = neurodyn.solve(neurodyn.ODETerm(lambda t, y: -y), torch.ones(2, dtype=torch.float64), t)
    >>> bool(torch.allclose(sol.ys[-1], torch.full((2,), 1.0, dtype=torch.float64).mul(-1).exp(), atol=1e-7))
    True
    """

    __slots__ = ("func", "shape", "t_dtype", "device", "nfe", "flat", "grid", "shaped")
    kinds: ClassVar[frozenset[str]] = frozenset({"ode"})

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int] | None = None,
                 t_dtype: torch.dtype | None = None, device: torch.device | None = None):
        if not callable(func):
            raise InputError(f"ODETerm(func): func must be callable as func(t, y), got {type(func).__name__}.")
        self.func = func
        self.t_dtype = t_dtype
        self.device = device
        self.nfe = 0
        self.grid: tuple[dict, Callable] | None = None
        # (flat, shaped): a stepper's last (1, n) state and the tensor in the user's shape it is a view of; a call
        # with that very flat tensor uses the shaped one (no view per call).
        self.shaped: tuple[Tensor, Tensor] | None = None
        if shape is None:
            self.shape = None
            self.flat = False
        else:
            n = math.prod(shape)
            self.flat = tuple(shape) == (1, n)  # the engine's (1, n) layout is already the user's shape
            self.shape = tuple(shape)

    def __call__(self, t: float, y: Tensor) -> Tensor:
        """dy/dt at ``(t, y)``; ``y`` of shape ``(1, n)`` or already in the user's shape (then passed as it is); the
        result has the user's shape (a view of ``(n,)`` elements, so it can be stored straight into a stage buffer
        row after ``view(-1)``). Every result is checked (type and shape: metadata, no host sync), see
        :func:`check_output`."""
        self.nfe += 1
        if not self.flat and y.shape != self.shape:
            y = self.in_shape(y)
        grid = self.grid
        at = grid[0].get(t) if grid is not None else None
        if at is not None:  # (the time tensor, the value there)
            out = grid[1](at[0], y, at[1])
        else:
            out = self.func(torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device), y)
        if not (isinstance(out, Tensor) and out.shape == self.shape):
            check_output(out, self.shape, t)
        return out

    def in_shape(self, y: Tensor) -> Tensor:
        """``y`` (a ``(1, n)`` row) in the user's state shape: the tensor recorded in ``shaped`` where ``y`` is its
        flat form (no new view), else ``y.view(shape)``."""
        shaped = self.shaped
        return shaped[1] if shaped is not None and y is shaped[0] else y.view(self.shape)

    @property
    def inline(self) -> bool:
        """Steppers may call ``func`` themselves (see the class docstring); not while :attr:`grid` is set."""
        return self.grid is None

    def grid_owner(self) -> Term | None:
        """The user's term whose :meth:`Term.on_grid` this bound term can use: ``func`` is that term's own ODE form,
        unwrapped, and its class overrides ``on_grid``; None otherwise (a plain field, an ODE term)."""
        owner = getattr(self.func, "__self__", None)
        if (not isinstance(owner, Term) or type(owner).on_grid is Term.on_grid
                or getattr(self.func, "__func__", None) not in (type(owner).ode, type(owner).rate)):
            return None
        return owner

    def use_grid(self, times: Sequence[float]) -> bool:
        """Bound term: evaluate the user's term's :meth:`Term.on_grid` part at ``times`` (floats, as the loop passes
        them) once, and read it from there in calls at those times until :attr:`grid` is reset to None; True where
        it applies (:meth:`grid_owner` is not None and its ``on_grid`` gives a part)."""
        owner = self.grid_owner()
        if owner is None:
            return False
        t_dtype = self.t_dtype or torch.get_default_dtype()
        part = owner.on_grid(times, t_dtype, self.device)
        if part is None:
            return False
        values, ode_at = part
        # The time tensors the field receives there, made at once (each equal to the scalar_tensor a call makes).
        tts = torch.tensor(list(values), dtype=torch.float64).to(t_dtype).to(self.device).unbind(0)
        self.grid = (dict(zip(values, zip(tts, values.values()))), ode_at)
        return True

    def vf(self, t: Tensor, y: Tensor) -> Tensor:
        return self.func(t, y)

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> Tensor | float:
        return t1 - t0

    def prod(self, vf: Tensor, control: Tensor | float) -> Tensor:
        return vf * control

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        return self.func(t, y)

    def rate(self, t: Tensor, y: Tensor) -> Tensor:
        return self.func(t, y)

    def grad_tensors(self) -> list[Tensor]:
        return field_params(self.func)


# The classes whose instances passed the Path protocol's check (isinstance against a runtime-checkable Protocol costs
# ~60 us, a share of a small solve that builds its term every call).
_PATH_TYPES: set[type] = set()


def _is_path(path: Any) -> bool:
    if isinstance(path, Path):
        _PATH_TYPES.add(type(path))
        return True
    return False


class ControlTerm(Term):
    """``dy = f(t, y) dX(t)``: a controlled differential equation (CDE) driven by a path ``X``.

    Parameters
    ----------
    vector_field : callable ``(t, y) -> Tensor`` of shape ``(*y.shape, channels)``
        A matrix per state element row: ``dy_i = sum_c f(t, y)[..., i, c] dX_c``.
    path : :class:`~neurodyn.core.paths.Path`
        ``X(t)`` with values ``(..., channels)`` whose batch dimensions broadcast against ``y``'s leading ones
        (e.g. ``y`` of shape ``(B, d)`` with a path of data ``(B, T, channels)`` or ``(T, channels)``);
        :class:`neurodyn.LinearPath` for piecewise-linear data.

    Notes
    -----
    ``contr(t0, t1) = X(t1) - X(t0)``, ``prod(vf, dX) = vf @ dX`` (``(*y.shape, channels) x (..., channels) ->
    y.shape``), ODE form ``f(t, y) @ dX/dt(t)`` (so every ODE method integrates it, as torchcde does). The
    path's ``knots`` are landed on (as ``jump_t`` where ``dX/dt`` jumps; as ``step_t`` for a path with
    ``smooth = True``, a cubic spline, whose ``dX/dt`` is continuous); gradients reach the path's data through every
    gradient method.

    **Brownian control (an SDE's diffusion).** With ``noise=`` or ``sde_type=`` the term is the diffusion
    ``g(t, y) dW`` of a stochastic differential equation (kind ``"sde"``; no ODE form, SDE methods only, see
    :mod:`neurodyn.solvers.sde` and :func:`sde_term`):

    * ``noise`` (torchsde's noise types): ``"general"`` (default) ``g`` of shape ``(*y.shape, m)`` times ``dW`` of
      shape ``(..., m)``; ``"diagonal"`` ``g`` and ``dW`` of the state's shape, multiplied elementwise;
      ``"scalar"`` ``g`` of shape ``(*y.shape, 1)``, ``dW`` of ``(..., 1)``; ``"additive"`` ``g`` independent of
      ``y`` in either layout (elementwise when ``g`` has ``dW``'s number of dimensions).
    * ``sde_type``: ``"ito"`` (default) or ``"stratonovich"``.
    * ``g_prod(t, y, dW)``: the product ``g(t, y) dW`` computed by the user (fused); used wherever a method needs
      only the product. ``vector_field`` may then be None (methods needing ``g`` itself refuse the term).
    * ``path``: anything with ``increment(s, t) = W(t) - W(s)`` (``neurodyn.paths.BrownianInterval``; ``levy(s, t)``
      for the methods needing Levy areas).

    Examples
    --------
    ``dh = A h dX`` with a scalar piecewise-linear ``X``: ``h(t) = expm(A (X(t) - X(0))) h0``.

    >>> import torch, neurodyn
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> ts = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    >>> X = neurodyn.LinearPath(ts, torch.tensor([[0.0], [0.5], [-0.25]], dtype=torch.float64))
    >>> term = neurodyn.ControlTerm(lambda t, h: (A @ h).unsqueeze(-1), X)   # (2,) -> (2, 1)
    >>> h0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> sol = neurodyn.solve(term, h0, ts, rtol=1e-10, atol=1e-12)
    >>> exact = torch.linalg.matrix_exp(A * -0.25) @ h0
    >>> bool(torch.allclose(sol.ys[-1], exact, atol=1e-8))
    True
    """

    __slots__ = ("vector_field", "path", "noise", "sde_type", "g_prod")

    def __init__(self, vector_field: Callable[[Tensor, Tensor], Tensor], path: Path, *, noise: str | None = None,
                 sde_type: str | None = None, g_prod: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None):
        if not callable(vector_field) and not (vector_field is None and g_prod is not None):
            raise InputError(f"ControlTerm(vector_field, path): vector_field must be callable as f(t, y), got "
                             f"{type(vector_field).__name__}.")
        stochastic = noise is not None or sde_type is not None
        if stochastic:
            noise = "general" if noise is None else noise
            sde_type = "ito" if sde_type is None else sde_type
            if noise not in NOISE_TYPES:
                raise InputError(f"ControlTerm: noise must be one of {', '.join(map(repr, NOISE_TYPES))}, got "
                                 f"{noise!r}.")
            if sde_type not in SDE_TYPES:
                raise InputError(f"ControlTerm: sde_type must be one of {', '.join(map(repr, SDE_TYPES))}, got "
                                 f"{sde_type!r}.")
            if not callable(getattr(path, "increment", None)):
                raise InputError(f"ControlTerm(diffusion, bm, noise=...): bm must have increment(s, t) = W(t) - W(s) "
                                 f"(e.g. neurodyn.paths.BrownianInterval), got {type(path).__name__}.")
        elif type(path) not in _PATH_TYPES and not _is_path(path):
            raise InputError(f"ControlTerm(vector_field, path): path must have evaluate(t), derivative(t), "
                             f"increment(s, t), knots and grad_tensors() (e.g. neurodyn.LinearPath(ts, xs)), got "
                             f"{type(path).__name__}.")
        if g_prod is not None and not callable(g_prod):
            raise InputError(f"ControlTerm: g_prod must be callable as g_prod(t, y, dW), got {type(g_prod).__name__}.")
        self.vector_field = vector_field
        self.path = path
        self.noise = noise
        self.sde_type = sde_type
        self.g_prod = g_prod

    @property
    def kinds(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"sde"}) if self.noise is not None else frozenset({"control"})

    def vf(self, t: Tensor, y: Tensor) -> Tensor:
        if self.vector_field is None:
            raise InputError("this diffusion term was given as g_prod(t, y, dW) only: g(t, y) itself is not "
                             "available (give the diffusion too).")
        return self.vector_field(t, y)

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        return self.path.increment(t0, t1)

    def prod(self, vf: Tensor, control: Tensor) -> Tensor:
        if self.noise == "diagonal" or (self.noise == "additive" and vf.dim() == control.dim()):
            out = vf * control  # elementwise: g of the state's shape, one Brownian channel per component
            if out.shape == vf.shape:
                return out
            raise InputError(f"ControlTerm (noise={self.noise!r}): the diffusion returned shape {tuple(vf.shape)}, "
                             f"which does not multiply the Brownian increment of shape {tuple(control.shape)} "
                             f"elementwise: with diagonal noise g(t, y) has the state's shape and the Brownian "
                             f"motion too.")
        if vf.dim() == 3 and control.dim() == 2 and vf.shape[0] == control.shape[0]:
            # (B, n, c) x (B, c): bmm itself (matmul adds expand and reshape nodes to an autograd graph)
            try:
                return torch.bmm(vf, control.unsqueeze(-1)).squeeze(-1)
            except RuntimeError:
                pass  # shapes or dtypes that do not multiply: matmul below says why
        try:
            return torch.matmul(vf, control.unsqueeze(-1)).squeeze(-1)
        except RuntimeError as err:
            raise InputError(
                f"ControlTerm: vector_field(t, y) returned shape {tuple(vf.shape)} ({vf.dtype}), which does not "
                f"multiply the control of shape {tuple(control.shape)} ({control.dtype}): it must return "
                f"(*y.shape, channels) with channels = {control.shape[-1]} (the path's last dimension), in the "
                f"path's dtype. ({err})") from None

    def vf_prod(self, t: Tensor, y: Tensor, control: Tensor) -> Tensor:
        if self.g_prod is not None:
            return self.g_prod(t, y, control)
        return self.prod(self.vector_field(t, y), control)

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        if self.noise is not None:
            raise InputError("a ControlTerm driven by Brownian motion (noise=...) has no ODE form (a Brownian path "
                             "has no derivative): integrate it with an SDE method (neurodyn.solvers.sde).")
        return self.prod(self.vector_field(t, y), self.path.derivative(t))

    def ode_at(self, t: Tensor, y: Tensor, dxdt: Tensor) -> Tensor:
        """The ODE form with ``dX/dt(t)`` given as a row ``(..., 1, channels)`` (as :meth:`on_grid` keeps it: no
        ``unsqueeze`` per evaluation): ``f(t, y) @ dX/dt``, the value of :meth:`ode` to rounding. For ``f`` of shape
        ``(B, n, channels)`` and a row ``(B, 1, channels)`` of its dtype the product is ``(f * row).sum(-1)``
        (elementwise product and a sum over the channels: on the CPU about half the time of ``bmm``'s small
        matrix-vector products, forward and backward, at B = 16-64, n = channels = 32; the sum's order differs from
        ``bmm``'s, so the values agree to rounding); any other shapes go through :meth:`prod`."""
        vf = self.vector_field(t, y)
        if (vf.dim() == 3 and dxdt.dim() == 3 and vf.shape[0] == dxdt.shape[0] and vf.shape[2] == dxdt.shape[2]
                and vf.dtype == dxdt.dtype):
            return torch.mul(vf, dxdt).sum(-1)
        return self.prod(vf, dxdt.squeeze(-2))

    def rate(self, t: Tensor, y: Tensor) -> Tensor:
        if self.noise is not None:
            return torch.zeros_like(y)  # no dt part
        return self.ode(t, y)

    def on_grid(self, times: Sequence[float], t_dtype: torch.dtype, device: Any) -> tuple[dict, Callable] | None:
        """``dX/dt`` at every time of ``times`` from one call of the path's ``derivative_grid(t)`` (a path without
        it, or Brownian motion: None), split into one row ``(..., 1, channels)`` per time with ``unbind`` (the
        backward pass stacks their gradients once), and :meth:`ode_at` (see :meth:`Term.on_grid`)."""
        grid = getattr(self.path, "derivative_grid", None) if self.noise is None else None
        if grid is None or not times:
            return None
        times = list(dict.fromkeys(times))
        values = grid(torch.tensor(times, dtype=torch.float64).to(t_dtype).to(device))
        return dict(zip(times, values.unsqueeze(-2).unbind(0))), self.ode_at

    @property
    def knots(self) -> tuple[float, ...]:
        return () if getattr(self.path, "smooth", False) else tuple(getattr(self.path, "knots", ()))

    @property
    def step_knots(self) -> tuple[float, ...]:
        return tuple(getattr(self.path, "knots", ())) if getattr(self.path, "smooth", False) else ()

    def grad_tensors(self) -> list[Tensor]:
        grads = getattr(self.path, "grad_tensors", None)
        extra = list(grads()) if grads is not None else []
        g_prod = field_params(self.g_prod) if self.g_prod is not None else []
        g = field_params(self.vector_field) if self.vector_field is not None else []
        return _unique(g + g_prod + extra)


class MultiTerm(Term):
    """A sum of terms, ``dy = sum_i prod_i(vf_i(t, y), contr_i(t0, t1))`` (drift + diffusion, ODE + CDE, ...).

    ``vf`` and ``contr`` return tuples (one entry per term), ``prod`` sums the terms' products; the ODE form is the
    sum of the terms' ODE forms; ``knots`` and ``grad_tensors`` are the union of the terms'. Its ``kinds`` are
    its terms' kinds: a stepper must accept each.

    Examples
    --------
    ``dh = -h dt + h dX`` (scalar): ``h(t) = h0 exp(-(t - t0) + X(t) - X(t0))``.

    >>> import torch, neurodyn
    >>> ts = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    >>> X = neurodyn.LinearPath(ts, torch.tensor([[0.0], [1.0], [0.5]], dtype=torch.float64))
    >>> term = neurodyn.MultiTerm(neurodyn.ODETerm(lambda t, h: -h),
    ...                           neurodyn.ControlTerm(lambda t, h: h.unsqueeze(-1), X))
    >>> sol = neurodyn.solve(term, torch.ones(1, dtype=torch.float64), ts, rtol=1e-10, atol=1e-12)
    >>> bool(torch.allclose(sol.ys[-1], torch.tensor([-1.5], dtype=torch.float64).exp(), atol=1e-8))
    True
    """

    __slots__ = ("terms", "rated")

    def __init__(self, *terms: Term):
        if not terms:
            raise InputError("MultiTerm(*terms) needs at least one term.")
        for i, term in enumerate(terms):
            if not isinstance(term, Term):
                raise InputError(f"MultiTerm: argument {i} is a {type(term).__name__}, not a term (wrap a vector "
                                 f"field f(t, y) in neurodyn.ODETerm(f)).")
        self.terms: tuple[Term, ...] = tuple(terms)
        # the parts with a dt form (what rate sums): all but the Brownian ones
        self.rated: tuple[Term, ...] = tuple(term for term in self.terms if "sde" not in term.kinds)

    @property
    def kinds(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(term.kinds for term in self.terms))

    def vf(self, t: Tensor, y: Tensor) -> tuple:
        return tuple(term.vf(t, y) for term in self.terms)

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> tuple:
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf: tuple, control: tuple) -> Tensor:
        parts = [term.prod(v, c) for term, v, c in zip(self.terms, vf, control)]
        return _sum(parts)

    def vf_prod(self, t: Tensor, y: Tensor, control: tuple) -> Tensor:
        return _sum([term.vf_prod(t, y, c) for term, c in zip(self.terms, control)])

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        return _sum([term.ode(t, y) for term in self.terms])

    def rate(self, t: Tensor, y: Tensor) -> Tensor:
        rated = self.rated
        if len(rated) == 1:
            return rated[0].rate(t, y)
        return _sum([term.rate(t, y) for term in rated]) if rated else torch.zeros_like(y)

    @property
    def knots(self) -> tuple[float, ...]:
        return tuple(sorted({x for term in self.terms for x in term.knots}))

    @property
    def step_knots(self) -> tuple[float, ...]:
        return tuple(sorted({x for term in self.terms for x in term.step_knots}))

    def grad_tensors(self) -> list[Tensor]:
        return _unique([x for term in self.terms for x in term.grad_tensors()])


def _sum(parts: list[Tensor]) -> Tensor:
    out = parts[0]
    for x in parts[1:]:
        out = out + x
    return out


class SDETerm(MultiTerm):
    """``dy = f(t, y) dt + g(t, y) dW``: ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, bm, noise, sde_type))``
    with torchsde's fused forms, which the SDE methods use where they need both pieces at one point.

    Build it with :func:`sde_term`. ``f_and_g(t, y) -> (f, g)`` and ``f_and_g_prod(t, y, dW) -> (f, g dW)`` must
    return what the plain forms return: the solution is then identical bit for bit, with fewer calls.
    """

    __slots__ = ("f_and_g", "f_and_g_prod")

    def __init__(self, drift: Term, diffusion: ControlTerm,
                 f_and_g: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                 f_and_g_prod: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None):
        super().__init__(drift, diffusion)
        for name, fn in (("f_and_g", f_and_g), ("f_and_g_prod", f_and_g_prod)):
            if fn is not None and not callable(fn):
                raise InputError(f"sde_term: {name} must be callable, got {type(fn).__name__}.")
        self.f_and_g = f_and_g
        self.f_and_g_prod = f_and_g_prod

    def grad_tensors(self) -> list[Tensor]:
        extra = [p for fn in (self.f_and_g, self.f_and_g_prod) if fn is not None for p in field_params(fn)]
        return _unique(super().grad_tensors() + extra)


def sde_term(drift: Callable[[Tensor, Tensor], Tensor] | None, diffusion: Callable[[Tensor, Tensor], Tensor] | None,
             bm: Any, *, noise: str = "diagonal", sde_type: str = "ito",
             f_and_g: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
             g_prod: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
             f_and_g_prod: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> SDETerm:
    """The SDE ``dy = drift(t, y) dt + diffusion(t, y) dW`` as a term for :func:`neurodyn.solve` (SDE methods).

    Parameters
    ----------
    drift : callable ``(t, y) -> Tensor`` of ``y``'s shape, or None (taken from ``f_and_g``)
    diffusion : callable ``(t, y) -> Tensor``, or None (from ``f_and_g``; or only ``g_prod`` given)
        Shape by ``noise``: ``"diagonal"`` ``y.shape``; ``"scalar"`` ``(*y.shape, 1)``; ``"general"``
        ``(*y.shape, m)``; ``"additive"`` either, independent of ``y``.
    bm : Brownian path
        ``increment(s, t)`` of shape ``y.shape`` (diagonal) or ``(*batch, m)``, e.g.
        ``neurodyn.paths.BrownianInterval(t0, t1, shape=(B, m), dtype=y0.dtype)``.
    noise : ``"diagonal"`` (default, torchsde's), ``"scalar"``, ``"general"``, ``"additive"``
    sde_type : ``"ito"`` (default) or ``"stratonovich"``
    f_and_g, g_prod, f_and_g_prod : callables, optional
        torchsde's fused forms ``(t, y) -> (f, g)``, ``(t, y, dW) -> g dW``, ``(t, y, dW) -> (f, g dW)``.

    Examples
    --------
    Geometric Brownian motion ``dy = 0.5 y dt + 0.2 y dW`` (Ito, diagonal noise) on a sampled Brownian path:

    >>> import torch, neurodyn
    >>> ts = torch.linspace(0, 1, 101, dtype=torch.float64)
    >>> w = torch.cat([torch.zeros(1, 3, dtype=torch.float64),
    ...                (torch.randn(100, 3, dtype=torch.float64) * 0.1).cumsum(0)])
    >>> bm = neurodyn.LinearPath(ts, w)   # W(t) on a grid; steps on the grid
    >>> term = neurodyn.sde_term(lambda t, y: 0.5 * y, lambda t, y: 0.2 * y, bm)
    >>> sol = neurodyn.solve(term, torch.ones(3, dtype=torch.float64), ts, method="euler", step_size=0.01)
    >>> sol.ys.shape
    torch.Size([101, 3])
    """
    if drift is None and f_and_g is None and f_and_g_prod is None:
        raise InputError("sde_term: give the drift (or f_and_g / f_and_g_prod).")
    if diffusion is None and f_and_g is None and g_prod is None and f_and_g_prod is None:
        raise InputError("sde_term: give the diffusion (or f_and_g / g_prod / f_and_g_prod).")
    if drift is None:
        fused = f_and_g if f_and_g is not None else None
        if fused is not None:
            def drift(t: Tensor, y: Tensor, _fg=fused) -> Tensor:
                return _fg(t, y)[0]
        else:
            def drift(t: Tensor, y: Tensor, _fgp=f_and_g_prod) -> Tensor:
                return _fgp(t, y, None)[0]
    if diffusion is None and f_and_g is not None:
        def diffusion(t: Tensor, y: Tensor, _fg=f_and_g) -> Tensor:
            return _fg(t, y)[1]
    if diffusion is None and g_prod is None:
        def g_prod(t: Tensor, y: Tensor, v: Tensor, _fgp=f_and_g_prod) -> Tensor:
            return _fgp(t, y, v)[1]
    return SDETerm(ODETerm(drift), ControlTerm(diffusion, bm, noise=noise, sde_type=sde_type, g_prod=g_prod),
                   f_and_g=f_and_g, f_and_g_prod=f_and_g_prod)


class SplitTerm(Term):
    """A separable Hamiltonian system given by its two halves: ``dq/dt = dq_dt(t, p)``, ``dp/dt = dp_dt(t, q)``.

    The state's last dimension holds ``[q, p]`` (shape ``(..., 2d)``); ``dq_dt(t, p)`` and ``dp_dt(t, q)`` take and
    return ``(..., d)`` (for ``H = T(p) + V(q)``: ``dT/dp`` and ``-dV/dq``). The ODE form is
    ``cat([dq_dt(t, p), dp_dt(t, q)], -1)``, so every ODE method integrates it; the symplectic methods
    (``leapfrog``, ``yoshida4``, ``semi_implicit_euler``) evaluate each half only where a drift or kick needs it,
    where a whole field ``f(t, y)`` computes both halves at every stage and uses one. With a ``SplitTerm``,
    ``stats["nfe"]`` counts the calls of either half (each half-cost).

    Examples
    --------
    A pendulum, ``H = p^2 / 2 - cos q``:

    >>> import torch, neurodyn
    >>> term = neurodyn.SplitTerm(lambda t, p: p, lambda t, q: -torch.sin(q))
    >>> y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> sol = neurodyn.solve(term, y0, torch.linspace(0, 10, 11, dtype=torch.float64), method="leapfrog",
    ...                      step_size=0.01)
    >>> H = lambda y: 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])
    >>> bool((H(sol.ys) - H(y0)).abs().max() < 1e-4)
    True
    """

    __slots__ = ("dq_dt", "dp_dt")
    kinds: ClassVar[frozenset[str]] = frozenset({"split"})

    def __init__(self, dq_dt: Callable[[Tensor, Tensor], Tensor], dp_dt: Callable[[Tensor, Tensor], Tensor]):
        for name, f in (("dq_dt", dq_dt), ("dp_dt", dp_dt)):
            if not callable(f):
                raise InputError(f"SplitTerm(dq_dt, dp_dt): {name} must be callable as {name}(t, half), got "
                                 f"{type(f).__name__}.")
        self.dq_dt = dq_dt
        self.dp_dt = dp_dt

    def vf(self, t: Tensor, y: Tensor) -> Tensor:
        return self.ode(t, y)

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> Tensor | float:
        return t1 - t0

    def prod(self, vf: Tensor, control: Tensor | float) -> Tensor:
        return vf * control

    def ode(self, t: Tensor, y: Tensor) -> Tensor:
        d2 = y.shape[-1] if y.dim() else 1
        if d2 % 2:
            raise InputError(f"SplitTerm: the state's last dimension must hold [q, p] (an even size), got state "
                             f"shape {tuple(y.shape)}.")
        d = d2 // 2
        return torch.cat([self.dq_dt(t, y[..., d:]), self.dp_dt(t, y[..., :d])], -1)

    def grad_tensors(self) -> list[Tensor]:
        return _unique(field_params(self.dq_dt) + field_params(self.dp_dt))


class AdjointTerm(Term):
    """The continuous adjoint's augmented field of a term (``gradient="adjoint"`` / ``"interpolated"``).

    On the flat state ``z = [y, a, g]`` (shape ``(1, 2n + P)``; ``n`` elements of the state, ``P`` of the
    parameters) it is ``[f(t, y), -a^T df/dy, -a^T df/dtheta]`` (integrated backward in time); with ``y_of_t`` (the
    interpolated adjoint: ``y`` read from the forward dense solution) the state is ``[a, g]`` and ``y``'s channel is
    dropped. ``f`` is the term's ODE form (or a plain field ``f(t, y)``); ``params`` default to the term's
    :meth:`~Term.grad_tensors`. With ``on_params`` the parameter channels leave the state (``[y, a]``, or ``[a]``):
    every evaluation hands ``on_params(z, grads)`` the state it was evaluated at and the products
    ``-a^T df/dtheta_j`` per parameter (None for a parameter the evaluation does not depend on), for the caller to
    integrate outside the state (a quadrature, see :meth:`~neurodyn.core.stepper.StepperBase.quadrature_weights`).
    ``fast`` (optional): :func:`adjoint_field`'s ``fast`` (``compile=True``'s compiled program).

    When ``z`` requires grad (an implicit backward method's Jacobian by reverse passes) the field is differentiable
    in ``z``; not under ``torch.func`` transforms, which would miss the parameter channels.

    Examples
    --------
    >>> import torch
    >>> w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    >>> adj = AdjointTerm(ODETerm(lambda t, y: w * y), (1,), [w])
    >>> adj.ode(torch.tensor(0.0), torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64))   # [f, -a w, -a y]
    tensor([[ 6., -2., -3.]], dtype=torch.float64)
    """

    __slots__ = ("func", "shape", "n", "params", "y_of_t", "on_params", "fast")
    kinds: ClassVar[frozenset[str]] = frozenset({"ode"})

    def __init__(self, term: Term | Callable[[Tensor, Tensor], Tensor], shape: Sequence[int],
                 params: Sequence[Tensor] | None = None, y_of_t: Callable[[float], Tensor] | None = None,
                 on_params: Callable[[Tensor, Sequence[Tensor | None]], None] | None = None,
                 fast: Callable | None = None):
        self.fast = fast
        self.func = term.ode if isinstance(term, Term) else term
        if params is None:
            params = term.grad_tensors() if isinstance(term, Term) else field_params(term)
        self.params = list(params)
        self.shape = tuple(shape)
        self.n = math.prod(self.shape)
        self.y_of_t = y_of_t
        self.on_params = on_params

    def ode(self, t: Tensor, z: Tensor) -> Tensor:
        return adjoint_field(self.func, t, z, self.n, self.shape, self.params, self.y_of_t, self.on_params,
                             self.fast)

    def vf(self, t: Tensor, z: Tensor) -> Tensor:
        return self.ode(t, z)

    def contr(self, t0: Tensor | float, t1: Tensor | float) -> Tensor | float:
        return t1 - t0

    def prod(self, vf: Tensor, control: Tensor | float) -> Tensor:
        return vf * control


def adjoint_field(func: Callable[[Tensor, Tensor], Tensor], t: Tensor, z: Tensor, n: int, shape: tuple[int, ...],
                  params: Sequence[Tensor], y_of_t: Callable[[float], Tensor] | None = None,
                  on_params: Callable[[Tensor, Sequence[Tensor | None]], None] | None = None,
                  fast: Callable | None = None) -> Tensor:
    """``[F(t, y), -a^T dF/dy, -a^T dF/dtheta]`` on the flat augmented state ``z = [y, a, g]`` (``(1, 2n + P)``;
    with ``y_of_t`` the state is ``[a, g]``, ``y`` read from it, and ``F`` is not returned): the augmented field of
    the continuous adjoint for one field ``F = func`` (an ODE's right-hand side; an SDE's drift, or its diffusion
    times a fixed Brownian increment). With ``on_params`` the state has no ``g`` (``[y, a]``, or ``[a]``): the
    products ``-a^T dF/dtheta_j`` (None where ``F`` does not depend on ``theta_j``) go to ``on_params(z, grads)``
    and only ``[F, -a^T dF/dy]`` (or ``[-a^T dF/dy]``) is returned. ``fast(t, y, a)`` (optional; ``y`` and ``a`` of
    the state's shape) computes ``(F, (-a^T dF/dy, *(-a^T dF/dtheta_j)))`` another way -- ``compile=True``'s compiled
    program (:mod:`neurodyn.compile.adjoint`) -- or returns None (then, and where ``z`` requires grad, autograd
    does)."""
    zf = z.reshape(-1)
    if y_of_t is None:
        y, a = zf[:n], zf[n:2 * n]
    else:
        y, a = y_of_t(float(t)).reshape(-1), zf[:n]
    # Differentiable in z when z requires grad (an implicit method's Jacobian of this field by reverse passes).
    # Not under torch.func: its transforms would miss the parameter channels (wrong, silently), so the
    # requires_grad_ below makes them fail instead and the Jacobian comes from plain autograd.
    diff = z.requires_grad and torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(z)
    done = fast(t, y.view(shape), a.view(shape)) if fast is not None and not z.requires_grad else None
    if done is not None:
        fy, grads = done
    else:
        with torch.enable_grad():
            yv = y.view(shape) if diff and y.requires_grad else y.detach().view(shape).requires_grad_(True)
            fy = func(t, yv)
            if fy.requires_grad:
                grads = vjp(fy, (yv, *params), -a.view(shape), create_graph=diff)
            else:  # a field of t alone: no dependence on y or the parameters
                grads = (None,) * (1 + len(params))
    parts = [grads[0].reshape(-1) if grads[0] is not None else torch.zeros_like(a)]
    if on_params is not None:
        on_params(z, grads[1:])
    else:
        parts.append(flat_cat(grads[1:], params).to(z.dtype) if params else z.new_zeros(0))
    if y_of_t is None:
        parts.insert(0, fy.reshape(-1) if diff else fy.detach().reshape(-1))
    return torch.cat(parts).view(1, -1)


def ito_correction(diffusion: ControlTerm, t: Tensor, y: Tensor) -> Tensor:
    """``1/2 sum_j (dg_j/dy) g_j`` at ``(t, y)``: an Ito drift minus this is the Stratonovich drift of the same SDE.

    ``g_j`` the diffusion's noise columns (diagonal noise: ``g_i`` depends on ``y_i`` alone, so the term is
    ``(dg_i/dy_i) g_i / 2``, one vector-Jacobian product; scalar and general noise: one Jacobian-vector product per
    column by double reverse passes; additive noise: zero). Differentiable in ``y`` and the diffusion's parameters
    (a graph is built under grad mode), so an adjoint can differentiate the converted drift."""
    if diffusion.noise == "additive":
        return torch.zeros_like(y)
    g = diffusion.vf(t, y)
    out = torch.zeros_like(y)
    if not g.requires_grad:  # g depends on neither y nor a tensor requiring grad: dg/dy = 0
        return out
    create = torch.is_grad_enabled()
    if diffusion.noise == "diagonal":
        (dg,) = torch.autograd.grad(g, y, g, create_graph=create, allow_unused=True)
        return out if dg is None else 0.5 * dg  # None: g does not depend on y (e.g. on parameters alone)
    for j in range(g.shape[-1]):
        col = g[..., j]
        u = torch.zeros_like(col, requires_grad=True)
        (vjp,) = torch.autograd.grad(col, y, u, create_graph=True, allow_unused=True)
        if vjp is None:  # this column does not depend on y
            continue
        (jvp,) = torch.autograd.grad(vjp, u, col, create_graph=create)
        out = out + jvp
    return 0.5 * out


def diffusion_probe(term: Term) -> Callable[[Tensor, Tensor], Tensor]:
    """``(t, y) -> g(t, y) v`` for the Brownian part of an SDE term, with ``v`` a fixed all-ones increment: the
    diffusion as one field whose evaluations the gradient methods can check for captured tensors."""
    parts = term.terms if isinstance(term, MultiTerm) else (term,)
    diffusion = next(p for p in parts if "sde" in p.kinds)

    def probe(t: Tensor, y: Tensor) -> Tensor:
        v = torch.ones_like(diffusion.path.increment(float(t), float(t)))
        return diffusion.vf_prod(t, y, v)
    return probe


class SDEAdjointTerm(MultiTerm):
    """The stochastic adjoint's augmented SDE of an SDE term (``gradient="adjoint"`` on an SDE; Li et al. 2020).

    On the flat state ``z = [y, a, g]`` (``(1, 2n + P)``) it is the Stratonovich SDE

    ``dz = [f, -a^T df/dy, -a^T df/dtheta] dt + [g dW, -a^T d(g dW)/dy, -a^T d(g dW)/dtheta]``

    driven by the forward's Brownian path, integrated backward in time (steps of negative size query the same
    increments: ``bm.increment(t, t + h) = -(W(t) - W(t + h))``). A Stratonovich SDE runs backward by the same
    rules, so the backward solve reconstructs ``y`` and carries ``a = dL/dy`` and the parameter gradient. An Ito
    SDE is converted first: ``f`` becomes ``f - 1/2 sum_j (dg_j/dy) g_j`` (:func:`ito_correction`). The diffusion
    part is given in product form (``noise="general"``, ``g_prod`` only), one vector-Jacobian product per
    evaluation whatever the noise type; so the backward methods are those using ``g dW`` only: ``heun``,
    ``midpoint``, ``euler_heun``.

    ``params`` default to the term's :meth:`~Term.grad_tensors` (drift and diffusion parameters); ``drift`` replaces
    the term's drift (e.g. watched for captured tensors) and ``wrap`` wraps each diffusion-product evaluation.
    ``fast`` (optional) computes the two fields' values and vector-Jacobian products another way
    (``fast.drift(t, y, a)``, ``fast.g_prod(t, y, a, dW)``, as :func:`adjoint_field`'s ``fast``):
    ``compile=True``'s compiled programs (:mod:`neurodyn.compile.adjoint`).

    Examples
    --------
    >>> import torch
    >>> from neurodyn.paths import BrownianInterval
    >>> w = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    >>> bm = BrownianInterval(0.0, 1.0, shape=(1,), dtype=torch.float64, entropy=0)
    >>> sde = sde_term(lambda t, y: -y, lambda t, y: w * y, bm, sde_type="stratonovich")
    >>> adj = SDEAdjointTerm(sde, (1,), [w])
    >>> z = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)      # [y, a, g]
    >>> adj.rate(torch.tensor(0.0), z)                                # [f, -a df/dy, -a df/dw]
    tensor([[-2.,  1.,  0.]], dtype=torch.float64)
    """

    __slots__ = ("user", "shape", "n", "params", "drift_of", "diffusion_of")

    def __init__(self, term: Term, shape: Sequence[int], params: Sequence[Tensor] | None = None,
                 drift: Callable[[Tensor, Tensor], Tensor] | None = None,
                 wrap: Callable[[Callable], Callable] | None = None, fast: Any = None):
        parts = term.terms if isinstance(term, MultiTerm) else (term,)
        noisy = [p for p in parts if "sde" in p.kinds]
        rest = [p for p in parts if "sde" not in p.kinds]
        if len(noisy) != 1 or len(rest) > 1 or not isinstance(noisy[0], ControlTerm):
            raise InputError("SDEAdjointTerm: the term must be one drift plus one Brownian ControlTerm "
                             "(neurodyn.sde_term(drift, diffusion, bm)).")
        diffusion = noisy[0]
        f = drift if drift is not None else (rest[0].rate if rest else (lambda t, y: torch.zeros_like(y)))
        self.user = term
        self.shape = tuple(shape)
        self.n = math.prod(self.shape)
        self.params = list(term.grad_tensors() if params is None else params)
        if diffusion.sde_type == "ito" and diffusion.noise != "additive":
            if diffusion.vector_field is None:
                raise InputError("gradient='adjoint' on an Ito SDE needs the diffusion g(t, y) itself (for the "
                                 "Ito-Stratonovich correction); this SDE gives only g_prod: give the diffusion, or "
                                 "use gradient='direct' / 'checkpoint'.")

            def strat(t: Tensor, y: Tensor, _f=f, _d=diffusion) -> Tensor:
                return _f(t, y) - ito_correction(_d, t, y)
            self.drift_of = strat
        else:
            self.drift_of = f
        self.diffusion_of = diffusion
        n, shp, ps = self.n, self.shape, self.params

        def aug_drift(t: Tensor, z: Tensor) -> Tensor:
            return adjoint_field(self.drift_of, t, z, n, shp, ps, fast=fast.drift if fast is not None else None)

        def aug_g_prod(t: Tensor, z: Tensor, dW: Tensor) -> Tensor:
            def g_dw(s: Tensor, y: Tensor) -> Tensor:
                return diffusion.vf_prod(s, y, dW)

            def fast_g(s: Tensor, y: Tensor, a: Tensor) -> Any:
                return fast.g_prod(s, y, a, dW)
            return adjoint_field(wrap(g_dw) if wrap is not None else g_dw, t, z, n, shp, ps,
                                 fast=fast_g if fast is not None else None)

        super().__init__(ODETerm(aug_drift), ControlTerm(None, diffusion.path, noise="general",
                                                         sde_type="stratonovich", g_prod=aug_g_prod))

    def grad_tensors(self) -> list[Tensor]:
        return []


# ----------------------------------------------------------------------------------------------
# How the engine meets terms
# ----------------------------------------------------------------------------------------------
def check_output(out: Any, shape: tuple[int, ...], t: float) -> None:
    """Raise an InputError when a vector field's result at time ``t`` is not a tensor of the state's ``shape``
    (a broadcastable wrong shape would otherwise fill stage rows silently wrong). Called on every evaluation where
    the cheap test ``isinstance(out, Tensor) and out.shape == shape`` fails."""
    if not isinstance(out, Tensor):
        raise InputError(f"func(t, y) returned {type(out).__name__} at t={t:.6g}, not a tensor: dy/dt must be a tensor "
                         f"of the state's shape {tuple(shape)} at every call.")
    if out.shape != tuple(shape):
        raise InputError(f"func(t, y) returned shape {tuple(out.shape)} at t={t:.6g}, but the state has shape "
                         f"{tuple(shape)}: dy/dt must have the state's shape at every call.")


def as_field(func: Any) -> tuple[Callable[[Tensor, Tensor], Tensor], Term | None]:
    """``(field, term)``: the ``f(t, y)`` the engine integrates for ``func`` (a term's ODE form, an
    :class:`ODETerm`'s own function, or ``func`` itself) and the term it came from (None for a plain field).

    A term's field is its bound ``rate`` method (the ODE form; an SDE's drift), so :func:`term_of` finds the term
    again from the field.
    """
    if isinstance(func, ODETerm):
        return func.func, func
    if isinstance(func, Term):
        return func.rate, func
    return func, None


def term_of(field: Any) -> Term | None:
    """The term whose ODE form ``field`` is (its bound ``rate`` method, or a wrapper of it with ``__wrapped__``),
    else None."""
    while getattr(field, "__wrapped__", None) is not None and getattr(field, "__self__", None) is None:
        field = field.__wrapped__
    owner = getattr(field, "__self__", None)
    return owner if isinstance(owner, Term) else None


def split_halves(term: Any) -> tuple[Callable, Callable] | None:
    """``(dq_dt, dp_dt)`` when the engine term ``term`` integrates a :class:`SplitTerm`, else None."""
    owner = term_of(getattr(term, "func", None))
    return (owner.dq_dt, owner.dp_dt) if isinstance(owner, SplitTerm) else None


def check_accepts(stepper: Any, term: Term, method: Any,
                  alternatives: Callable[[str], list[str]] | None = None) -> None:
    """Raise an InputError, before any work, when ``stepper`` does not integrate every kind of ``term``.

    ``alternatives(kind)`` lists the methods that do (named in the message).
    """
    accepts = stepper.accepts  # declared by every stepper (StepperBase: the ODE-form kinds)
    missing = sorted(term.kinds - set(accepts))
    if not missing:
        return
    kind = missing[0]
    name = method if isinstance(method, str) else getattr(stepper, "name", type(stepper).__name__)
    others = alternatives(kind) if alternatives is not None else []
    tail = (f"methods that do: {', '.join(others)}." if others else f"no method integrates {kind!r} terms.")
    raise InputError(f"method {name!r} integrates {', '.join(repr(k) for k in accepts)} terms, not a "
                     f"{type(term).__name__} (kind {kind!r}); {tail}")
