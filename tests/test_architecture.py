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


class _IncrementEuler(neurodyn.core.stepper.StepperBase):
    """A stepper written against the contract only (outside the library): Euler in increment form,
    ``y1 = y + prod(vf(t, y), contr(t, t + h))`` over the user's term -- Euler--Maruyama when the control is a
    Brownian sample path. No change to the loop is needed to run it."""

    name, order, error_order, controller_order = "increment_euler", 1, None, 1
    adaptive, fsal, stages, has_own_dense = False, False, 1, False
    accepts = ("ode", "control")

    def coefficients(self, dtype, device):
        return None

    def step(self, term, t, y, h, k1, co, t_end_nudge=None, buf=None):
        user = neurodyn.core.term.term_of(term.func)
        tt = torch.tensor(t, dtype=term.t_dtype)
        inc = user.vf_prod(tt, y.view(term.shape), user.contr(t, t + h))
        y1 = y + inc.reshape(1, -1)
        return y1, k1.reshape(1, -1), None

    def interpolate(self, term, st, thetas, co, interp="auto"):
        return neurodyn.core.interpolation.linear(thetas.view(-1, 1).to(st.y0.dtype), st.y0, st.y1)

    def interpolate_floats(self, term, st, thetas, co, interp="auto"):
        return self.interpolate(term, st, torch.tensor(thetas, dtype=st.y0.dtype), co, interp)


def test_a_new_sde_style_stepper_needs_no_change_to_the_loop():
    """Geometric Brownian motion dy = a y dt + b y dW on a sampled Brownian path: the contract-only stepper above,
    run by neurodyn.solve on MultiTerm(ODETerm, ControlTerm), reproduces the Euler--Maruyama recursion exactly."""
    from neurodyn.core.term import ControlTerm, MultiTerm, ODETerm
    from neurodyn.paths import LinearPath

    gen = torch.Generator().manual_seed(5)
    a, b, h, n = 0.3, 0.5, 0.01, 100
    ts = torch.linspace(0, n * h, n + 1, dtype=torch.float64)
    w = torch.cat([torch.zeros(1, 1, dtype=torch.float64),
                   torch.cumsum(torch.randn(n, 1, generator=gen, dtype=torch.float64) * math.sqrt(h), 0)])
    term = MultiTerm(ODETerm(lambda t, y: a * y), ControlTerm(lambda t, y: (b * y).unsqueeze(-1), LinearPath(ts, w)))
    y0 = torch.tensor([1.0], dtype=torch.float64)
    sol = neurodyn.solve(term, y0, ts, method=_IncrementEuler(), step_size=h)
    want = [1.0]
    for k in range(n):
        want.append(want[-1] + a * want[-1] * h + b * want[-1] * float(w[k + 1, 0] - w[k, 0]))
    assert sol.status == "success" and sol.stats["steps"] == n
    torch.testing.assert_close(sol.ys[:, 0], torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=1e-13)
