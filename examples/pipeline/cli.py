"""Turn a flat dataclass config into command-line flags, with each field's docstring as its help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal after the annotation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of an annotation like ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, choices: dict[str, tuple] | None = None) -> None:
    """One flag per field: ``--field-name VALUE``; a bool defaulting to True gets ``--no-field-name``,
    one defaulting to False gets ``--field-name``. Defaults come from the parser's set_defaults."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    choices = choices or {}
    instance = cls()
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(hints[f.name])
        flag = f.name.replace("_", "-")
        default = getattr(instance, f.name)
        help_text = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            if default:
                parser.add_argument(f"--no-{flag}", dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(f"--{flag}", dest=f.name, action="store_true", help=help_text)
        else:
            parse = _parse_optional(kind) if optional else kind
            parser.add_argument(f"--{flag}", dest=f.name, type=parse, choices=choices.get(f.name), help=help_text)
    parser.set_defaults(**{f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)})


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})
