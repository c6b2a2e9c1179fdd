"""Regularisers for training Neural ODEs: kinetic energy, Jacobian Frobenius norm (RNODE), TayNODE, STEER.

The integral penalties are integrated *with* the state: :class:`RegularizedField` wraps a vector field
``f(t, z)`` into one on the augmented state ``[z, E_1, ..., E_m]`` with

    dE_kinetic/dt  = ||f(t, z)||^2                                   (kinetic energy, RNODE)
    dE_jacobian/dt = ||eps^T df/dz||^2  ~  ||df/dz||_F^2             (Hutchinson; RNODE)
    dE_taylor/dt   = ||d^K z / dt^K||^2                              (TayNODE, K = taylor_order)

so one adaptive solve returns both the trajectory and the penalties (per sample), and every gradient
method of :func:`neurodyn.solve` differentiates them (the augmented field is an ``nn.Module`` whose
parameters are ``func``'s, so the adjoint finds them). :func:`regularized_solve` does the bookkeeping.

STEER (Ghosh et al. 2020) is a random end time per training step: :func:`steer_time`.

Conventions
-----------
A state ``z`` of shape ``(B, *features)`` (``z.dim() >= 2``) is a batch of ``B`` samples and every
penalty is kept per sample, shape ``(B,)``; a 1-d state ``(D,)`` is one sample and the penalties are
0-dim. Norms are sums of squares over the feature dimensions (not means).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .fields import NOISES, draw_probe, jacobian_trace, per_sample_sum, takes_time
from .solution import Solution
from .solve import solve

PENALTIES = ("kinetic", "jacobian", "taylor")
ESTIMATORS = ("hutchinson", "exact")

__all__ = ["RegularizedField", "regularized_solve", "steer_time", "taylor_derivative"]


class RegularizedField(nn.Module):
    """The vector field ``f`` on a state augmented with the running integrals of the chosen penalties.

    Parameters
    ----------
    func : nn.Module or callable
        The vector field ``f(t, z)`` (or ``f(z)``, see ``autonomous``); ``z`` of any shape, a batch
        being the leading dimension. Registered as a submodule when it is one, so its parameters are
        this module's (the adjoint and checkpoint gradient methods find them).
    kinetic, jacobian, taylor : float
        Weights (>= 0) of the penalties. Only the penalties with a non-zero weight are integrated
        (each adds ``B`` channels to the state); :meth:`split` returns those.
    taylor_order : int
        ``K >= 1`` of TayNODE's ``||d^K z/dt^K||^2`` (``K = 1`` is the kinetic energy, ``K = 2`` is
        ``||J f + df/dt||^2``). Computed by ``K - 1`` nested forward-mode products (``torch.func.jvp``)
        along the tangent ``(dt, dz) = (1, f)``; the cost grows like ``2^(K-1)`` evaluations of ``f``.
    estimator : ``"hutchinson"`` or ``"exact"``
        ``||df/dz||_F^2`` as ``||eps^T df/dz||^2`` with one noise draw ``eps`` (one VJP per step; an
        unbiased estimate, ``E[eps eps^T] = I``), or exactly as the sum over the ``D`` per-sample feature
        basis vectors (``D`` VJPs per evaluation). With a batch, ``"exact"`` is the per-sample
        ``||df_b/dz_b||_F^2`` when the field treats the samples independently (as an MLP does).
    noise : ``"gaussian"`` or ``"rademacher"``
        Distribution of ``eps`` (Rademacher has the lower variance).
    generator : torch.Generator, optional
        Source of the noise (on the state's device).
    autonomous : bool, optional
        Force ``f(z)`` (True) or ``f(t, z)`` (False) instead of detecting it from the signature.

    Notes
    -----
    The noise ``eps`` is a buffer drawn by :meth:`resample` (and by :meth:`augment` when none of the
    state's shape exists yet). It is *not* redrawn inside :meth:`forward`, so it stays fixed for a whole
    solve, including the backward solve of ``gradient="adjoint"``: call :meth:`resample` once per
    training step (:func:`regularized_solve` does).

    The VJP is taken with ``create_graph=True`` whenever autograd is recording, so the Jacobian and
    Taylor penalties train ``func``'s parameters; under ``torch.no_grad()`` the field returns detached
    values (the adjoint's forward pass).

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.regularizers import RegularizedField
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> field = RegularizedField(f, kinetic=0.01, jacobian=0.01)
    >>> z0 = torch.randn(8, 2)
    >>> state0 = field.augment(z0)                 # (8*2 + 2*8,) = (32,)
    >>> _ = field.resample(z0.shape)               # new noise for this training step
    >>> sol = neurodyn.solve(field, state0, torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-7)
    >>> z, pen = field.split(sol.ys)               # z: (2, 8, 2); pen["kinetic"]: (2, 8)
    >>> loss = z[-1].pow(2).mean() + field.penalty({k: v[-1] for k, v in pen.items()})
    >>> loss.backward()
    """

    def __init__(self, func: Callable, *, kinetic: float = 0.0, jacobian: float = 0.0, taylor: float = 0.0,
                 taylor_order: int = 2, estimator: str = "hutchinson", noise: str = "gaussian",
                 generator: torch.Generator | None = None, autonomous: bool | None = None):
        super().__init__()
        if not callable(func):
            raise InputError(f"RegularizedField: func must be callable, got {type(func).__name__}.")
        weights = {"kinetic": kinetic, "jacobian": jacobian, "taylor": taylor}
        for name, w in weights.items():
            try:
                wf = float(w)
            except (TypeError, ValueError):
                raise InputError(f"RegularizedField: {name} must be a number, got {type(w).__name__}.") from None
            if not math.isfinite(wf) or wf < 0:
                raise InputError(f"RegularizedField: {name} must be finite and >= 0, got {w}.")
            weights[name] = wf
        if isinstance(taylor_order, bool) or not isinstance(taylor_order, int) or taylor_order < 1:
            raise InputError(f"RegularizedField: taylor_order must be an integer >= 1, got {taylor_order!r}.")
        if estimator not in ESTIMATORS:
            raise InputError(f"RegularizedField: estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        if noise not in NOISES:
            raise InputError(f"RegularizedField: noise must be one of {NOISES}, got {noise!r}.")
        self.func = func  # a submodule when it is one: its parameters are this module's
        self.takes_time = (not autonomous) if autonomous is not None else takes_time(func)
        self.weights = weights
        self.active: tuple[str, ...] = tuple(k for k in PENALTIES if weights[k] != 0)
        self.taylor_order = taylor_order
        self.estimator = estimator
        self.noise = noise
        self.generator = generator
        self.register_buffer("eps", None, persistent=False)
        self._z_shape: torch.Size | None = None

    # ------------------------------------------------------------------------------------------
    # State layout
    # ------------------------------------------------------------------------------------------
    @property
    def z_shape(self) -> torch.Size:
        """Shape of the un-augmented state (set by :meth:`augment`)."""
        if self._z_shape is None:
            raise InputError("RegularizedField: call augment(z0) before solving (it fixes the state layout).")
        return self._z_shape

    @staticmethod
    def _sample_shape(z_shape: torch.Size) -> torch.Size:
        return torch.Size(z_shape[:1]) if len(z_shape) >= 2 else torch.Size()

    def augment(self, z0: Tensor) -> Tensor:
        """The initial augmented state: ``z0`` flattened, then zeros for each active penalty.

        ``z0`` of shape ``(B, *features)`` (or ``(D,)``, one sample) gives a 1-d state of
        ``z0.numel() + m * B`` entries (``m`` active penalties; ``B = 1`` for a 1-d ``z0``). Keeps
        ``z0``'s autograd graph. Draws the noise if none of ``z0``'s shape, dtype and device exists.

        >>> field = RegularizedField(lambda t, z: -z, kinetic=1.0, jacobian=1.0)
        >>> field.augment(torch.ones(4, 3)).shape
        torch.Size([20])
        """
        if not isinstance(z0, Tensor) or not z0.is_floating_point():
            raise InputError("RegularizedField.augment: z0 must be a real floating-point tensor.")
        if z0.dim() == 0 or z0.numel() == 0:
            raise InputError(f"RegularizedField.augment: z0 must have at least one dimension and one element, got "
                             f"shape {tuple(z0.shape)}.")
        self._z_shape = z0.shape
        s = self._sample_shape(z0.shape).numel()
        if self._needs_noise() and not self._noise_fits(z0):
            self.resample(z0.shape, dtype=z0.dtype, device=z0.device)
        return torch.cat([z0.reshape(-1), z0.new_zeros(len(self.active) * s)])

    def split(self, state: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Separate an augmented state (or a trajectory of them) into ``z`` and the penalty integrals.

        ``state`` of shape ``(*lead, N)`` (``lead`` = ``()`` for one state, ``(T,)`` for ``sol.ys``)
        returns ``z`` of shape ``(*lead, *z_shape)`` and ``{name: (*lead, B)}`` (``(*lead,)`` for a 1-d
        ``z``) for the active penalties: the integrals from the initial time (signed: negative when
        integrating backward in time).

        >>> field = RegularizedField(lambda t, z: -z, kinetic=1.0)
        >>> z, pen = field.split(field.augment(torch.ones(4, 3)))
        >>> z.shape, pen["kinetic"].shape
        (torch.Size([4, 3]), torch.Size([4]))
        """
        z_shape = self.z_shape
        n = z_shape.numel()
        sample = self._sample_shape(z_shape)
        s = sample.numel()
        total = n + len(self.active) * s
        if state.shape[-1:] != (total,):
            raise InputError(f"RegularizedField.split: expected a last dimension of {total} (state {tuple(z_shape)} "
                             f"and {len(self.active)} penalties), got shape {tuple(state.shape)}.")
        lead = state.shape[:-1]
        z = state[..., :n].reshape(*lead, *z_shape)
        pens = {name: state[..., n + i * s:n + (i + 1) * s].reshape(*lead, *sample)
                for i, name in enumerate(self.active)}
        return z, pens

    def penalty(self, penalties: dict[str, Tensor]) -> Tensor:
        """``sum_k weight_k * mean(penalties[k])``: the scalar to add to the loss, for the per-sample
        integrals of one state (``split(sol.ys[-1])[1]``, or ``split(sol.ys)[1]`` indexed at ``[-1]``).

        >>> field = RegularizedField(lambda t, z: -z, kinetic=0.5)
        >>> float(field.penalty({"kinetic": torch.tensor([2.0, 4.0])}))
        1.5
        """
        out = None
        for name in self.active:
            v = self.weights[name] * penalties[name].mean()
            out = v if out is None else out + v
        return out if out is not None else torch.zeros(())

    # ------------------------------------------------------------------------------------------
    # Noise
    # ------------------------------------------------------------------------------------------
    def _needs_noise(self) -> bool:
        return "jacobian" in self.active and self.estimator == "hutchinson"

    def _noise_fits(self, z: Tensor) -> bool:
        e = self.eps
        return e is not None and e.shape == z.shape and e.dtype == z.dtype and e.device == z.device

    def resample(self, z_shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """Draw new Hutchinson noise ``eps`` of shape ``z_shape`` (Gaussian or Rademacher) and keep it for
        the following solve(s). ``dtype``/``device`` default to the current noise's (else the default
        dtype, CPU). Returns the noise.

        >>> field = RegularizedField(lambda t, z: -z, jacobian=1.0, noise="rademacher")
        >>> field.resample((4, 3)).abs().unique().tolist()
        [1.0]
        """
        prev = self.eps
        dtype = dtype or (prev.dtype if prev is not None else torch.get_default_dtype())
        device = device or (prev.device if prev is not None else None)
        eps = draw_probe(z_shape, self.noise, generator=self.generator, dtype=dtype, device=device)
        self.eps = eps
        return eps

    # ------------------------------------------------------------------------------------------
    # The augmented vector field
    # ------------------------------------------------------------------------------------------
    def _f(self, t: Tensor, z: Tensor) -> Tensor:
        return self.func(t, z) if self.takes_time else self.func(z)

    @staticmethod
    def _per_sample(x: Tensor) -> Tensor:
        """Sum of squares over the feature dimensions: ``(B, *features) -> (B,)``, ``(D,) -> ()``."""
        return per_sample_sum(x.pow(2))

    def _jacobian_rate(self, f: Tensor, z: Tensor, need_graph: bool) -> Tensor:
        eps = None
        if self.estimator == "hutchinson":
            eps = self.eps
            if eps is None or not self._noise_fits(z):
                eps = self.resample(z.shape, dtype=z.dtype, device=z.device)
        return jacobian_trace(f, z, eps, create_graph=need_graph, frobenius=True)[1]

    def _taylor_derivative(self, t: Tensor, z: Tensor, f: Tensor) -> Tensor:
        """``d^K z/dt^K`` along the flow at ``(t, z)`` (``f = dz/dt`` given)."""
        return taylor_derivative(self._f, t, z, f, self.taylor_order)

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        """``d/dt [z, E...]`` for the flat augmented ``state`` (shape ``(N,)``, as :meth:`augment` builds)."""
        z_shape = self.z_shape
        n = z_shape.numel()
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t, dtype=state.dtype, device=state.device)
        need_graph = torch.is_grad_enabled()
        z = state.reshape(-1)[:n].view(z_shape)
        rates: dict[str, Tensor] = {}
        with torch.enable_grad():
            if not (need_graph and z.requires_grad):
                z = z.detach().requires_grad_("jacobian" in self.active)
            f = self._f(t, z)
            if "kinetic" in self.active:
                rates["kinetic"] = self._per_sample(f)
            if "jacobian" in self.active:
                rates["jacobian"] = self._jacobian_rate(f, z, need_graph)
        if "taylor" in self.active:
            with torch.set_grad_enabled(need_graph):
                fz = f if need_graph else f.detach()
                zz = z if need_graph else z.detach()
                rates["taylor"] = self._per_sample(self._taylor_derivative(t, zz, fz))
        out = torch.cat([f.reshape(-1)] + [rates[k].reshape(-1).to(f.dtype) for k in self.active])
        out = out.view(state.shape)
        return out if need_graph else out.detach()

    def extra_repr(self) -> str:
        w = ", ".join(f"{k}={self.weights[k]}" for k in PENALTIES if self.weights[k])
        return f"{w or 'no penalties'}, taylor_order={self.taylor_order}, estimator={self.estimator!r}, " \
               f"noise={self.noise!r}"


def taylor_derivative(func: Callable[[Tensor, Tensor], Tensor], t: Tensor, z: Tensor, f: Tensor,
                      order: int) -> Tensor:
    """``d^K z/dt^K`` (``K = order >= 1``) along the flow of ``dz/dt = func(t, z)`` at ``(t, z)``, given
    ``f = func(t, z)``; TayNODE's quantity. ``K - 1`` nested forward-mode products (``torch.func.jvp``) along the
    tangent ``(dt, dz) = (1, f)``: ``D_1 = f``, ``D_{k+1} = dD_k/dt + (dD_k/dz) f``. Same shape as ``z``.

    >>> a = 0.5
    >>> taylor_derivative(lambda t, z: a * z, torch.tensor(0.0), torch.ones(3), 0.5 * torch.ones(3), 3)
    tensor([0.1250, 0.1250, 0.1250])
    """
    if order == 1:
        return f
    from torch.func import jvp

    def deriv(k: int) -> Callable[[Tensor, Tensor], Tensor]:
        if k == 1:
            return func
        inner = deriv(k - 1)

        def dk(t_: Tensor, z_: Tensor) -> Tensor:
            return jvp(inner, (t_, z_), (torch.ones_like(t_), func(t_, z_)))[1]

        return dk

    return jvp(deriv(order - 1), (t, z), (torch.ones_like(t), f))[1]


def regularized_solve(func: Callable, z0: Tensor, t: Tensor, *, kinetic: float = 0.0, jacobian: float = 0.0,
                      taylor: float = 0.0, taylor_order: int = 2, estimator: str = "hutchinson",
                      noise: str = "gaussian", generator: torch.Generator | None = None,
                      autonomous: bool | None = None, return_solution: bool = False, **solve_kwargs: Any
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]] | tuple[Tensor, Tensor, dict[str, Tensor],
                                                                            Solution]:
    """Solve ``dz/dt = f(t, z)`` together with the penalty integrals; one noise draw per call.

    Parameters
    ----------
    func : nn.Module, callable, or RegularizedField
        The vector field ``f(t, z)`` (or ``f(z)``). A :class:`RegularizedField` is used as it is (its
        weights and noise settings; leave the penalty keywords at their defaults) -- reuse one across
        training steps to keep a ``generator``'s stream.
    z0 : Tensor, shape ``(B, *features)`` or ``(D,)``
        Initial state (real floating point).
    t : Tensor, shape ``(T,)``
        Output times, as for :func:`neurodyn.solve`; the penalties integrate from ``t[0]`` to ``t[-1]``.
    kinetic, jacobian, taylor, taylor_order, estimator, noise, generator, autonomous :
        As in :class:`RegularizedField`.
    return_solution : bool
        Also return the augmented solve's :class:`~neurodyn.Solution` (its ``stats``: ``nfe`` of the forward
        solve, ``nfe_backward`` once a backward pass has run; status).
    **solve_kwargs :
        Passed to :func:`neurodyn.solve` (``method``, ``rtol``, ``atol``, ``gradient``, ``params``, ...).
        Tolerances are scalars here (the state is augmented); the penalty channels take part in the
        error control, so a penalty is as accurate as the trajectory. ``compile=True`` is not supported
        (the field differentiates inside).

    Returns
    -------
    z_traj : Tensor, shape ``(T, *z0.shape)``
        The states at ``t``.
    penalty : Tensor, 0-dim
        ``sum_k weight_k * mean over samples of penalties[k]`` (0 when no penalty is active); add it to
        the loss.
    penalties : dict of str to Tensor
        The active penalties, ``{"kinetic", "jacobian", "taylor"}`` subset, each the per-sample integral
        over ``[t[0], t[-1]]`` (shape ``(B,)``; 0-dim for a 1-d ``z0``; positive also when ``t`` decreases),
        unweighted.
    solution : Solution
        With ``return_solution=True``: the solve of the augmented state.

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.regularizers import regularized_solve
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> z0 = torch.randn(32, 2)
    >>> zs, reg, parts = regularized_solve(f, z0, torch.tensor([0.0, 1.0]), kinetic=0.01, jacobian=0.01,
    ...                                    method="tsit5", rtol=1e-5, atol=1e-7, gradient="adjoint")
    >>> loss = zs[-1].pow(2).mean() + reg
    >>> loss.backward()
    >>> sorted(parts), parts["kinetic"].shape
    (['jacobian', 'kinetic'], torch.Size([32]))
    """
    if isinstance(func, RegularizedField):
        if kinetic or jacobian or taylor:
            raise InputError("regularized_solve: func is already a RegularizedField; set the weights there, not "
                             "with kinetic=/jacobian=/taylor=.")
        field = func
    else:
        field = RegularizedField(func, kinetic=kinetic, jacobian=jacobian, taylor=taylor, taylor_order=taylor_order,
                                 estimator=estimator, noise=noise, generator=generator, autonomous=autonomous)
    if solve_kwargs.get("compile"):
        raise InputError("regularized_solve: compile=True is not supported (the field differentiates inside).")
    state0 = field.augment(z0)
    if field._needs_noise():
        field.resample(z0.shape, dtype=z0.dtype, device=z0.device)
    sol = solve(field, state0, t, **solve_kwargs)
    z_traj, pens = field.split(sol.ys)
    direction = 1.0 if float(t[-1]) > float(t[0]) else -1.0
    final = {k: direction * v[-1] for k, v in pens.items()}
    penalty = field.penalty(final) if field.active else z0.new_zeros(())
    if return_solution:
        return z_traj, penalty, final, sol
    return z_traj, penalty, final


def steer_time(t1: float, b: float, generator: torch.Generator | None = None, *, t0: float | None = None) -> float:
    """STEER's random end time: uniform in ``[t1 - b, t1 + b]`` (Ghosh et al., "STEER: Simple Temporal
    Regularization For Neural ODEs", 2020).

    Draw a new end time every training step and integrate to it; evaluate at the nominal ``t1``.
    ``b`` must satisfy ``0 <= b < t1 - t0`` so the interval stays after the start (checked when ``t0``
    is given; with ``t1 < t0``, backward in time, ``b < t0 - t1``).

    Parameters
    ----------
    t1 : float
        Nominal end time.
    b : float
        Half-width of the interval.
    generator : torch.Generator, optional
        Source of randomness (CPU generator).
    t0 : float, optional
        Start time, to validate ``b``.

    Returns
    -------
    float
        The sampled end time.

    Examples
    --------
    With :class:`neurodyn.NeuralODE` (no special model class needed), pass the sampled span per call:

    >>> import torch, neurodyn
    >>> from neurodyn.regularizers import steer_time
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> model = neurodyn.NeuralODE(f, t=(0.0, 1.0))
    >>> z0 = torch.randn(8, 2)
    >>> t_end = steer_time(1.0, 0.5, t0=0.0)          # training step: end time in [0.5, 1.5]
    >>> z1 = model(z0, t=torch.tensor([0.0, t_end]))  # the model's own t is untouched
    >>> z1_eval = model(z0)                           # evaluation: the nominal t = (0, 1)

    or with the penalties: ``regularized_solve(f, z0, torch.tensor([0.0, t_end]), kinetic=0.01)``.
    """
    t1, b = float(t1), float(b)
    if not (math.isfinite(t1) and math.isfinite(b)) or b < 0:
        raise InputError(f"steer_time: t1 and b must be finite and b >= 0, got t1={t1}, b={b}.")
    if t0 is not None and not b < abs(t1 - float(t0)):
        raise InputError(f"steer_time: b={b} must be smaller than |t1 - t0| = {abs(t1 - float(t0))} so the end "
                         f"time stays on the same side of t0.")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return t1 - b + 2.0 * b * u
