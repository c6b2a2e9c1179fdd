"""What every gradient method shares: options, parameter discovery, the hidden-tensor check."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    #: Whether the backward solve steps adaptively (None: as the forward solve; True with a fixed-step forward: the
    #: backward solve adapts from the forward's step size).
    adjoint_adaptive: bool | None = None
    checkpoints: int = 16
    #: ``gradient="checkpoint"`` with ``compile=True``: the time of the hidden-tensor check that
    #: :func:`neurodyn.solve.prepare` left to the solve (made there where the compiled training step does not run);
    #: None where ``prepare`` made it (or none is due).
    hidden_t0: Tensor | None = None
    #: ``compile=True``: what compiles the adjoints' backward evaluations
    #: (:func:`neurodyn.compile.adjoint.adjoint_fields`, called as ``(func, shape, params, y)``; it returns None where
    #: they stay eager); None: eager.
    adjoint_fields: Callable | None = None


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


def _graph_leaves(roots: Sequence[Tensor | None], stop: set, extra: Sequence[Any] = ()) -> list[Tensor]:
    """Leaf tensors requiring grad that ``roots`` were computed from (walks the autograd graph, not past the
    nodes in ``stop`` and ``extra``: the ``grad_fn`` of non-leaf parameters, which receive their gradient there, the
    gradient accumulators of leaf parameters, and the ``grad_fn`` of a call's inputs). Each node is tested before
    it is pushed, so nodes in ``stop`` cost a set lookup and nothing else."""
    leaves: list[Tensor] = []
    seen = set(extra)
    stack = []
    for r in roots:
        fn = r.grad_fn if isinstance(r, Tensor) else None
        if fn is not None and fn not in stop and fn not in seen:
            seen.add(fn)
            stack.append(fn)
    pop, push, add = stack.pop, stack.append, seen.add
    while stack:
        fn = pop()
        nexts = fn.next_functions
        if nexts:
            for nf, _ in nexts:
                if nf is not None and nf not in stop and nf not in seen:
                    add(nf)
                    push(nf)
        else:
            var = getattr(fn, "variable", None)
            if var is not None:
                leaves.append(var)
    return leaves


def _accumulator(p: Tensor) -> Any:
    """The gradient accumulator node of a leaf tensor requiring grad (the same object in every graph using it while
    it is held), or its ``grad_fn`` for a non-leaf."""
    if p.grad_fn is not None:
        return p.grad_fn
    with torch.enable_grad():
        return p.view_as(p).grad_fn.next_functions[0][0]


def _hidden_error(method: str, shapes: list[tuple[int, ...]], when: str) -> InputError:
    listed = ", ".join(str(s) for s in shapes[:5])
    return InputError(
        f"gradient={method!r}: the vector field uses {len(shapes)} tensor(s) requiring grad that are not among its "
        f"parameters (shapes {listed}; {when}); they would get no gradient. Pass them explicitly with "
        f"solve(..., params=[...]) (odeint_adjoint: adjoint_params=...), or use gradient='direct'.")


class HiddenTensorGuard:
    """Finds tensors requiring grad that a vector field uses but the gradient method does not differentiate.

    ``"adjoint"``, ``"interpolated"`` and ``"checkpoint"`` differentiate the field (in their backward pass) with
    respect to ``y`` and ``params`` only; a tensor captured by a closure would silently get no gradient. A field may
    use such a tensor only at some times (``w if t > 0.5 else 1.0``), so every evaluation of the field with autograd
    in the backward pass is checked: :meth:`watch` walks the graph of its output (not past the call's inputs) for
    leaves requiring grad that are neither parameters nor the call's own inputs.

    A leaf the call made itself (FFJORD-style fields mark ``t`` or a fresh tensor ``requires_grad_()``) is not
    captured. Two ways tell them apart:

    * ``"alive"``: the leaves found are held by weak references only, and :meth:`settle` -- run once the graph is
      freed -- raises for those still alive: a call's own leaf dies with the graph, a captured tensor outlives it.
    * ``"repeat"`` (for replays through steppers that keep the last step's tensors, and so its graph): a captured
      tensor is the same live object in two evaluations, a call's own leaf is new in each; the second sighting raises.

    Cost: one walk of the field's autograd graph per evaluation (a Python loop over its nodes): measured +7 to +12 % on
    a solve with its backward pass for ``adjoint``/``interpolated``/``checkpoint`` (a 3-layer MLP field of width 64,
    batch 16, one thread; ``benchmarks/bench_gradient_overheads.py``); relatively less for fields whose operations
    cost more than their number.
    """

    def __init__(self, params: Sequence[Tensor], method: str, mode: str = "alive"):
        self.known = {id(p) for p in params}
        self.stop = {_accumulator(p) for p in params if p.requires_grad}
        self.method = method
        self.mode = mode
        self.pending: list[tuple[weakref.ref, int]] = []
        self.seen: dict[int, weakref.ref] = {}

    def watch(self, roots: Sequence[Tensor | None], inputs: Sequence[Tensor | None]) -> None:
        """Record the leaves requiring grad behind ``roots`` other than ``inputs`` and the parameters. The tensor an
        input is a view of counts as that input (a field may reach the state through another view of it, e.g. a
        value it computed from the same state in an earlier call)."""
        own = [x for x in inputs if isinstance(x, Tensor)]
        own += [x._base for x in own if x._base is not None]
        extra = [x.grad_fn for x in own if x.grad_fn is not None]
        leaves = _graph_leaves(roots, self.stop, extra)
        if not leaves:
            return
        known = self.known
        found = {id(v): v for v in leaves if id(v) not in known and not any(v is x for x in own)}
        if not found:
            return
        if self.mode == "alive":
            self.pending.extend((weakref.ref(v), i) for i, v in found.items())
            return
        again = []
        for i, v in found.items():
            ref = self.seen.get(i)
            if ref is not None and ref() is v:
                again.append(tuple(v.shape))
            else:
                self.seen[i] = weakref.ref(v)
        if again:
            raise _hidden_error(self.method, again, "seen in the backward pass")
        if len(self.seen) > 4096:  # forget the dead (each call's own leaves)
            self.seen = {i: r for i, r in self.seen.items() if r() is not None}

    def settle(self, when: str = "seen in the backward pass") -> None:
        """Raise for the recorded leaves that outlived the graph they were found in (captured tensors)."""
        if not self.pending:
            return
        alive = list({id(v): tuple(v.shape) for v in (ref() for ref, _ in self.pending) if v is not None}.values())
        self.pending = []
        if alive:
            raise _hidden_error(self.method, alive, when)

    def field(self, func: Callable[[Tensor, Tensor], Tensor],
              settle: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
        """``func`` with every evaluation under autograd watched. With ``settle`` (mode ``"alive"``) the previous
        evaluation's graph is freed by the next call, so its leaves are settled first (else the caller settles)."""

        def watched(t: Tensor, y: Tensor) -> Tensor:
            if settle and self.pending:
                self.settle()
            out = func(t, y)
            if isinstance(out, Tensor) and out.grad_fn is not None and torch.is_grad_enabled():
                self.watch((out,), (t, y))
            return out

        watched.__wrapped__ = func  # type: ignore[attr-defined]  # core.term.term_of finds the term behind it
        watched.guard = self  # type: ignore[attr-defined]  # steppers evaluating a term's other parts watch them too
        return watched


def check_hidden_tensors(func: Callable, t0: Tensor, y0: Tensor, params: list[Tensor], method: str) -> None:
    """Raise if ``func`` depends on tensors requiring grad that the gradient method cannot see (at ``t0``).

    Only ``y`` and ``params`` get gradients from the adjoint or checkpoint backward pass; a tensor
    captured by a closure would silently get none. Tensors the call makes itself (``t.requires_grad_()``,
    FFJORD-style) are not captured and pass (see :class:`HiddenTensorGuard`, which checks the backward pass's
    evaluations at every other time).
    """
    guard = HiddenTensorGuard(params, method)
    # The extra evaluation must not move the random generators: a stochastic field then draws in the solve what it
    # would draw without this check (what gradient='direct' draws).
    with torch.random.fork_rng(devices=[y0.device] if y0.device.type == "cuda" else []), torch.enable_grad():
        y = y0.detach().requires_grad_(True)
        out = func(t0, y)
        if isinstance(out, Tensor) and out.grad_fn is not None:
            guard.watch([out], [t0, y])
    del out
    guard.settle(f"at t={float(t0.detach().reshape(-1)[0]):.6g}")


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a first-order gradient through; differentiating it raises (see :func:`first_order_only`)."""

    @staticmethod
    def forward(ctx, method: str, grad: Tensor, *links: Tensor) -> Tensor:
        ctx.method = method
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise InputError(
            f"gradient={ctx.method!r} computes its gradient outside autograd, so it cannot be differentiated again "
            f"(a second derivative, Hessian-vector product or gradient penalty through the solve, requested with "
            f"create_graph=True). Use gradient='direct' (with an explicit method, e.g. method='dopri5', or an "
            f"implicit one, e.g. method='radau'): it gives exact second derivatives of the discrete solve.")


def first_order_only(method: str, grads: Sequence[Tensor | None], links: Sequence[Tensor | None]) -> tuple:
    """The gradients a gradient method's backward returns, made to raise if they are differentiated again.

    Only under ``create_graph=True`` (grad mode on inside ``backward``): each gradient is passed through a node
    whose backward raises a clear :class:`InputError`, and that node is linked to ``links`` (the incoming
    cotangents, the forward's inputs), so any second derivative through the solve reaches it -- instead of
    silently missing this path (a zero or a wrong value). Without ``create_graph`` the gradients are returned as
    they are (no cost)."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    live = [x for x in links if isinstance(x, Tensor) and x.requires_grad]
    if not live:
        return tuple(grads)
    return tuple(g if g is None else _NoDoubleBackward.apply(method, g, *live) for g in grads)
