"""Checks of :func:`neurodyn.solve`'s arguments: each raises :class:`~neurodyn.errors.InputError` naming the problem and
what to do, before any work."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .core.tensors import real_dtype
from .errors import InputError

INTERPOLATIONS = ("auto", "hermite", "linear")


def as_time_list(name: str, values: Any, device: torch.device) -> list[float]:
    if values is None:
        return []
    v = torch.as_tensor(values).detach()
    if v.dim() > 1:
        raise InputError(f"{name} must be a 1-d sequence of times, got shape {tuple(v.shape)}.")
    v = v.reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise InputError(f"{name} contains NaN or inf: {v.tolist()}.")
    return v.tolist()


def check_tol(name: str, tol: Any, y0: Tensor) -> float | Tensor:
    if isinstance(tol, Tensor):
        if tol.is_complex() or not bool(torch.isfinite(tol).all()) or bool((tol < 0).any()):
            raise InputError(f"{name} must be finite and >= 0, got {tol}.")
        if tol.numel() == 1:
            return float(tol)
        try:
            return torch.broadcast_to(tol.to(y0.device, real_dtype(y0.dtype)), y0.shape).reshape(1, -1)
        except RuntimeError:
            raise InputError(f"{name} of shape {tuple(tol.shape)} does not broadcast to the state shape "
                             f"{tuple(y0.shape)}.") from None
    try:
        v = float(tol)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or a tensor, got {type(tol).__name__}.") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be finite and >= 0, got {v}.")
    return v


def validate_times(t: Any, y0: Tensor) -> Tensor:
    """Check the output times: 1-d, >= 2 entries, real floating of y0's precision, finite, monotonic."""
    if not isinstance(t, Tensor):
        raise InputError(f"t must be a 1-d tensor of times, got {type(t).__name__}: use torch.tensor(t).")
    if t.dim() != 1 or t.numel() < 2:
        raise InputError(f"t must be a 1-d tensor with at least 2 times (t[0] is the initial time), got "
                         f"shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise InputError(f"t must be a floating-point tensor, got dtype {t.dtype}: use t.to({real_dtype(y0.dtype)}).")
    if t.device != y0.device:
        raise InputError(f"t is on {t.device} but y0 is on {y0.device}: move both to one device.")
    if t.dtype != real_dtype(y0.dtype):
        raise InputError(f"t has dtype {t.dtype} but y0 has dtype {y0.dtype}: use t.to({real_dtype(y0.dtype)}) "
                         f"(times must have the state's real precision).")
    td = t.detach()
    if td.numel() <= 256:  # short: one transfer, then plain Python (no per-check device syncs)
        vals = td.tolist()
        finite = all(math.isfinite(v) for v in vals)
        inc = all(b > a for a, b in zip(vals, vals[1:]))
        monotonic = inc or all(b < a for a, b in zip(vals, vals[1:]))
    else:
        finite = bool(torch.isfinite(td).all())
        d = td[1:] - td[:-1]
        monotonic = bool((d > 0).all()) or bool((d < 0).all())
    if not finite:
        raise InputError(f"t contains NaN or inf: {td.tolist() if td.numel() <= 20 else 'see t'}.")
    if not monotonic:
        raise InputError("t must be strictly increasing or strictly decreasing (no repeats); got "
                         f"{td.tolist() if td.numel() <= 20 else 'a non-monotonic sequence'}.")
    return t


def validate_state(y0: Any) -> Tensor:
    if not isinstance(y0, Tensor):
        raise InputError(f"y0 must be a tensor, got {type(y0).__name__} (tuples of tensors are accepted by "
                         f"neurodyn.odeint).")
    if not (y0.is_floating_point() or y0.is_complex()):
        raise InputError(f"y0 must be floating point or complex, got dtype {y0.dtype}: use y0.to(torch.float64).")
    if y0.numel() == 0:
        raise InputError(f"y0 is empty (shape {tuple(y0.shape)}): there is nothing to integrate.")
    return y0
