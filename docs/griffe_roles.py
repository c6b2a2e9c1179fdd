"""griffe extension for the API reference: the docstrings' reStructuredText markup as Markdown.

The docstrings are numpy style with a little reStructuredText, which Markdown would show literally:

* Sphinx cross-reference roles (``:class:`~neurodyn.core.term.ControlTerm```, ``:func:`neurodyn.solve```) become
  inline code of their target (the last component for a ``~`` target);
* a paragraph ending in ``::`` (a literal block follows) ends in ``:``;
* simple tables (columns under ``=====  =====`` borders) become pipe tables;
* doctest examples outside an ``Examples`` section (where griffe makes them code itself) become fenced code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")
BORDER = re.compile(r"^( *)(=+)( +=+)+ *$")


def _code(m: re.Match) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, cols: list[tuple[int, int]]) -> list[str]:
    out = []
    for i, (start, _) in enumerate(cols):
        end = cols[i + 1][0] if i + 1 < len(cols) else len(line)
        out.append(line[start:end].strip())
    return out


def simple_tables(text: str) -> str:
    """Every reStructuredText simple table (three borders: top, under the header, bottom) as a pipe table."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        borders = [j for j in range(i, len(lines)) if lines[j].strip() and BORDER.match(lines[j])][:3] if m else []
        if len(borders) < 3 or borders[1] != borders[0] + 2 or any(not lines[j].strip() for j in
                                                                       range(borders[0], borders[2])):
            out.append(lines[i])
            i += 1
            continue
        cols = _columns(lines[i])
        indent = m.group(1)
        header = _cells(lines[i + 1], cols)
        rows: list[list[str]] = []
        for line in lines[borders[1] + 1:borders[2]]:
            cells = _cells(line, cols)
            if rows and not cells[0]:  # a continuation line: its text joins the row above
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(cols))
        out.extend(indent + "| " + " | ".join(r) + " |" for r in rows)
        i = borders[2] + 1
    return "\n".join(out)


SECTION = re.compile(r"^-{3,}$")


def doctest_blocks(text: str) -> str:
    """Fence each run of doctest lines (``>>>``, ``...`` and the output up to a blank line) outside a numpy
    ``Examples`` section."""
    lines = text.split("\n")
    out: list[str] = []
    in_examples = False
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and SECTION.match(lines[i + 1].strip()) and lines[i].strip():
            in_examples = lines[i].strip() == "Examples"
        if not in_examples and lines[i].lstrip().startswith(">>>"):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [indent + "```python", *lines[i:j], indent + "```"]
            i = j
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def to_markdown(text: str) -> str:
    text = ROLE.sub(_code, text)
    if ">>>" in text:
        text = doctest_blocks(text)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    text = re.sub(r"^(\s*)::$", "", text, flags=re.M)
    return simple_tables(text) if "==" in text else text


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
