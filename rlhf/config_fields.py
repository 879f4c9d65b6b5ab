"""What a config dataclass's fields say about themselves: each value checked against its annotation (types, finite
numbers, Literal choices), the docstring under each field, and a markdown table of them (the README's config tables
and the recipes' --help)."""

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from typing import Literal


def _check_value(value, annotation, name: str) -> str | None:
    """Why ``value`` does not fit ``annotation`` (None when it does): types, finite numbers, Literal choices."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(annotation)
        if value is None and type(None) in arms:
            return None
        reasons = [_check_value(value, arm, name) for arm in arms if arm is not type(None)]
        return None if any(r is None for r in reasons) else reasons[0]
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"{name}={value!r} must be one of {list(choices)}."
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return f"{name}={value!r} must be a list."
        (item,) = typing.get_args(annotation) or (object,)
        return next((r for i, v in enumerate(value) if (r := _check_value(v, item, f"{name}[{i}]"))), None)
    if origin is dict:
        return None if isinstance(value, dict) else f"{name}={value!r} must be a mapping."
    if annotation is bool:
        return None if isinstance(value, bool) else f"{name}={value!r} must be true or false."
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name}={value!r} must be an integer (got {type(value).__name__})."
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} must be a number (got {type(value).__name__})."
        return None if math.isfinite(value) else f"{name}={value} must be finite."
    if annotation is str:
        return None if isinstance(value, str) else f"{name}={value!r} must be a string."
    return None


def field_type_errors(config) -> list[str]:
    """Every field of a config dataclass checked against its annotation."""
    hints = typing.get_type_hints(type(config))
    return [error for f in dataclasses.fields(config)
            if (error := _check_value(getattr(config, f.name), hints[f.name], f.name)) is not None]


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def markdown_table(cls: type, only: list[str] | None = None) -> str:
    """A markdown table of the fields of ``cls`` (or just ``only``): name, type, default, meaning."""
    docs = field_docs(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        type_name = _type_name(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {type_name} | `{default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)
