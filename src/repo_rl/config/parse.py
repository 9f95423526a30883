"""Reading configuration input: YAML files (duplicate keys and alias bombs refused), dotted
``key.sub=value`` overrides, and coercion of nested dicts into the typed dataclasses of
:mod:`repo_rl.config`, with one-line errors that name the key."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from . import safe_yaml
from ..errors import ConfigError

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        return f"a mapping of names to {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the non-list options first so "a" stays a str for Union[str, list[str]].
        for a in sorted(args, key=lambda a: typing.get_origin(a) is list):
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if isinstance(value, str) and inner is str:
                return [value]
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if not isinstance(k, str) or k not in names:
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown key {prefix}{k}{hint} (valid keys under {prefix[:-1] or 'the top level'}: "
                f"{', '.join(names)})"
            )
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def merge_config(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` laid over ``base``, mapping by mapping; a mapping over a scalar is a ConfigError."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v, f"{prefix}{k}.")
        elif isinstance(v, dict) and out.get(k) is not None:
            # e.g. "train: 3" in the file and train.max_steps=5 on the command line
            raise ConfigError(f"{prefix}{k}: expected a mapping, got {out[k]!r}")
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``1e-6``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = safe_yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001
        # Besides YAMLError, PyYAML's tag constructors raise ValueError, TypeError, KeyError,
        # IndexError, AttributeError (!!float abc, !!bool abc, !!int, !!timestamp abc) and deep
        # nesting raises RecursionError: keep the text, _coerce then names the key.
        value = raw
    # YAML reads "1e-6" as a string; accept numeric literals Python understands.
    if isinstance(value, str):
        try:
            lit = ast.literal_eval(raw)
            if isinstance(lit, (int, float)) and not isinstance(lit, bool):
                value = lit
        except Exception:  # literal_eval raises several types on arbitrary text
            pass
    return key.split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = safe_yaml.load(text, _UniqueKeyLoader)  # duplicate keys and alias bombs stop here
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {p}:{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"config file {p}: invalid YAML (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - tag constructors: !!float abc, !!bool abc, !!int, !!timestamp 2026-13-45
        raise ConfigError(f"config file {p}: invalid YAML ({type(e).__name__}: {str(e)[:120]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections at the top level")
    return data


