"""Packaging: the README's quickstart runs, the lazy top-level namespace is complete and light, and the
metadata files (LICENSE, CITATION.cff, CHANGELOG.md, py.typed, the one version) are there and agree.

The wheel itself is built, installed into a clean venv and checked by .ci/wheel_check.sh (CI, after the tests).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import neurodyn

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "neurodyn"


def quickstart_code(readme: str) -> str:
    """The python blocks between ``<!-- quickstart`` and ``<!-- /quickstart -->``, joined (what
    .ci/wheel_check.sh extracts with awk)."""
    start = readme.index("<!-- quickstart")
    end = readme.index("<!-- /quickstart -->", start)
    blocks = re.findall(r"^```python\n(.*?)^```", readme[start:end], flags=re.S | re.M)
    return "\n".join(blocks)


def test_readme_quickstart_runs(capsys):
    """The quickstart as a script, in this process (CI runs it in a clean venv from the wheel too)."""
    code = quickstart_code((ROOT / "README.md").read_text())
    assert code.count("neurodyn.solve(") >= 1 and "NeuralODE" in code and "ControlTerm" in code
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "__main__"})
    printed = re.fullmatch(r"torch\.Size\(\[11, 2\]\) success (\d+)", capsys.readouterr().out.strip())
    assert printed, "the quickstart printed something else"
    assert f"# torch.Size([11, 2]) success {printed.group(1)}" in code, "the quickstart's comment shows other values"


def test_wheel_check_extracts_the_same_code(tmp_path):
    """The CI script's awk extraction gives exactly the code the test above runs."""
    awk = Path(ROOT / ".ci" / "wheel_check.sh").read_text()
    program = re.search(r"awk '(.*?)' \\\n", awk, flags=re.S).group(1)
    res = subprocess.run(["awk", program, str(ROOT / "README.md")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = lambda text: [line for line in text.splitlines() if line.strip()]  # blank lines between blocks aside
    assert lines(res.stdout) == lines(quickstart_code((ROOT / "README.md").read_text()))


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse((SRC / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    names = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            names[alias.asname or alias.name] = "." + node.module if node.module else "." + alias.name
    return names


def test_exports_agree():
    """__all__, the lazy table and the imports type checkers read name the same things, each loads, and each
    is the object its defining module holds."""
    import importlib

    typed = _type_checking_imports()
    lazy = dict(neurodyn._EXPORTS)
    submodules = {name for name, module in typed.items() if module == "." + name and name not in lazy}
    assert {k: v for k, v in typed.items() if k not in submodules} == lazy
    assert set(neurodyn.__all__) == set(lazy)
    assert len(neurodyn.__all__) == len(set(neurodyn.__all__))
    for name, module in lazy.items():
        assert getattr(neurodyn, name) is getattr(importlib.import_module(module, "neurodyn"), name)
    assert callable(neurodyn.solve)  # the function, not the module of the same name
    for name in submodules:
        assert getattr(neurodyn, name).__name__ == f"neurodyn.{name}"
    assert set(neurodyn.__all__) <= set(dir(neurodyn))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        neurodyn.no_such_name  # noqa: B018


def test_import_is_light_and_submodules_keep_the_exports():
    code = (
        "import sys, neurodyn\n"
        "assert 'torch' not in sys.modules, 'import neurodyn imported torch'\n"
        "import neurodyn.models, neurodyn.regularizers\n"  # load neurodyn.solve (the module) first
        "assert callable(neurodyn.solve), neurodyn.solve\n"
        "from neurodyn import solve, viz, training\n"
        "assert callable(solve) and viz.__name__ == 'neurodyn.viz' and callable(training.count_nfe)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_metadata_files():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "neurodyn.__version__" }' in pyproject
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', (SRC / "__init__.py").read_text(), flags=re.M)
    assert 'neurodyn = ["py.typed"]' in pyproject and (SRC / "py.typed").is_file()
    torch_min = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    tested = re.search(r"^TORCH_VERSION := ([\d.]+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert tuple(map(int, torch_min.split("."))) == tuple(map(int, tested.split(".")[:2]))  # the tested torch

    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in pyproject

    cff = (ROOT / "CITATION.cff").read_text()
    for key in ("cff-version: 1.2.0", "message:", "title:", "authors:", "type: software", "license: MIT"):
        assert key in cff, key
    assert f'version: "{neurodyn.__version__}"' in cff
    try:
        import yaml
    except ImportError:
        pass
    else:
        data = yaml.safe_load(cff)
        assert data["cff-version"] == "1.2.0" and data["authors"] and data["version"] == neurodyn.__version__

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{neurodyn.__version__}]" in changelog


def test_ci_runs_the_wheel_check_after_the_tests():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands and "bash .ci/wheel_check.sh" in commands
    assert commands.index("make test") < commands.index("bash .ci/wheel_check.sh")
    assert "set -euo pipefail" in commands  # a failing check fails CI
