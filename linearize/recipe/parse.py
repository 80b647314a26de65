"""Building a :class:`~linearize.recipe.schema.Recipe` from YAML and ``key=value`` overrides, every value
checked against its annotation (errors name the key and the file)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from .schema import REQUIRED_KEYS, Recipe, RecipeError


# --- building from plain data ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as err:
                errors.append(err)
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads ``1e-3`` (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"recipe field {key} has an unsupported annotation {tp!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    where = prefix or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        bad = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise RecipeError(f"unknown key '{bad}'; keys of {where}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from err


def recipe_from_dict(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a plain mapping into a :class:`Recipe`; errors name the key and ``origin``."""
    try:
        return _build(Recipe, data)
    except RecipeError as err:
        raise RecipeError(f"{origin}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``lora.r=16`` -> (["lora", "r"], 16). The value is read as YAML (``[0, 5]``, ``null``, ``true``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} is not of the form dotted.key=value (e.g. lora.r=16)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in a copy of ``data`` (the nested recipe mapping)."""
    import copy

    out = copy.deepcopy(data) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or start from the defaults when ``path`` is None) and apply overrides.

    Errors are :class:`RecipeError` (a ``ValueError``) naming the bad key and the file, or
    ``command line`` when an override was at fault. The keys of :data:`REQUIRED_KEYS` must be set.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of settings, got {type(data).__name__}")
        origin = str(path)
        recipe_from_dict(data, origin)  # report file errors as file errors, before overrides
        launch = data.get("accelerate_config")
        if isinstance(launch, str) and not Path(launch).is_absolute():
            data["accelerate_config"] = str((path.parent / launch).resolve())
    if overrides:
        data = apply_overrides(data, overrides)
        origin = f"{origin} with command-line overrides {' '.join(overrides)}"
    recipe = recipe_from_dict(data, origin)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise RecipeError(f"{origin}: missing required {'keys' if len(missing) > 1 else 'key'} "
                          f"{', '.join(missing)}: set {'; '.join(REQUIRED_KEYS[k] for k in missing)} "
                          "(in the file or as key=value; see linearize finetune --help)")
    return recipe
