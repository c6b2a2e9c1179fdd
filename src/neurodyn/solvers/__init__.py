"""Solvers: tableaus as data, one generic stepper (and later implicit/multistep families)."""

from __future__ import annotations

from ..core.stepper import Stepper
from ..errors import InputError
from .adams import ADAMS_METHODS, make_adams
from .auto import AutoSwitch, make_auto
from .bdf import BDF, make_bdf
from .explicit_rk import ExplicitRungeKutta
from .implicit_rk import ImplicitRungeKutta, implicit_solver
from .implicit_tableaus import IMPLICIT_TABLEAUS, ImplicitTableau
from .sde import SDE_STEPPERS, make_sde
from .symplectic import SCHEMES as _SYMPLECTIC
from .symplectic import make_symplectic
from .tableaus import TABLEAUS, ButcherTableau

_INSTANCES: dict[str, ExplicitRungeKutta] = {}
# Steppers built by a factory: stateless ones are cached like the tableaus; multistep ones keep a history
# across steps, so every get_solver call (one per solve) builds a fresh one.
_FACTORIES = {name: make_symplectic for name in _SYMPLECTIC}
_FRESH = {name: make_adams for name in ADAMS_METHODS}
# Implicit RK methods keep a Jacobian and factorisations across steps: a fresh stepper per solve too.
_FRESH.update(dict.fromkeys(IMPLICIT_TABLEAUS, ImplicitRungeKutta))
_FRESH["bdf"] = make_bdf  # multistep and implicit: history, Jacobian and factorisations per solve
_FRESH["auto"] = make_auto  # explicit/implicit switching: a switching state and an implicit stepper per solve
# Methods by the term kind they integrate: a name found here for one of the term's kinds means this family's
# stepper (method="euler" on an SDE term is Euler--Maruyama); other names resolve as above. Fresh per solve.
BY_KIND: dict[str, dict] = {"sde": dict.fromkeys(SDE_STEPPERS, make_sde)}


def available_methods() -> list[str]:
    """Names accepted as ``method=`` (an SDE term's methods included: ``euler``, ``heun``, ``midpoint`` name
    the SDE methods there)."""
    kinds = {m for reg in BY_KIND.values() for m in reg}
    return sorted({*TABLEAUS, *_FACTORIES, *_FRESH, *kinds})


def methods_accepting(kind: str) -> list[str]:
    """The method names whose steppers integrate terms of ``kind`` (``"ode"``, ``"control"``, ``"split"``,
    ``"sde"``)."""
    general = {*TABLEAUS, *_FACTORIES, *_FRESH}
    own = set(BY_KIND.get(kind, ()))
    return [m for m in available_methods() if (m in general or m in own) and kind in get_solver(m, (kind,)).accepts]


def get_solver(method: str, kinds: frozenset[str] | tuple[str, ...] | None = None) -> ExplicitRungeKutta:
    """The (cached) stepper for a method name; raises InputError listing valid names.

    ``kinds``: the kinds of the term it will integrate; a name registered for one of them (``BY_KIND``) gives
    that family's stepper."""
    if not isinstance(method, str) and isinstance(method, Stepper):
        return method  # a configured stepper instance, e.g. neurodyn.solvers.adams.FixedAdams(max_order=6)
    for kind in sorted(kinds or ()):
        reg = BY_KIND.get(kind)
        if reg is not None and method in reg:
            return reg[method](method)
    if isinstance(method, str) and method not in TABLEAUS and method not in _FACTORIES and method not in _FRESH:
        for reg in BY_KIND.values():  # a name only one family has
            if method in reg:
                return reg[method](method)
    if isinstance(method, str) and method in _FRESH:
        return _FRESH[method](method)
    if isinstance(method, str) and method in _FACTORIES:
        if method not in _INSTANCES:
            _INSTANCES[method] = _FACTORIES[method](method)
        return _INSTANCES[method]
    s = _INSTANCES.get(method)
    if s is None:
        if not isinstance(method, str) or method not in TABLEAUS:
            raise InputError(f"unknown method {method!r}; valid methods: {', '.join(available_methods())}.")
        s = _INSTANCES[method] = ExplicitRungeKutta(TABLEAUS[method])
    return s


__all__ = ["BY_KIND",
           "AutoSwitch", "BDF", "ButcherTableau", "ExplicitRungeKutta", "IMPLICIT_TABLEAUS", "ImplicitRungeKutta",
           "ImplicitTableau", "TABLEAUS", "available_methods", "get_solver", "implicit_solver",
           "methods_accepting"]
