"""The engine's structure (docs/architecture.md): one-way imports, the engine below everything, private names kept
private, and a new explicit method that is only a tableau."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import neurodyn
from neurodyn.core.stepper import Stepper
from neurodyn.solvers import ExplicitRungeKutta
from neurodyn.solvers.tableaus import TABLEAUS, ButcherTableau

ROOT = Path(neurodyn.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every neurodyn module -> the neurodyn modules it imports (module level and inside functions)."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for cand in [f"{target}.{a.name}" for a in node.names] + [target]:
                    if cand in mods:
                        deps.add(cand)
                        break
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        deps.discard(name)
        graph[name] = deps
    return graph


GRAPH = _imports()


def test_import_graph_has_no_cycles():
    """Imports point one way (a package's __init__ re-exporting its own modules aside)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(GRAPH[u]):
            if v.startswith(u + ".") or u.startswith(v + "."):
                continue
            if state.get(v) == 1:
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []
    assert "neurodyn.solution" not in GRAPH["neurodyn.errors"]


@pytest.mark.parametrize("layer, allowed", [
    ("neurodyn.core", ("neurodyn.core", "neurodyn.errors", "neurodyn.solution")),
    ("neurodyn.solvers", ("neurodyn.core", "neurodyn.errors", "neurodyn.solution", "neurodyn.solvers")),
    ("neurodyn.gradients", ("neurodyn.core", "neurodyn.errors", "neurodyn.solution", "neurodyn.solvers",
                            "neurodyn.fields", "neurodyn.gradients")),
])
def test_layers_import_only_downwards(layer, allowed):
    """The engine imports no solver, gradient method or model; solvers import no gradient method; ..."""
    bad = {m: sorted(d for d in deps if not d.startswith(allowed))
           for m, deps in GRAPH.items() if m == layer or m.startswith(layer + ".")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_private_name_crosses_a_module():
    """``from neurodyn.x import _name`` and ``x._name`` of another neurodyn module do not occur."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("neurodyn")):
                offenders += [f"{path.name}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_every_stepper_meets_the_contract():
    """Every method's stepper is a core.stepper.Stepper and declares its capabilities (StepperBase)."""
    from neurodyn.core.stepper import StepperBase
    from neurodyn.solvers import available_methods, get_solver

    for name in available_methods():
        s = get_solver(name)
        assert isinstance(s, Stepper) and isinstance(s, StepperBase), name
        assert s.name == name, name


SSPRK3 = ButcherTableau(  # Shu & Osher's strong-stability-preserving RK3: not one of neurodyn's methods
    name="ssprk3", c=[0, 1, 0.5], a=[[], [1], [0.25, 0.25]], b=[1 / 6, 1 / 6, 2 / 3], order=3)


def test_a_new_explicit_method_is_only_a_tableau():
    """A tableau the library does not ship runs through the generic stepper with its design order (slope of the
    error against exp(-t) over three step sizes), eagerly and with compiled steps."""
    assert "ssprk3" not in TABLEAUS
    stepper = ExplicitRungeKutta(SSPRK3)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    errs = []
    for h in (0.1, 0.05, 0.025):
        sol = neurodyn.solve(lambda t, y: -y, y0, t, method=stepper, step_size=h)
        errs.append(abs(float(sol.ys[-1, 0]) - math.exp(-1.0)))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(s - 3.0) < 0.15 for s in slopes), slopes
