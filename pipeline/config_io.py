"""Configuration text -> typed values: YAML files, `key=value` overrides, dataclass sections.

Generic: it knows dataclasses and type hints, not the pipeline's sections (pipeline/config.py).
A section class may define `normalise_keys(data, where) -> data` to accept older spellings of
its keys before unknown keys are refused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` names (nested sections, lists, bool, int, float, str, dict)."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin is list:
        (item_hint,) = get_args(hint)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and number != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if hint is str:
        if value is None:
            return ""
        return str(value)
    if hint is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    normalise = getattr(cls, "normalise_keys", None)
    if normalise is not None:
        data = normalise(data, where)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def set_field(target: Any, key: str, value: Any, dotted: str) -> None:
    """Set one field of a section from an override's text (or a value)."""
    if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown setting {dotted!r}")
    hint = get_type_hints(type(target))[key]
    if isinstance(value, str) and get_origin(hint) is not list and hint is not str:
        value = parse_value(value, dotted)
    setattr(target, key, coerce(value, hint, dotted))


def parse_value(value: Any, dotted: str) -> Any:
    """An override's text as YAML reads it (`0.25` a number, `{a: 1}` a mapping)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{dotted}: {value!r} is not a valid value ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = str(getattr(exc, "problem", None) or exc)
    if "'\\t'" in problem:  # PyYAML's "found character '\t' that cannot start any token"
        problem = "a tab character: YAML indents with spaces only"
    return " ".join(problem.split())


def read_yaml_file(path: Path) -> Any:
    """A YAML file's contents; a syntax error becomes one ConfigError naming the file and the line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
