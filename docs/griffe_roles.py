"""griffe extension for the API reference: Sphinx cross-reference roles in docstrings as inline code.

The docstrings use Sphinx roles (``:class:`~neurodyn.core.term.ControlTerm```, ``:func:`neurodyn.solve```), which
Markdown would show literally. Each becomes inline code of its target (the last component for a ``~`` target).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _code(m: re.Match) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
