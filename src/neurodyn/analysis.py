"""Dynamics analysis of a vector field along a trajectory: Jacobian spectrum, stiffness, Lipschitz
constant, and the reversibility of the flow (forward then backward solve).

All functions take the vector field as :func:`neurodyn.solve` does, ``func(t, z)`` (or ``func(z)``,
detected from the signature or forced with ``autonomous``), and a trajectory ``ys`` of shape
``(T, *state)`` at the times ``t`` of shape ``(T,)`` -- e.g. ``sol.ts, sol.ys``. They do not build
autograd graphs: the results are detached diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import InputError
from .fields import time_field
from .solution import FAILURE_STATUSES
from .solve import solve

__all__ = ["jacobian_spectrum", "lipschitz_estimate", "reversibility", "spectral_radius", "stiffness_ratio"]


def _field(func: Callable, autonomous: bool | None) -> Callable[[Tensor, Tensor], Tensor]:
    if not callable(func):
        raise InputError(f"func must be callable as func(t, z), got {type(func).__name__}.")
    return time_field(func, autonomous)


def _resolve_per_sample(ys: Tensor, per_sample: bool | None) -> bool:
    """Per-sample analysis by default for batched states (T, B, *features); checked when forced."""
    state_dims = ys.dim() - 1
    per_sample = state_dims >= 2 if per_sample is None else bool(per_sample)
    if per_sample and state_dims < 2:
        raise InputError(f"per_sample=True needs a batched state (B, *features), got state shape "
                         f"{tuple(ys.shape[1:])}.")
    return per_sample


def _check_traj(t: Any, ys: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(ys, Tensor) or not ys.is_floating_point() or ys.dim() < 2:
        raise InputError("ys must be a real floating-point tensor of shape (T, *state) (a trajectory, e.g. sol.ys); "
                         f"got {type(ys).__name__}{'' if not isinstance(ys, Tensor) else tuple(ys.shape)}.")
    t = torch.as_tensor(t, dtype=ys.dtype, device=ys.device).detach().reshape(-1)
    if t.numel() != ys.shape[0]:
        raise InputError(f"t has {t.numel()} times but ys has {ys.shape[0]} states (first dimension).")
    return t, ys.detach()


def _sort_eigs(ev: Tensor) -> Tensor:
    """Deterministic order: by real part descending, ties by imaginary part descending."""
    idx = torch.argsort(ev.imag, dim=-1, descending=True, stable=True)
    ev = torch.gather(ev, -1, idx)
    idx = torch.argsort(ev.real, dim=-1, descending=True, stable=True)
    return torch.gather(ev, -1, idx)


def _jacobians(f: Callable, ti: Tensor, z: Tensor, per_sample: bool) -> Tensor:
    """``(B, D, D)`` per-sample Jacobians (rows independent) or the ``(n, n)`` full Jacobian at ``(ti, z)``."""
    from torch.func import jacrev, vmap

    if not per_sample:
        n = z.numel()
        return jacrev(lambda zz: f(ti, zz))(z).reshape(n, n)
    b = z.shape[0]
    d = z[0].numel()
    try:
        jac = vmap(jacrev(lambda row: f(ti, row.unsqueeze(0)).squeeze(0)))(z)
        return jac.reshape(b, d, d)
    except Exception:  # an op without a batching rule, a field that needs more than one row, ...
        # Rows independent: the Jacobian of sum_b f_b with respect to z_b is df_b/dz_b (D reverse passes).
        jac = jacrev(lambda zz: f(ti, zz).sum(0))(z)  # (*features, B, *features)
        return jac.reshape(d, b, d).permute(1, 0, 2)


def jacobian_spectrum(func: Callable, t: Tensor, ys: Tensor, *, per_sample: bool | None = None,
                      autonomous: bool | None = None) -> Tensor:
    """Eigenvalues of the Jacobian ``df/dz`` at every state of a trajectory.

    Parameters
    ----------
    func : callable ``(t, z) -> dz/dt`` (or ``(z) -> dz/dt``)
    t : Tensor, shape ``(T,)``
    ys : Tensor, shape ``(T, *state)``
        The trajectory, e.g. ``sol.ys``.
    per_sample : bool, optional
        Treat the first state dimension as a batch of independent samples (``state = (B, *features)``)
        and return the spectrum of each sample's ``D x D`` Jacobian (``D = prod(features)``), computed
        with ``torch.func.vmap(jacrev(...))`` over the rows (or, if the field cannot be vmapped, from the
        Jacobian of ``sum_b f_b``). Only valid when ``f`` treats the rows independently (an MLP does; a
        field mixing samples, e.g. batch norm in training mode, does not). ``False``: the full
        ``n x n`` Jacobian of the flattened state. Default: True for ``state`` with >= 2 dimensions.
    autonomous : bool, optional
        Force ``func(z)`` (True) or ``func(t, z)`` (False) instead of detecting it.

    Returns
    -------
    Tensor, complex
        ``(T, B, D)`` per sample, or ``(T, n)`` for the full Jacobian; each row sorted by real part
        (descending), ties by imaginary part.

    Examples
    --------
    >>> import torch, neurodyn
    >>> from neurodyn.analysis import jacobian_spectrum, spectral_radius, stiffness_ratio
    >>> A = torch.tensor([[-1.0, 0.0], [0.0, -1000.0]], dtype=torch.float64)
    >>> f = lambda t, y: y @ A.T
    >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> ys = neurodyn.solve(f, torch.ones(3, 2, dtype=torch.float64), t, method="bosh3").ys  # (5, 3, 2)
    >>> ev = jacobian_spectrum(f, t, ys)                                                     # (5, 3, 2)
    >>> ev[0, 0].real.tolist(), float(spectral_radius(ev).max()), float(stiffness_ratio(ev).max())
    ([-1.0, -1000.0], 1000.0, 1000.0)
    """
    f = _field(func, autonomous)
    t, ys = _check_traj(t, ys)
    per_sample = _resolve_per_sample(ys, per_sample)
    with torch.no_grad():
        jacs = torch.stack([_jacobians(f, t[i], ys[i], per_sample) for i in range(ys.shape[0])])
        return _sort_eigs(torch.linalg.eigvals(jacs))


def spectral_radius(eigvals: Tensor) -> Tensor:
    """``max |lambda|`` over the last dimension of eigenvalues from :func:`jacobian_spectrum`.

    ``(T, B, D) -> (T, B)``; ``(T, n) -> (T,)``.

    >>> spectral_radius(torch.tensor([[1 + 1j, -3 + 0j]])).tolist()
    [3.0]
    """
    return eigvals.abs().amax(dim=-1)


def stiffness_ratio(eigvals: Tensor) -> Tensor:
    """``max |Re lambda| / min |Re lambda|`` over the eigenvalues with ``Re lambda < 0``, per time (and sample).

    ``(T, B, D) -> (T, B)``; ``(T, n) -> (T,)``. NaN where no eigenvalue has a negative real part; 1 where
    exactly one has.

    >>> stiffness_ratio(torch.tensor([[-1 + 0j, -1000 + 0j, 5 + 0j]])).tolist()
    [1000.0]
    """
    re = eigvals.real if eigvals.is_complex() else eigvals
    neg = re < 0
    mag = (-re).clamp_min(0)
    hi = torch.where(neg, mag, torch.zeros_like(mag)).amax(dim=-1)
    lo = torch.where(neg, mag, torch.full_like(mag, math.inf)).amin(dim=-1)
    out = hi / lo
    return torch.where(neg.any(dim=-1), out, torch.full_like(out, math.nan))


def lipschitz_estimate(func: Callable, t: Tensor, ys: Tensor, iters: int = 20, *, per_sample: bool | None = None,
                       generator: torch.Generator | None = None, autonomous: bool | None = None,
                       return_all: bool = False) -> float | Tensor:
    """A local Lipschitz constant of ``f`` in ``z`` along a trajectory: ``max_i ||df/dz (t_i, y_i)||_2``.

    The spectral norm at each state is found by power iteration on ``J^T J`` with a forward-mode product
    (``J v``, ``torch.func.jvp``) and a reverse-mode product (``J^T w``, ``torch.func.vjp``) per iteration,
    never forming ``J``; the estimate is ``||J v||`` for the final unit vector ``v`` (a lower bound that
    converges like ``(sigma_2 / sigma_1)^(2 iters)``). For a batch of independent samples the norm over
    the whole state is the largest per-sample norm; with ``per_sample`` each sample runs its own power
    iteration (normalised row by row, all in the same products), which converges at each sample's own
    rate instead of the rate set by the two largest norms of different samples.

    Parameters
    ----------
    func : callable ``(t, z) -> dz/dt`` (or ``(z) -> dz/dt``)
    t : Tensor, shape ``(T,)``
    ys : Tensor, shape ``(T, *state)``
    iters : int
        Power iterations per state (>= 1).
    per_sample : bool, optional
        Treat the first state dimension as independent samples (as in :func:`jacobian_spectrum`; only
        valid when ``f`` does not mix the rows). Default: True for states with >= 2 dimensions.
    generator : torch.Generator, optional
        For the random start vectors (default: a generator seeded with 0, so results are reproducible).
    autonomous : bool, optional
        Force ``func(z)`` (True) or ``func(t, z)`` (False).
    return_all : bool
        Return the ``(T,)`` tensor of spectral norms instead of their maximum.

    Returns
    -------
    float (or Tensor of shape ``(T,)`` with ``return_all``)

    Examples
    --------
    >>> import torch
    >>> from neurodyn.analysis import lipschitz_estimate
    >>> A = torch.tensor([[0.0, 3.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> ys = torch.randn(4, 2, dtype=torch.float64)
    >>> round(lipschitz_estimate(lambda t, y: y @ A.T, torch.arange(4.0), ys), 6)
    3.0
    """
    from torch.func import jvp, vjp

    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise InputError(f"iters must be an integer >= 1, got {iters!r}.")
    f = _field(func, autonomous)
    t, ys = _check_traj(t, ys)
    per_sample = _resolve_per_sample(ys, per_sample)

    def rows(x: Tensor) -> Tensor:  # norms per sample (B, 1, ...) or of the whole state (0-dim)
        if not per_sample:
            return x.norm()
        return x.reshape(x.shape[0], -1).norm(dim=-1).view(-1, *([1] * (x.dim() - 1)))

    gen = generator if generator is not None else torch.Generator(device=ys.device).manual_seed(0)
    norms = []
    with torch.no_grad():
        for i in range(ys.shape[0]):
            ti, z = t[i], ys[i]
            g = lambda zz, ti=ti: f(ti, zz)
            _, vjp_fn = vjp(g, z)
            v = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
            v = v / rows(v)
            for _ in range(iters):
                (w,) = vjp_fn(jvp(g, (z,), (v,))[1])
                wn = rows(w)
                v = torch.where(wn > 0, w / torch.where(wn > 0, wn, torch.ones_like(wn)), v)
            norms.append(rows(jvp(g, (z,), (v,))[1]).max())
    out = torch.stack(norms)
    return out if return_all else float(out.max())


def reversibility(func: Callable, y0: Tensor, t: Tensor, **solve_kwargs: Any) -> dict[str, Any]:
    """Solve forward over ``t`` (``t[0] -> t[-1]``), then backward from ``y(t[-1])`` to ``t[0]``, and
    report how far the reconstruction of ``y0`` drifted.

    A conservative (volume-preserving, non-dissipative) flow reconstructs ``y0`` to solver tolerance; a
    contracting one loses information forward and amplifies the forward errors backward (by ``e^(-lambda T)``
    for ``y' = lambda y``), which is what breaks the adjoint method's backward reconstruction.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
    y0 : Tensor, any shape
    t : Tensor, shape ``(T,)``, ``T >= 2``
        Times of the forward leg (the backward leg uses ``t.flip(0)``).
    **solve_kwargs :
        Passed to both legs of :func:`neurodyn.solve` (``method``, ``rtol``, ``atol``, ...). Default
        ``on_failure="return"``: a failed leg gives infinite drift instead of raising.

    Returns
    -------
    dict
        ``abs_drift`` (float): ``||y_rec - y0||_2``; ``rel_drift`` (float): ``abs_drift / ||y0||_2``;
        ``max_abs_drift`` (float): ``max |y_rec - y0|``; ``drift_t`` (Tensor ``(T,)``): ``||y_back(t_i) -
        y_fwd(t_i)||_2`` at every time; ``y1`` (forward end state), ``y_reconstructed``;
        ``nfe_forward``, ``nfe_backward`` (int); ``status_forward``, ``status_backward`` (str).

    Examples
    --------
    >>> import torch
    >>> from neurodyn.analysis import reversibility
    >>> A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)      # rotation: conservative
    >>> t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    >>> r = reversibility(lambda t, y: y @ A.T, torch.tensor([1.0, 0.0], dtype=torch.float64), t, rtol=1e-9, atol=1e-12)
    >>> r["rel_drift"] < 1e-6, r["nfe_forward"] > 0
    (True, True)
    """
    if not isinstance(t, Tensor):
        raise InputError(f"t must be a 1-d tensor of times, got {type(t).__name__}.")
    solve_kwargs.setdefault("on_failure", "return")
    with torch.no_grad():
        fwd = solve(func, y0.detach(), t.detach(), **solve_kwargs)
        y1 = fwd.ys[-1]
        if fwd.status in FAILURE_STATUSES or not bool(torch.isfinite(y1).all()):
            bwd = None
        else:
            bwd = solve(func, y1, t.detach().flip(0), **solve_kwargs)
        if bwd is None or bwd.status in FAILURE_STATUSES:
            y_rec = torch.full_like(y1, math.nan)
            abs_drift = max_abs = math.inf
            drift_t = torch.full((t.shape[0],), math.inf, dtype=t.dtype)
        else:
            y_rec = bwd.ys[-1]
            diff = y_rec - y0.detach()
            abs_drift = float(diff.norm())
            max_abs = float(diff.abs().max())
            back = bwd.ys.flip(0)
            drift_t = (back - fwd.ys).reshape(t.shape[0], -1).norm(dim=-1)
            if not math.isfinite(abs_drift):
                abs_drift = max_abs = math.inf
        y0n = float(y0.detach().norm())
        rel = abs_drift / y0n if y0n > 0 else (0.0 if abs_drift == 0 else math.inf)
    return {
        "abs_drift": abs_drift,
        "rel_drift": rel,
        "max_abs_drift": max_abs,
        "drift_t": drift_t,
        "y1": y1,
        "y_reconstructed": y_rec,
        "nfe_forward": int(fwd.stats.get("nfe", 0)),
        "nfe_backward": int(bwd.stats.get("nfe", 0)) if bwd is not None else 0,
        "status_forward": fwd.status,
        "status_backward": bwd.status if bwd is not None else "not_run",
    }
