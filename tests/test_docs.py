"""The documentation site: every public name is in the API reference, and the guides' code runs.

The API pages (docs/api/*.md) document objects through mkdocstrings directives (``::: dotted.path``). The check
below resolves every directive to the Python objects mkdocstrings renders for it and requires every name of
``neurodyn.__all__`` and of each public module's ``__all__`` to be one of them (by identity, so a re-export is
covered by the page of the module that defines it). ``make docs`` repeats the check on the built site's
inventory (``objects.inv``, what the build really rendered) by setting ``NEURODYN_DOCS_INVENTORY``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import types
import zlib
from pathlib import Path

import pytest

import neurodyn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api"
# Pages whose ```python blocks run here, in order, in one namespace per page (a block not meant to run is
# fenced as ```text or ```bash). Their asserts hold the documented claims against closed forms and the peers.
RUN_PAGES = sorted(["index.md", "getting-started.md", *(str(p.relative_to(DOCS)) for p in DOCS.glob("guide/*.md")),
                    *(str(p.relative_to(DOCS)) for p in DOCS.glob("migrating/*.md"))])
CODE_BLOCK = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
DIRECTIVE = re.compile(r"^::: *([\w.]+)[ \t]*\n((?:[ \t]+.*\n|\n(?=[ \t]))*)", re.M)


def resolve(path: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.split(".")[0] != "neurodyn":
                raise  # an optional dependency is missing: the caller decides
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def import_optional(name: str):
    """The module, or None when it needs an optional dependency that is not installed (a module of an extra:
    its API page is still built, statically, by mkdocstrings)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        cause = e  # an ImportError naming the extra may wrap the ModuleNotFoundError
        while cause is not None and not isinstance(cause, ModuleNotFoundError):
            cause = cause.__cause__
        if cause is None or cause.name is None or cause.name.split(".")[0] == "neurodyn":
            raise
        return None


def public_modules():
    """``neurodyn`` and every module under it with no ``_``-prefixed part in its name (that imports here)."""
    yield neurodyn
    for info in pkgutil.walk_packages(neurodyn.__path__, "neurodyn.", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")):
            mod = import_optional(info.name)
            if mod is not None:
                yield mod


def public_names():
    """``(module name, name, object)`` for every name in a public module's ``__all__``."""
    out = []
    for mod in public_modules():
        for name in getattr(mod, "__all__", ()):
            out.append((mod.__name__, name, getattr(mod, name)))
    return out


def members_option(options: str):
    """The ``members:`` option of a directive: a list of names, False, or None (not given)."""
    m = re.search(r"^\s*members:\s*(.*)$", options, re.M)
    if m is None:
        return None
    value = m.group(1).strip()
    if value.lower() == "false":
        return False
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def documented_by_directives() -> dict[int, str]:
    """id(object) -> the page documenting it, for every object the API pages' directives render."""
    seen: dict[int, str] = {}
    for page in sorted(API.glob("*.md")):
        for m in DIRECTIVE.finditer(page.read_text()):
            try:
                obj = resolve(m.group(1))
            except ModuleNotFoundError:  # a module of an extra that is not installed here
                continue
            seen[id(obj)] = page.name
            if not isinstance(obj, types.ModuleType):
                continue
            members = members_option(m.group(2))
            if members is False:
                continue
            if members is None:
                members = getattr(obj, "__all__", None)
            if members is None:  # no __all__: what the module defines under a public name
                members = [n for n, v in vars(obj).items()
                           if not n.startswith("_") and getattr(v, "__module__", None) == obj.__name__]
            for name in members:
                seen[id(getattr(obj, name))] = page.name
    return seen


def read_inventory(path: Path) -> list[str]:
    """The object names in a Sphinx inventory (``objects.inv``, version 2) as mkdocstrings writes it."""
    raw = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    names = []
    for line in zlib.decompress(raw[header_end:]).decode().splitlines():
        name, domain_role = line.split(" ", 2)[:2]
        if domain_role.startswith("py:"):
            names.append(name)
    return names


def missing(documented: set[int]) -> list[str]:
    return sorted(f"{mod}.{name}" for mod, name, obj in public_names() if id(obj) not in documented)


def test_directive_parser_reads_options():
    text = "::: a.b\n    options:\n      members: [x, y]\n\n::: c.d\n"
    found = [(m.group(1), members_option(m.group(2))) for m in DIRECTIVE.finditer(text)]
    assert found == [("a.b", ["x", "y"]), ("c.d", None)]


def test_every_public_name_is_in_the_api_reference():
    names = public_names()
    assert len(names) > 150  # the walk found the package's modules (neurodyn.__all__ alone has 61 names)
    assert {"solve", "NeuralODE", "odeint"} <= {n for m, n, _ in names if m == "neurodyn"}
    absent = missing(set(documented_by_directives()))
    assert not absent, ("public names missing from the API reference (add a ::: directive for them, or their "
                        f"module, to a page under docs/api/): {absent}")


def test_every_public_module_has_a_reference_entry():
    # The command line and the demo programs are documented by `neurodyn demo --help` and docs/examples.md; the
    # demo modules that export names (__all__) are held by the test above.
    directives = [m.group(1) for page in API.glob("*.md") for m in DIRECTIVE.finditer(page.read_text())]
    modules = {m.__name__ for m in public_modules()
               if m.__name__ != "neurodyn.cli" and not m.__name__.startswith("neurodyn.demos.")}

    def owner(path: str) -> str:  # the module a directive's path belongs to: its longest module prefix
        return max((m for m in modules if path == m or path.startswith(m + ".")), key=len, default="")

    absent = sorted(modules - {owner(d) for d in directives})
    assert not absent, f"public modules with no ::: directive (the module or an object of it) under docs/api/: {absent}"


@pytest.mark.skipif("NEURODYN_DOCS_INVENTORY" not in os.environ,
                    reason="set by `make docs` after the build: the built site's objects.inv")
def test_built_inventory_lists_every_public_name():
    inventory = read_inventory(Path(os.environ["NEURODYN_DOCS_INVENTORY"]))
    documented = set()
    for name in inventory:
        try:
            documented.add(id(resolve(name)))
        except (ImportError, AttributeError):  # headings of module pages, attributes set in __init__
            pass
    absent = missing(documented)
    assert not absent, f"public names the built API reference does not render: {absent}"


def code_blocks(text: str) -> list[str]:
    """The ```python blocks of a page, dedented (blocks inside tabs and admonitions are indented)."""
    out = []
    for m in CODE_BLOCK.finditer(text):
        indent = len(m.group(1))
        out.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return out


def test_code_block_extraction():
    text = 'x\n```python\na = 1\n```\n=== "tab"\n\n    ```python\n    b = a + 1\n    ```\n```text\nno\n```\n'
    assert code_blocks(text) == ["a = 1", "b = a + 1"]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_code_runs(page):
    blocks = code_blocks((DOCS / page).read_text())
    assert blocks, f"{page} has no ```python block"
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page}, python block {i} failed: {type(e).__name__}: {e}\n{block}") from e


def test_methods_page_names_every_method():
    text = (DOCS / "guide" / "methods.md").read_text()
    absent = [m for m in neurodyn.available_methods() if f"`{m}`" not in text]
    assert not absent, f"docs/guide/methods.md does not mention these methods: {absent}"


def test_docstring_markup_extension():
    pytest.importorskip("griffe")  # the docs extra (`make docs` runs this test after installing it)
    spec = importlib.util.spec_from_file_location("griffe_roles", DOCS / "griffe_roles.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    text = ("See :class:`~neurodyn.core.term.ControlTerm` and :func:`neurodyn.solve`. Example::\n\n    x\n\n"
            "====  =====\nname  order\n====  =====\n``a``  1\n``b``  2\n      more\n====  =====\n")
    assert ext.to_markdown(text) == ("See `ControlTerm` and `neurodyn.solve`. Example:\n\n    x\n\n"
                                     "| name | order |\n|---|---|\n| ``a`` | 1 |\n| ``b`` | 2 more |\n")
    doc = "Text.\n\n>>> f(1)  # y[0](t)\n2\n\nExamples\n--------\n>>> g()\n3\n"
    assert ext.to_markdown(doc) == ("Text.\n\n```python\n>>> f(1)  # y[0](t)\n2\n```\n\nExamples\n--------\n"
                                    ">>> g()\n3\n")


def test_examples_gallery_hook(tmp_path):
    pytest.importorskip("mkdocs")  # the docs extra (`make docs` runs this test after installing it)
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    (tmp_path / "01_first.py").write_text('"""First example: a title.\n\nWhat it shows.\n\n'
                                          '    python examples/01_first.py [--quick]\n"""\nx = 1\n')
    (tmp_path / "02_second.py").write_text('"""Second."""\n')
    (tmp_path / "notes.py").write_text("")
    figures = tmp_path / "_out"
    figures.mkdir()
    (figures / "01_first.png").write_bytes(b"png")
    scripts = hooks.example_scripts(tmp_path)
    assert [p.name for p in scripts] == ["01_first.py", "02_second.py"]
    md = hooks.gallery(scripts, figures)
    text_first = md.split("??? example")[0]  # the first example's text, before its folded source
    assert "### First example: a title" in text_first and "What it shows." in text_first
    assert "[--quick]" not in text_first and "python examples/01_first.py " in text_first
    assert "![First example: a title.](examples/01_first.png)" in md
    assert "### Second" in md and "no figure in this build" in md
    assert '??? example "examples/01_first.py"' in md and "    x = 1" in md
