"""MkDocs hook: tables generated from the package itself, so that the pages cannot drift from the code.

A page asks for a table with a marker comment on a line of its own:

- ``<!-- vitlens:methods -->``: every registered explanation method (name, cost, scale, targets);
- ``<!-- vitlens:method NAME -->``: one method's paper, cost, display scale, meaning and targets;
- ``<!-- vitlens:metrics -->``: every registered evaluation metric (what it needs, direction, options);
- ``<!-- vitlens:models -->``: the named models shipped inside the package (``vitlens models``);
- ``<!-- vitlens:cli -->``: the ``--help`` of every command and subcommand.

The build also warns (an error under ``--strict``) when a registered method has no page under
``docs/methods/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.vitlens")
MARKER = re.compile(r"^<!-- vitlens:(\w+)(?: ([\w-]+))? -->$", flags=re.M)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _targets(cls) -> str:
    if not cls.class_specific:
        return "none: the map does not depend on the target"
    if cls.accepts_functions:
        return "classes and score functions"
    return "classes (not score functions)"


def methods_table() -> str:
    from vitlens.explainers import EXPLAINERS

    rows = ["| method | what the map means | cost | scale | targets |", "|---|---|---|---|---|"]
    for name, cls in sorted(EXPLAINERS.items()):
        rows.append(
            f"| [`{name}`]({name}.md) | {_cell(cls.meaning)} | {_cell(cls.cost)} | `{cls.scale}` | {_targets(cls)} |"
        )
    return "\n".join(rows)


def method_table(name: str) -> str:
    from vitlens.explainers import EXPLAINERS

    if name not in EXPLAINERS:
        raise PluginError(f"vitlens:method {name}: no such registered method")
    cls = EXPLAINERS[name]
    options = ", ".join(f"`{k}={v!r}`" for k, v in cls.options().items()) or "none"
    rows = [
        ("name", f'`{name}` (`vitlens.explain(model, images, method="{name}")`)'),
        ("class", f"`{cls.__module__}.{cls.__qualname__}`"),
        ("paper", _cell(cls.paper)),
        ("cost", _cell(cls.cost)),
        ("display scale", f"`{cls.scale}`"),
        ("meaning", _cell(cls.meaning)),
        ("targets", _targets(cls)),
        ("options (defaults)", options),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def metrics_table() -> str:
    from vitlens.metrics import METRICS

    rows = ["| metric | needs | better | options (defaults) | paper |", "|---|---|---|---|---|"]
    for name, cls in sorted(METRICS.items()):
        options = ", ".join(f"`{k}={v!r}`" for k, v in cls.options().items()) or "—"
        better = "higher" if cls.higher_is_better else "lower"
        needs = ", ".join(cls.needs) or "maps"
        rows.append(f"| `{name}` | {needs} | {better} | {_cell(options)} | {_cell(cls.paper)} |")
    return "\n".join(rows)


def models_table() -> str:
    from vitlens.pretrained import describe, names

    rows = ["| name | kind | trained from | input | figure | size | what it is |", "|---|---|---|---|---|---|---|"]
    for n in names():
        r = describe(n)
        size = "×".join(map(str, r["input_size"]))
        rows.append(
            f"| `{r['name']}` | {r['kind']} | {_cell(r['base'])} | {size} | {_cell(r['figure'])} | "
            f"{r['size_mb']:.1f} MB | {_cell(r['description'])} |"
        )
    return "\n".join(rows)


def _parsers(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, [*path, name])


def cli_help() -> str:
    from vitlens.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps at the terminal width
    parts = []
    for path, parser in _parsers(build_parser(), ["vitlens"]):
        parts.append(f"### `{' '.join(path)}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


TABLES = {"methods": methods_table, "metrics": metrics_table, "models": models_table, "cli": cli_help}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "method":
            return method_table(arg)
        if kind not in TABLES:
            raise PluginError(f"{page.file.src_path}: unknown marker vitlens:{kind}")
        return TABLES[kind]()

    return MARKER.sub(replace, markdown)


def on_files(files, config):
    from vitlens.explainers import EXPLAINERS

    pages = {f.src_uri for f in files.documentation_pages()}
    for name in sorted(EXPLAINERS):
        if f"methods/{name}.md" not in pages:
            log.warning(f"method {name!r} has no page docs/methods/{name}.md")
    return files
