"""Command-line flags built from a config dataclass, so each default and help text is written once.

``add_flags(parser, DemoConfig, names)`` adds one ``--kebab-case`` flag per field: the type (and a
``Literal``'s choices) from the annotation, the default from the field, the help from
``field(metadata={"help": ...})`` or else the field's docstring, followed by ``(default X)``. A field
whose text needs its own parser names it as ``metadata["parse"]``. ``from_flags(DemoConfig, args)``
builds the config back from the parsed namespace.

Standard library only, and in ``avgctl.protocol`` because both sides' entry points use it: the
worker's demo must not load server code, and the ``avgctl`` command must not load torch (which
``import avgctl.worker`` does).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

ConfigT = TypeVar("ConfigT")

_VALUE_TYPES = (int, float, str, Path)


def flag_name(field_name: str) -> str:
    """The flag for a field: ``job_id`` -> ``--job-id``."""
    return "--" + field_name.replace("_", "-")


def argument_options(annotation: Any, default: Any = None) -> dict[str, Any]:
    """``add_argument`` keywords for a value of type ``annotation``: ``X | None`` parses as ``X``, a
    ``Literal`` gives ``choices``, a ``bool`` a switch (``--no-x`` too when it defaults to True)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        values = [a for a in args if a is not type(None)]
        if len(values) != 1:
            raise TypeError(f"cannot make a flag for {annotation!r}: give the field metadata['parse']")
        return argument_options(values[0], default)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation in _VALUE_TYPES:
        return {"type": annotation}
    raise TypeError(f"cannot make a flag for {annotation!r}: give the field metadata['parse']")


def with_default(text: str | None, default: Any) -> str | None:
    """``text`` followed by ``(default X)``; switches and fields without a default show none."""
    if default is None or isinstance(default, bool):
        return text
    return f"{text} (default {default})" if text else f"default {default}"


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written below ``cls``'s fields, each as one line (``code`` marks dropped)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (an interactive session, a frozen app)
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            first_paragraph = inspect.cleandoc(after.value.value).split("\n\n")[0]
            docs[node.target.id] = " ".join(first_paragraph.replace("``", "").split()).removesuffix(".")
    return docs


def add_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None) -> None:
    """Add a flag per field of the dataclass ``cls`` (only ``names``, in that order, when given)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for name in fields if names is None else names:
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            default, given = f.default, {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            given = {"default": default}
        else:
            default, given = None, {"required": True}
        parse = f.metadata.get("parse")
        options = {"type": parse} if parse is not None else argument_options(hints[name], default)
        text = f.metadata.get("help", docs.get(name))
        parser.add_argument(flag_name(name), help=with_default(text, default), **options, **given)


def from_flags(cls: type[ConfigT], args: argparse.Namespace, **values: Any) -> ConfigT:
    """``cls`` from the parsed values of its fields' flags, plus ``values`` for the rest."""
    parsed = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**parsed, **values})
