"""Helpers the demos share: config from arguments, checked numeric option types, solve failures."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from typing import Any, TypeVar

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from neurodyn.errors import SolveFailure
from neurodyn.solution import Solution

C = TypeVar("C")


class DemoError(RuntimeError):
    """A demo cannot go on (training diverged, a training solve failed, ...). The message says why and what
    to try; ``neurodyn demo`` prints it as one line and exits with status 1."""


def config_from_args(cls: type[C], args: argparse.Namespace, quick: dict[str, Any] | None = None) -> C:
    """Build the demo's config dataclass ``cls`` from parsed arguments (options left at None keep the
    dataclass default); with ``--quick``, the ``quick`` overrides apply to every option not given."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = cls(**given)
    if getattr(cfg, "quick", False) and quick:
        cfg = replace(cfg, **{k: v for k, v in quick.items() if given.get(k) is None})
    return cfg


def add_out_and_seed(parser: argparse.ArgumentParser, out: str, seed: int) -> None:
    """The ``--out DIR`` and ``--seed`` options every demo has."""
    parser.add_argument("--out", default=out, metavar="DIR", help=f"output directory (default: {out})")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")


# ------------------------------------------------------------------------------ checked argparse types
def _number(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low`` (else a one-line argparse error naming the bound).

    >>> int_at_least(1)("3")
    3
    """
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in "invalid <name> value" messages
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in the interval from ``low`` to ``high`` (open or closed ends).

    >>> float_in(0.0, low_open=True)("1e-3")
    0.001
    """
    lo = f"{'(' if low_open else '['}{low:g}"
    hi = f"{high:g}{')' if high_open or math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        value = _number(float, text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            if math.isinf(high):
                bound = f"> {low:g}" if low_open else f">= {low:g}"
                raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text}")
            raise argparse.ArgumentTypeError(f"must be a number in {lo}, {hi}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT = int_at_least(1)
POSITIVE = float_in(0.0, low_open=True)
NON_NEGATIVE = float_in(0.0)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / inf float (a metric of a failed solve) replaced by None, so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON (null).

    >>> json_safe({"rmse": [float("nan"), 0.5]})
    {'rmse': [None, 0.5]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------- solve failures
def failure_note(sol: Solution) -> str:
    """One line on a failed solve: its status, the time reached and how many output rows are valid.

    >>> import torch, neurodyn
    >>> sol = neurodyn.solve(lambda t, y: y**2, torch.ones(1, dtype=torch.float64),
    ...                      torch.linspace(0, 2, 5, dtype=torch.float64), on_failure="return")
    >>> failure_note(sol).split(" at ")[0]
    'step_size_underflow'
    """
    return (f"{sol.status} at t={sol.t_final:.6g} ({sol.n_valid} of {sol.ts.shape[0]} output times "
            f"reached)")


def training_failure(what: str, exc: SolveFailure) -> DemoError:
    """The :class:`DemoError` for a training solve that failed (``what``: e.g. ``"iteration 12"``)."""
    return DemoError(f"the training solve failed at {what}: {exc.status} at t={exc.t:.6g}; the learned vector "
                     f"field blew up or became stiff. Try a lower --lr, looser --rtol/--atol or another --seed.")


@contextlib.contextmanager
def failures_returned(model: nn.Module) -> Iterator[Callable[[], Solution | None]]:
    """Within the block every :class:`~neurodyn.NeuralODE` inside ``model`` solves with
    ``on_failure="return"`` (NaN rows past the failure instead of an exception). Yields ``failed()``: after a
    forward pass, the failed :class:`~neurodyn.solution.Solution` of that pass (None when every solve
    succeeded). The models' own options are restored on exit.

    >>> import torch, neurodyn
    >>> ode = neurodyn.NeuralODE(lambda z: z**2, t=(0.0, 2.0), autonomous=True)
    >>> with failures_returned(ode) as failed:
    ...     z = ode(torch.ones(1, dtype=torch.float64))
    ...     failed().status, bool(z.isnan().all())
    ('step_size_underflow', True)
    """
    from neurodyn.models import NeuralODE

    odes = [m for m in model.modules() if isinstance(m, NeuralODE)]
    missing = object()
    saved = [m.solve_options.get("on_failure", missing) for m in odes]
    for m in odes:
        m.solve_options["on_failure"] = "return"

    def failed() -> Solution | None:
        for m in odes:
            sol = m.last_solution
            if sol is not None and not sol.success:
                return sol
        return None

    try:
        yield failed
    finally:
        for m, old in zip(odes, saved):
            if old is missing:
                m.solve_options.pop("on_failure", None)
            else:
                m.solve_options["on_failure"] = old


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers, started at their current values:
    :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(decay)`` and ``use_buffers=True`` (each
    floating buffer is averaged like a parameter, as GRU-D's ``x_mean``), its first ``update_parameters`` already made
    (it copies the current values), so that every later ``update_parameters(model)`` sets
    ``avg <- decay * avg + (1 - decay) * w`` (``torch.lerp``); ``.module`` is the averaged network."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)
    return ema
