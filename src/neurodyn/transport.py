"""Discrete optimal transport between two point clouds (squared-Euclidean cost): exact plans, entropic plans,
and the exact Wasserstein distance between samples.

POT (``pip install neurodyn[flows]``) is used where it is installed (``ot.emd``, ``ot.sinkhorn``, ``ot.emd2``).
Without it, the exact plan between two equal-size uniform batches is computed by
:func:`scipy.optimize.linear_sum_assignment` (for uniform weights and equal sizes the optimal plan is a
permutation, so this is exact OT, not an approximation), and the entropic plan by a log-domain Sinkhorn
iteration. Unequal sizes without POT raise an error naming the extra to install.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

__all__ = ["cost_matrix", "exact_plan", "have_pot", "sinkhorn_plan", "wasserstein"]


def have_pot() -> bool:
    """Whether POT (the ``ot`` package) can be imported."""
    try:
        import ot  # noqa: F401
    except ImportError:
        return False
    return True


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a tensor of shape (n, *dim), got {type(x).__name__}.")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InputError(f"{name} must have shape (n, *dim) with n >= 1, got {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1)


def cost_matrix(x0: Tensor, x1: Tensor, power: int = 2) -> np.ndarray:
    """Euclidean distances to the power ``power`` between the rows of ``x0`` ``(n, *dim)`` and ``x1``
    ``(m, *dim)`` (flattened), as a numpy array ``(n, m)`` of the inputs' dtype (what POT is handed, as torchcfm
    does). Computed as ``torch.cdist(x0, x1) ** power``.

    Example: ``cost_matrix(torch.zeros(3, 2), torch.ones(4, 2)).shape == (3, 4)``.
    """
    a, b = _flat(x0, "x0"), _flat(x1, "x1")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"x0 and x1 must have the same feature size, got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    M = torch.cdist(a, b)
    if power == 2:
        M = M**2
    return M.detach().cpu().numpy()


def _assignment_plan(M: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    n = M.shape[0]
    rows, cols = linear_sum_assignment(M)
    plan = np.zeros_like(M)
    plan[rows, cols] = 1.0 / n
    return plan


def exact_plan(M: np.ndarray, num_threads: int | str = 1) -> np.ndarray:
    """The exact optimal transport plan ``(n, m)`` between uniform weights for the cost matrix ``M`` ``(n, m)``.

    POT's network simplex (``ot.emd``) when POT is installed; otherwise, for ``n == m``, the optimal assignment
    (``scipy.optimize.linear_sum_assignment``) as the permutation plan with entries ``1/n`` -- for uniform
    weights and equal sizes this is an exact optimum of the same linear program.

    Example: ``exact_plan(cost_matrix(x0, x1))`` has rows summing to ``1/n`` and columns to ``1/m``.
    """
    M = np.asarray(M)
    if M.ndim != 2:
        raise InputError(f"M must be a 2-d cost matrix, got shape {M.shape}.")
    n, m = M.shape
    if have_pot():
        import ot

        return ot.emd(ot.unif(n), ot.unif(m), M, numThreads=num_threads)
    M = M.astype(np.float64)
    if n != m:
        raise InputError(f"exact OT between batches of different sizes ({n} and {m}) needs POT: "
                         "pip install 'neurodyn[flows]' (or pip install POT), or use equal batch sizes.")
    return _assignment_plan(M)


def sinkhorn_plan(M: np.ndarray, reg: float, num_iter: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """The entropic OT plan ``(n, m)`` between uniform weights: ``argmin <P, M> - reg * H(P)``.

    POT's ``ot.sinkhorn`` (the Sinkhorn-Knopp iteration, ``num_iter`` iterations at most, stop at marginal
    error ``tol``) when POT is installed; otherwise a log-domain Sinkhorn iteration with the same stopping rule.

    Example: ``sinkhorn_plan(cost_matrix(x0, x1), reg=0.5)``.
    """
    if not reg > 0:
        raise InputError(f"reg must be positive for the entropic plan, got {reg}.")
    M = np.asarray(M)
    n, m = M.shape
    if have_pot():
        import ot

        return ot.sinkhorn(ot.unif(n), ot.unif(m), M, reg=reg, numItermax=num_iter, stopThr=tol)
    M = M.astype(np.float64)
    from scipy.special import logsumexp

    loga, logb = np.full(n, -math.log(n)), np.full(m, -math.log(m))
    f, g = np.zeros(n), np.zeros(m)
    K = -M / reg
    for _ in range(num_iter):
        f = loga - logsumexp(K + g[None, :], axis=1)
        g = logb - logsumexp(K + f[:, None], axis=0)
        P = np.exp(K + f[:, None] + g[None, :])
        if np.abs(P.sum(axis=1) - np.exp(loga)).sum() < tol:
            break
    return np.exp(K + f[:, None] + g[None, :])


def wasserstein(x0: Tensor, x1: Tensor, power: int = 2, method: str = "exact", reg: float = 0.05) -> float:
    """The Wasserstein-``power`` distance between the empirical measures of ``x0`` ``(n, *dim)`` and ``x1``
    ``(m, *dim)`` (uniform weights, Euclidean ground cost): ``(min_P <P, |x0_i - x1_j|^power>)^(1/power)``.

    ``method="exact"``: the exact plan (:func:`exact_plan`: POT's ``emd`` or, without POT, the optimal
    assignment for ``n == m``). ``method="sinkhorn"``: the entropic plan's cost (needs ``reg``).

    Example::

        w2 = wasserstein(torch.randn(500, 2), torch.randn(500, 2) + 1.0)   # ~ sqrt(2) for large n
    """
    if power not in (1, 2):
        raise InputError(f"power must be 1 or 2, got {power}.")
    M = cost_matrix(x0, x1, power)
    if method == "exact":
        plan = None if have_pot() else exact_plan(M)
    elif method == "sinkhorn":
        plan = sinkhorn_plan(M, reg)
    else:
        raise InputError(f"method must be 'exact' or 'sinkhorn', got {method!r}.")
    if have_pot() and method == "exact":
        import ot

        cost = float(ot.emd2(ot.unif(M.shape[0]), ot.unif(M.shape[1]), M, numItermax=int(1e7)))
    else:
        cost = float((plan * M.astype(np.float64)).sum())
    return math.sqrt(cost) if power == 2 else cost
