"""The examples gallery stays whole: every example script is on docs/examples.md with its committed figure, takes
``--quick`` and ``--out``, and imports neurodyn only through public names. (Running them is ``make examples``.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("[0-9][0-9]_*.py"))
PAGE = ROOT / "docs" / "examples.md"


def test_there_are_examples():
    assert len(SCRIPTS) >= 11


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_is_in_the_gallery_with_its_figure(script):
    page = PAGE.read_text()
    assert f"examples/{script.name}" in page, f"{script.name} is not described on docs/examples.md"
    figure = f"examples/{script.stem}.png"
    assert f"]({figure})" in page, f"docs/examples.md does not show {figure}"
    png = ROOT / "docs" / figure
    assert png.is_file(), f"{png} is not committed (run: python examples/run_all.py --out docs/examples)"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 250_000, f"{png.name} is {png.stat().st_size} bytes: keep gallery figures small"
    assert not re.search(r"\bFULL\d", page), "docs/examples.md has an unfilled number"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_cli_and_public_imports(script):
    source = script.read_text()
    assert '"--quick"' in source and '"--out"' in source
    assert f'out / "{script.stem}.png"' in source or f"out_dir / \"{script.stem}.png\"" in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neurodyn"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), node.module
            assert not node.module.startswith("neurodyn.demos"), "examples show the API, not the demos' code"
