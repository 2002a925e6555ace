"""`cotune config --defaults`: the whole schema as a TOML file with comments.

Every key of every section at its default, each preceded by its help text (the
docstring under the field in `schema.py`) and what values are valid. A key whose
default is unset (None) is written commented out, as is a whole optional table
(`model.lora`, `kd.teacher_lora`) and an example entry of a list of tables
(`federated.devices`): parsed back, the file is the default config.
"""

from __future__ import annotations

import textwrap
import types
import typing
from typing import Any

import tomli_w
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cotune.config.schema import Config

WIDTH = 92
HEADER = """\
# cotune config: every key with its default (`cotune config --defaults`).
# A config names only what it changes; sections a method does not read are ignored with
# a warning. Paths are relative to the config file's folder. Keys shown commented out
# are unset by default; remove the "# " to set one.
"""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (`X`, `X | None`, `list[X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literals(arg)]


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _bounds(field: FieldInfo) -> list[str]:
    out = []
    for m in field.metadata:
        for kind, sign in ((Ge, ">="), (Gt, ">"), (Le, "<="), (Lt, "<")):
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, kind.__name__.lower())}")
        if isinstance(m, MinLen):
            text = field.annotation is str
            out.append("non-empty" if text else f"at least {m.min_length} entries")
    return out


def _valid(field: FieldInfo) -> str:
    """What values a field accepts: its choices or its bounds (empty: any of its type)."""
    choices = _literals(field.annotation)
    parts = []
    if choices:
        many = "list of" if _is_list(field.annotation) else "one of"
        parts.append(f"{many}: {', '.join(map(str, choices))}")
    parts += _bounds(field)
    return "; ".join(parts)


def _comment(text: str, indent: str = "") -> list[str]:
    text = " ".join(text.split())
    width = WIDTH - len(indent) - 2
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width, break_on_hyphens=False)]


def _value(key: str, value: Any) -> str:
    return tomli_w.dumps({key: value}).strip()


def _field_lines(name: str, field: FieldInfo, value: Any, commented: bool = False) -> list[str]:
    help_text = field.description or ""
    valid = _valid(field)
    lines = _comment(help_text + (f" [valid: {valid}]" if valid else ""))
    if value is None:
        lines.append(f"# {name} = (unset)")
    else:
        line = _value(name, value)
        lines.extend(f"# {part}" if commented else part for part in line.splitlines())
    return lines


def _example(model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` that have a value by default (for commented tables)."""
    # model_construct: the defaults without the validators (a table may need keys set)
    dump = model.model_construct().model_dump(mode="json")
    return {k: v for k, v in dump.items() if v is not None}


def _table(path: str, model: type[BaseModel], instance: BaseModel | None) -> list[str]:
    """A section (`instance` given) or a commented-out table of `model`'s keys."""
    commented = instance is None
    values = (instance or model.model_construct()).model_dump(mode="json")
    lines = [""]
    lines += _comment(model.__doc__ or "")
    lines.append(f"# [{path}]" if commented else f"[{path}]")
    nested: list[list[str]] = []
    for name, field in model.model_fields.items():
        value = values.get(name)
        inner = _models_in(field.annotation)
        if inner and isinstance(value, list):  # a list of tables: [] and an example entry
            lines += _field_lines(name, field, value, commented)
            nested.append(_entry(f"{path}.{name}", inner[0]))
        elif inner and value is None:  # an optional table: its keys, commented out
            nested.append(_optional(f"{path}.{name}", field, inner[0]))
        elif inner and isinstance(value, dict):  # a table with defaults: [path.name]
            sub = getattr(instance, name) if instance is not None else None
            nested.append(_table(f"{path}.{name}", inner[0], sub))
        else:
            lines += _field_lines(name, field, value, commented)
    for block in nested:
        lines += block
    return lines


def _keys(model: type[BaseModel]) -> list[str]:
    """`model`'s keys at their defaults, commented out, each after its help."""
    example = _example(model)
    lines = []
    for key, sub in model.model_fields.items():
        valid = _valid(sub)
        lines += _comment((sub.description or "") + (f" [valid: {valid}]" if valid else ""))
        lines.append(f"# {_value(key, example[key])}" if key in example else f"# {key} = (unset)")
    return lines


def _optional(path: str, field: FieldInfo, model: type[BaseModel]) -> list[str]:
    lines = ["", *_comment(f"{path} (unset by default): {field.description or ''}")]
    return [*lines, f"# [{path}]", *_keys(model)]


def _entry(path: str, model: type[BaseModel]) -> list[str]:
    lines = ["", *_comment(f"{path}: one [[{path}]] table per entry, with these keys")]
    return [*lines, f"# [[{path}]]", *_keys(model)]


def defaults_toml() -> str:
    """The default config as TOML, with each key's help and valid values as comments."""
    cfg = Config()
    lines = [HEADER.rstrip("\n")]
    sections = []
    for name, field in Config.model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            sections.append((name, value))
        else:
            lines.append("")
            lines += _field_lines(name, field, value)
    for name, section in sections:
        lines += _table(name, type(section), section)
    return "\n".join(lines) + "\n"
