"""``linearize finetune --help``: every recipe key with its type, default and documentation."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import yaml

from ..config import field_docs
from .parse import _hints, _type_name
from .schema import REQUIRED_KEYS, Recipe


# --- help text -----------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _help_lines(cls: type, prefix: str, width: int) -> list[str]:
    lines: list[str] = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {docs.get(f.name, '')}")
            lines.extend(_help_lines(tp, f"{key}.", width))
            continue
        default = _default(f)
        shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
        shown = shown.removesuffix("\n...").strip()
        if key in REQUIRED_KEYS:
            lines.append(f"  {key} ({_type_name(tp)}, required, e.g. {shown})")
        else:
            lines.append(f"  {key} ({_type_name(tp)}, default {shown})")
        doc = docs.get(f.name, "")
        if doc:
            lines.extend(textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      "))
    return lines


def recipe_help(width: int = 96) -> str:
    """Every recipe key with its type, default and documentation (the CLI's ``--help`` epilog)."""
    return "\n".join(_help_lines(Recipe, "", width))
