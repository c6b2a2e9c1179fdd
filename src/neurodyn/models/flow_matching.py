"""Flow matching: train a velocity field ``v(t, x)`` by regression on conditional paths, without simulation;
sample by solving ``dx/dt = v(t, x)`` from ``t=0`` to ``1`` with :func:`neurodyn.solve`; evaluate the exact
log-likelihood of the trained flow as a continuous normalizing flow.

Conditional paths (``x0`` a source sample, ``x1`` a target sample, ``t`` in [0, 1], ``eps ~ N(0, I)``)::

    ConditionalFlowMatcher (I-CFM)        x_t = t x1 + (1-t) x0 + sigma eps             u_t = x1 - x0
    ExactOptimalTransportCFM (OT-CFM)     the same path, (x0, x1) drawn from the exact minibatch OT plan
    SchrodingerBridgeCFM (SB-CFM)         x_t = t x1 + (1-t) x0 + sigma sqrt(t(1-t)) eps, pairs from the
                                          entropic plan with reg 2 sigma^2 ("sinkhorn") or the exact plan
                                          u_t = (1-2t) / (2t(1-t)) (x_t - mu_t) + x1 - x0
    TargetCFM (Lipman et al.; rectified   x_t = t x1 + (1 - (1-sigma) t) eps-scaled   u_t = (x1 - (1-sigma) x_t) /
      flow for sigma=0)                   source: mu_t = t x1, sigma_t = 1 - (1-sigma) t      (1 - (1-sigma) t)
    VariancePreservingCFM                 mu_t = cos(pi t/2) x0 + sin(pi t/2) x1         u_t = pi/2 (cos x1 - sin x0)

The classes follow torchcfm 1.0.7's names, signatures and order of random draws (the OT pair indices from
NumPy's global generator, then ``t`` by ``torch.rand``, then ``eps`` by ``torch.randn_like``), so that
:mod:`neurodyn.compat.torchcfm` is these classes and seeded torchcfm code gives the same numbers.

Example::

    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)
    net = VelocityMLP(2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2000):
        loss = cfm_loss(net, matcher, torch.randn(256, 2), sample_2d("moons", 256))
        opt.zero_grad(); loss.backward(); opt.step()
    out = sample_flow(net, torch.randn(1000, 2))              # out.samples (1000, 2), out.nfe
    logp = flow_log_likelihood(net, sample_2d("moons", 500))  # (500,)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..solve import solve
from ..transport import cost_matrix, exact_plan, have_pot, sinkhorn_plan
from .cnf import CNF

__all__ = [
    "ConditionalFlowMatcher",
    "ExactOptimalTransportConditionalFlowMatcher",
    "FlowSamples",
    "OTPlanSampler",
    "SchrodingerBridgeConditionalFlowMatcher",
    "TargetConditionalFlowMatcher",
    "VariancePreservingConditionalFlowMatcher",
    "VelocityMLP",
    "cfm_loss",
    "flow_log_likelihood",
    "pad_t_like_x",
    "path_straightness",
    "sample_flow",
]


def pad_t_like_x(t: Tensor | float, x: Tensor) -> Tensor | float:
    """Reshape ``t`` ``(B,)`` to ``(B, 1, ..., 1)`` with ``x.dim()`` dimensions (``x`` is ``(B, *dim)``);
    a Python number is returned unchanged.

    Example: ``pad_t_like_x(torch.rand(8), torch.zeros(8, 3, 4, 4)).shape == (8, 1, 1, 1)``.
    """
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------------------------
# minibatch OT pairing
# ----------------------------------------------------------------------------------------------------------------


class OTPlanSampler:
    """Pairs a source and a target minibatch by an OT plan (squared-Euclidean cost) and draws ``(i, j)`` index
    pairs from the plan.

    ``method``: ``"exact"`` (POT's ``emd``, or without POT the optimal assignment for equal sizes -- exact OT for
    uniform weights), ``"sinkhorn"`` (entropic plan with ``reg``; POT's or a log-domain fallback),
    ``"unbalanced"``/``"partial"`` (POT only). ``rng``: a ``numpy.random.Generator`` for the index draws; None
    uses NumPy's global generator (as torchcfm does).

    Example::

        sampler = OTPlanSampler("exact")
        x0p, x1p = sampler.sample_plan(torch.randn(64, 2), torch.randn(64, 2) + 3)   # (64, 2) each
    """

    def __init__(self, method: str, reg: float = 0.05, reg_m: float = 1.0, normalize_cost: bool = False,
                 num_threads: int | str = 1, warn: bool = True, rng: np.random.Generator | None = None) -> None:
        if method not in ("exact", "sinkhorn", "unbalanced", "partial"):
            raise ValueError(f"Unknown method: {method}")
        if method in ("unbalanced", "partial") and not have_pot():
            raise InputError(f"OTPlanSampler(method={method!r}) needs POT: pip install 'neurodyn[flows]'.")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.rng = rng

    def _plan(self, M: np.ndarray) -> np.ndarray:
        if self.method == "exact":
            return exact_plan(M, self.num_threads)
        if self.method == "sinkhorn":
            return sinkhorn_plan(M, self.reg)
        import ot

        a, b = ot.unif(M.shape[0]), ot.unif(M.shape[1])
        if self.method == "unbalanced":
            return ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, M, reg=self.reg, reg_m=self.reg_m)
        return ot.partial.entropic_partial_wasserstein(a, b, M, reg=self.reg)

    def get_map(self, x0: Tensor, x1: Tensor) -> np.ndarray:
        """The plan ``(n, m)`` (numpy float64) between ``x0`` ``(n, *dim)`` and ``x1`` ``(m, *dim)``."""
        M = cost_matrix(x0, x1, 2)
        if self.normalize_cost:
            M = M / M.max()
        p = self._plan(M)
        if not np.all(np.isfinite(p)):
            raise FloatingPointError("the OT plan is not finite (cost matrix with inf/nan, or reg too small for "
                                     "the sinkhorn method); check the batches or raise reg.")
        if np.abs(p.sum()) < 1e-8:
            if self.warn:
                warnings.warn("Numerical errors in OT plan, reverting to uniform plan.", stacklevel=2)
            p = np.ones_like(p) / p.size
        return p

    def sample_map(self, pi: np.ndarray, batch_size: int, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` index pairs ``(i, j)`` with probability ``pi[i, j] / pi.sum()``."""
        p = pi.flatten()
        p = p / p.sum()
        draw = self.rng.choice if self.rng is not None else np.random.choice
        choices = draw(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
        return np.divmod(choices, pi.shape[1])

    def sample_plan(self, x0: Tensor, x1: Tensor, replace: bool = True) -> tuple[Tensor, Tensor]:
        """``x0[i], x1[j]`` for ``x0.shape[0]`` pairs ``(i, j)`` drawn from the plan."""
        pi = self.get_map(x0, x1)
        i, j = self.sample_map(pi, x0.shape[0], replace=replace)
        return x0[i], x1[j]

    def sample_plan_with_labels(self, x0: Tensor, x1: Tensor, y0: Tensor | None = None, y1: Tensor | None = None,
                                replace: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """As :meth:`sample_plan`, carrying the labels ``y0`` ``(n,)`` and ``y1`` ``(m,)`` with their points."""
        pi = self.get_map(x0, x1)
        i, j = self.sample_map(pi, x0.shape[0], replace=replace)
        return x0[i], x1[j], (y0[i] if y0 is not None else None), (y1[j] if y1 is not None else None)

    def sample_trajectory(self, X: Tensor) -> np.ndarray:
        """OT-linked trajectories through populations ``X`` ``(bs, times, *dim)``: returns ``(bs, times, *dim)``."""
        times = X.shape[1]
        pis = [self.get_map(X[:, k], X[:, k + 1]) for k in range(times - 1)]
        draw = self.rng.choice if self.rng is not None else np.random.choice
        indices = [np.arange(X.shape[0])]
        for pi in pis:
            indices.append(np.array([draw(pi.shape[1], p=pi[i] / pi[i].sum()) for i in indices[-1]]))
        return np.stack([X[:, k][indices[k]] for k in range(times)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# conditional paths
# ----------------------------------------------------------------------------------------------------------------


class ConditionalFlowMatcher:
    """Independent conditional flow matching (I-CFM): ``x0``, ``x1`` paired as given,
    ``x_t ~ N(t x1 + (1-t) x0, sigma^2)``, target ``u_t = x1 - x0``.

    Shapes: ``x0``, ``x1``, ``x_t``, ``u_t``: ``(B, *dim)``; ``t``: ``(B,)``.

    Example::

        t, xt, ut = ConditionalFlowMatcher(sigma=0.1).sample_location_and_conditional_flow(x0, x1)
    """

    def __init__(self, sigma: float | int = 0.0) -> None:
        self.sigma = sigma

    def compute_mu_t(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Mean of the path: ``t x1 + (1 - t) x0``."""
        t = pad_t_like_x(t, x0)
        return t * x1 + (1 - t) * x0

    def compute_sigma_t(self, t: Tensor) -> Tensor | float:
        """Standard deviation of the path: ``sigma``."""
        del t
        return self.sigma

    def sample_xt(self, x0: Tensor, x1: Tensor, t: Tensor, epsilon: Tensor) -> Tensor:
        """``mu_t + sigma_t * epsilon``."""
        mu_t = self.compute_mu_t(x0, x1, t)
        sigma_t = pad_t_like_x(self.compute_sigma_t(t), x0)
        return mu_t + sigma_t * epsilon

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """Conditional velocity ``u_t(x | x0, x1) = x1 - x0``."""
        del t, xt
        return x1 - x0

    def sample_noise_like(self, x: Tensor) -> Tensor:
        """``eps ~ N(0, I)`` shaped as ``x``."""
        return torch.randn_like(x)

    def sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor | None = None,
                                             return_noise: bool = False) -> tuple[Tensor, ...]:
        """Draw ``t ~ U[0, 1]`` ``(B,)`` (unless given), ``eps``, and return ``(t, x_t, u_t)`` (``+ (eps,)``)."""
        if t is None:
            t = torch.rand(x0.shape[0]).type_as(x0)
        if len(t) != x0.shape[0]:
            raise InputError(f"t must have the batch size {x0.shape[0]} of x0, got shape {tuple(t.shape)}.")
        eps = self.sample_noise_like(x0)
        xt = self.sample_xt(x0, x1, t, eps)
        ut = self.compute_conditional_flow(x0, x1, t, xt)
        return (t, xt, ut, eps) if return_noise else (t, xt, ut)

    def guided_sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor, y0: Tensor | None = None,
                                                    y1: Tensor | None = None, t: Tensor | None = None,
                                                    return_noise: bool = False) -> tuple[Any, ...]:
        """Class-conditional form: returns ``(t, x_t, u_t, y0, y1)`` (``+ (eps,)``); the labels follow their
        points through the pairing (none for I-CFM)."""
        out = self.sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])

    def compute_lambda(self, t: Tensor) -> Tensor:
        """Score weighting ``2 sigma_t / (sigma^2 + 1e-8)``."""
        sigma_t = self.compute_sigma_t(t)
        return 2 * sigma_t / (self.sigma**2 + 1e-8)


class _PairedMatcher(ConditionalFlowMatcher):
    """A matcher that first re-pairs the batch with ``self.ot_sampler``."""

    ot_sampler: OTPlanSampler

    def sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor | None = None,
                                             return_noise: bool = False) -> tuple[Tensor, ...]:
        x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor, y0: Tensor | None = None,
                                                    y1: Tensor | None = None, t: Tensor | None = None,
                                                    return_noise: bool = False) -> tuple[Any, ...]:
        x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        out = ConditionalFlowMatcher.sample_location_and_conditional_flow(self, x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])


class ExactOptimalTransportConditionalFlowMatcher(_PairedMatcher):
    """OT-CFM: the I-CFM path with ``(x0, x1)`` drawn (with replacement) from the exact minibatch OT plan.

    Example::

        t, xt, ut = ExactOptimalTransportConditionalFlowMatcher(0.1).sample_location_and_conditional_flow(x0, x1)
    """

    def __init__(self, sigma: float | int = 0.0) -> None:
        super().__init__(sigma)
        self.ot_sampler = OTPlanSampler(method="exact")


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    """Lipman et al.'s path from the source noise ``x0``: ``mu_t = t x1``, ``sigma_t = 1 - (1 - sigma) t``,
    ``u_t = (x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t)``. For ``sigma=0`` with ``x0`` as the noise this is
    the rectified-flow interpolation ``x_t = t x1 + (1 - t) eps``.

    Example: ``t, xt, ut = TargetConditionalFlowMatcher(1e-4).sample_location_and_conditional_flow(x0, x1)``.
    """

    def compute_mu_t(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``t x1``."""
        del x0
        return pad_t_like_x(t, x1) * x1

    def compute_sigma_t(self, t: Tensor) -> Tensor:
        """``1 - (1 - sigma) t``."""
        return 1 - (1 - self.sigma) * t

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """``(x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t)``."""
        del x0
        t = pad_t_like_x(t, x1)
        return (x1 - (1 - self.sigma) * xt) / (1 - (1 - self.sigma) * t)


class SchrodingerBridgeConditionalFlowMatcher(_PairedMatcher):
    """SB-CFM: Brownian-bridge path ``sigma_t = sigma sqrt(t (1 - t))`` between pairs drawn from the OT plan with
    entropic regularisation ``2 sigma^2`` (``ot_method="sinkhorn"``, the Schrodinger bridge's static plan) or the
    exact plan (``"exact"``, torchcfm's default); ``u_t = (1 - 2t) / (2 t (1 - t) + 1e-8) (x_t - mu_t) + x1 - x0``.

    Example: ``SchrodingerBridgeConditionalFlowMatcher(0.5, "sinkhorn").sample_location_and_conditional_flow(x0, x1)``.
    """

    def __init__(self, sigma: float | int = 1.0, ot_method: str = "exact") -> None:
        if sigma <= 0:
            raise ValueError(f"Sigma must be strictly positive, got {sigma}.")
        if sigma < 1e-3:
            warnings.warn("Small sigma values may lead to numerical instability.", stacklevel=2)
        super().__init__(sigma)
        self.ot_method = ot_method
        self.ot_sampler = OTPlanSampler(method=ot_method, reg=2 * self.sigma**2)

    def compute_sigma_t(self, t: Tensor) -> Tensor:
        """``sigma sqrt(t (1 - t))``."""
        return self.sigma * torch.sqrt(t * (1 - t))

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """``(1 - 2t) / (2 t (1 - t) + 1e-8) (x_t - mu_t) + x1 - x0``."""
        t = pad_t_like_x(t, x0)
        mu_t = self.compute_mu_t(x0, x1, t)
        return (1 - 2 * t) / (2 * t * (1 - t) + 1e-8) * (xt - mu_t) + x1 - x0


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    """Trigonometric interpolant (Albergo et al.): ``mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1``,
    ``u_t = pi/2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)``, ``sigma_t = sigma``.

    Example: ``VariancePreservingConditionalFlowMatcher(0.0).sample_location_and_conditional_flow(x0, x1)``.
    """

    def compute_mu_t(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``cos(pi t / 2) x0 + sin(pi t / 2) x1``."""
        t = pad_t_like_x(t, x0)
        return torch.cos(math.pi / 2 * t) * x0 + torch.sin(math.pi / 2 * t) * x1

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """``pi/2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)``."""
        del xt
        t = pad_t_like_x(t, x0)
        return math.pi / 2 * (torch.cos(math.pi / 2 * t) * x1 - torch.sin(math.pi / 2 * t) * x0)


# ----------------------------------------------------------------------------------------------------------------
# velocity network, loss, sampler, likelihood, straightness
# ----------------------------------------------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """``v(t, x[, y])``: an MLP on ``[x, t]`` (plus a one-hot class ``y`` when ``num_classes`` is set), ``depth``
    hidden layers of width ``width`` with ``activation`` (SELU: torchcfm's 3x64 MLP).

    ``t``: a number, 0-dim tensor, or ``(B,)``; ``x``: ``(B, dim)``; ``y``: ``(B,)`` integer labels. Returns
    ``(B, dim)``. Callable as a :func:`neurodyn.solve` field ``f(t, x)`` (bind ``y`` with a closure).

    Example: ``VelocityMLP(2)(torch.tensor(0.5), torch.randn(10, 2)).shape == (10, 2)``.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 3, activation: Callable[[], nn.Module] = nn.SELU,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise InputError(f"dim, width and depth must be >= 1, got {dim}, {width}, {depth}.")
        self.dim, self.num_classes = dim, num_classes
        layers: list[nn.Module] = []
        n_in = dim + 1 + (num_classes or 0)
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), activation()]
            n_in = width
        layers.append(nn.Linear(n_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor | float, x: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(x.shape[0])
        parts = [x, tt[:, None]]
        if self.num_classes is not None:
            if y is None:
                raise InputError("this VelocityMLP is class-conditional: pass the labels y (B,).")
            parts.append(nn.functional.one_hot(y.long(), self.num_classes).to(x.dtype))
        return self.net(torch.cat(parts, dim=1))


def cfm_loss(model: Callable[..., Tensor], matcher: ConditionalFlowMatcher, x0: Tensor, x1: Tensor,
             y0: Tensor | None = None, y1: Tensor | None = None, label: str = "y1") -> Tensor:
    """The flow-matching regression loss ``mean |v(t, x_t) - u_t|^2`` (mean over batch and features) for one
    minibatch: ``x0`` source ``(B, *dim)``, ``x1`` target ``(B, *dim)``. With labels ``y0``/``y1`` ``(B,)`` the
    pairs and labels come from ``guided_sample_location_and_conditional_flow`` and the model is called as
    ``model(t, x_t, y)`` with ``y = y1`` (``label="y1"``) or ``y0``.

    Example: ``loss = cfm_loss(net, ConditionalFlowMatcher(0.1), torch.randn(256, 2), x1_batch)``.
    """
    if x0.shape[1:] != x1.shape[1:]:
        raise InputError(f"x0 and x1 must have the same sample shape, got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    if y0 is None and y1 is None:
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = model(t, xt)
    else:
        if label not in ("y0", "y1"):
            raise InputError(f"label must be 'y0' or 'y1', got {label!r}.")
        t, xt, ut, y0p, y1p = matcher.guided_sample_location_and_conditional_flow(x0, x1, y0, y1)
        y = y1p if label == "y1" else y0p
        if y is None:
            raise InputError(f"label={label!r} but that label tensor was not given.")
        vt = model(t, xt, y)
    return torch.mean((vt - ut) ** 2)


@dataclass
class FlowSamples:
    """Result of :func:`sample_flow`: ``samples`` ``(B, *dim)`` at ``t1``; ``trajectory`` ``(T, B, *dim)`` at
    ``times`` ``(T,)``; ``nfe`` (vector-field calls); ``stats`` (the solve's)."""

    samples: Tensor
    trajectory: Tensor
    times: Tensor
    nfe: int
    stats: dict


def _bind(model: Callable[..., Tensor], y: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    return (lambda t, x: model(t, x)) if y is None else (lambda t, x: model(t, x, y))


def sample_flow(model: Callable[..., Tensor], x0: Tensor, *, y: Tensor | None = None, t0: float = 0.0,
                t1: float = 1.0, n_times: int = 2, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                step_size: float | None = None, **solve_kwargs: Any) -> FlowSamples:
    """Push ``x0`` ``(B, *dim)`` through ``dx/dt = model(t, x)`` (``model(t, x, y)`` with labels ``y`` ``(B,)``)
    from ``t0`` to ``t1`` with :func:`neurodyn.solve` (any ``method``; fixed-step methods need ``step_size``),
    outputs at ``n_times`` equally spaced times. Runs without autograd. The NFE is the solve's ``stats["nfe"]``.

    Example: ``out = sample_flow(net, torch.randn(1000, 2), method="rk4", step_size=0.1); out.nfe == 40``.
    """
    if n_times < 2:
        raise InputError(f"n_times must be >= 2 (the two end points at least), got {n_times}.")
    t = torch.linspace(t0, t1, n_times, dtype=x0.dtype)
    with torch.no_grad():
        sol = solve(_bind(model, y), x0, t, method=method, rtol=rtol, atol=atol, step_size=step_size,
                    **solve_kwargs)
    return FlowSamples(sol.ys[-1], sol.ys, t, int(sol.stats["nfe"]), dict(sol.stats))


class _ReversedField(nn.Module):
    """``net(s, z) = -v(1 - s, z)``: the flow-matching field (base at ``t=0``, data at ``t=1``) in the CNF's
    direction (data at ``s=0``, base at ``s=1``)."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor], t1: float) -> None:
        super().__init__()
        self.field, self.t1 = field, t1

    def forward(self, s: Tensor, z: Tensor) -> Tensor:
        return -self.field(self.t1 - s, z)


def flow_log_likelihood(model: Callable[..., Tensor], x1: Tensor, *, y: Tensor | None = None, base: Any = None,
                        method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                        **solve_kwargs: Any) -> tuple[Tensor, int]:
    """Exact log-density ``log p_1(x1)`` ``(B,)`` of samples ``x1`` ``(B, d)`` under the flow ``dx/dt = model(t, x)``
    on ``[0, 1]`` started from the base density ``p_0`` (standard normal unless ``base``, a
    ``torch.distributions.Distribution``), and the NFE of the solve.

    Computed by :class:`neurodyn.models.CNF` with the exact trace (``d`` vector-Jacobian products) on the reversed
    field ``-v(1 - s, z)`` (data at ``s=0``, base at ``s=1``): ``log p_1(x1) = log p_0(z(1)) + log|det dz/dx|``,
    the instantaneous change of variables ``d log p / dt = -div v``. Runs without a graph to the parameters.

    Example: ``logp, nfe = flow_log_likelihood(net, test_x); nll = -logp.mean()``.
    """
    if x1.dim() != 2:
        raise InputError(f"x1 must have shape (B, d), got {tuple(x1.shape)}.")
    flow = CNF(_ReversedField(_bind(model, y), 1.0), x1.shape[1], trace="exact", t1=1.0, base=base, method=method,
               rtol=rtol, atol=atol, **solve_kwargs)
    with torch.no_grad():
        logp = flow.log_prob(x1)
    return logp, int(flow.last_solution.stats["nfe"])


def path_straightness(model: Callable[..., Tensor], x0: Tensor, *, y: Tensor | None = None, t0: float = 0.0,
                      t1: float = 1.0, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                      **solve_kwargs: Any) -> float:
    """Path straightness of the learned flow from ``x0`` ``(B, d)``: the kinetic energy over the squared
    displacement, ``S = E int_t0^t1 |v(t, x(t))|^2 dt / E |x(t1) - x(t0)|^2`` (for ``t1 - t0 = 1``; in general
    scaled by ``t1 - t0``). By Cauchy-Schwarz ``S >= 1``, with equality exactly when every path is a straight line
    at constant speed. ``int |v|^2`` is integrated by the same solve as the path (state ``(x, e)``,
    ``de/dt = |v|^2``).

    Example: ``path_straightness(net, torch.randn(1000, 2))  # 1.0 for straight flows``.
    """
    if x0.dim() != 2:
        raise InputError(f"x0 must have shape (B, d), got {tuple(x0.shape)}.")
    d = x0.shape[1]
    field = _bind(model, y)

    def aug(t: Tensor, s: Tensor) -> Tensor:
        v = field(t, s[:, :d])
        return torch.cat([v, (v**2).sum(dim=1, keepdim=True)], dim=1)

    s0 = torch.cat([x0, torch.zeros(x0.shape[0], 1, dtype=x0.dtype)], dim=1)
    with torch.no_grad():
        sol = solve(aug, s0, torch.tensor([t0, t1], dtype=x0.dtype), method=method, rtol=rtol, atol=atol,
                    **solve_kwargs)
    s1 = sol.ys[-1]
    disp = ((s1[:, :d] - x0) ** 2).sum(dim=1).mean()
    return float(s1[:, d].mean() * (t1 - t0) / disp)
