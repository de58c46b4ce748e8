"""The config's two texts, made from the settings tables: install's template and the docs table.

Neither is typed by hand: every key, its default and its note come from the declarations
(resolver/settings.py, resolver/spec_kms.py, resolver/spec_stored.py) in the order of
resolver/config.py COMPONENTS. scripts/generate.py writes the docs table into docs/resolver.md
between DOCS_START and DOCS_END; tests/unit/test_generated.py fails when it is stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

from resolver.config import COMPONENTS
from resolver.settings import Meta, declared, toml_keys

DOCS_START = (
    "<!-- config-table:start (scripts/generate.py writes this from the settings tables) -->"
)
DOCS_END = "<!-- config-table:end -->"
NOTE_COLUMN = 35
HEADER = """\
# kmskeys-resolver config (docs/resolver.md). Root-owned; unknown keys and bad values are errors.
# Every key is shown with its default. Tables come after every top-level key.
"""


def toml_value(value: object) -> str:
    """A TOML literal for a bool, number, str, Path or sequence of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def template(values: Mapping[str, object] | None = None) -> str:
    """The config install writes: every key commented out at its default (or an example),
    except the keys in `values`, which are set."""
    values = values or {}
    lines = [HEADER]
    tables: list[str] = []
    for component in COMPONENTS:
        lines.append(f"\n# --- {component.title}\n")
        for f, meta in declared(component.settings):
            if meta.rule_keys:
                tables.append("\n".join(f"# {line}" for line in meta.examples[0].splitlines()))
                continue
            for index, key in enumerate(toml_keys(f, meta)):
                if key in values:
                    lines.append(f"{key} = {toml_value(values[key])}\n")
                    continue
                shown = _example(f, meta, index)
                note = meta.note if index == 0 else ""
                lines.append(_commented(f"{key} = {shown}", note))
    lines.append("\n# Per-name policy: the first matching glob wins (docs/resolver.md). Any\n")
    lines.append("# section also takes allow_units, allow_cgroups, allow_exe (which programs).\n")
    lines.extend(f"{table}\n" for table in tables)
    return "".join(lines)


def docs_table() -> str:
    """The docs' reference of every key, one table per component, between the markers."""
    out = [DOCS_START, ""]
    for component in COMPONENTS:
        out += [f"**{component.title}**", "", "| key | default | meaning |", "|---|---|---|"]
        for f, meta in declared(component.settings):
            meaning = meta.meaning
            if meta.rule_keys:
                keys = f'`[{toml_keys(f, meta)[0]}."GLOB"]`'
                meaning += "; its keys: " + ", ".join(f"`{key}`" for key in meta.rule_keys)
            else:
                keys = ", ".join(f"`{key}`" for key in toml_keys(f, meta))
            out.append(f"| {keys} | {_shown_default(f, meta)} | {meaning} |")
        out.append("")
    out.append(DOCS_END)
    return "\n".join(out)


def replace_docs_table(text: str) -> str:
    """`text` (docs/resolver.md) with the table between the markers made anew."""
    head, found, rest = text.partition(DOCS_START)
    _, end, tail = rest.partition(DOCS_END)
    if not found or not end:
        raise ValueError("docs/resolver.md lacks the config-table markers")
    return head + docs_table() + tail


def _default(f: Field[Any]) -> object:
    return None if f.default is MISSING else f.default


def _example(f: Field[Any], meta: Meta, index: int) -> str:
    default = _default(f)
    if meta.examples and (default is None or default == ()):
        return meta.examples[min(index, len(meta.examples) - 1)]
    return toml_value(default)


def _shown_default(f: Field[Any], meta: Meta) -> str:
    if meta.shown is not None:
        return meta.shown
    default = _default(f)
    return "none" if default is None else f"`{toml_value(default)}`"


def _commented(line: str, note: str) -> str:
    if not note:
        return f"# {line}\n"
    return f"# {line}".ljust(NOTE_COLUMN - 1) + f" # {note}\n"
