"""Schemas with pydantic, errors in anoseg's words.

Every schema derives from :class:`Schema`: frozen, strict (no ``"1"`` or ``true`` for 1, no float for an
int), finite numbers, unknown fields forbidden. A field's ``description`` says what it must be ("a number
of CPUs per trial > 0"); without one the message is built from its type and bounds. A validator raises
:class:`FieldError` to name a field below the value it checks. :func:`config_error` turns the first error
of a pydantic ``ValidationError`` into one line ``SOURCE: FIELD.PATH: message; allowed: ...``.
"""
from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Tag, ValidationError
from pydantic.fields import FieldInfo

from anoseg.errors import ConfigError

__all__ = ["Schema", "FieldError", "config_error", "fail", "hint"]


class Schema(BaseModel):
    """Base of anoseg's schemas. ``example`` (optional) is shown when a mapping is missing or malformed."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)
    example: ClassVar[str] = ""


class FieldError(ValueError):
    """A validator's error about the field ``path`` below the value it validates ("" = that value)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def fail(source: str, path: str, message: str) -> ConfigError:
    """The ConfigError ``SOURCE: PATH: message`` (``SOURCE: message`` for the whole file)."""
    return ConfigError(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def hint(value: Any, allowed: Sequence[str] | Mapping[str, Any]) -> str:
    """A "did you mean" for a typo: allowed names holding the value, else the closest spelling."""
    text, allowed = str(value), [str(a) for a in allowed]
    close = [a for a in allowed if len(text) >= 3 and text in a and text != a][:3]
    if not close:
        close = difflib.get_close_matches(text, allowed, n=1, cutoff=0.7)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def config_error(exc: ValidationError, source: str, schema: type[BaseModel]) -> ConfigError:
    """The first error of `exc` (raised validating `schema`) as a one-line ConfigError naming `source`,
    the field path (``space.heads.padim.n_features.low``, ``objective[0].metric``) and what is allowed."""
    error = exc.errors(include_url=False)[0]
    loc, kind, value = error["loc"], error["type"], error.get("input")
    path, owner, info = _locate(schema, loc)
    if kind in ("value_error", "assertion_error"):
        cause = error["ctx"]["error"]
        return fail(source, _join(path, getattr(cause, "path", "")), str(cause))
    if kind == "extra_forbidden":
        allowed = list(owner.model_fields)
        return fail(source, path, f"unknown field {loc[-1]!r}{hint(loc[-1], allowed)}; allowed: {', '.join(allowed)}")
    if kind == "missing":
        return fail(source, path, "missing (required)")
    if info is None:
        return fail(source, path, error["msg"])
    tp, nullable, description, constraints = _unwrap(info)
    if kind == "literal_error":
        allowed = [str(a) for a in typing.get_args(tp)]
        return fail(source, path, f"unknown {loc[-1]} {value!r}{hint(value, allowed)}; allowed: {', '.join(allowed)}")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        example = tp.example if issubclass(tp, Schema) else ""
        return fail(source, path, f"expected a mapping with fields {', '.join(tp.model_fields)}{example}, "
                    f"got {value!r}")
    want = description or _want(tp, constraints) + (" or null" if nullable else "")
    return fail(source, path, f"must be {want}, got {value!r}{_yaml_number(value, tp)}")


def _locate(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None, FieldInfo | None]:
    """Walk `loc` through the schema's types: (display path, the last model passed, the field at the end;
    None for a field the model does not have). Union tags in `loc` are followed but not shown."""
    info: FieldInfo | None = FieldInfo.from_annotation(schema)
    owner: type[BaseModel] | None = None
    path = ""
    for i, item in enumerate(loc):
        tp = _unwrap(info)[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, info = tp, tp.model_fields.get(item)
            path = _join(path, str(item))
            if info is None:
                break
        elif origin in (dict, Mapping):
            key = loc[i + 1:i + 2] == ("[key]",)  # the key itself is wrong
            info, path = FieldInfo.from_annotation(args[0 if key else 1]), _join(path, str(item))
            if key:
                break
        elif origin in (list, tuple, Sequence):
            info, path = FieldInfo.from_annotation(args[0]), f"{path}[{item}]"
        elif origin in (typing.Union, types.UnionType):
            member, tagged = _member(args, item)
            if member is None or (not tagged and i == len(loc) - 1):
                break  # a type name of a plain union (int | float): the error concerns the whole value
            info = FieldInfo.from_annotation(member)
        else:
            break
    return path, owner, info


def _member(args: tuple[Any, ...], item: Any) -> tuple[Any, bool]:
    """The union member `item` names: (member, True) by its Tag, (member, False) by its type name."""
    for arg in args:
        if any(isinstance(m, Tag) and m.tag == item for m in getattr(arg, "__metadata__", ())):
            return arg, True
    for arg in args:
        if getattr(typing.get_origin(arg) or arg, "__name__", None) == item:
            return arg, False
    return None, False


def _unwrap(info: FieldInfo) -> tuple[Any, bool, str | None, list[Any]]:
    """A field's (bare type, whether None is allowed, description, constraints), through Optional and Annotated."""
    tp, nullable = info.annotation, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        rest = tuple(a for a in typing.get_args(tp) if a is not type(None))
        tp, nullable = (rest[0] if len(rest) == 1 else typing.Union[rest]), True
    inner = FieldInfo.from_annotation(tp)
    return inner.annotation, nullable, info.description or inner.description, [*info.metadata, *inner.metadata]


def _join(path: str, sub: str) -> str:
    if not sub:
        return path
    if not path or sub.startswith("["):
        return path + sub
    return f"{path}.{sub}"


def _want(tp: Any, constraints: list[Any]) -> str:
    """What a value of type `tp` with these bounds is: "an integer in [1, 10]", "a number > 0"."""
    if set(typing.get_args(tp)) == {int, float}:
        kind = "a number"
    else:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
                tuple: "a list", dict: "a mapping"}.get(typing.get_origin(tp) or tp, "a valid value")
    bounds = {name: getattr(c, name) for c in constraints for name in ("ge", "gt", "le", "lt") if hasattr(c, name)}
    if "ge" in bounds and "le" in bounds:
        return f"{kind} in [{bounds['ge']}, {bounds['le']}]"
    signs = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    return kind + "".join(f" {sign} {bounds[name]}" for name, sign in signs if name in bounds)


def _yaml_number(value: Any, tp: Any) -> str:
    """Explain PyYAML's YAML 1.1 float rule to a number field given 1e-3 (no dot), which it reads as text."""
    if not isinstance(value, str) or "e" not in value.lower() or not ({tp, *typing.get_args(tp)} & {int, float}):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML reads it as text: write it with a dot, e.g. 1.0e-3, or as 0.001)"
