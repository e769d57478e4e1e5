"""The package's layers import one way, and its top-level parts form no cycle (read from the source, no import)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vitlens"

#: Lowest first. A module may import its own layer and the layers below, never one above.
LAYERS: list[set[str]] = [
    {"errors", "_version", "_utils", "options", "trainables", "io", "data", "bcos", "pretrained"},
    {"backbones"},
    {"models"},
    {"explainers"},
    {"training", "metrics"},
    {"viz"},
    {"files", "bench", "demo", "cli", "__main__", ""},  # "" is the package itself (lazy re-exports)
]

#: The imports that go upwards on purpose, each inside the one function that needs it.
UPWARD = {
    ("explainers.explanation", "viz.overlay"): "Explanation.overlay() draws with the package's one overlay style",
    ("explainers.explanation", "viz.show"): "Explanation.show() is vitlens.show for one explanation",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports(path: Path) -> set[str]:
    """Every ``vitlens`` module ``path`` imports, at any depth (functions included), relative to the package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif (node.module or "").startswith("vitlens"):
                target = node.module.removeprefix("vitlens").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` names a module when x is one
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if is_module(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("vitlens").lstrip(".") for a in node.names if a.name.startswith("vitlens")}
    return found - {name}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module!r} belongs to no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_goes_down_or_sideways():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module) and (module, target) not in UPWARD:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up a layer: " + ", ".join(sorted(upward))


def test_the_allowed_upward_imports_still_exist_and_stay_inside_functions():
    g = graph()
    for (module, target), why in UPWARD.items():
        assert target in g[module], f"{module} no longer imports {target} ({why}): remove it from UPWARD"
        tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
        top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not any(m and target.endswith(m.lstrip(".")) for m in top_level), f"{module}: import {target} lazily"


def test_top_level_parts_form_no_cycle():
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        edges.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    for part in edges:
        edges[part].discard(part)
    for a, b in UPWARD:  # the documented upward imports are the only way back
        edges[a.split(".")[0]].discard(b.split(".")[0])
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for part in sorted(edges):
        if part not in state:
            visit(part, [])


def test_the_command_line_is_a_leaf():
    leaves = LAYERS[-1] - {""}
    for module, targets in graph().items():
        if module.split(".")[0] in leaves or module == "":
            continue
        assert not {t.split(".")[0] for t in targets} & leaves, f"{module} imports the command line"
