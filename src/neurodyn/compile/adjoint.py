"""``compile=True`` for the stochastic adjoint's backward solve (internal): each evaluation of the augmented SDE's drift
and diffusion product compiled.

The backward solve of ``gradient="adjoint"`` on an SDE (:class:`neurodyn.core.term.SDEAdjointTerm`) evaluates, per
stage, ``[F, -a^T dF/dy, -a^T dF/dtheta]`` for ``F = f`` and for ``F = g dW``: in eager mode a forward call of the
user's network with autograd recording, then a backward pass. Here each of the two is one compiled program (the
forward and the vector-Jacobian product by ``torch.func.vjp`` in one graph, the network's parameters as inputs through
``torch.func.functional_call``; no autograd graph is recorded): the forward's products and their transposes fused
with their pointwise work, on the CPU float32 products by oneDNN (:class:`~neurodyn.compile.loop.LoopProducts`). On
the benchmark's SDE (64-d MLP drift and diffusion, batch 512, float32, one core) a drift and diffusion pair takes
~0.95 ms compiled against ~1.6 ms eager.

It applies where the adjoint's evaluations are those of the user's modules only: CPU tensors; a Stratonovich SDE or
additive noise (an Ito SDE's drift correction stays eager); drift and diffusion methods of ``nn.Module`` s (or modules)
whose parameters requiring grad are exactly the gradient's ``params``. A tensor requiring grad that the functions
capture otherwise (a closure's, a module's plain attribute), or a failed compilation, makes the evaluations eager (the
eager path then checks hidden tensors as it does without ``compile=True``), with a warning for a failure.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.term import ODETerm, Term
from ..solvers.sde import split_sde
from .driven import call_compiled, graph_leaves
from .entries import Entries
from .loop import DRIVEN_OPTIONS, patched_inductor
from .step import own_code

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAILED = object()


class _Hidden(Exception):
    """The functions capture a tensor requiring grad that is not among the program's inputs."""


class _Owners(torch.nn.Module):
    """The modules owning the drift and diffusion as submodules (so that ``functional_call`` substitutes their
    parameters); ``forward`` evaluates the drift (``dW`` None) or the diffusion product of the term in ``holder``."""

    def __init__(self, owners: Sequence[torch.nn.Module], holder: list):
        super().__init__()
        self.owners = torch.nn.ModuleList(owners)
        self.holder = holder

    def forward(self, t: Tensor, y: Tensor, dW: Tensor | None) -> Tensor:
        drift, diffusion = self.holder
        if dW is None:
            return drift(t, y)
        return diffusion.vf_prod(t, y, dW)


class AdjointFields:
    """The compiled evaluations of one SDE's augmented adjoint fields (see the module docstring): :meth:`drift` and
    :meth:`g_prod` return ``[F, -a^T dF/dy, -a^T dF/dtheta]`` (``(1, 2n + P)``) on the flat state ``z = [y, a, g]``,
    or None where the compiled program is not usable (the caller evaluates eagerly)."""

    def __init__(self, owners: Sequence[torch.nn.Module], names: list[str], shape: tuple[int, ...]):
        self.holder: list = [None, None]
        self.module = _Owners(owners, self.holder)
        self.names = names
        self.shape = shape
        self.n = math.prod(shape)
        self.failed = False
        self.programs = {False: self._build(False), True: self._build(True)}
        self.close()

    def _build(self, diffusion: bool) -> Callable:
        module, names, shape, n = self.module, self.names, self.shape, self.n

        def run(t: Tensor, z: Tensor, dW: Tensor | None, *ps: Tensor):
            zf = z.reshape(-1)
            y, a = zf[:n].view(shape), zf[n:2 * n].view(shape)

            def field(y: Tensor, *ps: Tensor) -> Tensor:
                return torch.func.functional_call(module, dict(zip(names, ps)), (t, y, dW if diffusion else None))

            fy, back = torch.func.vjp(field, y, *ps)
            grads = back(-a)
            parts = [fy.reshape(-1), grads[0].reshape(-1)] + [g.reshape(-1) for g in grads[1:]]
            return (torch.cat(parts).to(z.dtype).view(1, -1),)

        fn = own_code(run)
        entries = Entries(fn, n_outputs=1)
        inductor = patched_inductor(DRIVEN_OPTIONS)

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            # The program's inputs are z, dW and the detached parameters: one requiring grad is a tensor the
            # functions capture, whose gradient this program would not compute.
            if any(isinstance(x, Tensor) and x.requires_grad for x in example_inputs):
                raise _Hidden("a tensor requiring grad captured by the drift or diffusion")
            return inductor(gm, example_inputs)

        compiled = torch.compile(fn, backend=entries.backend(backend), fullgraph=True, dynamic=False)
        compiled.entries = entries
        return compiled

    def bind(self, drift: Callable, diffusion: Any, owners: Sequence[torch.nn.Module]) -> AdjointFields:
        """Sets the functions of this solve's term (its drift, its Brownian ControlTerm) and their modules (in the
        order this object was made with)."""
        self.holder[0], self.holder[1] = drift, diffusion
        if not len(self.module.owners):
            self.module.owners.extend(owners)
        return self

    def close(self) -> None:
        """Forgets the bound term and modules (after the backward solve): this object lives in a cache keyed weakly
        by a module, so it must not keep the module alive."""
        self.holder[0] = self.holder[1] = None
        del self.module.owners[:]

    def _run(self, diffusion: bool, t: Tensor, z: Tensor, dW: Tensor | None, params: Sequence[Tensor]) -> Tensor | None:
        if self.failed:
            return None
        try:
            with torch.no_grad():
                return call_compiled(self.programs[diffusion], t, z, dW, *[p.detach() for p in params])[0]
        except Exception as err:  # noqa: BLE001 - any failure of compiling: the eager evaluations
            self.failed = True
            if not _is_hidden(err):
                warnings.warn(f"compile=True: the stochastic adjoint's backward evaluations could not be compiled "
                              f"({type(err).__name__}: {err}); they run eagerly.", RuntimeWarning, stacklevel=4)
            return None

    def drift(self, t: Tensor, z: Tensor, params: Sequence[Tensor]) -> Tensor | None:
        return self._run(False, t, z, None, params)

    def g_prod(self, t: Tensor, z: Tensor, dW: Tensor, params: Sequence[Tensor]) -> Tensor | None:
        return self._run(True, t, z, dW, params)


def _is_hidden(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, _Hidden):
            return True
        err = err.__cause__ or err.__context__
    return False


def _owner(fn: Any) -> torch.nn.Module | None:
    owner = getattr(fn, "__self__", fn)
    return owner if isinstance(owner, torch.nn.Module) else None


def adjoint_fields(user: Term, shape: Sequence[int], params: Sequence[Tensor], y: Tensor) -> AdjointFields | None:
    """The compiled evaluations of the stochastic adjoint of the SDE term ``user`` (state of shape ``shape``,
    gradients for ``params``; ``y`` a state of the solve, for its device and dtype), bound to this term's functions;
    None where they do not apply (module docstring). Cached per drift and diffusion functions, shape and dtype."""
    if y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64):
        return None
    drift, diffusion = split_sde(user)
    if diffusion.sde_type != "stratonovich" and diffusion.noise != "additive":
        return None
    fns = [drift.func if isinstance(drift, ODETerm) else drift, diffusion.vector_field, diffusion.g_prod]
    fns = [fn for fn in fns if fn is not None]
    owners = [_owner(fn) for fn in fns]
    leaves, known = graph_leaves(user, y.detach(), None)
    if not known or any(o is None for o in owners):
        return None
    if {id(p) for p in leaves} != {id(p) for p in params}:
        return None
    unique = list({id(o): o for o in owners}.values())
    try:
        per = _CACHE.setdefault(unique[0], {})
    except TypeError:
        return None
    key = (tuple(id(o) for o in unique), tuple((id(fn.__self__), fn.__func__) if hasattr(fn, "__func__") else fn
                                              for fn in fns),
           diffusion.noise, diffusion.sde_type, type(drift), tuple(shape), y.dtype, tuple(id(p) for p in params))
    fields = per.get(key)
    if fields is _FAILED:
        return None
    if fields is None:
        holder = _Owners(unique, [None, None])
        names_of = {id(p): name for name, p in holder.named_parameters(remove_duplicate=False)}
        if any(id(p) not in names_of for p in params):
            per[key] = _FAILED
            return None
        fields = per[key] = AdjointFields(unique, [names_of[id(p)] for p in params], tuple(shape))
    if fields.failed:
        per[key] = _FAILED
        return None
    field = drift.func if isinstance(drift, ODETerm) else drift
    return fields.bind(field if field is not None else (lambda t, y: torch.zeros_like(y)), diffusion, unique)
