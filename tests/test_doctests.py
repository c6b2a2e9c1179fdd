"""The docstrings' examples run as doctests in the default suite (the same examples the API reference shows)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
from test_docs import import_optional  # one rule for modules of an extra that is not installed

import neurodyn


def modules_with_examples() -> list[str]:
    names = ["neurodyn"] + [info.name for info in
                            pkgutil.walk_packages(neurodyn.__path__, "neurodyn.", onerror=lambda name: None)]
    finder = doctest.DocTestFinder()
    return [name for name in names  # modules with at least one example that runs (not all "+SKIP")
            if (mod := import_optional(name)) is not None
            and any(not ex.options.get(doctest.SKIP) for t in finder.find(mod) for ex in t.examples)]


MODULES = modules_with_examples()


def test_the_examples_are_found():
    # solve, Solution, the models, the paths, the drop-in layers: a walk that lost them would test nothing
    assert {"neurodyn.solve", "neurodyn.solution", "neurodyn.models.neural_ode", "neurodyn.paths.linear",
            "neurodyn.compat.torchdiffeq"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed (output above)"
    assert result.attempted > 0
