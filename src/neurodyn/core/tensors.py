"""Tensor helpers of the engine: real dtypes, functorch (vmap) detection, finiteness checks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

try:  # the engine call behind torch.autograd.grad (torch >= 2.3); older torch: torch.autograd.grad itself
    from torch.autograd.graph import _engine_run_backward as _run_backward
except ImportError:  # pragma: no cover - depends on the torch version
    _run_backward = None

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a (possibly complex) dtype."""
    return _REAL.get(dtype, dtype)


@contextlib.contextmanager
def _inference_off() -> Iterator[None]:
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) alone would turn grad mode on
        yield


def ordinary_tensors() -> contextlib.AbstractContextManager:
    """A context for creating tensors kept in a cache that outlives the current call (coefficients, tolerances,
    reused buffers): under ``torch.inference_mode()`` it turns inference mode off (grad mode stays off), so the
    tensors created are ordinary ones, which a later solve under autograd may save for backward (an inference tensor
    may not be); elsewhere it does nothing. Meant for the cache-miss path only: entering it costs a few
    microseconds."""
    return _inference_off() if torch.is_inference_mode_enabled() else contextlib.nullcontext()


VMAP_ADAPTIVE = ("torch.func.vmap over an adaptive solve is not possible: the step sizes are host-side decisions on "
                 "the values of every vmapped member (states or parameters). Use a fixed-step method (e.g. "
                 "method='rk4', step_size=h) under vmap, per_sample_steps=True for a batch of states, or a loop over "
                 "the members.")


def vmapped(*xs: Tensor) -> bool:
    """True when any of ``xs`` is a ``torch.func.vmap`` batched tensor (possibly under grad wrappers): no host-side
    decision may read its values, and it cannot be written into a buffer allocated from an unbatched tensor.
    Outside every ``torch.func`` transform this costs one cheap call; under ``torch.compile`` tracing (fake tensors)
    it is False."""
    if torch.compiler.is_compiling():
        return False
    ft = torch._C._functorch
    if ft.maybe_current_level() is None:
        return False
    for x in xs:
        while ft.is_functorch_wrapped_tensor(x):  # e.g. jacrev inside vmap: a grad wrapper around a batched one
            if ft.is_batchedtensor(x):
                return True
            x = ft.get_unwrapped(x)
    return False


def fixed_bad(y: Tensor) -> bool:
    """Non-finite values in a fixed-step state (skipped under vmap, where values cannot reach the host).

    Screened by the sum: any NaN or inf makes the sum non-finite, so a finite sum proves every value finite (one
    reduction, about 20x cheaper on CPU than ``isfinite(y).all()``); a non-finite sum (a NaN/inf, or finite values
    whose sum overflows) is settled by the exact elementwise check. A small CPU tensor (at most :data:`_LIST_MAX`
    elements, at most 2-d) is read as Python floats instead and each value checked.
    """
    if vmapped(y):
        return False
    yd = y.detach()
    if yd.is_complex():
        yd = torch.view_as_real(yd)
    if yd.is_cpu and yd.dim() <= 2 and yd.numel() <= _LIST_MAX:
        # a small CPU tensor: its values read as Python floats (~10x cheaper than a reduction and its read-back)
        vals = yd.tolist()
        if yd.dim() == 2:
            vals = [v for row in vals for v in row]
        elif yd.dim() == 0:
            vals = (vals,)
        return not all(map(math.isfinite, vals))
    if math.isfinite(float(yd.sum())):
        return False
    return not bool(torch.isfinite(yd).all())


_LIST_MAX = 64  # fixed_bad reads CPU tensors of at most this many elements (at most 2-d) as Python floats


def real_bad(y: Tensor) -> bool:
    """:func:`fixed_bad` for a real tensor where the caller knows that no ``torch.func`` transform is active (the
    loop checks once per solve): the same sum screen, without the per-call transform and complex checks, on
    ``y.data`` (no detach dispatch)."""
    yd = y.data
    if math.isfinite(float(yd.sum())):
        return False
    return not bool(torch.isfinite(yd).all())


def no_transform() -> bool:
    """True when no ``torch.func`` transform (vmap, grad, jacrev, ...) is active."""
    return torch._C._functorch.maybe_current_level() is None


def flat_cat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate flattened tensors, zeros (of the matching ``like`` entry's shape) where an entry is None."""
    return torch.cat([(t if t is not None else torch.zeros_like(ref)).reshape(-1) for t, ref in zip(tensors, like)])


def vjp(output: Tensor, inputs: Sequence[Tensor], cotangent: Tensor,
        create_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, cotangent, allow_unused=True, create_graph=create_graph)``: the
    vector-Jacobian product of one output, ``None`` for the inputs it does not depend on.

    For the per-evaluation products of the backward solves (the adjoint's augmented field runs one per field
    evaluation): where ``cotangent`` has ``output``'s shape and dtype and no tensor overrides ``__torch_function__``,
    the autograd engine is called directly, without ``torch.autograd.grad``'s argument normalisation and cotangent
    validation (about 10 us a call on a CPU, as much as a small field's evaluation); otherwise, and with
    ``create_graph``, through ``torch.autograd.grad``.

    Examples
    --------
    >>> w = torch.tensor([2.0, 3.0], requires_grad=True)
    >>> x = torch.tensor([1.0, 1.0], requires_grad=True)
    >>> vjp(w * x, (x, w), torch.tensor([1.0, 10.0]))
    (tensor([ 2., 30.]), tensor([ 1., 10.]))
    """
    if (_run_backward is None or create_graph or cotangent.shape != output.shape or cotangent.dtype != output.dtype
            or torch.overrides.has_torch_function((output, cotangent, *inputs))):
        return torch.autograd.grad(output, inputs, cotangent, allow_unused=True, create_graph=create_graph)
    return _run_backward((output,), (cotangent,), False, False, tuple(inputs), True, accumulate_grad=False)
