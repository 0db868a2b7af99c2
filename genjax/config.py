"""Command-line overrides and dict round-trips of (nested) frozen dataclass configs.

    override(cfg, ["model.d_model=128", "optim.lr=3e-4", "model.tie_embeddings=false",
                   "data.corpus=('a.txt', 'b.txt')", "run.mesh=data=2,fsdp=4"])

A value is parsed by its field's declared type: ``int``, ``float``, ``bool``
(true/false/1/0, any case), ``str`` (as written; quotes optional), ``None`` for
an Optional field (``none``/``null``), ``Literal`` choices, and containers
(tuples, lists, dicts) through ``ast.literal_eval``, their items checked against
the item types. Every assignment is checked before any is applied, and each
config is rebuilt once with all its changes, so ``__post_init__`` checks see the
final combination, never a half-applied one. A field given twice takes its
last value, so flags appended to a base command line win.

``to_dict`` / ``from_dict`` turn a config into nested JSON-able dicts and back
(tuples become lists and lists become tuples again where the field says so).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

DataclassT = TypeVar("DataclassT")

_TRUE, _FALSE = ("true", "1"), ("false", "0")
_NONE = ("none", "null")


class _Mismatch(Exception):
    """A value does not fit a type; turned into a ValueError naming the field."""


def override(cfg: DataclassT, assignments: Sequence[str]) -> DataclassT:
    """A copy of `cfg` with ``"section.field=value"`` assignments applied."""
    changes: dict[str, Any] = {}
    for assignment in assignments:
        dotted, sep, raw = assignment.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ValueError(
                f"bad override {assignment!r}: expected FIELD=VALUE, e.g. model.d_model=128"
            )
        owner, name = _locate(cfg, dotted)
        field_type = _field_types(type(owner))[name]
        if dataclasses.is_dataclass(getattr(owner, name)):
            raise ValueError(
                f"{dotted!r} is a config section; set its fields instead, e.g. {dotted}.FIELD=VALUE"
            )
        try:
            value = _parse(raw, field_type)
        except _Mismatch:
            raise ValueError(
                f"cannot set {dotted}={raw!r}: expected {_type_name(field_type)}"
            ) from None
        _nest(changes, dotted.split("."), value)
    return _apply(cfg, changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dicts of a config's constructor fields; tuples become lists (JSON-able)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def from_dict(cls: type[DataclassT], d: Mapping[str, Any]) -> DataclassT:
    """The config `cls` built from `to_dict` output (nested sections included)."""
    return _from_dict(cls, d, prefix="")


# ----------------------------------------------------------------------------- paths


def _init_fields(cls: type) -> list[str]:
    # Fields the constructor takes: the only ones dataclasses.replace can set.
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _field_types(cls: type) -> dict[str, Any]:
    # Resolves string annotations (``from __future__ import annotations``).
    return typing.get_type_hints(cls)


def _unknown(dotted: str, name: str, valid: list[str], prefix: str) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    where = f"of {prefix[:-1]!r}" if prefix else "at the top level"
    return ValueError(
        f"unknown config field {dotted!r}{hint}; valid fields {where}: {', '.join(valid)}"
    )


def _locate(cfg: Any, dotted: str) -> tuple[Any, str]:
    """The (possibly nested) config holding the field `dotted` names, and its name."""
    parts = dotted.split(".")
    owner, prefix = cfg, ""
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(owner):
            raise ValueError(
                f"unknown config field {dotted!r}: {prefix[:-1]!r} is a field of type "
                f"{type(owner).__name__}, not a config section"
            )
        valid = _init_fields(type(owner))
        if part not in valid:
            raise _unknown(dotted, part, valid, prefix)
        if i < len(parts) - 1:
            owner, prefix = getattr(owner, part), f"{prefix}{part}."
    return owner, parts[-1]


def _nest(changes: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        changes = changes.setdefault(part, {})
    changes[path[-1]] = value


def _apply(cfg: Any, changes: dict[str, Any]) -> Any:
    if not changes:
        return cfg
    updates = {
        k: _apply(getattr(cfg, k), v) if dataclasses.is_dataclass(getattr(cfg, k)) else v
        for k, v in changes.items()
    }
    return dataclasses.replace(cfg, **updates)


# ----------------------------------------------------------------------------- values


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "bool (true/false/1/0)"
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _parse(raw: str, tp: Any) -> Any:
    """A command-line string as a value of type `tp`."""
    text = raw.strip()
    if tp is Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return raw
    if _is_union(tp):
        return _first_fit(raw, tp, _parse)
    if tp is type(None):
        if text.lower() in _NONE:
            return None
        raise _Mismatch
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _Mismatch
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise _Mismatch from None
    if tp is str:
        return _unquote(raw)
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if text == str(choice) or _unquote(text) == choice:
                return choice
        raise _Mismatch
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise _Mismatch from None
    return _coerce(value, tp)


def _unquote(raw: str) -> str:
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if not isinstance(value, str):  # 'a', 'b' is a tuple, not one quoted string
            raise _Mismatch
        return value
    return text


def _first_fit(value: Any, tp: Any, convert) -> Any:
    # None first, so "none" never becomes the string "none" in a `str | None` field.
    args = sorted(typing.get_args(tp), key=lambda a: a is not type(None))
    for arg in args:
        try:
            return convert(value, arg)
        except _Mismatch:
            continue
    raise _Mismatch


def _coerce(value: Any, tp: Any) -> Any:
    """`value` (from literal_eval or JSON) checked against `tp`, sequences made as declared."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        return _first_fit(value, tp, _coerce)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool or tp is int or tp is str:
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if tp in (tuple, list) or origin in (tuple, list):
        return _coerce_sequence(value, origin or tp, args)
    if tp is dict or origin is dict:
        return _coerce_mapping(value, args)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _from_dict(tp, value, prefix="")
        raise _Mismatch
    if isinstance(value, tp):
        return value
    raise _Mismatch


def _coerce_sequence(value: Any, kind: type, args: tuple) -> tuple | list:
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if kind is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: fixed length
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    item = args[0] if args else Any
    return kind(_coerce(v, item) for v in value)


def _coerce_mapping(value: Any, args: tuple) -> dict:
    if not isinstance(value, Mapping):
        raise _Mismatch
    key_t, value_t = args or (Any, Any)
    return {_coerce(k, key_t): _coerce(v, value_t) for k, v in value.items()}


# ----------------------------------------------------------------------------- dicts


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _from_dict(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix[:-1] or cls.__name__}: expected a dict, got {type(d).__name__}")
    valid, types_ = _init_fields(cls), _field_types(cls)
    for key in d:
        if key not in valid:
            raise _unknown(prefix + key, key, valid, prefix)
    kwargs = {}
    for key, value in d.items():
        tp = types_[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            kwargs[key] = _from_dict(tp, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise ValueError(
                f"config field {prefix + key!r} = {value!r}: expected {_type_name(tp)}"
            ) from None
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in d
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{cls.__name__}: missing required config fields {missing}")
    return cls(**kwargs)


def add_set_flag(p: argparse.ArgumentParser, help: str, metavar: str = "SECTION.FIELD=VALUE"):
    """``--set A=1 B=2``: the assignments ``override`` takes. Every ``--set`` counts (a
    plain ``nargs="*"`` flag keeps only the last one), a later value of a field winning."""
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar=metavar, help=help)
