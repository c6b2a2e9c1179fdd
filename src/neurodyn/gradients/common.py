"""What every gradient method shares: options, parameter discovery, the hidden-tensor check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.term import field_params, term_of
from ..errors import InputError


@dataclass
class GradientOptions:
    """Settings of the gradient methods (validated by :func:`neurodyn.solve`).

    Attributes
    ----------
    params : list of Tensor
        The tensors the vector field uses that need gradients (found automatically for ``nn.Module``
        vector fields; closures pass them as ``params=``).
    adjoint_method : str or None
        Method of the backward (adjoint) solve; default: the forward method.
    adjoint_rtol, adjoint_atol : float or None
        Tolerances of the backward solve; default: the forward ones.
    seminorm : bool
        Leave the parameter-gradient channels out of the backward error control (fewer steps).
    checkpoints : int
        ``gradient="checkpoint"``: states kept per level; longer segments are checkpointed recursively.
    """

    params: list[Tensor]
    adjoint_method: str | None = None
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    seminorm: bool = True
    checkpoints: int = 16


def find_params(func: Callable, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The tensors needing gradients: ``params`` if given, else the parameters of an ``nn.Module``
    vector field (or of the module a bound method belongs to), else none. For a term's ODE form (``solve`` given a
    :class:`~neurodyn.core.term.Term`) the term's :meth:`~neurodyn.core.term.Term.grad_tensors` (its vector fields'
    parameters, a path's data), joined by ``params`` when given."""
    term = term_of(func)
    if params is not None:
        out = list(params)
        for i, p in enumerate(out):
            if not isinstance(p, Tensor):
                raise InputError(f"params[{i}] is a {type(p).__name__}, not a tensor.")
        out = [p for p in out if p.requires_grad]
        if term is None:
            return out
        known = {id(p) for p in out}
        return [p for p in term.grad_tensors() if id(p) not in known] + out
    return term.grad_tensors() if term is not None else field_params(func)


def _graph_leaves(root: Tensor, stop: set) -> list[Tensor]:
    """Leaf tensors requiring grad that ``root`` was computed from (walks the autograd graph, not past the
    nodes in ``stop``: the ``grad_fn`` of non-leaf parameters, which receive their gradient there)."""
    leaves, seen, stack = [], set(), [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(nf for nf, _ in fn.next_functions)
    return leaves


def check_hidden_tensors(func: Callable, t0: Tensor, y0: Tensor, params: list[Tensor], method: str) -> None:
    """Raise if ``func`` depends on tensors requiring grad that the gradient method cannot see.

    Only ``y`` and ``params`` get gradients from the adjoint or checkpoint backward pass; a tensor
    captured by a closure would silently get none.
    """
    with torch.enable_grad():
        y = y0.detach().requires_grad_(True)
        out = func(t0, y)
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return
    known = {id(p) for p in params} | {id(y)}
    stop = {p.grad_fn for p in params if p.grad_fn is not None}
    hidden = [v for v in _graph_leaves(out, stop) if id(v) not in known]
    if hidden:
        shapes = ", ".join(str(tuple(v.shape)) for v in hidden[:5])
        raise InputError(
            f"gradient={method!r}: the vector field uses {len(hidden)} tensor(s) requiring grad that are not "
            f"among its parameters (shapes {shapes}); they would get no gradient. Pass them explicitly with "
            f"solve(..., params=[...]) (odeint_adjoint: adjoint_params=...), or use gradient='direct'."
        )
