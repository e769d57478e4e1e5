"""The documentation keeps up with the code: a page per method, and no references to documents outside the repo.

The site itself is built by ``make docs`` (``mkdocs build --strict``), which CI runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from vitlens.explainers import EXPLAINERS

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in EXPLAINERS:
        page = ROOT / "docs" / "methods" / f"{name}.md"
        assert page.is_file(), f"no docs/methods/{name}.md"
        assert f"methods/{name}.md" in nav, f"methods/{name}.md is not in mkdocs.yml's nav"
        assert f"<!-- vitlens:method {name} -->" in page.read_text(), f"{page.name} lacks its generated table"


def test_every_method_documents_its_options():
    for name, cls in EXPLAINERS.items():
        doc = cls.__doc__ or ""
        for option in cls.options():
            documented = re.search(rf"^\s+{option}( \([^)]*\))?:", doc, flags=re.M)
            assert documented, f"{name}: option {option} is not described under Args:"


def test_no_references_to_documents_outside_the_repository():
    internal = ["SPEC" + ".md", "SPEC" + " §", "NOTES" + ".md", "ARCHITECTURE" + ".md"]
    found = [
        f"{path.relative_to(ROOT)}: {word}"
        for folder in ("src", "tests", "examples", "docs", "benchmarks")
        for path in [*(ROOT / folder).rglob("*"), *ROOT.glob("*.md")]
        if path.suffix in (".py", ".md")
        for word in internal
        if word in path.read_text(encoding="utf-8")
    ]
    assert not found, found
