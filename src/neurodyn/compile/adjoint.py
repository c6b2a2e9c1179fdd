"""``compile=True`` for the continuous adjoints' backward solves (internal): each evaluation of the augmented field's
value and vector-Jacobian products compiled.

The backward solve of ``gradient="adjoint"`` / ``"interpolated"`` (:class:`neurodyn.core.term.AdjointTerm`) and of
the stochastic adjoint (:class:`neurodyn.core.term.SDEAdjointTerm`) evaluates, per stage, ``F`` and
``(-a^T dF/dy, -a^T dF/dtheta)`` for ``F`` the field (an ODE's right-hand side, an SDE's drift) and, for an SDE,
``F = g dW``: in eager mode a forward call of the user's network with autograd recording, then a backward pass. Here
each is one compiled program (the forward and the vector-Jacobian product by ``torch.func.vjp`` in one graph, the
network's parameters as inputs through ``torch.func.functional_call``; no autograd graph is recorded): the forward's
products and their transposes fused with their pointwise work, on the CPU float32 products by oneDNN
(:class:`~neurodyn.compile.loop.LoopProducts`). The values are assembled into the augmented field by
:func:`~neurodyn.core.term.adjoint_field`, as the eager ones are. On the benchmark's SDE (64-d MLP drift and
diffusion, batch 512, float32, one core) a drift and diffusion pair takes ~0.95 ms compiled against ~1.6 ms eager.

It applies where the evaluations are those of the user's modules only: CPU tensors; an ODE field, or a Stratonovich
SDE or additive noise (an Ito SDE's drift correction stays eager), that is an ``nn.Module`` or a method of one, whose
parameters requiring grad are exactly the gradient's ``params``. A tensor requiring grad that the functions capture
otherwise (a closure's, a module's plain attribute), or a failed compilation, makes the evaluations eager (the eager
path then checks hidden tensors as it does without ``compile=True``), with a warning for a failure.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.term import ODETerm, term_of
from ..solvers.sde import split_sde
from .driven import call_compiled, compiled_program
from .loop import DRIVEN_OPTIONS
from .step import own_code

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAILED = object()


class _Hidden(Exception):
    """The functions capture a tensor requiring grad that is not among the program's inputs."""


class _Owners(torch.nn.Module):
    """The modules owning the field (and diffusion) as submodules, so that ``functional_call`` substitutes their
    parameters; ``forward`` evaluates the field (``dW`` None) or the diffusion product of the functions in
    ``holder``."""

    def __init__(self, owners: Sequence[torch.nn.Module], holder: list):
        super().__init__()
        self.owners = torch.nn.ModuleList(owners)
        self.holder = holder

    def forward(self, t: Tensor, y: Tensor, dW: Tensor | None) -> Tensor:
        field, diffusion = self.holder
        if dW is None:
            return field(t, y)
        return diffusion.vf_prod(t, y, dW)


class AdjointFields:
    """The compiled evaluations of one adjoint's fields (see the module docstring): :meth:`drift` and :meth:`g_prod`
    return ``(F, (-a^T dF/dy, *(-a^T dF/dtheta_j)))`` for ``F`` the field and ``F = g dW``, or None where the compiled
    program is not usable (the caller evaluates eagerly). Programs are compiled at their first use."""

    def __init__(self, owners: Sequence[torch.nn.Module], params: Sequence[Tensor], shape: tuple[int, ...]):
        self.holder: list = [None, None]
        self.module = _Owners(owners, self.holder)
        names_of = {id(p): name for name, p in self.module.named_parameters(remove_duplicate=False)}
        self.names = [names_of[id(p)] for p in params]
        self.params = list(params)
        self.shape = shape
        self.failed = False
        self.programs: dict[bool, Callable] = {}
        self.close()

    def _build(self, diffusion: bool) -> Callable:
        module, names = self.module, self.names

        def run(t: Tensor, y: Tensor, a: Tensor, dW: Tensor | None, *ps: Tensor):
            def field(y: Tensor, *ps: Tensor) -> Tensor:
                return torch.func.functional_call(module, dict(zip(names, ps)), (t, y, dW if diffusion else None))

            fy, back = torch.func.vjp(field, y, *ps)
            return (fy, *back(-a))

        return compiled_program(own_code(run), DRIVEN_OPTIONS, 2 + len(names), check=_no_hidden, dynamic=False)

    def bind(self, field: Callable, diffusion: Any, owners: Sequence[torch.nn.Module]) -> AdjointFields:
        """Sets the functions of this solve (the field, the Brownian ControlTerm or None) and their modules (in the
        order this object was made with)."""
        self.holder[0], self.holder[1] = field, diffusion
        if not len(self.module.owners):
            self.module.owners.extend(owners)
        return self

    def close(self) -> None:
        """Forgets the bound functions and modules (after the backward solve): this object lives in a cache keyed
        weakly by a module, so it must not keep the module alive."""
        self.holder[0] = self.holder[1] = None
        del self.module.owners[:]

    def _run(self, diffusion: bool, t: Tensor, y: Tensor, a: Tensor, dW: Tensor | None) -> tuple | None:
        if self.failed:
            return None
        try:
            program = self.programs.get(diffusion)
            if program is None:
                program = self.programs[diffusion] = self._build(diffusion)
            with torch.no_grad():
                out = call_compiled(program, t, y, a, dW, *[p.detach() for p in self.params])
        except Exception as err:  # noqa: BLE001 - any failure of compiling: the eager evaluations
            self.failed = True
            if not _is_hidden(err):
                warnings.warn(f"compile=True: the adjoint's backward evaluations could not be compiled "
                              f"({type(err).__name__}: {err}); they run eagerly.", RuntimeWarning, stacklevel=5)
            return None
        return out[0], tuple(out[1:])

    def drift(self, t: Tensor, y: Tensor, a: Tensor) -> tuple | None:
        return self._run(False, t, y, a, None)

    def g_prod(self, t: Tensor, y: Tensor, a: Tensor, dW: Tensor) -> tuple | None:
        return self._run(True, t, y, a, dW)


def _no_hidden(example_inputs: list) -> None:
    """The programs' inputs are y, a, dW and the detached parameters: one requiring grad is a tensor the functions
    capture, whose gradient the program would not compute."""
    if any(isinstance(x, Tensor) and x.requires_grad for x in example_inputs):
        raise _Hidden("a tensor requiring grad captured by the field")


def _is_hidden(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, _Hidden):
            return True
        err = err.__cause__ or err.__context__
    return False


def _owner(fn: Any) -> torch.nn.Module | None:
    owner = getattr(fn, "__self__", fn)
    return owner if isinstance(owner, torch.nn.Module) else None


def _key_of(fn: Any) -> Any:
    return (id(fn.__self__), fn.__func__) if getattr(fn, "__func__", None) is not None else fn


def adjoint_fields(func: Callable, shape: Sequence[int], params: Sequence[Tensor], y: Tensor) -> AdjointFields | None:
    """The compiled evaluations of the adjoint of a solve of ``func`` (the engine's field: an SDE term's drift, an ODE
    term's form, a module or a module's method; state of shape ``shape``, gradients for ``params``; ``y`` a state of
    the solve, for its device and dtype), bound to this solve's functions; None where they do not apply (module
    docstring). Cached per functions, shape, dtype and parameters."""
    if y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64):
        return None
    user = term_of(func)
    if user is not None and "sde" in user.kinds:
        drift, diffusion = split_sde(user)
        if diffusion.sde_type != "stratonovich" and diffusion.noise != "additive":
            return None
        field = drift.func if isinstance(drift, ODETerm) else drift
        fns = [fn for fn in (field, diffusion.vector_field, diffusion.g_prod) if fn is not None]
        extra = (diffusion.noise, diffusion.sde_type)
    else:
        field = user.func if isinstance(user, ODETerm) else (func if user is None else None)
        fns, diffusion, extra = [field], None, ()
    if field is None:
        return None
    owners = [_owner(fn) for fn in fns]
    if any(o is None for o in owners):
        return None
    unique = list({id(o): o for o in owners}.values())
    if {id(p) for o in unique for p in o.parameters() if p.requires_grad} != {id(p) for p in params}:
        return None
    try:
        per = _CACHE.setdefault(unique[0], {})
    except TypeError:
        return None
    key = (tuple(id(o) for o in unique), tuple(_key_of(fn) for fn in fns), extra, tuple(shape), y.dtype,
           tuple(id(p) for p in params))
    fields = per.get(key)
    if fields is _FAILED:
        return None
    if fields is None:
        fields = per[key] = AdjointFields(unique, params, tuple(shape))
    if fields.failed:
        per[key] = _FAILED
        return None
    return fields.bind(field, diffusion, unique)
