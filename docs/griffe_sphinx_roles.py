"""Griffe extension: Sphinx cross-reference roles in docstrings become inline code for mkdocstrings.

The docstrings use ``:class:`Explanation``` / ``:func:`~vitlens.load_model``` (readable in ``help()`` and
IDEs); mkdocstrings renders Markdown, where such a role would show literally. ``~`` keeps the last name only,
as in Sphinx.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
