"""Continuous normalizing flows (Chen et al. 2018; FFJORD, Grathwohl et al. 2019).

A CNF transports data ``x = z(0)`` to a base sample ``z(t1)`` along ``dz/dt = f(t, z)`` and integrates the
change of log-density with it, ``d log p(z(t))/dt = -tr(df/dz)``, so

    log p(x) = log p_base(z(t1)) + integral_0^t1 tr(df/dz(t, z(t))) dt.

The state ``(z, int tr, penalties...)`` is one ``(B, D + 1 + m)`` tensor integrated by :func:`neurodyn.solve`
(every method, gradient method and ``per_sample_steps``). The trace is exact (``D`` vector-Jacobian products)
or Hutchinson's estimate with a probe drawn once per solve and held by the field, so the forward pass, a
checkpoint replay and the adjoint's backward solve all see the same estimator. The RNODE penalties
(kinetic energy ``||f||^2``, Jacobian Frobenius norm) ride along from the same products
(:func:`neurodyn.fields.jacobian_trace`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError
from ..fields import NOISES, draw_probe, jacobian_trace, takes_time
from ..regularizers import taylor_derivative
from ..solution import Solution
from ..solve import solve

TRACES = ("exact", "hutchinson")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu, "relu": torch.relu, "swish": F.silu, "selu": F.selu,
}

__all__ = ["CNF", "CNFField", "CNFStack", "ConcatSquashLinear", "ODEnet"]


def _time_column(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (scalar, or ``(B,)`` under per-sample steps) as a ``(1, 1)`` or ``(B, 1)`` column in ``like``'s dtype."""
    if not (isinstance(t, Tensor) and t.dtype == like.dtype and t.device == like.device):
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1)


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned linear layer: ``(W x + b) * sigmoid(a t + c) + d t``.

    Parameters
    ----------
    dim_in, dim_out : int
        Feature sizes.

    Notes
    -----
    ``forward(t, x)``: ``t`` a scalar (or ``(B,)``, one time per sample), ``x`` of shape ``(B, dim_in)``;
    returns ``(B, dim_out)``.

    Examples
    --------
    >>> layer = ConcatSquashLinear(2, 8)
    >>> layer(torch.tensor(0.5), torch.randn(4, 2)).shape
    torch.Size([4, 8])
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.apply_column(_time_column(t, x), x)

    def apply_column(self, tc: Tensor, x: Tensor) -> Tensor:
        """The layer for a time column ``tc`` (``(1, 1)`` or ``(B, 1)``) already in ``x``'s dtype."""
        gate = torch.sigmoid(F.linear(tc, self.hyper_gate.weight, self.hyper_gate.bias))
        return F.linear(x, self.layer.weight, self.layer.bias) * gate + F.linear(tc, self.hyper_bias.weight)


class ODEnet(nn.Module):
    """FFJORD's MLP vector field of concatsquash layers: ``dim -> hidden_dims... -> dim``, an activation
    between layers (none after the last).

    Parameters
    ----------
    dim : int
        Data dimension ``D``.
    hidden_dims : sequence of int
        Hidden widths (FFJORD's toy setup: ``(64, 64, 64)``).
    activation : str
        One of ``"tanh"``, ``"softplus"``, ``"elu"``, ``"relu"``, ``"swish"``, ``"selu"``.

    Notes
    -----
    ``forward(t, z)``: ``z`` of shape ``(B, D)`` -> ``(B, D)``.

    Examples
    --------
    >>> net = ODEnet(2, (64, 64, 64), "tanh")
    >>> net(torch.tensor(0.0), torch.randn(5, 2)).shape
    torch.Size([5, 2])
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "tanh"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"ODEnet: dim must be a positive integer, got {dim!r}.")
        if activation not in ACTIVATIONS:
            raise InputError(f"ODEnet: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        widths = [dim, *[int(h) for h in hidden_dims], dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tc = _time_column(t, z)
        act = ACTIVATIONS[self.activation]
        layers = list(self.layers)
        h = z
        for layer in layers[:-1]:
            h = act(layer.apply_column(tc, h))
        return layers[-1].apply_column(tc, h)


class CNFField(nn.Module):
    """The augmented vector field of a CNF on the state ``[z, L, E_1, ..., E_m]`` of shape ``(B, D + 1 + m)``:

        dz/dt = f(t, z),   dL/dt = tr(df/dz),   dE_kinetic/dt = ||f||^2,   dE_jacobian/dt = ||df/dz||_F^2

    and ``dE_taylor/dt = ||d^K z/dt^K||^2`` (TayNODE) (per sample; ``L`` is the log-determinant of the flow map so
    far; the penalties present are those switched on, in this order). ``trace="hutchinson"`` uses the probe
    :attr:`eps` (``(B, D)``), set by :meth:`set_probe` before a solve and left unchanged by :meth:`forward`.

    Examples
    --------
    >>> field = CNFField(ODEnet(2, (16,)), dim=2, trace="exact")
    >>> field(torch.tensor(0.0), torch.zeros(3, 3)).shape
    torch.Size([3, 3])
    """

    def __init__(self, net: Callable, dim: int, trace: str = "exact", kinetic: bool = False,
                 jacobian: bool = False, autonomous: bool | None = None, taylor: bool = False, taylor_order: int = 2):
        super().__init__()
        self.taylor_order = taylor_order
        self.net = net
        self.dim = dim
        self.trace = trace
        self.takes_time = (not autonomous) if autonomous is not None else takes_time(net)
        self.active = tuple(k for k, on in (("kinetic", kinetic), ("jacobian", jacobian), ("taylor", taylor)) if on)
        self.register_buffer("eps", None, persistent=False)

    def set_probe(self, eps: Tensor | None) -> None:
        """Hold ``eps`` (``(B, D)``) as the Hutchinson probe for the following solve(s)."""
        self.eps = eps

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        d = self.dim
        need_graph = torch.is_grad_enabled()
        z = state[:, :d]
        eps = None
        if self.trace == "hutchinson":
            eps = self.eps
            if eps is None or eps.shape != z.shape:
                raise InputError(f"CNFField: the Hutchinson probe has shape "
                                 f"{None if eps is None else tuple(eps.shape)}, the state {tuple(z.shape)}; call "
                                 f"set_probe(eps) with a (B, D) probe before solving (CNF does this).")
            if eps.dtype != z.dtype:
                eps = eps.to(z.dtype)
        with torch.enable_grad():
            if not (need_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            f = self.net(t, z) if self.takes_time else self.net(z)
            if f.shape != z.shape:
                raise InputError(f"CNF: the network returned shape {tuple(f.shape)} for z of shape {tuple(z.shape)}; "
                                 f"it must return dz/dt of z's shape (B, D).")
            tr, frob = jacobian_trace(f, z, eps, create_graph=need_graph, frobenius="jacobian" in self.active)
        cols = [f, tr.unsqueeze(1)]
        if "kinetic" in self.active:
            cols.append(f.pow(2).sum(1, keepdim=True))
        if "jacobian" in self.active:
            cols.append(frob.unsqueeze(1))
        if "taylor" in self.active:
            with torch.set_grad_enabled(need_graph):
                tt = t if isinstance(t, Tensor) and t.dtype == z.dtype else torch.as_tensor(t, dtype=z.dtype,
                                                                                             device=z.device)
                fz, zz = (f, z) if need_graph else (f.detach(), z.detach())
                fn = self.net if self.takes_time else (lambda t_, z_: self.net(z_))
                dk = taylor_derivative(fn, tt, zz, fz, self.taylor_order)
            cols.append(dk.pow(2).sum(1, keepdim=True))
        out = torch.cat(cols, 1)
        return out if need_graph else out.detach()


class CNF(nn.Module):
    """A continuous normalizing flow block: data ``x = z(0)`` <-> base ``z(t1)``, ``dz/dt = net(t, z)``.

    Parameters
    ----------
    net : nn.Module or callable
        The vector field ``net(t, z)`` (or ``net(z)``) on ``z`` of shape ``(B, D)``, returning ``(B, D)``; samples
        must be treated independently (an MLP, :class:`ODEnet`). Under ``per_sample_steps`` ``t`` is ``(B,)``.
    dim : int
        Data dimension ``D`` (inputs of shape ``(B, *event_shape)`` with ``prod(event_shape) = D`` are flattened).
    trace : ``"exact"`` or ``"hutchinson"``
        Divergence by ``D`` vector-Jacobian products, or by Hutchinson's ``eps^T J eps`` (one product, unbiased).
    noise : ``"gaussian"`` or ``"rademacher"``
        The Hutchinson probe's distribution. One probe ``(B, D)`` is drawn per solve (per :meth:`transport` call)
        and held by the field, so the forward solve, checkpoint replays and the adjoint see the same estimator.
    t1 : float
        End time (> 0).
    train_t1 : bool
        Make the end time a parameter, ``t1 = s^2`` with ``s`` trained (FFJORD's ``sqrt_end_time``).
    base : torch.distributions.Distribution, optional
        Base density with ``log_prob(z) -> (B,)`` on ``(B, D)`` and ``sample((n,)) -> (n, D)``; default standard
        normal (computed in the data's dtype and device).
    kinetic, jacobian : float
        RNODE weights (>= 0) of the kinetic energy and Jacobian Frobenius penalties, integrated with the flow
        (the Jacobian one from the same probe / products as the trace); :meth:`penalty` after each solve.
    taylor, taylor_order : float, int
        TayNODE weight (>= 0) of ``integral ||d^K z/dt^K||^2 dt`` with ``K = taylor_order``
        (:func:`neurodyn.regularizers.taylor_derivative`).
    method, rtol, atol, gradient :
        As in :func:`neurodyn.solve` (``gradient``: ``"direct"``, ``"adjoint"``, ``"checkpoint"``,
        ``"interpolated"``).
    generator : torch.Generator, optional
        Source of the probes and of :meth:`sample`'s draws from the default base (a given ``base`` samples with
        its own stream).
    **solve_kwargs :
        Any other keyword of :func:`neurodyn.solve` (``per_sample_steps``, ``max_steps``, ...).

    Attributes
    ----------
    last_solution : Solution
        The last solve (``stats["nfe"]``, status).
    penalties : dict of str to Tensor
        Per-sample penalty integrals ``(B,)`` of the last solve (active ones).

    Examples
    --------
    >>> import torch
    >>> from neurodyn.models import CNF, ODEnet
    >>> flow = CNF(ODEnet(2, (32, 32)), dim=2, trace="hutchinson", rtol=1e-5, atol=1e-5, gradient="adjoint")
    >>> x = torch.randn(16, 2)
    >>> loss = -flow.log_prob(x).mean()        # (16,) log-densities, averaged
    >>> loss.backward()
    >>> flow.sample(4).shape
    torch.Size([4, 2])
    """

    def __init__(self, net: Callable, dim: int, *, trace: str = "exact", noise: str = "gaussian", t1: float = 1.0,
                 train_t1: bool = False, base: Any = None, kinetic: float = 0.0, jacobian: float = 0.0,
                 taylor: float = 0.0, taylor_order: int = 2, method: str = "dopri5", rtol: float = 1e-5,
                 atol: float = 1e-5, gradient: str = "direct",
                 generator: torch.Generator | None = None, autonomous: bool | None = None, **solve_kwargs: Any):
        super().__init__()
        if not callable(net):
            raise InputError(f"CNF: net must be callable (an nn.Module), got {type(net).__name__}.")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"CNF: dim must be a positive integer, got {dim!r}.")
        if trace not in TRACES:
            raise InputError(f"CNF: trace must be one of {TRACES}, got {trace!r}.")
        if noise not in NOISES:
            raise InputError(f"CNF: noise must be one of {NOISES}, got {noise!r}.")
        try:
            t1 = float(t1)
        except (TypeError, ValueError):
            raise InputError(f"CNF: t1 must be a number, got {type(t1).__name__}.") from None
        if not math.isfinite(t1) or t1 <= 0:
            raise InputError(f"CNF: t1 must be finite and > 0, got {t1}.")
        weights = {}
        if isinstance(taylor_order, bool) or not isinstance(taylor_order, int) or taylor_order < 1:
            raise InputError(f"CNF: taylor_order must be an integer >= 1, got {taylor_order!r}.")
        for name, w in (("kinetic", kinetic), ("jacobian", jacobian), ("taylor", taylor)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise InputError(f"CNF: {name} must be a finite number >= 0, got {w!r}.")
            weights[name] = float(w)
        if base is not None and not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise InputError("CNF: base must be a torch.distributions.Distribution (log_prob and sample).")
        self.field = CNFField(net, dim, trace, kinetic=weights["kinetic"] > 0, jacobian=weights["jacobian"] > 0,
                              autonomous=autonomous, taylor=weights["taylor"] > 0, taylor_order=taylor_order)
        self.dim = dim
        self.noise = noise
        self.weights = weights
        self.base = base
        self.generator = generator
        sqrt_t1 = torch.tensor(math.sqrt(t1), dtype=torch.get_default_dtype())
        self.t1_fixed = None if train_t1 else t1  # exact in any dtype when not trained
        if train_t1:
            self.sqrt_end_time = nn.Parameter(sqrt_t1)
        else:
            self.register_buffer("sqrt_end_time", sqrt_t1)
        self.solve_kwargs = dict(method=method, rtol=rtol, atol=atol, gradient=gradient, **solve_kwargs)
        self.last_solution: Solution | None = None
        self.penalties: dict[str, Tensor] = {}

    @property
    def end_time(self) -> Tensor:
        """``t1`` as a 0-dim tensor (differentiable when ``train_t1``)."""
        if self.t1_fixed is not None:
            return torch.tensor(self.t1_fixed, dtype=self.sqrt_end_time.dtype, device=self.sqrt_end_time.device)
        return self.sqrt_end_time * self.sqrt_end_time

    # ------------------------------------------------------------------------------------------
    def _flat(self, x: Tensor, who: str) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InputError(f"CNF.{who}: expected a real floating-point tensor.")
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise InputError(f"CNF.{who}: expected shape (B, *event_shape) with {self.dim} features per sample, "
                             f"got {tuple(x.shape)}.")
        return x.reshape(x.shape[0], self.dim)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """Base log-density of ``z`` (``(B, D)`` -> ``(B,)``)."""
        if self.base is None:
            return -0.5 * (z.pow(2).sum(1) + self.dim * math.log(2 * math.pi))
        return self.base.log_prob(z)

    def base_sample(self, n: int, *, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
        """``n`` base samples, shape ``(n, D)``."""
        if self.base is None:
            dtype = dtype or self.sqrt_end_time.dtype
            device = device or self.sqrt_end_time.device
            where = self.generator.device if self.generator is not None else device
            return torch.randn(n, self.dim, generator=self.generator, dtype=dtype, device=where).to(device)
        return self.base.sample((n,))

    def penalty(self) -> Tensor:
        """``sum_k weight_k * mean(E_k)`` over the active penalties of the last solve (0 when none)."""
        out = self.sqrt_end_time.new_zeros(())
        for k, v in self.penalties.items():
            out = out + self.weights[k] * v.mean()
        return out

    def transport(self, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Integrate states ``y`` (``(B, D)``, at ``t[0]``) to every time in ``t`` (``(T,)``, any direction).

        Returns the states ``(T, B, D)`` and the log-determinants ``log|det dz(t)/dz(t[0])|`` ``(T, B)``.
        Draws one Hutchinson probe for the whole solve; sets :attr:`penalties` and :attr:`last_solution`.
        """
        m = len(self.field.active)
        if self.field.trace == "hutchinson":
            self.field.set_probe(draw_probe(y.shape, self.noise, generator=self.generator, dtype=y.dtype,
                                            device=y.device))
        state0 = torch.cat([y, y.new_zeros(y.shape[0], 1 + m)], 1)
        kw = self.solve_kwargs
        if kw.get("per_sample_steps") and t.requires_grad:
            raise InputError("CNF: per_sample_steps=True gives no gradient for the end time; use train_t1=False or "
                             "call under torch.no_grad() (sampling, evaluation).")
        sol = solve(self.field, state0, t, **kw)
        self.last_solution = sol
        ys = sol.ys
        sign = 1.0 if float(t[-1].detach()) >= float(t[0].detach()) else -1.0
        self.penalties = {k: sign * ys[-1][:, self.dim + 1 + i] for i, k in enumerate(self.field.active)}
        return ys[..., :self.dim], ys[..., self.dim]

    def _times(self, reverse: bool, ref: Tensor) -> Tensor:
        if self.t1_fixed is not None:
            t = torch.tensor([0.0, self.t1_fixed], dtype=ref.dtype, device=ref.device)
        else:
            t1 = self.end_time.to(ref.dtype)
            t = torch.stack([torch.zeros_like(t1), t1])
        return t.flip(0) if reverse else t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to base: ``x`` ``(B, *event_shape)`` -> ``z`` ``(B, D)`` and ``log|det dz/dx|`` ``(B,)``."""
        xf = self._flat(x, "forward")
        zs, ld = self.transport(xf, self._times(False, xf))
        return zs[-1], ld[-1]

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base to data: ``z`` ``(B, D)`` -> ``x`` ``(B, D)`` and ``log|det dx/dz|`` ``(B,)``."""
        zf = self._flat(z, "inverse")
        xs, ld = self.transport(zf, self._times(True, zf))
        return xs[-1], ld[-1]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, ``(B, *event_shape)`` -> ``(B,)``."""
        z, ld = self.forward(x)
        return self.base_log_prob(z) + ld

    def sample(self, n: int) -> Tensor:
        """``n`` samples of the model density, shape ``(n, D)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"CNF.sample: n must be a positive integer, got {n!r}.")
        return self.inverse(self.base_sample(n))[0]


class CNFStack(nn.Module):
    """Several CNF blocks in sequence: ``x -> block_1 -> ... -> block_K -> z`` (base density of the stack).

    Parameters
    ----------
    blocks : sequence of CNF
        The blocks, all of the same ``dim`` (their own ``base`` is ignored).
    base : torch.distributions.Distribution, optional
        Base density (default standard normal).

    Examples
    --------
    >>> from neurodyn.models import CNF, CNFStack, ODEnet
    >>> flow = CNFStack([CNF(ODEnet(2, (16,)), dim=2) for _ in range(2)])
    >>> flow.log_prob(torch.randn(3, 2)).shape
    torch.Size([3])
    """

    def __init__(self, blocks: Sequence[CNF], base: Any = None):
        super().__init__()
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, CNF) for b in blocks):
            raise InputError("CNFStack: blocks must be a non-empty sequence of CNF.")
        if len({b.dim for b in blocks}) != 1:
            raise InputError(f"CNFStack: every block must have the same dim, got {[b.dim for b in blocks]}.")
        self.blocks = nn.ModuleList(blocks)
        self.dim = blocks[0].dim
        self.base = base

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to base: ``(B, *event_shape)`` -> ``z`` ``(B, D)``, summed ``log|det|`` ``(B,)``."""
        z, total = x, None
        for b in self.blocks:
            z, ld = b(z)
            total = ld if total is None else total + ld
        return z, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base to data: ``(B, D)`` -> ``x`` ``(B, D)``, summed ``log|det dx/dz|`` ``(B,)``."""
        x, total = z, None
        for b in reversed(self.blocks):
            x, ld = b.inverse(x)
            total = ld if total is None else total + ld
        return x, total

    def base_log_prob(self, z: Tensor) -> Tensor:
        if self.base is None:
            return -0.5 * (z.pow(2).sum(1) + self.dim * math.log(2 * math.pi))
        return self.base.log_prob(z)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, ``(B,)``."""
        z, ld = self.forward(x)
        return self.base_log_prob(z) + ld

    def penalty(self) -> Tensor:
        """Sum of the blocks' RNODE penalties of their last solves."""
        return sum((b.penalty() for b in self.blocks), self.blocks[0].sqrt_end_time.new_zeros(()))

    def sample(self, n: int) -> Tensor:
        """``n`` samples, ``(n, D)``."""
        first = self.blocks[-1]
        z = first.base_sample(n) if self.base is None else self.base.sample((n,))
        return self.inverse(z)[0]
