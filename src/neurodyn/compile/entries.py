"""Repeat calls of a ``torch.compile``'d function that run its compiled program with Dynamo's guards checked, but
without Dynamo's frame machinery around them.

A call of a function compiled by ``torch.compile`` goes through Dynamo's Python wrapper and its frame evaluation:
Python bookkeeping (eval-frame callbacks, dispatch-key and fullgraph flags, the stance), then the guards of each
compiled entry (the conditions under which the entry's graph is the function's behaviour: its globals, the Python
state it read, its tensors' dtypes, shapes, strides, devices and flags), then the entry's bytecode, which calls the
backend's compiled graph. For the small protocol case's compiled whole loop (CPU, one 64-wide MLP) the machinery
around the guards cost ~85 us of a ~500 us call, the guards themselves ~28 us.

:class:`Entries` keeps, per compiled entry, the callable the backend returned and where each of the graph's inputs
comes from (an argument or closure variable of the function, and the items and attributes Dynamo read from it: a
module's parameters, say), and on a call evaluates the entries' own guard managers (the same C++ guard trees Dynamo
evaluates, on the function's arguments and closure) in Dynamo's order; the first entry whose guards pass runs, with
the arguments Dynamo's bytecode would pass it. Where no entry passes, where an entry is not one it recorded, or where
Dynamo would not simply run an entry (another stance than the default, an eval-frame callback active: a call from
inside a region being compiled), it returns None and the caller calls the compiled function itself (which compiles a
new entry where needed). ``torch._dynamo.config.disable`` is not read: Dynamo reads it only where it would compile
(no entry's guards pass), and runs an entry whose guards pass whatever its value, as this does. It relies on private
parts of torch (the cache entries' guard managers, the graph's input sources); where torch lacks them it returns None
(Dynamo's path).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch

try:  # private parts of torch (2.x); without them every call takes Dynamo's path
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
    from torch._dynamo import eval_frame as _eval_frame
    from torch._dynamo.source import (
        AttrSource,
        DictGetItemSource,
        GetItemSource,
        LocalSource,
        NNModuleSource,
        ParamBufferSource,
        TensorProperty,
        TensorPropertySource,
        UnspecializedBuiltinNNModuleSource,
        UnspecializedNNModuleSource,
        UnspecializedParamBufferSource,
    )
    from torch._guards import CompileContext

    # Dynamo's sources that read an attribute (a module's ``_parameters``, say), and those that stand for their base.
    _ATTR_SOURCES = (AttrSource, ParamBufferSource, UnspecializedParamBufferSource)
    _SAME_SOURCES = (NNModuleSource, UnspecializedNNModuleSource, UnspecializedBuiltinNNModuleSource)
except ImportError:  # pragma: no cover - another torch
    _debug_get_cache_entry_list = None


class Entries:
    """The compiled entries of ``torch.compile(fn, backend=entries.backend(compile_graph), fullgraph=True)``, called
    without Dynamo's frame machinery (see the module docstring). ``fn``: a Python function with positional
    parameters and optionally ``*args`` (no keyword-only parameters, no defaults used); ``n_outputs``: it returns a
    tuple of that many distinct tensors (entries whose graph does not return exactly these are not recorded).

    Examples
    --------
    >>> import torch
    >>> def fn(x, *ws):
    ...     return (x * ws[0] + 1, x.sum())
    >>> entries = Entries(fn, n_outputs=2)
    >>> compiled = torch.compile(fn, backend=entries.backend(lambda gm, inputs: gm), fullgraph=True)
    >>> x, w = torch.ones(3), torch.full((3,), 2.0)
    >>> first = compiled(x, w)               # Dynamo compiles an entry
    >>> again = entries((x, w))              # the entry's guards checked, its graph called
    >>> [torch.equal(a, b) for a, b in zip(first, again)]
    [True, True]
    >>> entries((x.double(), w)) is None     # no entry for float64: Dynamo's path (it compiles one)
    True
    >>> torch._dynamo.reset()                # (Dynamo's entries of this example dropped)
    """

    def __init__(self, fn: Callable, n_outputs: int):
        code = fn.__code__
        self.code = code
        self.n_outputs = n_outputs
        n_pos = code.co_argcount
        self.positional = code.co_varnames[:n_pos]
        self.varargs = code.co_varnames[n_pos] if code.co_flags & inspect.CO_VARARGS else None
        self.cells = tuple(zip(code.co_freevars, fn.__closure__ or ()))
        self.records: dict = {}  # compile id -> (graph callable, input paths: see _path)
        self.usable = _debug_get_cache_entry_list is not None and not code.co_kwonlyargcount \
            and not code.co_flags & inspect.CO_VARKEYWORDS

    def backend(self, compile_graph: Callable) -> Callable:
        """A ``torch.compile`` backend: ``compile_graph(gm, example_inputs)``, its result recorded for the entry
        being compiled (with where each graph input comes from) where every input is an argument of the function or
        an item of its ``*args`` and the graph returns the function's ``n_outputs`` tensors."""

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            compiled = compile_graph(gm, example_inputs)
            if self.usable:
                getters = self._getters(gm)
                compile_id = CompileContext.current_compile_id()
                if getters is not None and compile_id is not None:
                    # Dynamo installs the graph's callable with Dynamo disabled inside it, and Inductor returns it
                    # wrapped so already (torch._dynamo.disable: its wrapper sets no eval-frame callback for the call
                    # and restores the caller's after). A call from here runs only where no callback is set and the
                    # stance is the default (see __call__), where that wrapper changes nothing: the callable inside
                    # it is recorded.
                    self.records[compile_id] = (_undisabled(compiled), getters)
            return compiled

        return backend

    def _getters(self, gm: torch.fx.GraphModule) -> list[tuple[str, tuple]] | None:
        """Where each graph input comes from: ``(name, steps)``, the function's argument or closure variable ``name``
        read along ``steps`` (:func:`_path`); None where an input comes from elsewhere or the outputs are not the
        function's ``n_outputs`` distinct values."""
        getters = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                arg = node.meta.get("grapharg")
                path = _path(getattr(arg, "source", None))
                if path is None:
                    return None
                getters.append(path)
            elif node.op == "output":
                outs = node.args[0]
                if not isinstance(outs, (tuple, list)) or len(outs) != self.n_outputs or len(set(outs)) != len(outs) \
                        or not all(isinstance(o, torch.fx.Node) for o in outs):
                    return None
        names = set(self.positional) | ({self.varargs} if self.varargs else set()) | {n for n, _ in self.cells}
        return getters if all(name in names for name, _ in getters) else None

    def cache(self) -> list:
        """Dynamo's compiled entries of the function now (its cache entries, in the order Dynamo tries them; empty
        where torch lacks the private parts this module reads). Their number is the number of compiled variants."""
        return _debug_get_cache_entry_list(self.code) if _debug_get_cache_entry_list is not None else []

    def __call__(self, args: tuple, entries: list | None = None) -> Any:
        """The function's result on ``args`` from the first compiled entry whose guards pass, or None (call the
        compiled function: no entry recorded, none passes, or Dynamo would not run an entry as it is). ``entries``:
        :meth:`cache` read by the caller just before (else read here)."""
        if not self.records or _eval_frame._stance.stance != "default" or _eval_frame_callback() is not None:
            return None
        if entries is None:
            entries = _debug_get_cache_entry_list(self.code)
        if not entries:
            return None
        n_pos = len(self.positional)
        if len(args) < n_pos or (self.varargs is None and len(args) != n_pos):
            return None
        frame = {}
        for name, cell in self.cells:
            try:
                frame[name] = cell.cell_contents
            except ValueError:  # an empty cell: not a local of the frame either
                pass
        frame.update(zip(self.positional, args))
        if self.varargs is not None:
            frame[self.varargs] = tuple(args[n_pos:])
        for entry in entries:
            if entry.guard_manager.root.check(frame):
                record = self.records.get(entry.compile_id)
                if record is None:
                    return None
                compiled, getters = record
                return compiled(*[_follow(frame[name], steps) for name, steps in getters])
        return None


def _undisabled(fn: Callable) -> Callable:
    """``fn`` without ``torch._dynamo.disable``'s wrappers (the function each of them calls)."""
    while getattr(fn, "_torchdynamo_disable", False) and callable(getattr(fn, "_torchdynamo_orig_callable", None)):
        fn = fn._torchdynamo_orig_callable
    return fn


def _path(src: Any) -> tuple[str, tuple] | None:
    """``(name, steps)`` for a Dynamo source that reads a local ``name`` of the frame (an argument, or a closure
    variable) and then items, attributes and a tensor's sizes, strides or offset: ``steps`` one getter per item
    (``operator.itemgetter``), per run of attributes (``operator.attrgetter``) and per tensor property
    (``operator.methodcaller``); None for any other source (a global, a computed value)."""
    steps: list = []
    attrs: list[str] = []
    while True:
        if type(src) in _ATTR_SOURCES:
            attrs.append(src.member)
        elif type(src) not in _SAME_SOURCES:
            if attrs:
                steps.append(operator.attrgetter(".".join(reversed(attrs))))
                attrs = []
            if type(src) is LocalSource:
                return src.local_name, tuple(reversed(steps))
            if type(src) is GetItemSource and not src.index_is_slice and type(src.index) in (int, str):
                steps.append(operator.itemgetter(src.index))
            elif type(src) is DictGetItemSource and type(src.index) in (int, str):
                steps.append(operator.itemgetter(src.index))
            elif type(src) is TensorPropertySource:  # a size, stride or offset of a tensor (a dynamic shape's symbol)
                name = src.prop.method_name()
                steps.append(operator.methodcaller(name) if src.prop is TensorProperty.STORAGE_OFFSET
                             else operator.methodcaller(name, src.idx))
            else:
                return None
        src = src.base


def _follow(value: Any, steps: tuple) -> Any:
    """``value`` read along ``steps`` (:func:`_path`)."""
    for step in steps:
        value = step(value)
    return value


def constant_guard_filter(names: tuple[str, ...]) -> Callable[[list], list[bool]]:
    """A Dynamo guard filter (``torch.compile``'s ``guard_filter_fn``) that leaves out the guards on the closure
    variables ``names`` of a compiled loop (and on anything reached through them: ``name.attr``, ``name[i]``) and keeps
    every other guard (the field, the inputs, globals, the global state). For loops whose ``names`` are their build's
    own constants, made from what is already in the program's cache key and never changed after, so that their guards
    could only fail if neurodyn's own code changed those objects.

    Example:
        >>> from types import SimpleNamespace as Entry
        >>> keep = constant_guard_filter(("plan",))
        >>> keep([Entry(name="plan"), Entry(name="plan.a_rows[1]"), Entry(name="planner"), Entry(name="L['y0']")])
        [False, False, True, True]
    """
    exact = frozenset(names)
    prefixes = tuple(name + sep for name in names for sep in ".[")

    def keep(entries: list) -> list[bool]:
        return [not (e.name in exact or e.name.startswith(prefixes)) for e in entries]

    return keep
