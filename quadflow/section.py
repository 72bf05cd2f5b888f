"""The base of every settings model: frozen, no unknown keys, numbers that are numbers.

YAML reads `true` as a boolean and pydantic would take it for the integer 1 or the float 1.0,
so `budget_tokens: true` would silently mean one token; NaN passes every `ge`/`le` check of a
float that has none. A Section refuses both, naming the setting. No quadflow imports: both
quadflow.settings and quadflow.objectstore build on it.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean (bool itself, or a union or container of it)."""
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Literal, typing.Annotated):
        return any(_accepts_bool(a) for a in typing.get_args(annotation))
    return annotation is Any


def _bool_inside(value: Any) -> str | None:
    """The key of a boolean value of a mapping, e.g. `weights: {dsir: true}`, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, bool):
                return str(k)
    return None


class Section(BaseModel):
    """Frozen, closed to unknown keys, finite floats, and no booleans where a number belongs."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or _accepts_bool(field.annotation):
            return value
        if isinstance(value, bool):
            raise ValueError(f"{value} is a boolean, not a {_kind(field.annotation)}")
        origin = typing.get_origin(field.annotation)
        if origin is dict and (key := _bool_inside(value)) is not None:
            raise ValueError(f"{key} = {value[key]} is a boolean, not a number")
        return value


def _kind(annotation: Any) -> str:
    args = {a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)}
    if args <= {int}:
        return "whole number"
    if args <= {int, float} or args <= {float}:
        return "number"
    return "value of this setting"
