"""Command-line options generated from the configuration dataclasses, so the CLI is never a third copy of them.

Each field becomes ``--field-name`` with the field's default, type and ``metadata["help"]``; ``metadata`` may also
give ``choices``, ``parse`` (a function from the command-line string to the field's value, applied after the
choices are checked) and ``flag`` (another option name; a bool field whose default is True and whose flag starts
with ``--no-`` is switched off by it). Nested dataclass fields (``UnlearnConfig.objective``) add their own fields'
options, and ``config_from_args`` builds the nested objects back.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _option_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _value_type(annotation) -> type:
    """The scalar type of an annotation like ``int``, ``float | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        origin = typing.get_origin(annotation)
    if origin is list:
        return _value_type(typing.get_args(annotation)[0])
    return annotation


def _is_nested(annotation) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type,
    *,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> None:
    """Add one option per field of ``config_class`` (and of its nested dataclass fields), except ``skip``."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip or field.metadata.get("cli") is False:
            continue
        annotation = hints[field.name]
        if _is_nested(annotation):
            add_config_arguments(parser, annotation, skip=skip, required=required)
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = field.metadata.get("help", "")
        name = _option_name(field)
        if annotation is bool:
            action = "store_false" if name.startswith("--no-") else "store_true"
            parser.add_argument(name, dest=field.name, action=action, help=help_text)
            continue
        kwargs: dict = {"dest": field.name, "help": help_text}
        if typing.get_origin(annotation) is list:
            kwargs["nargs"] = "+"
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        else:
            kwargs["type"] = _value_type(annotation)
        if field.name in required or (field.default is dataclasses.MISSING and "nargs" not in kwargs):
            kwargs["required"] = True
        elif "nargs" in kwargs and field.default_factory is not dataclasses.MISSING:
            kwargs["required"] = field.name in required
        else:
            kwargs["default"] = default
            if default is not None and help_text:
                kwargs["help"] = f"{help_text} (default {default})"
        parser.add_argument(name, **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace, **overrides):
    """Build ``config_class`` (nested dataclasses included) from parsed options; ``overrides`` win over them."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for field in dataclasses.fields(config_class):
        annotation = hints[field.name]
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif _is_nested(annotation):
            values[field.name] = config_from_args(annotation, args)
        elif hasattr(args, field.name):
            value = getattr(args, field.name)
            parse = field.metadata.get("parse")
            values[field.name] = parse(value) if parse is not None and value is not None else value
    return config_class(**values)
