"""Booleans are not numbers: one validator that configuration base classes share.

Why: Python's ``bool`` is a subclass of ``int`` and Pydantic's lax mode converts ``true`` to ``1`` (and
``1.0``), so ``max_steps: true`` in a YAML file would silently train one step. Pydantic's strict mode
would also refuse the string ``"2"`` that ``${STEPS:-2}`` expands to, so instead every integer and float
field refuses a boolean, and nothing else changes.

Example::

    class Config(BaseModel):
        steps: int = 1

        _no_bools = field_validator("*", mode="before")(refuse_bool_for_numbers)

    Config(steps=True)   # ValidationError: must be an integer, not a boolean (got true)
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationInfo

__all__ = ["bool_problem", "refuse_bool_for_numbers"]

_NUMBERS = (int, float)
_SEQUENCES = (list, tuple, set, frozenset)


@functools.cache
def _leaf_types(annotation: Any) -> frozenset[Any]:
    """The scalar types (and model classes) a value of ``annotation`` may be, containers excluded."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return frozenset().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return frozenset(type(v) for v in typing.get_args(annotation))
    if origin is not None:  # list[int], dict[str, float] ...: the container itself
        return frozenset({origin})
    return frozenset({annotation})


def _numeric_not_bool(annotation: Any) -> str | None:
    """'an integer' / 'a number' when the annotation takes numbers but no boolean; else None."""
    leaves = _leaf_types(annotation)
    if bool in leaves or Any in leaves or not leaves & set(_NUMBERS):
        return None
    return "a number" if float in leaves else "an integer"


def _element_types(annotation: Any) -> list[Any]:
    """The element annotations of the sequence types inside ``annotation`` (``list[int] | None`` -> [int])."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _element_types(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [e for a in typing.get_args(annotation) for e in _element_types(a)]
    if origin in _SEQUENCES:
        return [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return []


def bool_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is refused for a field of type ``annotation`` (a boolean where a number belongs)."""
    if isinstance(value, bool):
        kind = _numeric_not_bool(annotation)
        return f"must be {kind}, not a boolean (got {str(value).lower()})" if kind else None
    if isinstance(value, list | tuple):
        elements = _element_types(annotation)
        if elements and not any(_numeric_not_bool(e) is None for e in elements):
            for i, item in enumerate(value):
                if isinstance(item, bool):
                    return f"item {i} must be {_numeric_not_bool(elements[0])}, not a boolean (got {str(item).lower()})"
    return None


def refuse_bool_for_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A ``field_validator("*", mode="before")`` body: raise ValueError for a boolean in a number field."""
    field = cls.model_fields.get(info.field_name or "")
    if field is not None:
        problem = bool_problem(field.annotation, value)
        if problem:
            raise ValueError(problem)
    return value
