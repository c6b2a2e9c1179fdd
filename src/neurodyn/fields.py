"""Field adapters: how user vector fields are called and checked."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError

NOISES = ("gaussian", "rademacher")


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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype of the ``torch.autocast`` region active for ``device_type`` (``"cpu"``,
    ``"cuda"``, ...), or None when autocast is off there."""
    try:
        on, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 (per-device functions), or no autocast there
        if device_type == "cpu":
            on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        elif device_type == "cuda":
            on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            return None
    return dtype if on else None


def autocast_field(func: Callable[[Tensor, Tensor], Tensor], device_type: str,
                   dtype: torch.dtype) -> Callable[[Tensor, Tensor], Tensor]:
    """``func`` evaluated inside ``torch.autocast(device_type, dtype)``, its result cast back to the state's dtype.

    :func:`neurodyn.solve` called inside an autocast region runs its own arithmetic (stage sums, error norms,
    Newton solves) with autocast off and the vector field through this wrapper: the field's matmuls run in
    ``dtype`` (e.g. bfloat16), the state stays in its own dtype (e.g. float32). Only a result in ``dtype`` is
    cast back (any other dtype mismatch is still reported). ``__wrapped__`` is ``func``.

    Example: ``g = autocast_field(net_field, "cpu", torch.bfloat16); g(t, y).dtype == y.dtype``.
    """

    def field(t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            out = func(t, y)
        if isinstance(out, Tensor) and out.dtype == dtype and y.dtype != dtype:
            out = out.to(y.dtype)
        return out

    field.__wrapped__ = func  # type: ignore[attr-defined]  # core.term.term_of / field_params look through it
    return field


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


# ----------------------------------------------------------------------------------------------
# Trace (divergence) and Jacobian-norm estimators, shared by the CNF and the regularisers
# ----------------------------------------------------------------------------------------------
def draw_probe(shape: torch.Size | tuple[int, ...], noise: str = "gaussian", *,
               generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """A Hutchinson probe ``eps`` of the given shape with ``E[eps eps^T] = I``: standard normal
    (``noise="gaussian"``) or uniform on ``{-1, +1}`` (``"rademacher"``, lower variance).

    Drawn on the generator's device (else ``device``, else CPU), then moved to ``device`` when given.
    ``dtype`` defaults to the default dtype.

    >>> draw_probe((3, 2), "rademacher", generator=torch.Generator().manual_seed(0)).abs().unique().tolist()
    [1.0]
    """
    if noise not in NOISES:
        raise InputError(f"draw_probe: noise must be one of {NOISES}, got {noise!r}.")
    dtype = dtype or torch.get_default_dtype()
    where = generator.device if generator is not None else (device or "cpu")
    with torch.no_grad():
        if noise == "gaussian":
            eps = torch.randn(torch.Size(shape), generator=generator, dtype=dtype, device=where)
        else:
            eps = torch.randint(0, 2, torch.Size(shape), generator=generator, device=where).to(dtype) * 2 - 1
    return eps if device is None else eps.to(device)


def per_sample_sum(x: Tensor) -> Tensor:
    """Sum over the feature dimensions: ``(B, *features) -> (B,)``; a 1-d ``(D,)`` (one sample) gives ``()``.

    >>> per_sample_sum(torch.ones(4, 3)).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """
    return x.reshape(x.shape[0], -1).sum(-1) if x.dim() >= 2 else x.sum()


def jacobian_trace(f: Tensor, z: Tensor, eps: Tensor | None = None, *, create_graph: bool = False,
                   frobenius: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-sample ``tr(df/dz)`` and (``frobenius=True``) ``||df/dz||_F^2``, from ``f = f(z)`` already computed
    with ``z`` in its graph.

    Parameters
    ----------
    f, z : Tensor, shape ``(B, *features)`` (a batch of independent samples) or ``(D,)`` (one sample)
        The field's value and its input (``z.requires_grad``).
    eps : Tensor of ``z``'s shape, optional
        A Hutchinson probe (:func:`draw_probe`): the estimates are ``eps^T J eps`` and ``||eps^T J||^2`` from
        one vector-Jacobian product (unbiased; the caller keeps ``eps`` fixed for a whole solve). Omitted:
        exact, one VJP per feature (``D`` products, each over the whole batch; exact per sample when the
        field treats the samples independently, as an MLP does).
    create_graph : bool
        Keep the graph of the products (to differentiate the estimates; training).
    frobenius : bool
        Also return the squared Frobenius norm (RNODE's Jacobian penalty) from the same products.

    Returns
    -------
    trace : Tensor, shape ``(B,)`` (``()`` for a 1-d ``z``)
    frob : Tensor of the same shape, or None when ``frobenius=False``

    Examples
    --------
    >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> z = torch.randn(5, 2, requires_grad=True)
    >>> tr, fro = jacobian_trace(z @ A.T, z, frobenius=True)
    >>> tr.tolist(), fro[0].item()
    ([5.0, 5.0, 5.0, 5.0, 5.0], 30.0)
    """
    if not f.requires_grad:
        zero = per_sample_sum(torch.zeros_like(z))
        return zero, (zero if frobenius else None)
    if eps is not None:
        if eps.shape != z.shape:
            raise InputError(f"jacobian_trace: the probe has shape {tuple(eps.shape)}, the state {tuple(z.shape)}: "
                             f"draw the probe with the state's shape.")
        (v,) = torch.autograd.grad(f, z, eps, create_graph=create_graph, retain_graph=True, allow_unused=True)
        if v is None:
            zero = per_sample_sum(torch.zeros_like(z))
            return zero, (zero if frobenius else None)
        return per_sample_sum(v * eps), (per_sample_sum(v * v) if frobenius else None)
    batched = z.dim() >= 2
    d = z[0].numel() if batched else z.numel()
    zero = per_sample_sum(torch.zeros_like(z))
    trace, frob = zero, (zero if frobenius else None)
    for i in range(d):
        e = torch.zeros(d, dtype=z.dtype, device=z.device)
        e[i] = 1.0
        e = e.expand(z.shape[0], d).reshape(z.shape) if batched else e.view(z.shape)
        (v,) = torch.autograd.grad(f, z, e, create_graph=create_graph, retain_graph=True, allow_unused=True)
        if v is None:
            continue
        vf = v.reshape(z.shape[0], d) if batched else v.reshape(d)
        trace = trace + vf[..., i]
        if frobenius:
            frob = frob + per_sample_sum(v * v)
    return trace, frob
