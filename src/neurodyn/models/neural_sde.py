"""``NeuralSDE`` and ``LatentSDE``: thin ``nn.Module``s over :func:`neurodyn.solve` with SDE methods.

``NeuralSDE`` solves ``dy = f(t, y) dt + g(t, y) dW`` for learned ``f`` (drift) and ``g`` (diffusion).
``LatentSDE`` is a variational model of time series (Li et al. 2020): a GRU encoder gives a context, a posterior SDE
(drift conditioned on the context) and a prior SDE (drift ``h``) share one diagonal diffusion ``g``; the path's KL term
``logqp = int_0^T |(f - h) / g|^2 / 2 dt`` is an extra state channel of the same solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.term import NOISE_TYPES, SDE_TYPES, sde_term
from ..errors import InputError
from ..fields import takes_time
from ..paths.brownian import BrownianInterval
from ..solution import Solution
from ..solve import solve
from .neural_ode import select_output

OUTPUTS = ("final", "trajectory", "solution")
LIKELIHOODS = ("gaussian", "laplace")
#: The Levy area a method needs from a Brownian path built here (others: ``"none"``).
METHOD_LEVY = {"srk": "space-time", "log_ode": "foster"}


class _Field(nn.Module):
    """A user's ``f(t, y)`` or ``f(y)`` as ``(t, y) -> Tensor``."""

    def __init__(self, func: Callable, with_time: bool):
        super().__init__()
        self.func = func
        self.with_time = with_time

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.func(t, y) if self.with_time else self.func(y)


def _times(t: Sequence[float] | Tensor, like: Tensor, who: str) -> Tensor:
    tt = torch.as_tensor(t)
    if tt.dim() != 1 or tt.numel() < 2:
        raise InputError(f"{who}: t must be a 1-D sequence of at least 2 increasing times, got shape "
                         f"{tuple(tt.shape)}.")
    tt = tt.to(device=like.device, dtype=like.dtype)
    if not bool((tt[1:] > tt[:-1]).all()):
        raise InputError(f"{who}: t must be strictly increasing (the Brownian path runs forward), got "
                         f"{tt.tolist()}.")
    return tt


def brownian_for(method: str, shape: Sequence[int], t0: float, t1: float, dtype: torch.dtype,
                 device: torch.device, entropy: int | None = None,
                 levy_area: str | None = None) -> BrownianInterval:
    """A :class:`BrownianInterval` on ``[t0, t1]`` of ``shape`` with the Levy area ``method`` needs.

    Example: ``brownian_for("srk", (512, 64), 0.0, 1.0, torch.float32, torch.device("cpu"), entropy=0)``.
    """
    area = levy_area if levy_area is not None else METHOD_LEVY.get(method, "none")
    return BrownianInterval(t0, t1, shape=tuple(shape), dtype=dtype, device=device, entropy=entropy, levy_area=area)


class NeuralSDE(nn.Module):
    """A Neural SDE layer: ``dy = f(t, y) dt + g(t, y) dW`` solved by :func:`neurodyn.solve` (SDE methods).

    Parameters
    ----------
    drift : nn.Module or callable
        ``f(t, y)`` or ``f(y)`` (detected from the signature, or set ``autonomous``), output of ``y``'s shape.
    diffusion : nn.Module or callable
        ``g(t, y)`` or ``g(y)``; shape by ``noise``: ``"diagonal"`` ``y.shape``; ``"scalar"`` ``(*y.shape, 1)``;
        ``"general"`` / ``"additive"`` ``(*y.shape, m)`` with ``m = brownian_size`` (``"additive"``: independent of
        ``y``; ``y.shape`` when ``brownian_size`` is None).
    t : sequence of floats or Tensor, shape ``(T,)``, increasing
        Default output times (``forward(y0, t=...)`` overrides them).
    noise : ``"diagonal"``, ``"scalar"``, ``"general"``, ``"additive"``
    sde_type : ``"ito"`` or ``"stratonovich"``
    brownian_size : int, optional
        ``m``, the Brownian channels for ``"general"`` and ``"additive"`` noise (required for ``"general"``).
    method : str
        An SDE method (``"euler"``, ``"milstein"``, ``"srk"``, ``"heun"``, ``"midpoint"``, ``"euler_heun"``,
        ``"log_ode"``, ``"reversible_heun"``).
    step_size : float, optional
        Fixed step ``dt``; None: adaptive steps (``rtol``, ``atol``; the error estimate of :mod:`neurodyn.solvers.sde`).
    gradient : ``"direct"``, ``"checkpoint"`` or ``"adjoint"`` (any gradient :func:`neurodyn.solve` accepts for SDEs)
    entropy : int, optional
        Seed of the Brownian path each forward builds: an int gives the same path at every call; None draws a new
        one per call from torch's global generator (``torch.manual_seed`` fixes the sequence).
    levy_area : str, optional
        Levy area of the built path (default: what ``method`` needs).
    output : ``"trajectory"`` (default; ``(T, *y0.shape)``), ``"final"`` or ``"solution"``
    **solve_options : other keywords of :func:`neurodyn.solve` (``max_steps``, ``on_failure``, ...)

    Attributes
    ----------
    last_solution : Solution
        The last forward solve (``stats["nfe"]``: drift evaluations).

    Examples
    --------
    >>> import torch, neurodyn
    >>> f = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> g = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid())
    >>> model = neurodyn.models.NeuralSDE(f, g, t=(0.0, 0.5, 1.0), method="euler", step_size=0.05, entropy=0)
    >>> ys = model(torch.randn(8, 2))          # (3, 8, 2): y at t = 0, 0.5, 1 for a batch of 8
    >>> ys.shape
    torch.Size([3, 8, 2])
    >>> ys[-1].pow(2).mean().backward()
    """

    def __init__(self, drift: Callable, diffusion: Callable, t: Sequence[float] | Tensor = (0.0, 1.0), *,
                 noise: str = "diagonal", sde_type: str = "ito", brownian_size: int | None = None,
                 method: str = "euler", step_size: float | None = None, rtol: float = 1e-3, atol: float = 1e-3,
                 gradient: str = "direct", entropy: int | None = None, levy_area: str | None = None,
                 output: str = "trajectory", autonomous: bool | None = None, **solve_options: Any):
        super().__init__()
        for name, fn in (("drift", drift), ("diffusion", diffusion)):
            if not callable(fn):
                raise InputError(f"NeuralSDE: {name} must be callable, got {type(fn).__name__}.")
        if noise not in NOISE_TYPES:
            raise InputError(f"NeuralSDE: noise must be one of {list(NOISE_TYPES)}, got {noise!r}.")
        if sde_type not in SDE_TYPES:
            raise InputError(f"NeuralSDE: sde_type must be one of {list(SDE_TYPES)}, got {sde_type!r}.")
        if noise == "general" and brownian_size is None:
            raise InputError("NeuralSDE: noise='general' needs brownian_size=m (the Brownian channels; the "
                             "diffusion returns (*y.shape, m)).")
        if brownian_size is not None and (not isinstance(brownian_size, int) or brownian_size < 1):
            raise InputError(f"NeuralSDE: brownian_size must be a positive int, got {brownian_size!r}.")
        if output not in OUTPUTS:
            raise InputError(f"NeuralSDE: output must be one of {OUTPUTS}, got {output!r}.")
        if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
            raise InputError(f"NeuralSDE: step_size must be a positive number or None, got {step_size!r}.")
        self.drift = _Field(drift, (not autonomous) if autonomous is not None else takes_time(drift))
        self.diffusion = _Field(diffusion, (not autonomous) if autonomous is not None else takes_time(diffusion))
        self.t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t.detach()
        self.noise, self.sde_type, self.brownian_size = noise, sde_type, brownian_size
        self.method, self.step_size, self.rtol, self.atol, self.gradient = method, step_size, rtol, atol, gradient
        self.entropy, self.levy_area, self.output = entropy, levy_area, output
        self.solve_options = dict(solve_options)
        self.last_solution: Solution | None = None

    def brownian_shape(self, y0: Tensor) -> tuple[int, ...]:
        """Shape of ``W(t)`` for a state ``y0``: ``y0.shape`` (diagonal), ``(*batch, 1)`` (scalar), ``(*batch, m)``."""
        if self.noise == "scalar":
            return (*y0.shape[:-1], 1)
        if self.noise in ("general", "additive") and self.brownian_size is not None:
            return (*y0.shape[:-1], self.brownian_size)
        return tuple(y0.shape)

    def forward(self, y0: Tensor, t: Tensor | None = None, bm: Any = None,
                entropy: int | None = None) -> Tensor | Solution:
        """Solve from ``y0`` (shape ``(*batch, d)``) at ``t[0]``; returns what ``output`` says.

        ``bm``: a Brownian path over ``[t[0], t[-1]]`` of shape :meth:`brownian_shape` (built from ``entropy``, or
        the module's, when None). The same ``bm`` gives the same sample path in every call.
        """
        tt = _times(self.t if t is None else t, y0, "NeuralSDE")
        if bm is None:
            ent = entropy if entropy is not None else self.entropy
            bm = brownian_for(self.method, self.brownian_shape(y0), float(tt[0]), float(tt[-1]), y0.dtype,
                              y0.device, ent, self.levy_area)
        term = sde_term(self.drift, self.diffusion, bm, noise=self.noise, sde_type=self.sde_type)
        opts = dict(self.solve_options)
        if self.step_size is not None:
            opts["step_size"] = self.step_size
        sol = solve(term, y0, tt, method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient,
                    dense=self.output == "solution", **opts)
        self.last_solution = sol
        return select_output(sol, self.output)

    def extra_repr(self) -> str:
        return (f"noise={self.noise!r}, sde_type={self.sde_type!r}, method={self.method!r}, "
                f"step_size={self.step_size}, gradient={self.gradient!r}")


class DiagonalDiffusion(nn.Module):
    """``g(z)_i = sigmoid(MLP_i(z_i))``: one small network per latent dimension (a diagonal diffusion).

    Input ``(*batch, d)``, output ``(*batch, d)`` in ``(0, 1)``; the ``d`` networks run as one batched product.

    Example: ``DiagonalDiffusion(4, 16)(torch.randn(8, 4)).shape == (8, 4)``.
    """

    def __init__(self, size: int, hidden: int):
        super().__init__()
        bound1, bound2 = 1.0, 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(size, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(size, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(size, hidden).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(size))

    def forward(self, z: Tensor) -> Tensor:
        hid = nn.functional.softplus(z.unsqueeze(-1) * self.w1 + self.b1)
        return torch.sigmoid((hid * self.w2).sum(-1) + self.b2)


class _StateKey:
    """What identifies a state tensor for reusing a value computed from it: the tensor it views (the same object,
    held here so that it stays alive: also the same autograd identity, a detached copy is another), its version
    counter (in-place changes), the view's offset, shape and strides, and the grad mode (a value computed without
    autograd has no graph to differentiate)."""

    __slots__ = ("root", "rest")

    def __init__(self, y: Tensor):
        self.root = y._base if y._base is not None else y
        self.rest = (self.root._version, y.storage_offset(), tuple(y.shape), y.stride(), y.requires_grad,
                     torch.is_grad_enabled())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StateKey) and other.root is self.root and other.rest == self.rest

    __hash__ = None  # type: ignore[assignment]


def _state_key(y: Tensor) -> _StateKey:
    return _StateKey(y)


class PosteriorSDE:
    """The posterior SDE of one :meth:`LatentSDE.posterior` solve, on the augmented state ``y = [z, logqp]``
    ``(B, d + 1)``: it holds the observation times ``ts`` ``(T,)`` and the encoder's contexts ``ctx``
    ``(T, B, C)``, so every evaluation of its drift -- in the forward solve, a checkpoint replay, an adjoint's
    backward solve -- sees the same context. ``ctx`` is among :meth:`grad_tensors`: the gradient methods that
    differentiate the field themselves (``"checkpoint"``, ``"adjoint"``) pass its gradient on to the encoder.

    Example: ``sde = model.posterior_sde(ts, model.encode(xs)); sde.drift(ts[0], y0).shape == y0.shape``.
    """

    def __init__(self, model: LatentSDE, ts: Tensor, ctx: Tensor):
        if ctx.dim() != 3 or ctx.shape[0] != ts.numel():
            raise InputError(f"PosteriorSDE: ctx must have shape ({ts.numel()}, B, C) (one context per time of ts), "
                             f"got {tuple(ctx.shape)}.")
        self.model, self.ts, self.ctx = model, ts.detach(), ctx
        # The diffusion g(z) the drift computed last, with the state it was computed at (see _StateKey): the step's
        # diffusion at that state reuses it (g is evaluated once per state, as torchsde's logqp wrapper).
        self._g_last: tuple[_StateKey, Tensor] | None = None

    def context(self, t: Tensor) -> Tensor:
        """The context at time ``t``, ``(B, C)``: that of the first observation time strictly after ``t`` (the last
        one at and after the final time)."""
        ts = self.ts
        i = torch.searchsorted(ts, t.reshape(1).to(ts.dtype), right=True).clamp(max=ts.numel() - 1)
        return self.ctx.index_select(0, i)[0]

    def drift(self, t: Tensor, y: Tensor) -> Tensor:
        """``[f, |(f - h) / g|^2 / 2]``, ``(B, d + 1)``: the posterior drift and the KL integrand."""
        m = self.model
        z = y[..., : m.latent_size]
        f = m.f_net(torch.cat([z, self.context(t)], dim=-1))
        g = m.g_net(z)
        self._g_last = (_state_key(y), g)
        u = (f - m.h_net(z)) / g
        return torch.cat([f, 0.5 * (u * u).sum(-1, keepdim=True)], dim=-1)

    def diffusion(self, t: Tensor, y: Tensor) -> Tensor:
        """Diagonal diffusion ``[g(z), 0]``, ``(B, d + 1)``; the ``g(z)`` the drift computed at the same state (the
        same tensor, unmodified, under the same grad mode) is reused."""
        last = self._g_last
        if last is not None and last[0] == _state_key(y):
            g = last[1]
        else:
            g = self.model.g_net(y[..., : self.model.latent_size])
        return torch.cat([g, torch.zeros_like(g[..., :1])], dim=-1)

    def grad_tensors(self) -> list[Tensor]:
        """The tensors requiring grad that the drift and diffusion use: the parameters of ``f_net``, ``h_net``,
        ``g_net`` and the contexts ``ctx`` (not the encoder's parameters: they reach the solve only through ``ctx``,
        whose gradient autograd passes on to them)."""
        m = self.model
        out = [p for net in (m.f_net, m.h_net, m.g_net) for p in net.parameters() if p.requires_grad]
        return out + ([self.ctx] if self.ctx.requires_grad else [])


class _LeadingRMS:
    """The RMS of the scaled error over the first ``n`` channels of its last dimension (an error norm for
    :func:`neurodyn.solve`: the adaptive posterior solve controls the error of ``z``, not of the ``logqp`` channel)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, scaled: Tensor) -> Tensor:
        return scaled[..., : self.n].pow(2).mean().sqrt()


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                         nn.Linear(hidden, n_out))


class LatentSDE(nn.Module):
    """A latent SDE for time series (Li et al. 2020): GRU encoder, posterior and prior SDEs, decoder, ELBO.

    Posterior ``dz = f(z, ctx(t)) dt + g(z) dW``, prior ``dz = h(z) dt + g(z) dW`` (Ito, diagonal noise, shared
    ``g``); ``z(t0) ~ N(mu(ctx_0), sigma(ctx_0)^2)`` against the learned prior ``N(m0, s0^2)``; observations
    ``x(t) ~ Normal(W z(t) + b, scale)`` or ``Laplace(W z(t) + b, scale)``. The context ``ctx(t)`` is the encoder's
    output at the first observation time ``>= t`` (strictly after ``t`` between observations): a GRU run over the
    observations from last to first, so it summarises the observations still ahead.

    ELBO per series: ``log p(x | z) - KL(q(z0) || p(z0)) - logqp``, ``logqp = int |(f - h) / g|^2 / 2 dt`` integrated
    as channel ``d`` of the posterior solve (state ``(B, d + 1)``; that channel has no noise).

    Parameters
    ----------
    data_size : int
        Observation dimension ``D``.
    latent_size, context_size, hidden_size : int
        ``d``, the context width, and the hidden width of the networks.
    likelihood : ``"gaussian"`` or ``"laplace"``
    obs_scale : float
        The likelihood's fixed scale.
    method, step_size, gradient, rtol, atol :
        The SDE solve (``step_size=None``: adaptive steps). Posterior steps land on the observation times (the
        drift's context changes there, passed as ``jump_t``). Adaptive posterior steps control the error of ``z``
        only (``logqp``, a drift-only integral of ``z``, is left out of the error norm) unless a ``norm`` is given.
        Each posterior solve's drift and diffusion are those of a :class:`PosteriorSDE` holding its contexts, which
        it declares as tensors needing gradients: with ``gradient="checkpoint"`` or ``"adjoint"`` the encoder gets
        its gradient through the drift as with ``"direct"``.
    **solve_options : other keywords of :func:`neurodyn.solve`.

    Notes
    -----
    Shapes: ``xs`` ``(T, B, D)``, ``ts`` ``(T,)``; latent paths ``(T, B, d)``.

    Examples
    --------
    >>> import torch
    >>> from neurodyn.models import LatentSDE
    >>> model = LatentSDE(3, latent_size=4, context_size=8, hidden_size=16, step_size=0.05)
    >>> ts, xs = torch.linspace(0, 1, 11), torch.randn(11, 5, 3)
    >>> out = model.elbo(xs, ts, entropy=0)
    >>> out["loss"].backward()            # -ELBO per series, averaged over the batch
    >>> sorted(out)
    ['elbo', 'kl', 'kl0', 'log_lik', 'logqp', 'loss', 'zs']
    """

    def __init__(self, data_size: int, latent_size: int = 4, context_size: int = 64, hidden_size: int = 64, *,
                 likelihood: str = "gaussian", obs_scale: float = 0.01, method: str = "euler",
                 step_size: float | None = 0.01, gradient: str = "direct", rtol: float = 1e-3, atol: float = 1e-3,
                 **solve_options: Any):
        super().__init__()
        for name, v in (("data_size", data_size), ("latent_size", latent_size), ("context_size", context_size),
                        ("hidden_size", hidden_size)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"LatentSDE: {name} must be a positive int, got {v!r}.")
        if likelihood not in LIKELIHOODS:
            raise InputError(f"LatentSDE: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if not obs_scale > 0:
            raise InputError(f"LatentSDE: obs_scale must be positive, got {obs_scale!r}.")
        self.data_size, self.latent_size = data_size, latent_size
        self.gru = nn.GRU(data_size, hidden_size)
        self.ctx_out = nn.Linear(hidden_size, context_size)
        self.qz0_net = nn.Linear(context_size, 2 * latent_size)
        self.f_net = _mlp(latent_size + context_size, hidden_size, latent_size)
        self.h_net = _mlp(latent_size, hidden_size, latent_size)
        self.g_net = DiagonalDiffusion(latent_size, max(hidden_size // 4, 1))
        self.projector = nn.Linear(latent_size, data_size)
        self.pz0_mean = nn.Parameter(torch.zeros(1, latent_size))
        self.pz0_logstd = nn.Parameter(torch.zeros(1, latent_size))
        self.likelihood, self.obs_scale = likelihood, float(obs_scale)
        self.method, self.step_size, self.gradient, self.rtol, self.atol = method, step_size, gradient, rtol, atol
        self.solve_options = dict(solve_options)
        self.last_solution: Solution | None = None

    # ------------------------------------------------------------------ the SDEs
    def posterior_sde(self, ts: Tensor, ctx: Tensor) -> PosteriorSDE:
        """The posterior SDE for observation times ``ts`` ``(T,)`` and contexts ``ctx = encode(xs)``
        ``(T, B, C)`` (see :class:`PosteriorSDE`)."""
        return PosteriorSDE(self, ts, ctx)

    def prior_drift(self, t: Tensor, z: Tensor) -> Tensor:
        """``h(z)``, ``(B, d)``."""
        return self.h_net(z)

    def prior_diffusion(self, t: Tensor, z: Tensor) -> Tensor:
        """``g(z)``, ``(B, d)``."""
        return self.g_net(z)

    # ------------------------------------------------------------------ pieces
    def encode(self, xs: Tensor) -> Tensor:
        """Contexts ``(T, B, context_size)``: row ``i`` summarises ``xs[i:]`` (a GRU run from last to first)."""
        out, _ = self.gru(xs.flip(0))
        return self.ctx_out(out).flip(0)

    def qz0(self, ctx0: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and std of ``z(t0)``, each ``(B, d)``, from the first context ``(B, C)``."""
        mean, logstd = self.qz0_net(ctx0).chunk(2, dim=-1)
        return mean, logstd.exp()

    def log_likelihood(self, xs: Tensor, zs: Tensor) -> Tensor:
        """``sum_{t, D} log p(x_t | z_t)`` per series, shape ``(B,)``; ``xs`` ``(T, B, D)``, ``zs`` ``(T, B, d)``."""
        mu = self.projector(zs)
        b = self.obs_scale
        if self.likelihood == "gaussian":
            lp = -0.5 * ((xs - mu) / b) ** 2 - math.log(b) - 0.5 * math.log(2 * math.pi)
        else:
            lp = -(xs - mu).abs() / b - math.log(2 * b)
        return lp.sum(dim=(0, 2))

    def _solve(self, term: Any, y0: Tensor, ts: Tensor, jumps: Tensor | None = None,
               params: list[Tensor] | None = None, error_dims: int | None = None) -> Solution:
        opts = dict(self.solve_options)
        if self.step_size is not None:
            opts["step_size"] = self.step_size
        elif error_dims is not None and opts.get("norm") is None:
            # Adaptive steps: the error norm over the first error_dims channels (the posterior's z, not logqp).
            opts["norm"] = _LeadingRMS(error_dims)
        if jumps is not None and jumps.numel():
            # Steps land on the times where the drift jumps and evaluate it just past them in the direction of
            # travel: adaptive steps (an error estimate across a jump measures the jump, not the step) and the
            # backward solve of gradient="adjoint" (which runs from each observation time into the interval before
            # it, where the context is that of the observation time itself).
            given = opts.get("jump_t")
            opts["jump_t"] = jumps if given is None else torch.cat([torch.as_tensor(given, dtype=jumps.dtype,
                                                                                    device=jumps.device).reshape(-1),
                                                                    jumps])
        if params:
            # Tensors the field closes over (the posterior's contexts): "checkpoint" and "adjoint" differentiate
            # the field with respect to them and pass their gradients on.
            given = opts.get("params")
            opts["params"] = [*params, *(given if given is not None else ())]
        sol = solve(term, y0, ts, method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient,
                    **opts)
        self.last_solution = sol
        return sol

    def posterior(self, xs: Tensor, ts: Tensor, bm: Any = None, entropy: int | None = None,
                  eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Sample the posterior: ``(zs (T, B, d), logqp (B,), kl0 (B,))``.

        ``eps`` ``(B, d)``: the standard normal draw of ``z(t0)`` (drawn when None); ``bm``: a Brownian path of shape
        ``(B, d + 1)`` on ``[ts[0], ts[-1]]`` (built from ``entropy`` when None).
        """
        self._check(xs, ts)
        ctx = self.encode(xs)
        mean, std = self.qz0(ctx[0])
        if eps is None:
            eps = torch.randn_like(mean)
        z0 = mean + std * eps
        pm, ps = self.pz0_mean, self.pz0_logstd.exp()
        kl0 = (torch.log(ps / std) + (std ** 2 + (mean - pm) ** 2) / (2 * ps ** 2) - 0.5).sum(-1)
        y0 = torch.cat([z0, torch.zeros_like(z0[:, :1])], dim=-1)
        if bm is None:
            bm = brownian_for(self.method, y0.shape, float(ts[0]), float(ts[-1]), y0.dtype, y0.device, entropy)
        sde = self.posterior_sde(ts, ctx)
        sol = self._solve(sde_term(sde.drift, sde.diffusion, bm), y0, ts, jumps=ts.detach()[1:-1],
                          params=sde.grad_tensors(), error_dims=self.latent_size)
        ys = sol.ys
        return ys[..., : self.latent_size], ys[-1, :, self.latent_size], kl0

    def elbo(self, xs: Tensor, ts: Tensor, *, kl_weight: float = 1.0, bm: Any = None, entropy: int | None = None,
             eps: Tensor | None = None) -> dict[str, Tensor]:
        """The ELBO pieces per series and the loss.

        Returns ``log_lik``, ``kl0``, ``logqp``, ``kl`` (= kl0 + logqp), ``elbo`` (= log_lik - kl), each ``(B,)``;
        ``loss`` (scalar) ``= mean(-log_lik + kl_weight * kl)``; ``zs`` ``(T, B, d)`` the posterior sample.
        """
        zs, logqp, kl0 = self.posterior(xs, ts, bm=bm, entropy=entropy, eps=eps)
        log_lik = self.log_likelihood(xs, zs)
        kl = kl0 + logqp
        return {"log_lik": log_lik, "kl0": kl0, "logqp": logqp, "kl": kl, "elbo": log_lik - kl,
                "loss": (-log_lik + kl_weight * kl).mean(), "zs": zs}

    def forward(self, xs: Tensor, ts: Tensor, bm: Any = None, entropy: int | None = None) -> Tensor:
        """Posterior-sample reconstruction of ``xs``: the decoder's mean at each time, ``(T, B, D)``."""
        zs, _, _ = self.posterior(xs, ts, bm=bm, entropy=entropy)
        return self.projector(zs)

    def sample_prior(self, ts: Tensor, batch: int, bm: Any = None, entropy: int | None = None) -> Tensor:
        """Decoder means along prior sample paths, ``(T, batch, D)``."""
        ts = _times(ts, self.pz0_mean, "LatentSDE")
        z0 = self.pz0_mean + self.pz0_logstd.exp() * torch.randn(batch, self.latent_size, dtype=ts.dtype,
                                                                   device=ts.device)
        if bm is None:
            bm = brownian_for(self.method, z0.shape, float(ts[0]), float(ts[-1]), z0.dtype, z0.device, entropy)
        sol = self._solve(sde_term(self.prior_drift, self.prior_diffusion, bm), z0, ts)
        return self.projector(sol.ys)

    def _check(self, xs: Tensor, ts: Tensor) -> None:
        if xs.dim() != 3 or xs.shape[-1] != self.data_size:
            raise InputError(f"LatentSDE: xs must have shape (T, B, {self.data_size}), got {tuple(xs.shape)}.")
        if ts.dim() != 1 or ts.numel() != xs.shape[0]:
            raise InputError(f"LatentSDE: ts must have shape ({xs.shape[0]},) (one time per row of xs), got "
                             f"{tuple(ts.shape)}.")
        _times(ts, xs, "LatentSDE")
