"""Checks of :func:`neurodyn.solve`'s arguments: each raises :class:`~neurodyn.errors.InputError` naming the problem and
what to do, before any work."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .core.control import RTOL_FLOOR_EPS, PIDController, rtol_floor
from .core.tensors import fixed_bad, real_dtype, vmapped
from .errors import InputError, PrecisionWarning

INTERPOLATIONS = ("auto", "hermite", "linear")
# Half precision states are refused (validate_state).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_time_list(name: str, values: Any, device: torch.device) -> list[float]:
    if values is None:
        return []
    # a list of Python floats read as float64 (torch.as_tensor would round it to the default float32 dtype)
    v = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
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
        finite = all(map(math.isfinite, vals))
        rest = vals[1:]
        monotonic = all(map(operator.lt, vals, rest)) or all(map(operator.gt, vals, rest))
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
    if real_dtype(y0.dtype) in HALF_DTYPES:
        wide = "complex64" if y0.is_complex() else "float32"
        raise InputError(f"y0 has dtype {y0.dtype}: half precision is not supported (its 8 or 11 significant bits "
                         f"cannot hold a solve's increments, so the state freezes or the steps underflow). Use "
                         f"y0.to(torch.{wide}) (and t.to(torch.float32)), or torch.float64 for tight tolerances.")
    if y0.numel() == 0:
        raise InputError(f"y0 is empty (shape {tuple(y0.shape)}): there is nothing to integrate.")
    return y0


def clamp_rtol(name: str, rtol: float | Tensor, dtype: torch.dtype, atol: float | Tensor | None = None,
               y0: Tensor | None = None) -> float | Tensor:
    """``rtol`` (a float or a ``(1, n)`` row) raised to :func:`rtol_floor` of ``dtype`` wherever it is below, with a
    :class:`PrecisionWarning`.

    Below about two rounding units the result is no more accurate (the global error stops falling with ``rtol``, at
    the dtype's rounding), and an implicit method's error estimate (Newton's rounding) is noise: its steps shrink
    (float32 ``kvaerno3`` at one epsilon: 12 times the steps, a larger error). A zero ``rtol`` (a pure absolute
    tolerance) is raised too when ``atol`` and the state ``y0`` (its ``(1, n)`` rows) are given: the error scale
    ``atol + rtol |y|`` then never falls below the state's resolution, which changes nothing where ``atol`` is
    resolved; it warns only where ``atol`` is below the resolution of ``y0`` itself. Without them zeros are kept.

    Examples
    --------
    >>> import torch, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     clamp_rtol("rtol", 1e-9, torch.float32) == rtol_floor(torch.float32)
    True
    >>> clamp_rtol("rtol", 1e-6, torch.float64)
    1e-06
    """
    floor = rtol_floor(dtype)
    zeros_too = atol is not None and y0 is not None and not vmapped(y0)
    if isinstance(rtol, Tensor):
        low = rtol < floor if zeros_too else (rtol > 0) & (rtol < floor)
        if not bool(low.any()):
            return rtol
        positive = low & (rtol > 0)
        smallest = float(rtol[positive].min()) if bool(positive.any()) else 0.0
        out = torch.where(low, torch.full_like(rtol, floor), rtol)
    else:
        if not (rtol < floor and (rtol > 0 or zeros_too)):
            return rtol
        positive = rtol > 0
        smallest, out = rtol, floor
    warn = bool(positive.any()) if isinstance(positive, Tensor) else positive
    dt = str(real_dtype(dtype)).replace("torch.", "")
    if warn:
        why = f"{name}={smallest:.3g} is below what {dt} resolves"
    else:  # zeros only: warn where atol asks for less than the state's resolution at y0
        resolution = y0.detach().abs().reshape(1, -1) * floor
        unresolved = (atol < resolution) & (rtol == 0 if isinstance(rtol, Tensor) else True)
        warn = bool(unresolved.any())
        why = f"{name}=0 with atol={float(torch.as_tensor(atol).min()):.3g} asks for less than {dt} resolves at y0"
    if warn:
        warnings.warn(f"{why}: using {name}={floor:.3g} ({RTOL_FLOOR_EPS:g} times {dt}'s machine epsilon) instead. "
                      f"Pass {name} >= {floor:.3g}, or use float64 states and times for tighter tolerances.",
                      PrecisionWarning, stacklevel=4)  # clamp_rtol <- solve.prepare <- solve / init <- the caller
    return out


def zero_tolerance(rtol: float | Tensor, atol: float | Tensor) -> int:
    """How many state components have ``rtol == atol == 0`` (an error control no step can satisfy) for validated
    tolerances (floats or ``(1, n)`` rows)."""
    if isinstance(rtol, Tensor) or isinstance(atol, Tensor):
        r = rtol if isinstance(rtol, Tensor) else torch.tensor(float(rtol))
        a = atol if isinstance(atol, Tensor) else torch.tensor(float(atol))
        r, a = torch.broadcast_tensors(r, a.to(r.device))
        return int(((r == 0) & (a == 0)).sum())
    return int(rtol == 0 and atol == 0)


def check_norm(norm: Any, y0: Tensor, probe: bool = True) -> None:
    """``norm`` maps a scaled error of ``y0``'s shape to a real scalar; with ``probe`` (an adaptive solve, which will
    use it) it is called once on ones to check that, before any work."""
    if not callable(norm):
        raise InputError("norm must be callable: norm(scaled_error) -> scalar tensor.")
    if not probe:
        return
    try:
        with torch.no_grad():
            out = norm(torch.ones_like(y0.detach()))
    except Exception as exc:  # the user's function failed on a plain tensor: say so up front
        raise InputError(f"norm(scaled_error) failed on a tensor of the state's shape {tuple(y0.shape)} and dtype "
                         f"{y0.dtype}: {type(exc).__name__}: {exc}") from exc
    if isinstance(out, Tensor):
        ok = out.numel() == 1 and not out.is_complex()
        got = f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
    else:
        ok = isinstance(out, (int, float)) and not isinstance(out, bool)
        got = type(out).__name__
    if not ok:
        raise InputError(f"norm must return a real scalar (e.g. x.abs().max() or x.pow(2).mean().sqrt()), got {got} "
                         f"for a scaled error of shape {tuple(y0.shape)}: reduce over every element.")


def validate_problem(y0: Any, t: Any, per_sample_steps: bool) -> tuple[Tensor, Tensor]:
    """``(y0, t)`` checked: the state (:func:`validate_state`, finite values), the times (:func:`validate_times`;
    with ``per_sample_steps`` also ``(B, T)``: one row of times per sample)."""
    y0 = validate_state(y0)
    if per_sample_steps and isinstance(t, Tensor) and t.dim() == 2:
        if t.shape[0] != y0.shape[0]:
            raise InputError(f"per-sample times t of shape {tuple(t.shape)} need one row per sample "
                             f"({y0.shape[0]} samples).")
        for row in t:
            validate_times(row, y0)
    else:
        t = validate_times(t, y0)
    if fixed_bad(y0):  # (skipped under vmap; screened by the sum)
        raise InputError("y0 contains NaN or inf.")
    return y0, t


def check_choice(name: str, value: Any, valid: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``valid`` (the message lists them)."""
    if value not in valid:
        raise InputError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}.")


def check_int(name: str, value: Any, least: int) -> int:
    """``value`` as an integer ``>= least`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}.")
    return value


def check_nonnegative(**values: Any) -> None:
    """Each given value (None: not given) must be a finite number >= 0."""
    for name, v in values.items():
        if v is not None and (not math.isfinite(float(v)) or float(v) < 0):
            raise InputError(f"{name} must be finite and >= 0, got {v}.")


def check_steps(step_size: Any, first_step: Any, min_step: Any, max_step: Any, max_steps: Any
                ) -> tuple[float | None, float | None, float, float]:
    """The step-size options as floats: ``step_size`` and ``first_step`` finite and > 0 (or None), ``0 <= min_step <=
    max_step``, ``max_steps`` an integer >= 1."""
    for name, v in (("step_size", step_size), ("first_step", first_step)):
        if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
            raise InputError(f"{name} must be a finite number > 0, got {float(v)}.")
    min_step, max_step = float(min_step), float(max_step)
    if not (min_step >= 0 and math.isfinite(min_step)):
        raise InputError(f"min_step must be a finite number >= 0, got {min_step}.")
    if not max_step > 0:
        raise InputError(f"max_step must be > 0, got {max_step}.")
    if min_step > max_step:
        raise InputError(f"min_step={min_step} is larger than max_step={max_step}.")
    check_int("max_steps", max_steps, 1)
    return (None if step_size is None else float(step_size), None if first_step is None else float(first_step),
            min_step, max_step)


def check_hooks(controller: Any, step_callbacks: Any, event_fn: Any) -> None:
    """The controller is a :class:`~neurodyn.PIDController`; ``step_callbacks`` maps ``"step"``, ``"accept"``,
    ``"reject"`` to callables; ``event_fn`` is callable."""
    if controller is not None and not isinstance(controller, PIDController):
        raise InputError(f"controller must be a neurodyn.PIDController, got {type(controller).__name__}.")
    if step_callbacks is not None:
        bad = sorted(set(step_callbacks) - {"step", "accept", "reject"})
        if bad or not all(callable(c) for c in step_callbacks.values()):
            raise InputError(f"step_callbacks must map 'step', 'accept', 'reject' to callables cb(t, y, h_abs); got "
                             f"keys {sorted(step_callbacks)}.")
    if event_fn is not None and not callable(event_fn):
        raise InputError("event_fn must be callable as event_fn(t, y).")
