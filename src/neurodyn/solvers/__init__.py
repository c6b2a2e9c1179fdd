"""Solvers: tableaus as data, one generic stepper (and later implicit/multistep families)."""

from __future__ import annotations

from ..errors import InputError
from .explicit_rk import ExplicitRungeKutta
from .tableaus import TABLEAUS, ButcherTableau

_INSTANCES: dict[str, ExplicitRungeKutta] = {}


def available_methods() -> list[str]:
    """Names accepted as ``method=``."""
    return sorted(TABLEAUS)


def get_solver(method: str) -> ExplicitRungeKutta:
    """The (cached) stepper for a method name; raises InputError listing valid names."""
    s = _INSTANCES.get(method)
    if s is None:
        if not isinstance(method, str) or method not in TABLEAUS:
            raise InputError(f"unknown method {method!r}; valid methods: {', '.join(available_methods())}.")
        s = _INSTANCES[method] = ExplicitRungeKutta(TABLEAUS[method])
    return s


__all__ = ["ButcherTableau", "ExplicitRungeKutta", "TABLEAUS", "available_methods", "get_solver"]
