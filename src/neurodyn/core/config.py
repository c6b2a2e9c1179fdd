"""The validated, immutable settings of one integration."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .control import PIDController


@dataclass(frozen=True)
class LoopConfig:
    """Validated settings of one integration (internal). Immutable: a gradient method that needs other settings
    (a per-step hook, recorded steps, a backward solve) makes its own copy with ``dataclasses.replace``."""

    rtol: float | Tensor
    atol: float | Tensor
    adaptive: bool
    step_size: float | None = None
    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_steps: int = 100_000
    step_t: list[float] = field(default_factory=list)
    jump_t: list[float] = field(default_factory=list)
    controller: PIDController = field(default_factory=PIDController)
    norm: Callable[[Tensor], Tensor] | None = None
    unflatten: Callable[[Tensor], Any] | None = None
    record: bool = False
    interp: str = "auto"
    perturb: bool = False
    # Events (core.events.Event), located after every accepted step; the Zeno limits: at most ``max_events``
    # occurrences, consecutive ones at least ``min_event_gap`` apart in time.
    events: tuple = ()
    max_events: int = 10_000
    min_event_gap: float = 0.0
    # Error control over the first ``error_dims`` components only (a seminorm, e.g. the adjoint's).
    error_dims: int | None = None
    # Called after every accepted step as on_accept(t, h, t1, nudge, k1_time, y_start, k1) (k1: dy/dt the step used).
    on_accept: Callable[..., None] | None = None
    # A compiled step advance(t, y, h, k1) -> (y1, k, ratio) used where no nudge is needed (compile=True).
    advance: Callable[..., Any] | None = None
    # The whole loop compiled (compile=True; compiled_loop.compiled_loop), used where it applies.
    loop: Callable[..., Any] | None = None
    # integrate() returns None unless the whole compiled loop runs (a gradient method with a path of its own for
    # the other cases: gradient="checkpoint" with compile=True).
    loop_only: bool = False
    # The per-sample attempt compiled (compile=True with per_sample_steps; compile.rows.CompiledRows):
    # row_step.bind(solver, controller, dtype, device, direction, error_dims, rtol, atol, n_times) -> the
    # compiled forms (a whole loop, one attempt) or None.
    row_step: Any = None
    # torchdiffeq's min_step: steps are never proposed below min_step, and a step of at most min_step is accepted
    # whatever its (finite) error. False: a step that must shrink below min_step is a StepSizeUnderflow.
    accept_min_step: bool = False
    # Per-attempt hooks {"step": cb, "accept": cb, "reject": cb}, each called as cb(t, y, |h|) with the step's
    # start time, start state (1, n) and size: "step" before every attempt, then "accept" or "reject".
    step_callbacks: dict[str, Callable[[float, Tensor, float], None]] | None = None
    # Called after every attempted step as on_attempt(t, y, h, accepted, nfe): t, y the step's end and result when
    # accepted, its unchanged start when rejected; h signed; nfe the term's count so far (loop.iterate).
    on_attempt: Callable[[float, Tensor, float, bool, int], None] | None = None
    # The loop pauses (yields) after every attempted step: manual stepping (neurodyn.stepping) drives it.
    pause: bool = False


def _dict_init(cls: type) -> type:
    """Give the frozen dataclass ``cls`` an ``__init__`` with the generated one's signature and defaults that fills the
    instance dict in one update instead of one ``object.__setattr__`` per field (a frozen dataclass's own ``__init__``;
    ~2.5x slower for ``LoopConfig``'s 26 fields, paid once per solve). Attribute assignment stays refused."""
    ns: dict = {"_MISSING": dataclasses.MISSING}
    args, body = [], []
    for i, f in enumerate(dataclasses.fields(cls)):
        if f.default is not dataclasses.MISSING:
            ns[f"_d{i}"] = f.default
            args.append(f"{f.name}=_d{i}")
            body.append(f"{f.name}={f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_f{i}"] = f.default_factory
            args.append(f"{f.name}=_MISSING")
            body.append(f"{f.name}=_f{i}() if {f.name} is _MISSING else {f.name}")
        else:
            args.append(f.name)
            body.append(f"{f.name}={f.name}")
    exec(f"def __init__(self, {', '.join(args)}):\n    self.__dict__.update({', '.join(body)})\n", ns)  # noqa: S102
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    return cls


_dict_init(LoopConfig)
