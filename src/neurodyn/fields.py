"""Field adapters: how user vector fields are called and checked."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .errors import InputError


def check_derivative(f0: Any, y0: Tensor) -> Tensor:
    if not isinstance(f0, Tensor):
        raise InputError(f"func(t, y) must return a tensor, got {type(f0).__name__}.")
    if f0.shape != y0.shape:
        raise InputError(f"func(t, y) returned shape {tuple(f0.shape)}, but the state has shape "
                         f"{tuple(y0.shape)}: dy/dt must have the state's shape.")
    if f0.dtype != y0.dtype:
        raise InputError(f"func(t, y) returned dtype {f0.dtype}, but the state has dtype {y0.dtype}: "
                         f"make the vector field compute in the state's dtype.")
    if f0.device != y0.device:
        raise InputError(f"func(t, y) returned a tensor on {f0.device}, but the state is on {y0.device}.")
    return f0


def takes_time(func: Callable) -> bool:
    """True when ``func`` is called as ``func(t, z)``, False for ``func(z)``.

    Wrappers whose ``forward`` is ``(*args, **kwargs)`` are looked through: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``), ``DistributedDataParallel`` / ``DataParallel`` (``module``).
    A signature that cannot tell (uninspectable, or ``*args`` with fewer than two required positional
    parameters) means the solver's own convention, ``f(t, z)``.
    """
    while isinstance(func, nn.Module):
        inner = getattr(func, "_orig_mod", None)
        if inner is None and isinstance(func, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = func.module
        if not isinstance(inner, nn.Module):
            break
        func = inner
    target = func.forward if isinstance(func, nn.Module) else func
    try:
        sig = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    params = [p for p in sig if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) < 2 and any(p.kind is p.VAR_POSITIONAL for p in sig):
        return True
    return len(params) >= 2


def time_field(func: Callable, autonomous: bool | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``func`` as a field ``f(t, z)``: itself when it takes the time (or ``autonomous=False``), else
    ``lambda t, z: func(z)`` (``autonomous=True``, or a signature with one required argument; see :func:`takes_time`).

    Examples
    --------
    >>> import torch
    >>> f = time_field(lambda z: -z)
    >>> f(torch.tensor(0.0), torch.ones(2))
    tensor([-1., -1.])
    """
    with_time = (not autonomous) if autonomous is not None else takes_time(func)
    return func if with_time else (lambda t, z: func(z))
