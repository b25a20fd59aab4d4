"""Typed hyperparameters: declared once per plugin, parsed from the command line, validated.

A plugin declares a frozen dataclass whose fields are made with :func:`param`; the CLI
syntax ``name:key=value,key=value`` and the Optuna search spaces are derived from it::

    @dataclass(frozen=True)
    class Params:
        c: float = param(0.4, "conflict-aversion radius", low=0.0, high=1.0, high_open=True)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from bench.errors import ConfigError

_TOKEN = re.compile(r"^(?P<name>[A-Za-z0-9_.@-]+)(?::(?P<args>.*))?$")


class ParamError(ConfigError, ValueError):
    """A bad hyperparameter: unknown name, wrong type or out of range."""


def param(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with a help text and an optional valid range or set of choices."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For plugins without hyperparameters."""


def describe_range(f: dataclasses.Field[Any]) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    low, high = m.get("low"), m.get("high")
    if low is None and high is None:
        return "any " + _type_name(f)
    left = "(" if m.get("low_open") else "["
    right = ")" if m.get("high_open") else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _type_name(f: dataclasses.Field[Any]) -> str:
    return getattr(f.type, "__name__", str(f.type))


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"cagrad:c=0.5,rescale=1"`` -> ``("cagrad", {"c": "0.5", "rescale": "1"})``."""
    match = _TOKEN.match(spec.strip())
    if not match:
        raise ParamError(f"cannot parse {spec!r}: expected NAME or NAME:key=value,key=value")
    overrides: dict[str, str] = {}
    for item in filter(None, (match["args"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"cannot parse {item!r} in {spec!r}: expected key=value")
        overrides[key.strip()] = value.strip()
    return match["name"], overrides


def build(cls: type, overrides: Mapping[str, Any], owner: str) -> Any:
    """Instantiate the params dataclass ``cls`` from string or typed overrides, validated."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        valid = ", ".join(f"{n} ({describe_range(f)})" for n, f in fields.items()) or "none"
        raise ParamError(f"{owner}: unknown parameter {', '.join(unknown)}; valid parameters: {valid}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], owner, k) for k, v in overrides.items()}
    instance = cls(**values)
    for f in fields.values():
        check(owner, f, getattr(instance, f.name))
    return instance


def check(owner: str, f: dataclasses.Field[Any], value: Any) -> None:
    m = f.metadata
    bad = False
    if m.get("choices") is not None:
        bad = value not in m["choices"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = m.get("low"), m.get("high")
        if low is not None:
            bad |= value <= low if m.get("low_open") else value < low
        if high is not None:
            bad |= value >= high if m.get("high_open") else value > high
        bad |= value != value  # NaN
    if bad:
        raise ParamError(f"{owner}: parameter {f.name}={value!r} is out of range; valid: {describe_range(f)}")


def _coerce(value: Any, hint: Any, owner: str, key: str) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if origin is Literal:
            for choice in typing.get_args(hint):
                if str(choice) == value:
                    return choice
            raise ValueError(value)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if value.lower() in ("none", "null") and len(args) < len(typing.get_args(hint)):
                return None
            return _coerce(value, args[0], owner, key)
        if origin is tuple:
            (inner, *_rest) = typing.get_args(hint)
            return tuple(_coerce(v, inner, owner, key) for v in value.split("/") if v)
        return value
    except ValueError:
        raise ParamError(f"{owner}: parameter {key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}


def non_default(params: Any) -> dict[str, Any]:
    """The fields whose value differs from the declared default."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if value != f.default:
            out[f.name] = value
    return out


def format_spec(name: str, params: Any) -> str:
    """Canonical ``name:key=value`` with only non-default values, keys sorted."""
    changed = non_default(params)
    if not changed:
        return name
    return name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(changed.items()))


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value)
