"""``method="scipy_solver"`` for :func:`neurodyn.odeint`: any ``scipy.integrate.solve_ivp`` method, forward only.

The torchdiffeq layer routes ``odeint(func, y0, t, method="scipy_solver", options={"solver": "LSODA", ...})``
here (torchdiffeq's ``ScipyWrapperODESolver``): the state is flattened to a float64 (or complex128) NumPy
vector, ``func`` is called under ``torch.no_grad()`` on tensors of ``y0``'s dtype and device, and the solution
at the times ``t`` comes back as a tensor of ``y0``'s dtype and device. Gradients cannot flow through scipy:
if ``y0`` or ``t`` requires grad an :class:`~neurodyn.errors.InputError` is raised (use a torch method);
the result never carries a gradient (not to ``func``'s parameters either).

Options: ``solver`` (``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``, ``"LSODA"`` -- torchdiffeq's
default -- or an ``OdeSolver`` subclass) and any further ``solve_ivp`` keyword (``first_step``, ``max_step``,
``min_step`` (LSODA), ``jac``, ``jac_sparsity``, ``lband``/``uband``, ``vectorized``, ...). ``rtol``/``atol``
are ``odeint``'s. torchdiffeq's ``norm``, ``grid_points``, ``eps`` and ``dtype`` options are accepted and
ignored, as there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.tensors import real_dtype
from ..errors import InputError, SolveFailure
from ..options import validate_state, validate_times

IGNORED_OPTIONS = ("norm", "grid_points", "eps", "dtype")
SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
"""The ``scipy.integrate.solve_ivp`` methods ``method="scipy_solver"`` accepts."""


def _as_numpy_tol(name: str, tol: Any, n: int) -> float | np.ndarray:
    if isinstance(tol, Tensor):
        if tol.numel() == 1:
            return float(tol)
        arr = tol.detach().cpu().to(torch.float64).numpy().reshape(-1)
        if arr.size != n:
            try:
                arr = np.broadcast_to(arr, (n,)).copy()
            except ValueError:
                raise InputError(f"{name} of {arr.size} elements does not match the state's {n} elements.") from None
        return arr
    try:
        return float(tol)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or a tensor, got {type(tol).__name__}.") from None


def scipy_odeint(func: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t: Tensor, *, rtol: Any = 1e-7,
                 atol: Any = 1e-9, options: dict | None = None) -> Tensor:
    """Solve ``dy/dt = func(t, y)`` with ``scipy.integrate.solve_ivp`` and return ``y`` at the times ``t``.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``t`` a 0-dim tensor of ``y0``'s real dtype, ``y`` of ``y0``'s shape; called without autograd.
    y0 : Tensor, any shape
        Initial state at ``t[0]``; float or complex, any device. Must not require grad.
    t : Tensor, shape ``(T,)``
        Strictly monotonic output times (decreasing integrates backward); must not require grad.
    rtol, atol : float or Tensor
        Tolerances for ``solve_ivp`` (a tensor ``atol`` is flattened to one per element).
    options : dict, optional
        ``{"solver": name, **solve_ivp_kwargs}``; see the module docstring.

    Returns
    -------
    Tensor of shape ``(T, *y0.shape)``, ``y0``'s dtype and device, without a gradient.

    Raises
    ------
    InputError
        ``y0`` or ``t`` requires grad, an unknown ``solver``, bad options.
    SolveFailure
        ``solve_ivp`` failed (its message is included).

    Examples
    --------
    >>> import torch, neurodyn
    >>> y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> ys = neurodyn.odeint(lambda t, y: torch.stack([y[1], -y[0]]), y0, t, method="scipy_solver",
    ...                      options={"solver": "DOP853"}, rtol=1e-10, atol=1e-12)
    >>> ys.shape
    torch.Size([5, 2])
    >>> bool(torch.allclose(ys[:, 0], torch.cos(t), atol=1e-8))
    True
    """
    import scipy.integrate

    y0 = validate_state(y0)
    t = validate_times(t, y0)
    if torch.is_grad_enabled() and (y0.requires_grad or t.requires_grad):
        which = "y0" if y0.requires_grad else "t"
        raise InputError(f"method='scipy_solver' is forward only: {which} requires grad, but no gradient can flow "
                         f"through scipy.integrate.solve_ivp. Use a torch method (e.g. method='dopri5', or 'adams'), "
                         f"or call under torch.no_grad() / pass {which}.detach().")
    opts = dict(options or {})
    solver = opts.pop("solver", "LSODA")
    for key in IGNORED_OPTIONS:
        opts.pop(key, None)
    if "method" in opts or "t_eval" in opts or "dense_output" in opts or "events" in opts or "args" in opts:
        bad = sorted(k for k in ("method", "t_eval", "dense_output", "events", "args") if k in opts)
        raise InputError(f"scipy_solver options {bad} are not accepted: choose the scipy method with "
                         f"options['solver'], and the output times with t.")
    valid = SCIPY_METHODS
    if isinstance(solver, str) and solver not in valid:
        raise InputError(f"unknown scipy solver {solver!r}; valid: {', '.join(valid)} (or an OdeSolver subclass).")

    shape = y0.shape
    n = y0.numel()
    dtype, device = y0.dtype, y0.device
    t_dtype = real_dtype(dtype)
    complex_state = y0.is_complex()
    np_dtype = np.complex128 if complex_state else np.float64

    def np_func(tt: float, y: np.ndarray) -> np.ndarray:
        ts = torch.tensor(float(tt), dtype=t_dtype, device=device)
        with torch.no_grad():
            if y.ndim == 2:  # vectorized=True: columns are states
                cols = [func(ts, torch.as_tensor(y[:, j]).to(device, dtype).reshape(shape)).reshape(-1)
                        for j in range(y.shape[1])]
                return torch.stack(cols, 1).cpu().numpy().astype(np_dtype, copy=False)
            out = func(ts, torch.as_tensor(y).to(device, dtype).reshape(shape))
        if not isinstance(out, Tensor) or out.numel() != n:
            raise InputError(f"func(t, y) must return a tensor of the state's shape {tuple(shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}.")
        return out.detach().reshape(-1).cpu().numpy().astype(np_dtype, copy=False)

    times = t.detach().cpu().to(torch.float64).numpy()
    y0_np = y0.detach().reshape(-1).cpu().numpy().astype(np_dtype)
    try:
        res = scipy.integrate.solve_ivp(np_func, (float(times[0]), float(times[-1])), y0_np, method=solver,
                                        t_eval=times, rtol=_as_numpy_tol("rtol", rtol, n),
                                        atol=_as_numpy_tol("atol", atol, n), **opts)
    except TypeError as exc:
        raise InputError(f"scipy_solver: bad solve_ivp option(s) {sorted(opts)}: {exc}") from exc
    if res.status < 0 or res.y.shape[1] != times.shape[0]:
        raise SolveFailure(f"scipy.integrate.solve_ivp (method {solver!r}) failed: {res.message}",
                           status="scipy_failure", t=float(res.t[-1]) if res.t.size else float(times[0]))
    ys = torch.from_numpy(np.ascontiguousarray(res.y.T)).to(device=device, dtype=dtype)
    return ys.reshape(times.shape[0], *shape)


__all__ = ["SCIPY_METHODS", "scipy_odeint"]
