"""Score-based diffusion with the variance-preserving SDE (Song et al. 2021), on neurodyn's SDE and ODE solves.

The forward (noising) SDE on ``t`` in ``[0, 1]``, Ito, additive noise::

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,     beta(t) = beta_min + t (beta_max - beta_min)

has Gaussian transition kernels ``x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I)`` with
``alpha_t = exp(-1/2 int_0^t beta)`` and ``sigma_t^2 = 1 - alpha_t^2`` (:meth:`VPSDE.marginal`). A score model
``s(t, x) ~ grad log p_t(x)`` is trained by denoising score matching (:func:`denoising_score_matching_loss`,
weighting ``lambda(t) = sigma_t^2``). Samples come from

* the reverse-time SDE ``dx = [f - g^2 s] dt + g dW`` integrated from ``t = 1`` down to ``t = eps``
  (:func:`reverse_sde_sample`: one :func:`neurodyn.solve` of a :func:`neurodyn.sde_term` with negative steps; each
  step's Brownian increment over ``[t + h, t]`` has variance ``|h|``, so Euler--Maruyama backward in time is the
  reverse-diffusion discretisation), or
* the probability-flow ODE ``dx/dt = f - 1/2 g^2 s`` (:func:`probability_flow_sample`, any ODE method), which
  has the same marginals ``p_t``.

The probability-flow ODE is a continuous normalizing flow: :func:`probability_flow_cnf` wraps it in
:class:`neurodyn.models.CNF` (data at ``t = eps``, prior at ``t = 1``; exact trace or Hutchinson's), so
``log p_eps(x)`` is ``CNF.log_prob`` (:func:`probability_flow_log_likelihood`).

Example::

    sde = VPSDE()
    score = ScoreModel(VelocityMLP(2, width=128, activation=nn.SiLU), sde)
    opt = torch.optim.Adam(score.parameters(), 1e-3)
    for _ in range(5000):
        loss = denoising_score_matching_loss(score, sample_2d("8gaussians", 256), sde)
        opt.zero_grad(); loss.backward(); opt.step()
    x = reverse_sde_sample(score, sde, sde.prior_sample(1000, 2), step_size=1e-3).samples
    logp, nfe = probability_flow_log_likelihood(score, sde, test_x)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.term import sde_term
from ..errors import InputError
from ..paths.brownian import BrownianInterval
from ..solve import solve
from .cnf import CNF
from .flow_matching import FlowSamples, sample_flow

__all__ = [
    "ProbabilityFlowField",
    "ReverseSamples",
    "ScoreModel",
    "VPSDE",
    "denoising_score_matching_loss",
    "probability_flow_cnf",
    "probability_flow_log_likelihood",
    "probability_flow_sample",
    "reverse_sde_sample",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _column(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` (number, 0-dim, or ``(B,)``) as a tensor broadcastable against ``x`` ``(B, *dim)``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t if t.dim() == 0 else t.reshape(-1, *([1] * (x.dim() - 1)))


def _positive_finite(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise InputError(f"VPSDE: {name} must be a finite number > 0, got {v!r}.")
    return float(v)


class VPSDE:
    """The variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW`` on ``[0, 1]`` with the linear
    schedule ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021: 0.1 and 20).

    All methods take ``t`` as a number, a 0-dim tensor or a ``(B,)`` tensor (one time per sample) and broadcast it
    against ``x`` ``(B, *dim)``.

    Examples
    --------
    >>> sde = VPSDE()
    >>> alpha, sigma = sde.marginal_coefficients(torch.tensor(1.0))
    >>> round(float(alpha), 5), round(float(sigma), 5)
    (0.00657, 0.99998)
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = _positive_finite("beta_min", beta_min)
        self.beta_max = _positive_finite("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise InputError(f"VPSDE: need beta_max >= beta_min, got {beta_max} < {beta_min}.")

    def beta(self, t: Tensor) -> Tensor:
        """``beta(t)``, same shape as ``t``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log alpha_t = -1/2 int_0^t beta = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``."""
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` with ``x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I)``; ``sigma_t^2 = 1 - alpha_t^2``
        (computed as ``-expm1(2 log alpha_t)``, accurate for small ``t``)."""
        la = self.log_alpha(t)
        return la.exp(), torch.sqrt(-torch.expm1(2 * la))

    def marginal(self, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean ``alpha_t x0`` ``(B, *dim)`` and std ``sigma_t`` (broadcastable) of ``x_t`` given ``x0``."""
        alpha, sigma = self.marginal_coefficients(_column(t, x0))
        return alpha * x0, sigma

    def drift(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``f(t, x) = -1/2 beta(t) x``."""
        return -0.5 * self.beta(_column(t, x)) * x

    def diffusion(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``g(t) = sqrt(beta(t))`` broadcast to ``x``'s shape (additive noise, one channel per coordinate)."""
        return torch.sqrt(self.beta(_column(t, x))).expand_as(x)

    def prior_sample(self, n: int, dim: int, *, dtype: torch.dtype | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``(n, dim)`` from the prior ``N(0, I)`` (the ``t = 1`` marginal up to ``alpha_1 ~ 7e-3``)."""
        return torch.randn(n, dim, generator=generator, dtype=dtype)


class ScoreModel(nn.Module):
    """A score ``s(t, x) = -net(t, x) / sigma_t``: ``net`` predicts the noise ``z`` of ``x_t = alpha_t x_0 +
    sigma_t z`` (Ho et al.'s parametrisation; the ``1/sigma_t`` scale is Song et al.'s ``scale_by_sigma``).

    ``net(t, x)``: ``t`` a 0-dim or ``(B,)`` tensor, ``x`` ``(B, dim)`` -> ``(B, dim)`` (e.g.
    :class:`~neurodyn.models.flow_matching.VelocityMLP`). ``forward(t, x)`` returns ``(B, dim)``.

    Example: ``ScoreModel(VelocityMLP(2), VPSDE())(torch.tensor(0.5), torch.randn(4, 2)).shape == (4, 2)``.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], sde: VPSDE):
        super().__init__()
        if not callable(net):
            raise InputError(f"ScoreModel: net must be callable, got {type(net).__name__}.")
        if not isinstance(sde, VPSDE):
            raise InputError(f"ScoreModel: sde must be a VPSDE, got {type(sde).__name__}.")
        self.net = net
        self.sde = sde

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        _, sigma = self.sde.marginal_coefficients(_column(t, x))
        return -self.net(t, x) / sigma


def _check_eps(eps: float, who: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise InputError(f"{who}: eps must be a number in (0, 1), got {eps!r}.")
    return float(eps)


def _check_batch(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{who}: expected a floating-point tensor of shape (B, d), got {shape}.")


def denoising_score_matching_loss(score: ScoreFn, x0: Tensor, sde: VPSDE, *, eps: float = 1e-5,
                                  t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """Denoising score matching with ``lambda(t) = sigma_t^2``:

        L = E_{t ~ U[eps, 1], x0, z ~ N(0, I)} || sigma_t s(t, alpha_t x0 + sigma_t z) + z ||^2

    (sum over features, mean over the batch). Its minimiser is the marginal score ``grad log p_t``, because
    ``L = E sigma_t^2 ||s - grad log p_t||^2 + const``.

    Parameters
    ----------
    score : callable ``(t (B,), x (B, d)) -> (B, d)``
    x0 : Tensor ``(B, d)``
        Data batch.
    sde : VPSDE
    eps : float
        Smallest time drawn.
    t, noise : Tensor, optional
        ``(B,)`` times and ``(B, d)`` noise to use instead of drawing them (``torch.rand`` then ``torch.randn``).

    Examples
    --------
    ``loss = denoising_score_matching_loss(score, sample_2d("8gaussians", 256), VPSDE())``.
    """
    _check_batch(x0, "denoising_score_matching_loss")
    eps = _check_eps(eps, "denoising_score_matching_loss")
    b = x0.shape[0]
    if t is None:
        t = eps + (1 - eps) * torch.rand(b, dtype=x0.dtype, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    if t.shape != (b,) or noise.shape != x0.shape:
        raise InputError(f"denoising_score_matching_loss: t must be ({b},) and noise {tuple(x0.shape)}, got "
                         f"{tuple(t.shape)} and {tuple(noise.shape)}.")
    mean, sigma = sde.marginal(x0, t)
    s = score(t, mean + sigma * noise)
    return (sigma * s + noise).pow(2).sum(1).mean()


class ProbabilityFlowField(nn.Module):
    """The probability-flow ODE's field ``f(t, x) - 1/2 g(t)^2 s(t, x)`` at ``t = t0 + tau``: ``forward(tau, x)``.

    ``t0 = 0`` gives the field in diffusion time; :func:`probability_flow_cnf` uses ``t0 = eps`` so that a CNF on
    ``[0, 1 - eps]`` runs from the data (``t = eps``) to the prior (``t = 1``).

    Example: ``ProbabilityFlowField(score, VPSDE())(torch.tensor(0.3), torch.randn(5, 2)).shape == (5, 2)``.
    """

    def __init__(self, score: ScoreFn, sde: VPSDE, t0: float = 0.0):
        super().__init__()
        self.score, self.sde, self.t0 = score, sde, float(t0)

    def forward(self, tau: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(tau, dtype=x.dtype, device=x.device) + self.t0
        tc = _column(t, x)
        return self.sde.drift(tc, x) - 0.5 * self.sde.beta(tc) * self.score(t, x)


def probability_flow_sample(score: ScoreFn, sde: VPSDE, z: Tensor, *, eps: float = 1e-3, n_times: int = 2,
                            method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                            **solve_kwargs: Any) -> FlowSamples:
    """Samples by the probability-flow ODE: prior draws ``z`` ``(B, d)`` at ``t = 1`` integrated down to
    ``t = eps`` by :func:`~neurodyn.models.flow_matching.sample_flow` (any :func:`neurodyn.solve` method; NFE in
    the result), outputs at ``n_times`` times from 1 to ``eps``.

    Example: ``out = probability_flow_sample(score, sde, torch.randn(1000, 2)); out.samples, out.nfe``.
    """
    _check_batch(z, "probability_flow_sample")
    eps = _check_eps(eps, "probability_flow_sample")
    return sample_flow(ProbabilityFlowField(score, sde), z, t0=1.0, t1=eps, n_times=n_times, method=method,
                       rtol=rtol, atol=atol, **solve_kwargs)


@dataclass
class ReverseSamples:
    """Result of :func:`reverse_sde_sample`: ``samples`` ``(B, d)`` at ``t = eps``, ``nfe`` (drift evaluations,
    each one score evaluation) and the solve's ``stats``."""

    samples: Tensor
    nfe: int
    stats: dict


def reverse_sde_sample(score: ScoreFn, sde: VPSDE, z: Tensor, *, eps: float = 1e-3, method: str = "euler",
                       step_size: float | None = 1e-3, rtol: float = 1e-3, atol: float = 1e-3,
                       bm: Any = None, entropy: int | None = None, **solve_kwargs: Any) -> ReverseSamples:
    """Samples by the reverse-time SDE (Ito, additive noise)

        dx = [f(t, x) - g(t)^2 s(t, x)] dt + g(t) dW,    from t = 1 down to t = eps,

    one :func:`neurodyn.solve` of a :func:`neurodyn.sde_term` with decreasing output times (negative steps;
    ``method``: any Ito SDE method, e.g. ``"euler"`` (Euler--Maruyama, Song et al.'s reverse-diffusion
    predictor) or ``"srk"``; fixed ``step_size``, or adaptive with ``step_size=None`` and ``rtol``/``atol``).
    The Brownian path is ``bm`` if given, else a :class:`~neurodyn.paths.BrownianInterval` on ``[eps, 1]`` seeded
    by ``entropy`` (None: drawn from torch's generator). Runs without autograd.

    ``z``: prior draws ``(B, d)``. Returns :class:`ReverseSamples`.

    Example: ``x = reverse_sde_sample(score, sde, torch.randn(1000, 2), step_size=1e-3).samples``.
    """
    _check_batch(z, "reverse_sde_sample")
    eps = _check_eps(eps, "reverse_sde_sample")
    if step_size is not None and not (isinstance(step_size, (int, float)) and 0 < step_size <= 1 - eps):
        raise InputError(f"reverse_sde_sample: step_size must be in (0, 1 - eps] or None (adaptive), "
                         f"got {step_size!r}.")
    if bm is None:
        if entropy is None:
            entropy = int(torch.randint(0, 2**31 - 1, ()).item())
        levy = "space-time" if method == "srk" else None
        bm = BrownianInterval(eps, 1.0, shape=tuple(z.shape), dtype=z.dtype, device=z.device, entropy=entropy,
                              levy_area=levy)

    def drift(t: Tensor, x: Tensor) -> Tensor:
        return sde.drift(t, x) - sde.beta(_column(t, x)) * score(t, x)

    term = sde_term(drift, sde.diffusion, bm, noise="additive", sde_type="ito")
    ts = torch.tensor([1.0, eps], dtype=z.dtype, device=z.device)
    kw = dict(step_size=step_size) if step_size is not None else dict(rtol=rtol, atol=atol)
    with torch.no_grad():
        sol = solve(term, z, ts, method=method, **kw, **solve_kwargs)
    return ReverseSamples(sol.ys[-1], int(sol.stats["nfe"]), dict(sol.stats))


def probability_flow_cnf(score: ScoreFn, sde: VPSDE, dim: int, *, eps: float = 1e-5, trace: str = "exact",
                         base: Any = None, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                         **cnf_kwargs: Any) -> CNF:
    """The probability-flow ODE as a :class:`neurodyn.models.CNF` on ``[0, 1 - eps]``: CNF time ``tau`` is
    diffusion time ``eps + tau``, so ``CNF.forward`` maps data at ``t = eps`` to the prior at ``t = 1``,
    ``CNF.log_prob(x)`` is ``log p_eps(x)`` (``(B, dim)`` -> ``(B,)``) and ``CNF.sample`` draws by the ODE.

    ``trace``: ``"exact"`` (``dim`` vector-Jacobian products) or ``"hutchinson"`` (``noise=`` in
    ``cnf_kwargs``). ``base``: the prior (default ``N(0, I)``; any ``torch.distributions`` distribution).

    Example: ``flow = probability_flow_cnf(score, VPSDE(), 2); nll = -flow.log_prob(x).mean()``.
    """
    eps = _check_eps(eps, "probability_flow_cnf")
    return CNF(ProbabilityFlowField(score, sde, t0=eps), dim, trace=trace, t1=1.0 - eps, base=base, method=method,
               rtol=rtol, atol=atol, **cnf_kwargs)


def probability_flow_log_likelihood(score: ScoreFn, sde: VPSDE, x: Tensor, *, eps: float = 1e-5,
                                    trace: str = "exact", base: Any = None, chunk: int = 5000,
                                    **cnf_kwargs: Any) -> tuple[Tensor, int]:
    """``log p_eps(x)`` ``(B,)`` of ``x`` ``(B, d)`` under the probability-flow ODE of ``score`` (no autograd graph
    to the parameters), in chunks of ``chunk`` samples, and the NFE of the last solve
    (:func:`probability_flow_cnf`; ``method``, ``rtol``, ``atol``, ``noise``, ... in ``cnf_kwargs``).

    Example: ``logp, nfe = probability_flow_log_likelihood(score, VPSDE(), test_x); nll = -logp.mean()``.
    """
    _check_batch(x, "probability_flow_log_likelihood")
    flow = probability_flow_cnf(score, sde, x.shape[1], eps=eps, trace=trace, base=base, **cnf_kwargs)
    with torch.no_grad():
        logp = torch.cat([flow.log_prob(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    return logp, int(flow.last_solution.stats["nfe"])
